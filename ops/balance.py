"""Numba kernels that assign weighted items to ``k`` ranks with equal item counts per rank.

Both kernels take item costs (float64 ``[n]``, non-negative) already sorted in decreasing order and
return the rank of each item (int64 ``[n]``). Padding to a multiple of ``k`` with zero-cost items,
sorting, and mapping back to the caller's order are the caller's business (``seqpack.plan.balance``).
Ties break by the lower index everywhere, so results are deterministic and match the pure-Python
references at the bottom of this file exactly.
"""

from __future__ import annotations

import heapq

import numba as nb
import numpy as np

# ----------------------------------------------------------------------------- min-heap of (key, id)
# A binary heap over parallel arrays, ordered by (key, id) so equal keys pop the lower id first.


@nb.njit(cache=True)
def _less(keys, ids, i, j):
    return keys[i] < keys[j] or (keys[i] == keys[j] and ids[i] < ids[j])


@nb.njit(cache=True)
def _swap(keys, ids, i, j):
    keys[i], keys[j] = keys[j], keys[i]
    ids[i], ids[j] = ids[j], ids[i]


@nb.njit(cache=True)
def _heap_push(keys, ids, size, key, item):
    i = size
    keys[i] = key
    ids[i] = item
    while i > 0:
        parent = (i - 1) // 2
        if _less(keys, ids, i, parent):
            _swap(keys, ids, i, parent)
            i = parent
        else:
            break
    return size + 1


@nb.njit(cache=True)
def _heap_pop(keys, ids, size):
    """Remove the root; returns (key, id, new size)."""
    key = keys[0]
    item = ids[0]
    size -= 1
    keys[0] = keys[size]
    ids[0] = ids[size]
    i = 0
    while True:
        left = 2 * i + 1
        if left >= size:
            break
        child = left
        if left + 1 < size and _less(keys, ids, left + 1, left):
            child = left + 1
        if _less(keys, ids, child, i):
            _swap(keys, ids, child, i)
            i = child
        else:
            break
    return key, item, size


# ----------------------------------------------------------------------------- LPT
@nb.njit(cache=True)
def lpt_assign(costs_desc, n_ranks, per_rank):
    """Longest processing time first with a cap of ``per_rank`` items per rank.

    Each item (in the given, decreasing order) goes to the least loaded rank that still has room;
    a rank leaves the heap once it holds ``per_rank`` items. O(n log k).
    """
    n = costs_desc.shape[0]
    keys = np.empty(n_ranks, np.float64)
    ids = np.empty(n_ranks, np.int64)
    size = 0
    for r in range(n_ranks):
        size = _heap_push(keys, ids, size, 0.0, r)
    count = np.zeros(n_ranks, np.int64)
    out = np.empty(n, np.int64)
    for i in range(n):
        load, r, size = _heap_pop(keys, ids, size)
        out[i] = r
        count[r] += 1
        if count[r] < per_rank:
            size = _heap_push(keys, ids, size, load + costs_desc[i], r)
    return out


# ----------------------------------------------------------------------------- balanced KK
@nb.njit(cache=True)
def kk_assign(costs_desc, n_ranks):
    """Balanced Karmarkar-Karp (largest differencing) for ``k = n_ranks`` equal-count subsets.

    ``len(costs_desc)`` must be a multiple of ``k``. Consecutive groups of ``k`` items form the
    initial partitions (one item per subset), so every subset always holds the same number of
    items. Repeatedly the two partitions with the largest spread (max - min subset sum) merge by
    pairing the heaviest subset of one with the lightest of the other. Subsets are linked lists
    of items so a merge costs O(k log k); O(n log k) overall.
    """
    n = costs_desc.shape[0]
    k = n_ranks
    n_parts = n // k
    sums = np.empty((n_parts, k), np.float64)
    head = np.empty((n_parts, k), np.int64)
    tail = np.empty((n_parts, k), np.int64)
    nxt = np.full(n, -1, np.int64)
    keys = np.empty(n_parts, np.float64)
    ids = np.empty(n_parts, np.int64)
    size = 0
    for p in range(n_parts):
        for j in range(k):
            item = p * k + j
            sums[p, j] = costs_desc[item]
            head[p, j] = item
            tail[p, j] = item
        # max-heap on spread via negated keys; items are sorted so spread = first - last
        size = _heap_push(keys, ids, size, -(sums[p, 0] - sums[p, k - 1]), p)
    new_sum = np.empty(k, np.float64)
    new_head = np.empty(k, np.int64)
    new_tail = np.empty(k, np.int64)
    while size > 1:
        _, p, size = _heap_pop(keys, ids, size)
        _, q, size = _heap_pop(keys, ids, size)
        heavy_first = np.argsort(-sums[p], kind="mergesort")
        light_first = np.argsort(sums[q], kind="mergesort")
        for i in range(k):
            a = heavy_first[i]
            b = light_first[i]
            new_sum[i] = sums[p, a] + sums[q, b]
            nxt[tail[p, a]] = head[q, b]
            new_head[i] = head[p, a]
            new_tail[i] = tail[q, b]
        hi = new_sum[0]
        lo = new_sum[0]
        for i in range(k):
            sums[p, i] = new_sum[i]
            head[p, i] = new_head[i]
            tail[p, i] = new_tail[i]
            hi = max(hi, new_sum[i])
            lo = min(lo, new_sum[i])
        size = _heap_push(keys, ids, size, -(hi - lo), p)
    out = np.empty(n, np.int64)
    if n_parts == 0:
        return out
    root = ids[0]
    for j in range(k):
        item = head[root, j]
        while item != -1:
            out[item] = j
            item = nxt[item]
    return out


def warmup() -> None:
    """Compile (or load from cache) both kernels on tiny inputs."""
    c = np.array([3.0, 2.0, 1.0, 0.0])
    lpt_assign(c, 2, 2)
    kk_assign(c, 2)


# ----------------------------------------------------------------------------- references
def lpt_assign_reference(costs_desc: list[float], n_ranks: int, per_rank: int) -> list[int]:
    """Plain-Python LPT with heapq; same tie-breaking as :func:`lpt_assign`."""
    heap = [(0.0, r) for r in range(n_ranks)]
    heapq.heapify(heap)
    count = [0] * n_ranks
    out = []
    for c in costs_desc:
        load, r = heapq.heappop(heap)
        out.append(r)
        count[r] += 1
        if count[r] < per_rank:
            heapq.heappush(heap, (load + c, r))
    return out


def kk_assign_reference(costs_desc: list[float], n_ranks: int) -> list[int]:
    """Plain-Python balanced Karmarkar-Karp; same tie-breaking as :func:`kk_assign`."""
    k = n_ranks
    parts = {}
    heap = []
    for p in range(len(costs_desc) // k):
        subsets = [(costs_desc[p * k + j], [p * k + j]) for j in range(k)]
        parts[p] = subsets
        heapq.heappush(heap, (-(subsets[0][0] - subsets[-1][0]), p))
    while len(heap) > 1:
        _, p = heapq.heappop(heap)
        _, q = heapq.heappop(heap)
        heavy = sorted(parts[p], key=lambda s: -s[0])
        light = sorted(parts.pop(q), key=lambda s: s[0])
        merged = [(a[0] + b[0], a[1] + b[1]) for a, b in zip(heavy, light)]
        parts[p] = merged
        sums = [s for s, _ in merged]
        heapq.heappush(heap, (-(max(sums) - min(sums)), p))
    out = [0] * len(costs_desc)
    if heap:
        for j, (_, items) in enumerate(parts[heap[0][1]]):
            for item in items:
                out[item] = j
    return out
