"""Numba kernel for dataset decomposition, with a pure-Python reference.

Each document of ``n`` tokens is cut greedily from the front into pieces of ``2^k + 1`` tokens with
``k = floor(log2(remaining - 1))``. A piece with ``k > max_log2`` gets a random ``k`` in
``[min_log2, max_log2]`` with ``P(k) ∝ 2^(max_log2 - k)`` (equal expected token mass per bucket), or
``max_log2`` when ``cap`` is set. Once ``k < min_log2`` the remainder is dropped (and counted).

The random draw is a counter-based hash of ``(seed, doc_key, piece_index)``, so a document decomposes
the same way offline, streamed, on any rank and in any worker: nothing depends on visiting order.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_MASK64 = (1 << 64) - 1


@njit(cache=True)
def _mix64(x: np.uint64) -> np.uint64:
    # splitmix64 finalizer: a bijective avalanche, good enough to turn counters into uniform bits
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@njit(cache=True)
def piece_hash(seed: np.int64, doc_key: np.int64, piece: np.int64) -> np.uint64:
    h = _mix64(np.uint64(seed) + np.uint64(0x9E3779B97F4A7C15))
    h = _mix64(h ^ np.uint64(doc_key))
    return _mix64(h ^ (np.uint64(piece) * np.uint64(0xD6E8FEB86659FD93)))


@njit(cache=True)
def _floor_log2(x: np.int64) -> np.int64:
    k = np.int64(-1)
    while x > 0:
        x >>= 1
        k += 1
    return k


@njit(cache=True)
def draw_overlong_log2(h: np.uint64, min_log2: np.int64, max_log2: np.int64) -> np.int64:
    """``k`` in ``[min_log2, max_log2]`` with ``P(k) ∝ 2^(max_log2 - k)`` from 64 random bits."""
    span = max_log2 - min_log2
    total = (np.int64(1) << (span + 1)) - 1
    r = np.int64(h % np.uint64(total))
    width = np.int64(1) << span
    k = min_log2
    while r >= width:
        r -= width
        width >>= 1
        k += 1
    return k


@njit(cache=True)
def _decompose_one(n, key, min_log2, max_log2, cap, seed, out_start, out_log2, write, base):
    pos = np.int64(0)
    j = np.int64(0)
    while n - pos - 1 >= (np.int64(1) << min_log2):
        k = _floor_log2(n - pos - 1)
        if k > max_log2:
            k = max_log2 if cap else draw_overlong_log2(piece_hash(seed, key, j), min_log2, max_log2)
        if write:
            out_start[base + j] = pos
            out_log2[base + j] = k
        pos += (np.int64(1) << k) + 1
        j += 1
    return j, n - pos


@njit(cache=True)
def decompose_kernel(lengths, keys, min_log2, max_log2, cap, seed):
    """Pieces of every document.

    Args: int64 ``lengths [n]`` and ``keys [n]`` (the hash key of each document, its global id).
    Returns: ``piece_offsets [n+1]`` (CSR over documents), ``piece_start``, ``piece_log2``
    (int64 ``[n_pieces]``; the piece covers ``2^k + 1`` tokens from ``piece_start``) and
    ``dropped [n]`` (tokens left over per document).
    """
    n = len(lengths)
    offsets = np.zeros(n + 1, np.int64)
    dropped = np.zeros(n, np.int64)
    dummy = np.zeros(0, np.int64)
    for d in range(n):
        cnt, rest = _decompose_one(lengths[d], keys[d], min_log2, max_log2, cap, seed, dummy, dummy, False, 0)
        offsets[d + 1] = offsets[d] + cnt
        dropped[d] = rest
    starts = np.empty(offsets[n], np.int64)
    log2s = np.empty(offsets[n], np.int64)
    for d in range(n):
        _decompose_one(lengths[d], keys[d], min_log2, max_log2, cap, seed, starts, log2s, True, offsets[d])
    return offsets, starts, log2s, dropped


# ---------------------------------------------------------------------------------- pure Python reference
def _mix64_py(x: int) -> int:
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def piece_hash_py(seed: int, doc_key: int, piece: int) -> int:
    h = _mix64_py((seed + 0x9E3779B97F4A7C15) & _MASK64)
    h = _mix64_py(h ^ (doc_key & _MASK64))
    return _mix64_py(h ^ ((piece * 0xD6E8FEB86659FD93) & _MASK64))


def draw_overlong_log2_py(h: int, min_log2: int, max_log2: int) -> int:
    span = max_log2 - min_log2
    r = h % ((1 << (span + 1)) - 1)
    # bucket k covers 2^(max-k) consecutive values of r, largest (k = min_log2) first
    for k in range(min_log2, max_log2 + 1):
        width = 1 << (max_log2 - k)
        if r < width:
            return k
        r -= width
    raise AssertionError("unreachable")


def decompose_reference(
    n: int, key: int, min_log2: int, max_log2: int, cap: bool, seed: int
) -> tuple[list[tuple[int, int]], int]:
    """``[(start, k), ...]`` and dropped tokens for one document of ``n`` tokens (plain loop)."""
    pieces, pos = [], 0
    while n - pos - 1 >= 2**min_log2:
        k = (n - pos - 1).bit_length() - 1
        if k > max_log2:
            k = (
                max_log2
                if cap
                else draw_overlong_log2_py(piece_hash_py(seed, key, len(pieces)), min_log2, max_log2)
            )
        pieces.append((pos, k))
        pos += 2**k + 1
    return pieces, n - pos
