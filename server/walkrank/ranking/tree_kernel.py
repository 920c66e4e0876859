"""Numba kernels that score rows with a forest padded into perfect trees (see scorer.py).

Layout: tree t has `2**depth - 1` internal nodes stored level by level (children of node i
are 2i+1 and 2i+2) and `2**depth` leaves. A row goes right where `x >= threshold`, so one
level is `i = 2*i + 1 + (x[f[i]] >= t[i])` with no branch to mispredict. Shallower leaves were
copied into every padded leaf below them, so every row walks exactly `depth` levels.

Two choices make it fast (benchmarks/scoring.py measures it against xgboost and onnxruntime):
it walks 8 rows at once, independent dependency chains the CPU overlaps, where a plain loop
waits on each load; and its indices are unsigned, so numba skips the negative-index
wraparound code on every load.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Rows walked together: 8 index registers plus row bases still fit x86-64's 16 registers.
_INTERLEAVE = 8


@njit(nogil=True, cache=True)
def has_nan(rows: np.ndarray) -> bool:
    """True if any value of a C-contiguous float32 matrix is NaN."""
    flat = rows.ravel()
    # An explicit loop: it stops at the first NaN and allocates nothing.
    for k in range(flat.size):  # noqa: SIM110
        if flat[k] != flat[k]:
            return True
    return False


@njit(nogil=True, cache=True)
def _add_leaves(rows, features, thresholds, leaves, depth, out):
    """Adds every tree's leaf value to `out`; rows must be free of NaN."""
    n = rows.shape[0]
    n_cols = rows.shape[1]
    n_trees = features.shape[0]
    flat = rows.ravel()
    one = np.uint64(1)
    first_leaf = np.uint64((1 << depth) - 1)
    stride = np.uint64(n_cols)
    r = 0
    while r + _INTERLEAVE <= n:
        b0 = np.uint64(r) * stride
        b1 = b0 + stride
        b2 = b1 + stride
        b3 = b2 + stride
        b4 = b3 + stride
        b5 = b4 + stride
        b6 = b5 + stride
        b7 = b6 + stride
        s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)
        for t in range(n_trees):
            f = features[t]
            th = thresholds[t]
            lv = leaves[t]
            i0 = i1 = i2 = i3 = i4 = i5 = i6 = i7 = np.uint64(0)
            for _ in range(depth):
                i0 = (i0 << one) + one + np.uint64(flat[b0 + f[i0]] >= th[i0])
                i1 = (i1 << one) + one + np.uint64(flat[b1 + f[i1]] >= th[i1])
                i2 = (i2 << one) + one + np.uint64(flat[b2 + f[i2]] >= th[i2])
                i3 = (i3 << one) + one + np.uint64(flat[b3 + f[i3]] >= th[i3])
                i4 = (i4 << one) + one + np.uint64(flat[b4 + f[i4]] >= th[i4])
                i5 = (i5 << one) + one + np.uint64(flat[b5 + f[i5]] >= th[i5])
                i6 = (i6 << one) + one + np.uint64(flat[b6 + f[i6]] >= th[i6])
                i7 = (i7 << one) + one + np.uint64(flat[b7 + f[i7]] >= th[i7])
            s0 += lv[i0 - first_leaf]
            s1 += lv[i1 - first_leaf]
            s2 += lv[i2 - first_leaf]
            s3 += lv[i3 - first_leaf]
            s4 += lv[i4 - first_leaf]
            s5 += lv[i5 - first_leaf]
            s6 += lv[i6 - first_leaf]
            s7 += lv[i7 - first_leaf]
        out[r] += s0
        out[r + 1] += s1
        out[r + 2] += s2
        out[r + 3] += s3
        out[r + 4] += s4
        out[r + 5] += s5
        out[r + 6] += s6
        out[r + 7] += s7
        r += _INTERLEAVE
    while r < n:
        base = np.uint64(r) * stride
        total = np.float32(0.0)
        for t in range(n_trees):
            f = features[t]
            th = thresholds[t]
            i = np.uint64(0)
            for _ in range(depth):
                i = (i << one) + one + np.uint64(flat[base + f[i]] >= th[i])
            total += leaves[t, i - first_leaf]
        out[r] += total
        r += 1


@njit(nogil=True, cache=True)
def _add_leaves_missing(rows, features, thresholds, nan_right, leaves, depth, out):
    """Like `_add_leaves`, but a NaN goes where the model's missing-value direction says."""
    n = rows.shape[0]
    n_trees = features.shape[0]
    first_leaf = (1 << depth) - 1
    for r in range(n):
        total = np.float32(0.0)
        for t in range(n_trees):
            i = 0
            for _ in range(depth):
                x = rows[r, features[t, i]]
                right = nan_right[t, i] != 0 if x != x else x >= thresholds[t, i]
                i = 2 * i + 1 + int(right)
            total += leaves[t, i - first_leaf]
        out[r] += total


@njit(nogil=True, cache=True)
def score_rows(rows, features, thresholds, nan_right, leaves, depth, base, logistic, out):
    """Writes base + sum of leaves (then the sigmoid if `logistic`) for each row into `out`.

    rows: float32 (n, f) C-contiguous; features: uint64 (trees, 2**depth - 1);
    thresholds: float32 like features; nan_right: uint8 like features;
    leaves: float32 (trees, 2**depth); out: float32 (n,).
    """
    for r in range(rows.shape[0]):
        out[r] = base
    if has_nan(rows):
        _add_leaves_missing(rows, features, thresholds, nan_right, leaves, depth, out)
    else:
        _add_leaves(rows, features, thresholds, leaves, depth, out)
    if logistic:
        for r in range(rows.shape[0]):
            out[r] = np.float32(1.0) / (np.float32(1.0) + np.exp(-out[r]))
