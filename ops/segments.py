"""Numba kernels that turn packed segments into batch arrays in one pass each, with references.

A streamed batch is ~10 segments of ~10^3 tokens; built with numpy, every field costs a call and a
temporary per segment or per field. ``gather_two`` copies the segments' tokens into the batch row
(casting int32 Arrow values to int64 on the way) and ``batch_fields`` fills labels, positions,
segment indices and ``cu_seqlens`` in one loop, so assembling a batch costs two calls whatever its
segment count (``VarlenBatch.from_arrays`` is the one caller of ``batch_fields``).
"""

from __future__ import annotations

import numba as nb
import numpy as np


@nb.njit(cache=True)
def gather_segments(values, src_start, seg_len, dest_start, out):
    """``out[dest_start[i] : dest_start[i] + seg_len[i]] = values[src_start[i] : ... + seg_len[i]]``."""
    # slices, not ``out[d + j]``: numba's negative-index wraparound on computed indices blocks SIMD
    for i in range(seg_len.shape[0]):
        n = seg_len[i]
        dst = out[dest_start[i] : dest_start[i] + n]
        src = values[src_start[i] : src_start[i] + n]
        for j in range(n):
            dst[j] = src[j]


@nb.njit(cache=True)
def batch_fields(
    input_ids, target, has_target, lens, doc_ids, seg_start, continue_positions, ignore, pad_id,
    labels, position_ids, seq_idx, cu, out_doc_ids, out_seg_start,
):  # fmt: skip
    """The fields of a batch whose ``n`` segments (``lens``, int64 ``[n]``) lie back to back at the
    start of ``input_ids`` (int64 ``[T]``); the rest of ``input_ids``, if any, becomes one padding
    segment (``pad_id``, no targets, doc id -1).

    ``target`` (bool, read only when ``has_target``; else every token is one) marks the tokens that
    are targets; a segment's first token never is. Positions restart at 0 per segment, or at
    ``seg_start[s]`` with ``continue_positions``. Writes ``labels``, ``position_ids``, ``seq_idx``
    (``[T]``), ``cu`` (int32, ``[n + 2]`` room), ``out_doc_ids`` and ``out_seg_start`` (``[n + 1]``
    room). Returns ``(targets, segments including padding, longest segment)``, or ``(-1, -1, -1)``
    without writing anything when the segments hold more than ``T`` tokens.
    """
    n = lens.shape[0]
    size = input_ids.shape[0]
    total = 0
    for s in range(n):
        total += lens[s]
    if total > size:
        return -1, -1, -1
    n_loss = 0
    longest = 0
    cu[0] = 0
    a = 0
    for s in range(n):
        ln = lens[s]
        b = a + ln
        cu[s + 1] = b
        out_doc_ids[s] = doc_ids[s]
        out_seg_start[s] = seg_start[s]
        longest = max(longest, ln)
        if ln <= 0:
            continue
        p0 = seg_start[s] if continue_positions else 0
        seq_idx[a:b] = s
        pos, lab, ids = position_ids[a:b], labels[a:b], input_ids[a:b]
        for j in range(ln):
            pos[j] = p0 + j
        if has_target:
            tg = target[a:b]
            for j in range(ln):
                lab[j] = ids[j] if tg[j] else ignore
                n_loss += np.int64(tg[j])
            n_loss -= np.int64(tg[0])
        else:
            for j in range(ln):
                lab[j] = ids[j]
            n_loss += ln - 1
        lab[0] = ignore
        a = b
    if size == a:
        return n_loss, n, longest
    input_ids[a:size] = pad_id
    labels[a:size] = ignore
    seq_idx[a:size] = n
    pos = position_ids[a:size]
    for j in range(size - a):
        pos[j] = j
    cu[n + 1] = size
    out_doc_ids[n] = -1
    out_seg_start[n] = 0
    return n_loss, n + 1, max(longest, size - a)


@nb.njit(cache=True)
def _copy(src, dst):
    for j in range(dst.shape[0]):
        dst[j] = src[j]


@nb.njit(cache=True)
def gather_two(first, second, src_start, seg_len, out):
    """Segments ``(first ++ second)[src_start[i] : src_start[i] + seg_len[i]]`` back to back into
    ``out`` (the virtual concatenation of two arrays, which may differ in dtype; no segment
    straddles the two)."""
    n0 = first.shape[0]
    d = 0
    for i in range(seg_len.shape[0]):
        n, s = seg_len[i], src_start[i]
        dst = out[d : d + n]
        if s < n0:
            _copy(first[s : s + n], dst)
        else:
            _copy(second[s - n0 : s - n0 + n], dst)
        d += n


def warmup() -> None:
    """Run one tiny kernel so numba's runtime is initialized (~0.3 s on first use in a process, even
    with every kernel cached): callers pay it once up front instead of inside the first batch."""
    one, zero = np.ones(1, np.int64), np.zeros(1, np.int64)
    gather_segments(one, zero, one, zero, np.zeros(1, np.int64))


def gather_segments_reference(values, src_start, seg_len, dest_start, out) -> None:
    """Plain-Python :func:`gather_segments`."""
    for s, n, d in zip(src_start, seg_len, dest_start):
        out[d : d + n] = values[s : s + n]


def batch_fields_reference(
    input_ids, target, has_target, lens, doc_ids, seg_start, continue_positions, ignore, pad_id,
    labels, position_ids, seq_idx, cu, out_doc_ids, out_seg_start,
) -> tuple[int, int, int]:  # fmt: skip
    """Plain-Python :func:`batch_fields`."""
    size, total = len(input_ids), int(np.sum(lens))
    if total > size:
        return -1, -1, -1
    pad = size - total
    lens = [int(x) for x in lens] + ([pad] if pad else [])
    n_seg = len(lens)
    cu[0] = 0
    cu[1 : n_seg + 1] = np.cumsum(lens)
    out_doc_ids[:n_seg] = list(doc_ids[: len(doc_ids)]) + ([-1] if pad else [])
    out_seg_start[:n_seg] = list(seg_start[: len(seg_start)]) + ([0] if pad else [])
    input_ids[total:] = pad_id
    n_loss = 0
    for s in range(n_seg):
        a, b = int(cu[s]), int(cu[s + 1])
        is_pad = pad and s == n_seg - 1
        p0 = int(out_seg_start[s]) if continue_positions else 0
        position_ids[a:b] = np.arange(b - a) + p0
        seq_idx[a:b] = s
        tg = np.zeros(b - a, bool) if is_pad else (target[a:b] if has_target else np.ones(b - a, bool))
        lab = np.where(tg, input_ids[a:b], ignore)
        lab[0] = ignore
        labels[a:b] = lab
        n_loss += int((lab != ignore).sum())
    return n_loss, n_seg, max(lens, default=0)
