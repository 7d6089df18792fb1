"""Numba kernels that turn packed segments into batch arrays in one pass each, with references.

A streamed batch is ~10 segments of ~10^3 tokens; built with numpy, every field costs a call and a
temporary per segment or per field. These kernels copy the segments' tokens into the batch row
(casting int32 Arrow values to int64 on the way) and fill labels, positions and segment indices in
single loops, so assembling a batch costs two calls whatever its segment count.
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
def segment_fields(
    input_ids, target, cu, seg_start, continue_positions, ignore, labels, position_ids, seq_idx
):
    """Fill ``labels``, ``position_ids``, ``seq_idx`` (all ``[T]``) for segments ``cu`` (int32 ``[n+1]``).

    ``target`` (bool ``[T]``) marks tokens that are targets; a segment's first token never is.
    Positions restart at 0 per segment, or at ``seg_start[s]`` with ``continue_positions``.
    Returns the number of targets (labels != ``ignore``).
    """
    n_loss = 0
    for s in range(cu.shape[0] - 1):
        a, b = np.int64(cu[s]), np.int64(cu[s + 1])
        if b <= a:
            continue
        p0 = seg_start[s] if continue_positions else 0
        seq_idx[a:b] = s
        pos, lab, ids, tg = position_ids[a:b], labels[a:b], input_ids[a:b], target[a:b]
        for j in range(b - a):
            pos[j] = p0 + j
        for j in range(b - a):
            lab[j] = ids[j] if tg[j] else ignore
            n_loss += np.int64(tg[j])
        n_loss -= np.int64(tg[0])
        lab[0] = ignore
    return n_loss


@nb.njit(cache=True)
def _copy(src, dst):
    for j in range(dst.shape[0]):
        dst[j] = src[j]


@nb.njit(cache=True)
def gather_two(first, second, src_start, seg_len, dest_start, out):
    """:func:`gather_segments` over the virtual concatenation ``first ++ second`` (no segment
    straddles the two; the arrays may differ in dtype)."""
    n0 = first.shape[0]
    for i in range(seg_len.shape[0]):
        n, s = seg_len[i], src_start[i]
        dst = out[dest_start[i] : dest_start[i] + n]
        if s < n0:
            _copy(first[s : s + n], dst)
        else:
            _copy(second[s - n0 : s - n0 + n], dst)


@nb.njit(cache=True)
def _fill_segment(tok, tg, has_mask, ids, lab, pos, p0, ignore):
    """Copy one segment's tokens and fill its labels/positions; returns its targets."""
    ln = ids.shape[0]
    for j in range(ln):
        ids[j] = tok[j]
        pos[j] = p0 + j
    n_loss = 0
    if has_mask:
        for j in range(ln):
            lab[j] = tok[j] if tg[j] else ignore
            n_loss += np.int64(tg[j])
        n_loss -= np.int64(tg[0])
    else:
        for j in range(ln):
            lab[j] = tok[j]
        n_loss += ln - 1
    lab[0] = ignore
    return n_loss


@nb.njit(cache=True)
def assemble_batch(
    first, second, first_mask, second_mask, has_mask, src, seg_len, seg_start, doc_id, size, pad_id,
    continue_positions, ignore, input_ids, labels, position_ids, seq_idx, cu, out_doc_id, out_seg_start,
):
    """One packed row from token segments of ``first ++ second`` (two integer arrays, e.g. carried
    int64 tokens and an int32 Arrow buffer; the masks are bool and aligned when ``has_mask``).

    Segment ``i`` is ``(first ++ second)[src[i] : src[i] + seg_len[i]]``. Writes ``input_ids``, ``labels``,
    ``position_ids``, ``seq_idx`` (``[size]``), ``cu`` (``[n + 2]`` room), ``out_doc_id`` and
    ``out_seg_start`` (``[n + 1]`` room); when the segments hold fewer than ``size`` tokens the rest
    is one padding segment (``pad_id``, no targets, doc id -1). Returns ``(targets, segments
    including padding, longest segment)``.
    """
    n = seg_len.shape[0]
    n0 = first.shape[0]
    t = 0
    n_loss = 0
    longest = 0
    cu[0] = 0
    for s in range(n):
        ln = seg_len[s]
        a = src[s]
        p0 = seg_start[s] if continue_positions else 0
        ids, lab, pos = input_ids[t : t + ln], labels[t : t + ln], position_ids[t : t + ln]
        seq_idx[t : t + ln] = s
        if a < n0:
            tg = first_mask[a : a + ln] if has_mask else first_mask
            n_loss += _fill_segment(first[a : a + ln], tg, has_mask, ids, lab, pos, p0, ignore)
        else:
            b = a - n0
            tg = second_mask[b : b + ln] if has_mask else second_mask
            n_loss += _fill_segment(second[b : b + ln], tg, has_mask, ids, lab, pos, p0, ignore)
        out_doc_id[s] = doc_id[s]
        out_seg_start[s] = seg_start[s]
        longest = max(longest, ln)
        t += ln
        cu[s + 1] = t
    n_seg = n
    if size > t:
        pad = size - t
        input_ids[t:size] = pad_id
        labels[t:size] = ignore
        seq_idx[t:size] = n
        pos = position_ids[t:size]
        for j in range(pad):
            pos[j] = j
        out_doc_id[n] = -1
        out_seg_start[n] = 0
        cu[n + 1] = size
        longest = max(longest, pad)
        n_seg = n + 1
    return n_loss, n_seg, longest


def gather_segments_reference(values, src_start, seg_len, dest_start, out) -> None:
    """Plain-Python :func:`gather_segments`."""
    for s, n, d in zip(src_start, seg_len, dest_start):
        out[d : d + n] = values[s : s + n]


def segment_fields_reference(
    input_ids, target, cu, seg_start, continue_positions, ignore, labels, position_ids, seq_idx
) -> int:
    """Plain-Python :func:`segment_fields`."""
    n_loss = 0
    for s in range(len(cu) - 1):
        a, b = int(cu[s]), int(cu[s + 1])
        p0 = int(seg_start[s]) if continue_positions else 0
        position_ids[a:b] = np.arange(b - a) + p0
        seq_idx[a:b] = s
        lab = np.where(target[a:b], input_ids[a:b], ignore)
        lab[0] = ignore
        labels[a:b] = lab
        n_loss += int((lab != ignore).sum())
    return n_loss
