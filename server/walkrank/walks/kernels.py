"""Numba kernels for Pixie random walks (Eksombatchai et al., WWW 2018, arXiv:1711.07601).

Arrays and scalars only; validation, allocation and I/O live in `walkrank.walks.engine`.
Every kernel is `nogil` and keeps no state between calls, so concurrent queries on several
threads share nothing but the read-only graph arrays.

Speed comes from memory-level parallelism, not arithmetic: a step is four dependent loads
into a graph much larger than the caches (pin offsets -> board id -> board offsets -> pin id)
plus a visit-counter update. `WALKERS` independent walkers advance in lock-step, one pass over
the walkers per dependent load, and each pass prefetches the address the next pass reads, so
the cache misses of all walkers overlap instead of queueing. With restarts, K short walkers
started at the query pin draw from the same distribution as one long walker.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.extending import intrinsic

# Measured on a 20M-edge graph (steps/s, one core): 16 walkers 23M, 32 31M, 64 40M, 128 41M;
# past 64 the misses in flight are capped by the core, not by the walkers.
WALKERS = 64
EMPTY = -1
# Rows of each per-request cache of key slice bounds (pins, boards): 256 KiB each, L2-sized.
SLICE_CACHE_ROWS = 16384

_LOW32 = np.uint64(0xFFFFFFFF)
_NO_LIMIT = np.int64(2**62)


class WalkSettings(NamedTuple):
    """One query pin's walk: `walk_query_pin`'s scalar parameters, in its order (numba
    scalars: their types are part of the compiled signature)."""

    query_pin: np.int32
    query_index: np.int32  # the pin's position in the query: its random streams, its rows
    budget: np.int64  # steps
    restart_threshold: np.uint64  # probabilities scaled to 2**32
    bias_threshold: np.uint64
    bias_locale: np.int32  # -1: no locale bias
    key_lo: np.int32  # bias keys [key_lo, key_hi); empty: by locale
    key_hi: np.int32
    early_stop_pins: np.int64  # 0: never
    early_stop_visits: np.int64
    seed: np.uint64


class SliceCache(NamedTuple):
    """A request's cache of key slices, shared by its query pins' walks (the bias key is the
    request's): direct-mapped int32 rows [node, first, last, -], the slice of the key range
    relative to the node's list, EMPTY = free (`walks.engine.new_slice_cache`). One row each
    when the walk is not by key."""

    pin_slices: np.ndarray
    board_slices: np.ndarray


class VisitTable(NamedTuple):
    """A request's visit counts, shared by its query pins' walks and read by `top_candidates`
    (their parameters of the same names, in this order)."""

    direct: bool  # a row per pin at the pin's id; else a hash table (open addressing)
    table: np.ndarray  # int32[rows, 4]: [pin, owner, count, visits]
    root_sum: np.ndarray  # float64[rows]
    hits: np.ndarray  # int32[rows]
    count_scale: np.ndarray  # float64[query pins]


@intrinsic
def _prefetch(typingctx, array, index):
    """`llvm.prefetch` of `&array[index, 0, ...]` (read, keep in all cache levels).

    numba has no prefetch builtin; this reaches the LLVM intrinsic through the extension API.
    """
    if not isinstance(array, types.Array) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        array_type, index_type = signature.args
        ary = context.make_array(array_type)(context, builder, args[0])
        idx = context.cast(builder, args[1], index_type, types.intp)
        zero = context.get_constant(types.intp, 0)
        ptr = cgutils.get_item_pointer(
            context,
            builder,
            array_type,
            ary,
            [idx] + [zero] * (array_type.ndim - 1),
            wraparound=False,
            boundscheck=False,
        )
        byte_ptr_type = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn_type = ir.FunctionType(ir.VoidType(), [byte_ptr_type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fn_type, "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(ptr, byte_ptr_type), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(array, index), codegen


@intrinsic
def _load_relaxed(typingctx, array):
    """`array[0]` as an atomic (monotonic) load, which LLVM must redo on every loop pass.

    A plain load of a cell no store in the loop touches may be hoisted out of the loop;
    the cancel flag is written by another thread, so it is read this way.
    """
    if not isinstance(array, types.Array) or not isinstance(array.dtype, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        ary = context.make_array(array_type)(context, builder, args[0])
        zero = context.get_constant(types.intp, 0)
        ptr = cgutils.get_item_pointer(
            context,
            builder,
            array_type,
            ary,
            [zero] * array_type.ndim,
            wraparound=False,
            boundscheck=False,
        )
        return builder.load_atomic(ptr, "monotonic", array_type.dtype.bitwidth // 8)

    return array.dtype(array), codegen


@njit(inline="always")
def _xorshift(x):
    """xorshift64 state update (Vigna 2016); `_scramble` turns a state into an output."""
    x ^= x >> np.uint64(12)
    x ^= x << np.uint64(25)
    return x ^ (x >> np.uint64(27))


@njit(inline="always")
def _scramble(x):
    """The xorshift64* output multiply: makes the high bits good enough for `_below`."""
    return x * np.uint64(0x2545F4914F6CDD1D)


@njit(inline="always")
def _below(r, n):
    """Uniform integer in [0, n) from the high 32 bits of r (multiply-shift, no division)."""
    return np.int64(((r >> np.uint64(32)) * np.uint64(n)) >> np.uint64(32))


@njit(inline="always")
def _splitmix64(x):
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@njit(inline="always")
def _hash_slot(pin, mask):
    return (np.int64(pin) * np.int64(0x9E3779B1)) & mask


@njit(inline="always")
def _locale_bounds(locale_ends, node, locale, start):
    """[first, last) of `locale`'s neighbours in `node`'s list (sorted by bias key, locale
    first), from the node's row of the locale index: `locale_ends[node, l]` is where locale
    l ends.

    Branch-free on purpose, like `_pick`: numba keeps an array argument's reference count up
    to date around a helper with branches even when inlined, atomic operations on every
    biased step (measured on the quick graph, one pin, 100k steps: locale bias 0.5 took 3.6x
    an unbiased walk through such a helper, 1.1x without).
    """
    first = np.int64(locale_ends[node, max(locale - 1, 0)]) * (locale > 0)
    return start + first, start + np.int64(locale_ends[node, locale])


@njit(inline="always")
def _pick(first, last, r, uniform, biased, delta_at, delta_len):
    """When `biased` and the slice [first, last) has neighbours, a uniform draw from the slice
    and the node's `delta_len` real-time delta neighbours (from `delta_at` in the delta
    adjacency, kept as `~position`), else `uniform`: selects, not branches (the bias coin is
    unpredictable). The delta is not indexed by bias key, so its neighbours stay eligible."""
    in_slice = last - first
    j = _below(r, in_slice + delta_len)
    # `delta_len == 0` first: a walk without a delta passes the constant 0, and the compiled
    # pick is the slice draw alone (the delta's select measured 5% of a locale-biased walk).
    chosen = first + j if delta_len == 0 or j < in_slice else ~(delta_at + j - in_slice)
    return chosen if biased and last > first else uniform


@njit(inline="always")
def _runs_below(runs, at, count, key):
    """How many of a node's runs, runs[at:at + count] (rising), have a key below `key`
    (`key` shifted like the runs): a binary search whose steps are selects, not branches."""
    base = at
    n = count
    while n > 1:
        half = n >> 1
        base = base + half if np.int64(runs[base + half]) < key else base
        n -= half
    return base - at + (np.int64(runs[base]) < key) if count > 0 else np.int64(0)


@njit(inline="always")
def _is_run_of(runs, at, count, below, hi_key):
    """Whether the run after the first `below` runs of a node exists and is below `hi_key`
    (1 or 0): with `key_hi = key_lo + 1`, whether the node has neighbours of the key."""
    j = at + min(below, max(count - 1, 0))
    return np.int64(below < count and np.int64(runs[j]) < hi_key)


@njit(inline="always")
def _run_end(runs, at, below, end_mask):
    """Where the first `below` runs of a node end in its list (0 for none)."""
    return np.int64(runs[at + below - 1]) & end_mask if below > 0 else np.int64(0)


@njit(inline="always")
def _slices_from_runs(n, searching, nodes, side, delta_adj, index, found, key):
    """A pass of `walk_query_pin` over its walkers (pins' or boards'): each `searching`
    walker's slice of [lo_key, hi_key) from its node's runs (prefetched the pass before),
    cached in `slices`, its draw from it (`_pick`) into `index`, and that neighbour
    prefetched. One call a lock-step round, so what numba pays a call is spread over it.
    `side`: the pins' or boards' arrays (`_draw_pass`); `found`: the walkers' runs (where,
    how many), list starts, draws and delta lists, as pass 1 or 3 left them; `key`: the key
    range's bounds shifted like the runs, whether it is one key, and the mask of a run's end."""
    _, adj, _, _, key_runs, slices = side
    runs_at, runs_count, list_start, draw, delta_from, delta_count = found
    lo_key, hi_key, one_key, end_mask = key
    slice_mask = np.int64(slices.shape[0] - 1)
    for w in range(n):
        if searching[w]:
            at, count = runs_at[w], runs_count[w]
            below_lo = _runs_below(key_runs, at, count, lo_key)
            if one_key:  # the run after the key's, if it is the key's own
                below_hi = below_lo + _is_run_of(key_runs, at, count, below_lo, hi_key)
            else:
                below_hi = _runs_below(key_runs, at, count, hi_key)
            first = list_start[w] + _run_end(key_runs, at, below_lo, end_mask)
            last = list_start[w] + _run_end(key_runs, at, below_hi, end_mask)
            row = _hash_slot(nodes[w], slice_mask)
            slices[row, 0] = nodes[w]
            slices[row, 1] = first - list_start[w]
            slices[row, 2] = last - list_start[w]
            index[w] = _pick(first, last, draw[w], index[w], True, delta_from[w], delta_count[w])
            if delta_adj is None or index[w] >= 0:
                _prefetch(adj, index[w])
            else:
                _prefetch(delta_adj, ~index[w])


@njit(inline="always")
def _draw_pass(n, from_pins, nodes, side, delta_offsets, delta_adj, walkers, found, bias):
    """Pass 1 (`from_pins`: pin -> board, and the step's bias coin) or 3 (board -> pin, and
    the restart coin) of `walk_query_pin` over its walkers: each walker's draw from its node's
    list (and delta list), or from the node's bias slice when the step is biased, into
    `index`, prefetched; a key slice not in `slices` leaves the walker `searching`, its runs
    prefetched and `found` filled for `_slices_from_runs`. `side`: the pins' or boards'
    offsets, adjacency, locale index, run offsets, key runs and slice cache; `walkers`: their
    random states, draws, bias and restart coins and whether they search; `bias`: the walk's
    use_bias, by_locale, by_key, locale, bias and restart thresholds and runs a cache line."""
    offsets, adj, locale_ends, run_offsets, key_runs, slices = side
    state, index, biased, restart, searching = walkers
    use_bias, by_locale, by_key, locale, bias_threshold, restart_threshold, runs_line = bias
    runs_at, runs_count, list_start, draw, delta_from, delta_count = found
    base = np.int64(offsets.shape[0] - 1)
    last_row = np.int64(max(offsets.shape[0] - 2, 0))  # the bias index row a new node reads
    slice_mask = np.int64(slices.shape[0] - 1)
    for w in range(n):
        v = nodes[w]
        x = _xorshift(state[w])
        state[w] = x
        r = _scramble(x)
        coin = r & _LOW32
        if from_pins:
            biased[w] = use_bias and coin < bias_threshold
        else:
            restart[w] = coin < restart_threshold
        if delta_offsets is None:
            start = offsets[v]
            stop = offsets[v + 1]
            i = start + _below(r, stop - start)
            bias_node = np.int64(v)
            delta_at = np.int64(0)  # no delta list
            delta_len = np.int64(0)
        else:  # base list, then delta list; a new node has the delta list only
            start = offsets[min(v, base)]
            stop = offsets[min(v + 1, base)]
            delta_at = np.int64(delta_offsets[v])
            delta_len = delta_offsets[v + 1] - delta_at
            i = start + _below(r, stop - start + delta_len)
            if i >= stop:
                i = ~(delta_at + i - stop)
            biased[w] = biased[w] and v < base
            bias_node = min(np.int64(v), last_row)
        if by_locale:
            first, last = _locale_bounds(locale_ends, bias_node, locale, start)
            i = _pick(first, last, r, i, biased[w], delta_at, delta_len)
        elif by_key:
            row = _hash_slot(v, slice_mask)
            cached = slices[row, 0] == v
            i = _pick(
                start + slices[row, 1],
                start + slices[row, 2],
                r,
                i,
                biased[w] and cached,
                delta_at,
                delta_len,
            )
            searching[w] = biased[w] and not cached
            if searching[w]:
                at = run_offsets[v]
                runs_at[w] = at
                runs_count[w] = run_offsets[v + 1] - at
                list_start[w] = start
                delta_from[w] = delta_at
                delta_count[w] = delta_len
                draw[w] = r
                last_run = at + runs_count[w] - 1
                _prefetch(key_runs, at)
                _prefetch(key_runs, min(at + runs_line, last_run))
                _prefetch(key_runs, min(at + 2 * runs_line, last_run))
                _prefetch(key_runs, min(at + 3 * runs_line, last_run))
                _prefetch(key_runs, last_run)
        index[w] = i
        if delta_adj is None or i >= 0:
            _prefetch(adj, i)
        else:
            _prefetch(delta_adj, ~i)


@njit(nogil=True, cache=True)
def walk_query_pin(
    pin_offsets,
    pin_adj,
    board_offsets,
    board_adj,
    pin_locale_ends,
    board_locale_ends,
    pin_run_offsets,
    pin_key_runs,
    board_run_offsets,
    board_key_runs,
    run_shift,
    pin_delta_offsets,
    pin_delta_adj,
    board_delta_offsets,
    board_delta_adj,
    query_pin,
    query_index,
    budget,
    restart_threshold,
    bias_threshold,
    bias_locale,
    key_lo,
    key_hi,
    early_stop_pins,
    early_stop_visits,
    seed,
    direct,
    table,
    root_sum,
    hits,
    count_scale,
    pin_slices,
    board_slices,
    cancel,
):
    """Walk `budget` steps (pin -> board -> pin) from one query pin and count arrivals.

    The parameters come in named groups, in their field order: `GraphArrays` and `DeltaArrays`
    (`walkrank.graph.store`), `WalkSettings`, `VisitTable`, `SliceCache`, then `cancel`;
    callers pass `*graph.walk_arrays, *graph.delta_arrays, *settings, *visits, *slices,
    cancel`. Spread rather than passed as tuples: numba types a tuple argument in Python on
    every call, which measured 2-5 us a call, about 10% of a 2,000-step request.
    `table` is the request's visit table, one int32 row per slot: [pin, owner, count, visits]
    (slot = pin when `direct`, else open addressing with linear probing, power-of-two rows,
    EMPTY = free). `count` is the visits of query pin `owner` only; when another query pin
    arrives, the old count is folded into `root_sum += sqrt(count * count_scale[owner])` and
    `hits += 1`, so multi-hit boosting needs no per-query table and no merge pass
    (`top_candidates` folds the last owner); `count_scale[q]` is query pin q's budget over the
    steps it walked (1 unless it stopped early), set by the caller once q's walk is over.
    `restart_threshold` / `bias_threshold` are probabilities scaled to 2**32; a biased step
    (when `bias_locale` >= 0) draws from the neighbours in that locale (a row of the locale
    index), or, when key_lo < key_hi, from those whose bias key is in [key_lo, key_hi) (the
    node's key runs, `key << run_shift | end in the list`); an empty slice draws uniformly.
    The walk stops early once more than `early_stop_pins` pins (0 = never) reach
    `early_stop_visits` visits from this query pin; the check runs after each lock-step round,
    so it may overshoot by under WALKERS steps but never past `budget`. Walker w draws from a
    stream derived from (seed, query_index, w). The walk also stops, at the next round, once
    another thread sets `cancel[0]` (a deadline passed, the server stops): a round is ~2 us.
    Returns the steps walked. A hash table with no free row left (a caller that sized it
    for fewer pins than it counts) raises instead of probing forever.

    With delta arrays (not None), the graph is the mapped base plus a real-time delta segment
    (`walkrank.graph.delta`): a node's neighbours are its base list followed by its delta
    list (`*_delta_adj[*_delta_offsets[n]:*_delta_offsets[n + 1]]`, offsets for every node,
    base and new, so the lookup is one load, prefetched like the base's), and nodes past the
    base's (new pins and boards) have a delta list only. A draw past the base list is
    kept as `~(position in the delta adjacency)`, below 0. A biased step draws from the base
    node's slice of the bias index and its delta list together (the delta is not indexed by
    bias key, so its neighbours stay eligible; a node whose slice is empty, or a new node,
    draws unbiased). With None (no delta) numba compiles a version without any of it (its
    `is None` branches are pruned), the base-only walk exactly as before.
    """
    mask = np.int64(table.shape[0] - 1)
    state = np.empty(WALKERS, np.uint64)
    position = np.empty(WALKERS, np.int32)
    index = np.empty(WALKERS, np.int64)
    node = np.empty(WALKERS, np.int32)
    biased = np.zeros(WALKERS, np.bool_)
    restart = np.zeros(WALKERS, np.bool_)
    for w in range(WALKERS):
        s = _splitmix64(
            _splitmix64(_splitmix64(np.uint64(seed)) ^ np.uint64(query_index)) + np.uint64(w)
        )
        state[w] = s if s != 0 else np.uint64(1)
        position[w] = query_pin
    stop_after = np.int64(early_stop_pins) if early_stop_pins > 0 else _NO_LIMIT
    use_bias = bias_threshold > 0 and bias_locale >= 0
    by_key = use_bias and key_lo < key_hi
    by_locale = use_bias and not by_key
    locale = np.int64(max(bias_locale, 0))
    lo_key = np.int64(key_lo) << np.int64(run_shift)
    hi_key = np.int64(key_hi) << np.int64(run_shift)
    end_mask = (np.int64(1) << np.int64(run_shift)) - 1
    one_key = key_hi == key_lo + 1  # a node has at most one run of a key: one search
    # A key step's slice comes from the request's direct-mapped cache of [node, first, last]
    # rows (walks restart at the query pin every few steps, so nodes near it come back: 88% /
    # 74% hits on the quick / bench graph at 4,096 rows a walk), else from the node's runs,
    # prefetched (their first four cache lines and the last: a loop of prefetches inside the
    # walkers' loop measured 3% slower walks of every kind) and searched in a pass of their
    # own. Measured (one pin, 100k steps, bias 0.8; times an unbiased walk, quick / bench):
    # the list binary-searched behind the cache 4.2 / 5.8, the runs searched on every step
    # 2.6 / 3.4, runs behind the cache 1.6 / 2.0, a precomputed slice per node for the
    # request's key (the floor) 1.0 / 1.0.
    slice_mask = np.int64(pin_slices.shape[0] - 1)
    runs_line = max(64 // pin_key_runs.itemsize, 1)  # runs a cache line
    searching = np.zeros(WALKERS, np.bool_)  # a key step whose slice is not cached
    draw = np.empty(WALKERS, np.uint64)  # its random draw
    list_start = np.empty(WALKERS, np.int64)  # and its node's list and runs
    runs_at = np.empty(WALKERS, np.int64)
    runs_count = np.empty(WALKERS, np.int64)
    delta_from = np.zeros(WALKERS, np.int64)  # the node's delta list: where, how long
    delta_count = np.zeros(WALKERS, np.int64)
    found = (runs_at, runs_count, list_start, draw, delta_from, delta_count)
    key = (lo_key, hi_key, one_key, end_mask)
    pins = (pin_offsets, pin_adj, pin_locale_ends, pin_run_offsets, pin_key_runs, pin_slices)
    boards = (
        board_offsets,
        board_adj,
        board_locale_ends,
        board_run_offsets,
        board_key_runs,
        board_slices,
    )
    walkers = (state, index, biased, restart, searching)
    bias = (use_bias, by_locale, by_key, locale, bias_threshold, restart_threshold, runs_line)
    done = np.int64(0)
    reached = np.int64(0)
    while done < budget and reached <= stop_after and _load_relaxed(cancel) == 0:
        n = min(np.int64(WALKERS), budget - done)
        # Pass 1: pin -> position of a random board (pin offsets were prefetched in pass 4).
        _draw_pass(n, True, position, pins, pin_delta_offsets, pin_delta_adj, walkers, found, bias)
        if by_key:  # Pass 1b: the slices not cached, from the pins' runs.
            _slices_from_runs(n, searching, position, pins, pin_delta_adj, index, found, key)
        # Pass 2: board id.
        for w in range(n):
            i = index[w]
            if pin_delta_adj is None:
                b = pin_adj[i]
            else:
                b = pin_delta_adj[~i] if i < 0 else pin_adj[i]
                _prefetch(board_delta_offsets, b)
            node[w] = b
            _prefetch(board_offsets, b)
            if by_locale:
                _prefetch(board_locale_ends, b)
            elif by_key:
                _prefetch(board_run_offsets, b)
                _prefetch(board_slices, _hash_slot(b, slice_mask))
        # Pass 3: board -> position of a random pin, and the restart draw.
        _draw_pass(
            n, False, node, boards, board_delta_offsets, board_delta_adj, walkers, found, bias
        )
        if by_key:  # Pass 3b: the slices not cached, from the boards' runs.
            _slices_from_runs(n, searching, node, boards, board_delta_adj, index, found, key)
        # Pass 4: arrival pin; prefetch its counter and where the walker goes next.
        for w in range(n):
            i = index[w]
            if board_delta_adj is None:
                p = board_adj[i]
            else:
                p = board_delta_adj[~i] if i < 0 else board_adj[i]
            node[w] = p
            _prefetch(table, np.int64(p) if direct else _hash_slot(p, mask))
            nxt = query_pin if restart[w] else p
            position[w] = nxt
            _prefetch(pin_offsets, nxt)
            if pin_delta_offsets is not None:  # the pin's delta list bounds, for pass 1
                _prefetch(pin_delta_offsets, nxt)
            if by_locale:
                _prefetch(pin_locale_ends, nxt)
            elif by_key:
                _prefetch(pin_run_offsets, nxt)
                _prefetch(pin_slices, _hash_slot(nxt, slice_mask))
        # Pass 5: count the arrivals. Probing is inline because a numba helper that takes an
        # array is not inlined and pays reference counting on every call (measured 5x slower).
        for w in range(n):
            p = node[w]
            if direct:
                slot = np.int64(p)
            else:
                slot = _hash_slot(p, mask)
                probes = np.int64(0)
                while table[slot, 0] != p and table[slot, 0] != EMPTY:
                    slot = (slot + 1) & mask
                    probes += 1
                    if probes > mask:
                        raise ValueError("visit table full: sized for fewer pins than walked")
                table[slot, 0] = p
            if table[slot, 1] != query_index:
                owner = table[slot, 1]
                if owner != EMPTY:
                    root_sum[slot] += np.sqrt(np.float64(table[slot, 2]) * count_scale[owner])
                    hits[slot] += 1
                table[slot, 1] = query_index
                table[slot, 2] = 0
            count = table[slot, 2] + 1
            table[slot, 2] = count
            table[slot, 3] += 1
            if count == early_stop_visits:
                reached += 1
        done += n
    return done


@njit
def _top_keys(keys, k):
    """Positions of the k largest (unique, non-negative) keys, in no particular order.

    A histogram of the top 16 key bits (the score's exponent and leading mantissa bits)
    finds the bucket holding the k-th key in one branch-free pass; only that bucket's keys
    need a partition. At k = 2000 of ~60k candidates: 0.1 ms, against 0.7 ms for
    np.partition over all keys and 0.9 ms for a size-k heap.
    """
    hist = np.zeros(1 << 15, np.int64)
    for key in keys:
        hist[key >> 48] += 1
    bucket = (1 << 15) - 1
    above = 0
    while above + hist[bucket] < k:
        above += hist[bucket]
        bucket -= 1
    chosen = np.flatnonzero(keys >= (np.int64(bucket) << 48))
    if chosen.shape[0] > k:
        tied = keys[chosen]
        threshold = np.partition(tied, tied.shape[0] - k)[tied.shape[0] - k]
        chosen = chosen[tied >= threshold]
    return chosen


@njit(nogil=True, cache=True)
def top_candidates(direct, table, root_sum, hits, count_scale, query_pins, k, pin_offsets):
    """The k best pins of a visit table, query pins excluded, best first (consumes the table).

    Score = (sum over query pins q of sqrt(visits from q * count_scale[q]))**2 (Pixie
    multi-hit boosting, each query pin's counts scaled to its budget), as float32. Order:
    score descending, then pin id ascending, so ties are deterministic and the same for
    either counter. Each candidate becomes one int64 key (float32 score bits, which order
    like the scores since they are positive, above the complemented pin id); `_top_keys`
    selects the k largest in O(n) and only they are sorted.
    Returns (pins, scores, visits, query_hits, degree).
    """
    mask = np.int64(table.shape[0] - 1)
    # Query pins never come back: unmark their rows (the walks are over) instead of testing
    # every candidate against the query.
    for q in query_pins:
        if direct:
            table[q, 1] = EMPTY
            continue
        slot = _hash_slot(q, mask)
        for _ in range(table.shape[0]):  # a full table without q ends here too
            if table[slot, 0] == EMPTY:
                break
            if table[slot, 0] == q:
                table[slot, 1] = EMPTY
                break
            slot = (slot + 1) & mask
    rows = table.shape[0]
    # The occupied rows, branch-free: every row's index is written and only occupied rows
    # advance `m` (a branch on the ~50% occupancy mispredicted often enough to cost 40% of
    # the scan). Scores are then computed for those rows only.
    slots = np.empty(rows, np.int32)
    m = 0
    for slot in range(rows):
        slots[m] = slot
        m += table[slot, 1] != EMPTY
    keys = np.empty(m, np.int64)
    score32 = np.empty(1, np.float32)
    score_bits = score32.view(np.int32)  # a float32 -> int32 bit cast through one cell
    for i in range(m):
        slot = slots[i]
        own = np.float64(table[slot, 2]) * count_scale[table[slot, 1]]
        root = root_sum[slot] + np.sqrt(own)
        score32[0] = root * root
        pin = slot if direct else table[slot, 0]
        keys[i] = (np.int64(score_bits[0]) << 32) | (np.int64(0x7FFFFFFF) - pin)
    n = min(k, m)
    chosen = np.arange(m)
    if m > k:
        chosen = _top_keys(keys, k)
    order = chosen[np.argsort(-keys[chosen])]
    out_pins = np.empty(n, np.int32)
    out_scores = np.empty(n, np.float32)
    out_visits = np.empty(n, np.int32)
    out_hits = np.empty(n, np.int32)
    out_degree = np.empty(n, np.int32)
    for o in range(n):
        i = order[o]
        slot = slots[i]
        pin = np.int32(0x7FFFFFFF - (keys[i] & 0xFFFFFFFF))
        score_bits[0] = np.int32(keys[i] >> 32)
        out_pins[o] = pin
        out_scores[o] = score32[0]
        out_visits[o] = table[slot, 3]
        out_hits[o] = hits[slot] + 1
        # Base degree; a new pin's (past the base) is 0 here, its delta degree the caller's.
        base = pin_offsets.shape[0] - 1
        out_degree[o] = pin_offsets[min(pin + 1, base)] - pin_offsets[min(pin, base)]
    return out_pins, out_scores, out_visits, out_hits, out_degree


@njit(nogil=True, cache=True)
def reference_walk(
    pin_offsets, pin_adj, board_offsets, board_adj, query_pin, steps, restart_probability, seed
):
    """Deliberately plain Pixie walk: one walker, np.random, a counter per pin per call.

    The yardstick the benchmark times against, and the slow reference tests compare the
    fast kernel's visit distribution to.
    """
    np.random.seed(seed)
    visits = np.zeros(pin_offsets.shape[0] - 1, np.int32)
    current = query_pin
    for _ in range(steps):
        start = pin_offsets[current]
        board = pin_adj[start + np.random.randint(0, pin_offsets[current + 1] - start)]
        start = board_offsets[board]
        pin = board_adj[start + np.random.randint(0, board_offsets[board + 1] - start)]
        visits[pin] += 1
        current = query_pin if np.random.random() < restart_probability else pin
    return visits
