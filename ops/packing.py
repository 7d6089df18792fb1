"""Numba bin-packing kernels over int64 arrays, with pure-Python references for tests.

Every kernel takes the segment lengths in the order they are to be placed and returns the bin index
of each segment (int64 ``[n]``) plus the number of bins. Sorting, overflow handling and the CSR plan
are the caller's business (``seqpack.plan``): the kernels stay small and free of Python objects.
All lengths are in tokens and must satisfy ``0 < length <= capacity``.
"""

from __future__ import annotations

import numba as nb
import numpy as np


@nb.njit(cache=True)
def _tree_add(tree, size, leaf, delta):
    node = leaf + size
    while node >= 1:
        tree[node] += delta
        node //= 2


@nb.njit(cache=True)
def _first_nonzero_at_least(tree, size, lo):
    """Smallest leaf index >= lo whose count is non-zero, or -1 (count tree, O(log size))."""
    if lo >= size:
        return -1
    node = lo + size
    if tree[node] > 0:
        return lo
    while node > 1:
        if node % 2 == 0 and tree[node + 1] > 0:
            node += 1
            while node < size:
                node = 2 * node if tree[2 * node] > 0 else 2 * node + 1
            return node - size
        node //= 2
    return -1


@nb.njit(cache=True)
def _pow2_at_least(x):
    size = 1
    while size < x:
        size *= 2
    return size


@nb.njit(cache=True)
def bfd_assign(seg_len, capacity):
    """Best fit: each segment goes to the open bin with the least remaining room that still fits.

    A count tree indexed by remaining capacity (``0..capacity``) finds that bin in O(log C); bins
    with the same remaining room form a LIFO stack so ties break deterministically. Feed segments
    sorted by decreasing length to get best-fit *decreasing*.
    """
    # a cap above the segment count is never reached: the capped kernel is plain best fit
    return bfd_assign_capped(seg_len, capacity, seg_len.shape[0] + 1)


@nb.njit(cache=True)
def ffd_assign(seg_len, capacity):
    """First fit: each segment goes to the lowest-numbered bin with room (max tree over bins).

    Unopened bins hold ``capacity`` in the tree, so "the first leaf with room" is either an open
    bin or the next new one: O(n log n). Feed decreasing lengths for first-fit *decreasing*.
    """
    return ffd_assign_capped(seg_len, capacity, seg_len.shape[0] + 1)


@nb.njit(cache=True)
def next_fit_assign(seg_len, capacity):
    """Order-preserving next fit: close the current bin as soon as a segment does not fit."""
    # kept apart from the capped kernel: the segment counter doubles the cost of this tight loop
    n = seg_len.shape[0]
    assign = np.empty(n, np.int64)
    b = -1
    left = 0
    for i in range(n):
        length = seg_len[i]
        if length > left:
            b += 1
            left = capacity
        assign[i] = b
        left -= length
    return assign, b + 1


@nb.njit(cache=True)
def bin_loads(assign, seg_len, n_bins):
    """Tokens per bin (int64 ``[n_bins]``)."""
    loads = np.zeros(n_bins, np.int64)
    for i in range(assign.shape[0]):
        loads[assign[i]] += seg_len[i]
    return loads


@nb.njit(cache=True)
def stable_counting_order(keys, n_keys):
    """Stable argsort of small non-negative int keys (``0 <= key < n_keys``) in O(n + n_keys).

    Replaces ``np.argsort(kind="stable")`` for lengths bounded by the capacity and for bin ids,
    where a comparison sort is the planner's largest cost.
    """
    counts = np.zeros(n_keys + 1, np.int64)
    for i in range(keys.shape[0]):
        counts[keys[i] + 1] += 1
    for k in range(n_keys):
        counts[k + 1] += counts[k]
    order = np.empty(keys.shape[0], np.int64)
    for i in range(keys.shape[0]):
        k = keys[i]
        order[counts[k]] = i
        counts[k] += 1
    return order


@nb.njit(cache=True)
def bfd_assign_capped(seg_len, capacity, max_segments):
    """:func:`bfd_assign` where a bin holding ``max_segments`` segments is closed (treated as full).

    Caps the per-bin segment count (attention kernels and fixed-shape batches pay per segment).
    """
    n = seg_len.shape[0]
    size = _pow2_at_least(capacity + 1)
    tree = np.zeros(2 * size, np.int64)
    head = np.full(capacity + 1, -1, np.int64)
    nxt = np.full(max(n, 1), -1, np.int64)
    count = np.zeros(max(n, 1), np.int64)
    assign = np.empty(n, np.int64)
    n_bins = 0
    for i in range(n):
        length = seg_len[i]
        room = _first_nonzero_at_least(tree, size, length)
        if room < 0:
            b = n_bins
            n_bins += 1
            left = capacity - length
        else:
            b = head[room]
            head[room] = nxt[b]
            _tree_add(tree, size, room, -1)
            left = room - length
        assign[i] = b
        count[b] += 1
        if left > 0 and count[b] < max_segments:
            nxt[b] = head[left]
            head[left] = b
            _tree_add(tree, size, left, 1)
    return assign, n_bins


@nb.njit(cache=True)
def ffd_assign_capped(seg_len, capacity, max_segments):
    """:func:`ffd_assign` where a bin holding ``max_segments`` segments gets no more."""
    n = seg_len.shape[0]
    size = _pow2_at_least(max(n, 1))
    tree = np.full(2 * size, capacity, np.int64)
    count = np.zeros(size, np.int64)
    assign = np.empty(n, np.int64)
    n_bins = 0
    for i in range(n):
        length = seg_len[i]
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= length else 2 * node + 1
        b = node - size
        assign[i] = b
        if b + 1 > n_bins:
            n_bins = b + 1
        count[b] += 1
        # a full-count bin advertises no room; lengths are > 0 so it is never chosen again
        tree[node] = 0 if count[b] >= max_segments else tree[node] - length
        node //= 2
        while node >= 1:
            left = tree[2 * node]
            right = tree[2 * node + 1]
            tree[node] = left if left > right else right
            node //= 2
    return assign, n_bins


@nb.njit(cache=True)
def next_fit_assign_capped(seg_len, capacity, max_segments):
    """:func:`next_fit_assign` that also closes a bin once it holds ``max_segments`` segments."""
    n = seg_len.shape[0]
    assign = np.empty(n, np.int64)
    b = -1
    left = 0
    count = 0
    for i in range(n):
        length = seg_len[i]
        if length > left or count >= max_segments:
            b += 1
            left = capacity
            count = 0
        assign[i] = b
        left -= length
        count += 1
    return assign, b + 1


def warmup() -> float:
    """Compile (or load from the on-disk cache) every kernel; returns the seconds it took.

    Call once outside a hot loop so the first-call JIT cost is paid, and reported, up front.
    """
    import time

    t0 = time.perf_counter()
    x = np.array([3, 2, 1], np.int64)
    bfd_assign(x, 4)
    ffd_assign(x, 4)
    a, nb_ = next_fit_assign(x, 4)
    bin_loads(a, x, nb_)
    stable_counting_order(x, 4)
    bfd_assign_capped(x, 4, 2)
    ffd_assign_capped(x, 4, 2)
    next_fit_assign_capped(x, 4, 2)
    return time.perf_counter() - t0


# --- pure-Python references (quadratic; tests only) -------------------------------------------


def bfd_assign_reference(
    seg_len: list[int], capacity: int, max_segments: int | None = None
) -> tuple[list[int], int]:
    """Best fit by linear scan; ties go to the most recently touched bin, like the kernel.

    ``max_segments``: a bin holding that many segments takes no more (``bfd_assign_capped``).
    """
    rooms: list[int] = []
    counts: list[int] = []
    touched: list[int] = []
    assign = []
    clock = 0
    for length in seg_len:
        best = -1
        for b, room in enumerate(rooms):
            if max_segments is not None and counts[b] >= max_segments:
                continue
            if (
                room >= length
                and room > 0
                and (best < 0 or room < rooms[best] or (room == rooms[best] and touched[b] > touched[best]))
            ):
                best = b
        if best < 0:
            rooms.append(capacity)
            touched.append(0)
            counts.append(0)
            best = len(rooms) - 1
        rooms[best] -= length
        counts[best] += 1
        clock += 1
        touched[best] = clock
        assign.append(best)
    return assign, len(rooms)


def ffd_assign_reference(
    seg_len: list[int], capacity: int, max_segments: int | None = None
) -> tuple[list[int], int]:
    rooms: list[int] = []
    counts: list[int] = []
    assign = []
    for length in seg_len:
        b = next(
            (
                i
                for i, room in enumerate(rooms)
                if room >= length and (max_segments is None or counts[i] < max_segments)
            ),
            -1,
        )
        if b < 0:
            rooms.append(capacity)
            counts.append(0)
            b = len(rooms) - 1
        rooms[b] -= length
        counts[b] += 1
        assign.append(b)
    return assign, len(rooms)
