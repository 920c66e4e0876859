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

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.extending import intrinsic

# Measured on a 20M-edge graph (steps/s, one core): 16 walkers 23M, 32 31M, 64 40M, 128 41M;
# past 64 the misses in flight are capped by the core, not by the walkers.
WALKERS = 64
EMPTY = -1

_LOW32 = np.uint64(0xFFFFFFFF)
_NO_LIMIT = np.int64(2**62)


@intrinsic
def _prefetch(typingctx, array, index):
    """`llvm.prefetch` of `&array[index]` (read, high locality); numba has no builtin for it."""
    if not isinstance(array, types.Array) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        array_type, index_type = signature.args
        ary = context.make_array(array_type)(context, builder, args[0])
        idx = context.cast(builder, args[1], index_type, types.intp)
        ptr = cgutils.get_item_pointer(
            context, builder, array_type, ary, [idx], wraparound=False, boundscheck=False
        )
        byte_ptr_type = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn_type = ir.FunctionType(ir.VoidType(), [byte_ptr_type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fn_type, "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(ptr, byte_ptr_type), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(array, index), codegen


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


@njit
def _find_slot(keys, pin, mask):
    """Open addressing with linear probing; claims an empty slot for a new pin."""
    h = _hash_slot(pin, mask)
    while True:
        k = keys[h]
        if k == pin:
            return h
        if k == EMPTY:
            keys[h] = pin
            return h
        h = (h + 1) & mask


@njit
def _key_slice(adj, key, start, stop, key_lo, key_hi):
    """Bounds of the neighbours in adj[start:stop] whose key is in [key_lo, key_hi).

    Adjacency lists are sorted by the neighbour's bias key, so this is two binary searches.
    Only biased steps call it; the uniform path stays inline in the walk loop.
    """
    lo, hi = start, stop
    while lo < hi:
        mid = (lo + hi) >> 1
        if key[adj[mid]] < key_lo:
            lo = mid + 1
        else:
            hi = mid
    first = lo
    hi = stop
    while lo < hi:
        mid = (lo + hi) >> 1
        if key[adj[mid]] < key_hi:
            lo = mid + 1
        else:
            hi = mid
    return first, lo


@njit(nogil=True, cache=True)
def walk_query_pin(
    pin_offsets,
    pin_adj,
    board_offsets,
    board_adj,
    pin_key,
    board_key,
    query_pin,
    budget,
    restart_threshold,
    bias_threshold,
    key_lo,
    key_hi,
    early_stop_pins,
    early_stop_visits,
    seed,
    stream,
    dense,
    keys,
    visits,
    touched,
):
    """Walk `budget` steps (pin -> board -> pin) from one query pin and count arrivals.

    Visit counts go to `visits[slot]`: slot = pin when `dense`, else an open-addressing slot
    in `keys` (power-of-two size, EMPTY = free). `touched` receives each new slot once, in
    first-visit order, so the caller can read and clear only what the walk wrote.
    `restart_threshold` / `bias_threshold` are probabilities scaled to 2**32. The walk stops
    early once more than `early_stop_pins` pins (0 = never) reach `early_stop_visits` visits;
    the check runs after each lock-step round, so it may overshoot by under WALKERS steps but
    never past `budget`. Walker w draws from a stream derived from (seed, stream, w), so each
    query pin of a request walks with its own random numbers.
    Returns (steps walked, number of touched slots).
    """
    mask = np.int64(keys.shape[0] - 1)
    state = np.empty(WALKERS, np.uint64)
    position = np.empty(WALKERS, np.int32)
    index = np.empty(WALKERS, np.int64)
    node = np.empty(WALKERS, np.int32)
    biased = np.zeros(WALKERS, np.bool_)
    restart = np.zeros(WALKERS, np.bool_)
    for w in range(WALKERS):
        s = _splitmix64(_splitmix64(_splitmix64(np.uint64(seed)) ^ np.uint64(stream))
                        + np.uint64(w))
        state[w] = s if s != 0 else np.uint64(1)
        position[w] = query_pin
    stop_after = np.int64(early_stop_pins) if early_stop_pins > 0 else _NO_LIMIT
    use_bias = bias_threshold > 0
    done = np.int64(0)
    n_touched = np.int64(0)
    reached = np.int64(0)
    while done < budget and reached <= stop_after:
        n = min(np.int64(WALKERS), budget - done)
        # Pass 1: pin -> position of a random board (pin offsets were prefetched in pass 4).
        for w in range(n):
            p = position[w]
            start = pin_offsets[p]
            stop = pin_offsets[p + 1]
            x = _xorshift(state[w])
            state[w] = x
            r = _scramble(x)
            i = start + _below(r, stop - start)
            biased[w] = use_bias and (r & _LOW32) < bias_threshold
            if biased[w]:
                first, last = _key_slice(pin_adj, board_key, start, stop, key_lo, key_hi)
                if last > first:
                    i = first + _below(r, last - first)
            index[w] = i
            _prefetch(pin_adj, i)
        # Pass 2: board id.
        for w in range(n):
            b = pin_adj[index[w]]
            node[w] = b
            _prefetch(board_offsets, b)
        # Pass 3: board -> position of a random pin, and the restart draw.
        for w in range(n):
            b = node[w]
            start = board_offsets[b]
            stop = board_offsets[b + 1]
            x = _xorshift(state[w])
            state[w] = x
            r = _scramble(x)
            i = start + _below(r, stop - start)
            if biased[w]:
                first, last = _key_slice(board_adj, pin_key, start, stop, key_lo, key_hi)
                if last > first:
                    i = first + _below(r, last - first)
            restart[w] = (r & _LOW32) < restart_threshold
            index[w] = i
            _prefetch(board_adj, i)
        # Pass 4: arrival pin; prefetch its counter and where the walker goes next.
        for w in range(n):
            p = board_adj[index[w]]
            node[w] = p
            if dense:
                _prefetch(visits, p)
            else:
                _prefetch(keys, _hash_slot(p, mask))
            nxt = query_pin if restart[w] else p
            position[w] = nxt
            _prefetch(pin_offsets, nxt)
        # Pass 5: count the arrivals (linear probing inline: a call here costs ~10%).
        for w in range(n):
            p = node[w]
            if dense:
                slot = np.int64(p)
            else:
                slot = _hash_slot(p, mask)
                while keys[slot] != p and keys[slot] != EMPTY:
                    slot = (slot + 1) & mask
                keys[slot] = p
            v = visits[slot] + 1
            visits[slot] = v
            if v == 1:
                touched[n_touched] = slot
                n_touched += 1
            if v == early_stop_visits:
                reached += 1
        done += n
    return done, n_touched


@njit(nogil=True, cache=True)
def merge_query_visits(
    dense, keys, visits, touched, n_touched, g_keys, g_root_sum, g_visits, g_hits, g_touched,
    g_count
):
    """Fold one query pin's visits into the multi-hit accumulator and clear its table.

    Multi-hit boosting (Pixie eq. 2): the final score is (sum_q sqrt(V_q[p]))**2, so the
    accumulator keeps sum_q sqrt(V_q[p]) per pin, plus raw visits and the number of query
    pins that reached p. Returns the new number of touched accumulator slots.
    """
    g_mask = np.int64(g_keys.shape[0] - 1)
    for i in range(n_touched):
        slot = touched[i]
        pin = slot if dense else keys[slot]
        v = visits[slot]
        g = np.int64(pin) if dense else _find_slot(g_keys, pin, g_mask)
        if g_hits[g] == 0:
            g_touched[g_count] = g
            g_count += 1
        g_root_sum[g] += np.sqrt(np.float64(v))
        g_visits[g] += v
        g_hits[g] += 1
        visits[slot] = 0
        if not dense:
            keys[slot] = EMPTY
    return g_count


@njit(nogil=True, cache=True)
def top_candidates(
    dense, g_keys, g_root_sum, g_visits, g_hits, g_touched, g_count, query_sorted, k, pin_offsets
):
    """The k best-scored pins, query pins excluded, sorted by boosted score descending.

    Selection is O(n) (partition around the k-th score) so a large walk does not pay a full
    sort; pins tied at the cut-off are kept in first-visit order, which is deterministic.
    Returns (pins, scores, visits, query_hits, degree).
    """
    pins = np.empty(g_count, np.int32)
    scores = np.empty(g_count, np.float64)
    slots = np.empty(g_count, np.int64)
    c = 0
    for i in range(g_count):
        g = g_touched[i]
        pin = np.int32(g) if dense else g_keys[g]
        j = np.searchsorted(query_sorted, pin)
        if j < query_sorted.shape[0] and query_sorted[j] == pin:
            continue
        pins[c] = pin
        scores[c] = g_root_sum[g] * g_root_sum[g]
        slots[c] = g
        c += 1
    keep = np.arange(c)
    if c > k:
        threshold = np.partition(scores[:c].copy(), c - k)[c - k]
        keep = np.empty(k, np.int64)
        m = 0
        for i in range(c):
            if scores[i] > threshold:
                keep[m] = i
                m += 1
        for i in range(c):
            if m == k:
                break
            if scores[i] == threshold:
                keep[m] = i
                m += 1
    order = np.argsort(-scores[keep], kind="mergesort")
    n = keep.shape[0]
    out_pins = np.empty(n, np.int32)
    out_scores = np.empty(n, np.float32)
    out_visits = np.empty(n, np.int32)
    out_hits = np.empty(n, np.int32)
    out_degree = np.empty(n, np.int32)
    for o in range(n):
        i = keep[order[o]]
        g = slots[i]
        p = pins[i]
        out_pins[o] = p
        out_scores[o] = scores[i]
        out_visits[o] = g_visits[g]
        out_hits[o] = g_hits[g]
        out_degree[o] = pin_offsets[p + 1] - pin_offsets[p]
    return out_pins, out_scores, out_visits, out_hits, out_degree


@njit(nogil=True, cache=True)
def reference_walk(pin_offsets, pin_adj, board_offsets, board_adj, query_pin, steps,
                   restart_probability, seed):
    """Deliberately plain Pixie walk: one walker, np.random, a dense counter per call.

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
