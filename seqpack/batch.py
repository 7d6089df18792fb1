"""VarlenBatch: the one output type of text pipelines, its one builder, and the padding batch.

One flat token axis of ``T`` tokens holding ``n`` segments (this docstring is the batch contract;
docs/architecture.md is the map). Padding, when asked for, is its own final segment, so
``cu_seqlens[-1] == T`` always and no segment is empty.
Every VarlenBatch is built by :meth:`VarlenBatch.from_arrays` (tokens, target flags and segment
lengths in; labels, positions, ``seq_idx`` and ``cu_seqlens`` computed in one numba pass). The
consumer views (``to_hf``, ``to_flash_attn``, ``to_thd``, ``block_mask``, ``shard_for_cp``) live in
:mod:`seqpack.views`; the methods here call them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch

from seqpack import views
from seqpack.ops.segments import batch_fields
from seqpack.views import IGNORE_INDEX
from seqpack.wire import batch_tokens, new_storage, storage_layout, storage_of, storage_spans

_NO_TARGET = np.zeros(0, np.bool_)


def accelerator_available() -> bool:
    """Whether torch sees an accelerator (CUDA, ROCm, XPU, MPS, ...) that pinned memory can serve."""
    probe = getattr(torch, "accelerator", None)  # torch >= 2.6: every backend behind one call
    if probe is not None:
        return bool(probe.is_available())
    return torch.cuda.is_available()


@dataclass
class VarlenBatch:
    """A packed batch of ``n`` segments over ``T`` tokens.

    Attributes:
        input_ids: int64 ``[T]``.
        labels: int64 ``[T]``, unshifted (the model shifts); ``-100`` on each segment's first token,
            on tokens whose loss mask is False, and on padding.
        position_ids: int64 ``[T]``, restart at 0 per segment (or continue from ``seg_start``).
        cu_seqlens: int32 ``[n + 1]``, contiguous; ``cu_seqlens[-1] == T``.
        max_seqlen: longest segment (Python int, padding segment included).
        seq_idx: int32 ``[T]``, segment index of each token.
        doc_ids: int64 ``[n]``, global id of each segment's document; ``-1`` for padding.
        seg_start: int64 ``[n]``, token offset of each segment inside its document.
        num_loss_tokens: targets after the shift (``labels != -100``).
        n_real_segments: segments that hold documents (excludes the padding segment).
        loss_weights: optional float32 ``[T]`` per-token loss weights (aligned with ``labels``).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    seq_idx: torch.Tensor
    doc_ids: torch.Tensor
    seg_start: torch.Tensor
    num_loss_tokens: int
    n_real_segments: int
    loss_weights: torch.Tensor | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_segments(
        cls,
        tokens: Sequence[np.ndarray],
        doc_ids: Sequence[int] | np.ndarray,
        *,
        seg_start: Sequence[int] | np.ndarray | None = None,
        loss_masks: Sequence[np.ndarray | None] | None = None,
        pad_to: int | None = None,
        pad_id: int = 0,
        continue_positions: bool = False,
        pad_segments_to: int | None = None,
    ) -> VarlenBatch:
        """Concatenate segment token arrays into a batch.

        Args:
            tokens: one 1-D integer array per segment (length > 0).
            doc_ids: global document id per segment.
            seg_start: offset of each segment inside its document (0 when omitted).
            loss_masks: per segment, a bool array (True = token is a target) or None (all True).
            pad_to: total length ``T``; the remainder becomes one padding segment.
            continue_positions: positions of a split document's later piece continue from its
                offset instead of restarting at 0.
            pad_segments_to: fixed-shape mode (with ``pad_to``): the padding is cut into as many
                segments as it takes for ``cu_seqlens`` to have ``pad_segments_to + 1`` entries,
                see :meth:`pad_to_shape`.
        """
        if pad_segments_to is not None:
            if pad_to is None:
                raise ValueError("pad_segments_to needs pad_to (a fixed number of tokens)")
            batch = cls.from_segments(
                tokens,
                doc_ids,
                seg_start=seg_start,
                loss_masks=loss_masks,
                continue_positions=continue_positions,
            )
            return batch.pad_to_shape(pad_to, pad_segments_to, pad_id=pad_id)
        n = len(tokens)
        if n == 0:
            raise ValueError("a batch needs at least one segment")
        lens = np.fromiter((len(t) for t in tokens), np.int64, n)
        if (lens <= 0).any():
            raise ValueError(f"segment {int(np.flatnonzero(lens <= 0)[0])} is empty")
        total = int(lens.sum())
        if pad_to is not None and pad_to < total:
            raise ValueError(f"pad_to={pad_to} is shorter than the {total} tokens of the batch")
        size = total if pad_to is None else int(pad_to)
        input_ids = batch_tokens(size, n)
        np.concatenate([np.asarray(t, np.int64) for t in tokens], out=input_ids[:total])
        target = None
        if loss_masks is not None:
            masks = [
                np.ones(ln, bool) if m is None else np.asarray(m, bool) for m, ln in zip(loss_masks, lens)
            ]
            if sum(len(m) for m in masks) != total:
                raise ValueError("loss_masks must have the same lengths as tokens")
            target = np.concatenate(masks)
        starts = np.zeros(n, np.int64) if seg_start is None else np.asarray(seg_start, np.int64)
        return cls.from_arrays(
            input_ids,
            lens,
            doc_ids,
            starts,
            target=target,
            pad_id=pad_id,
            continue_positions=continue_positions,
        )

    @classmethod
    def from_arrays(
        cls,
        input_ids: np.ndarray,
        lens: np.ndarray,
        doc_ids: np.ndarray,
        seg_start: np.ndarray,
        *,
        target: np.ndarray | None = None,
        pad_id: int = 0,
        continue_positions: bool = False,
    ) -> VarlenBatch:
        """The one builder: a batch from its flat tokens and segment table.

        Every array of the batch is a view into one buffer (its *storage*), so a DataLoader worker
        sends the batch as that one buffer (:func:`seqpack.wire.encode_batch`). ``input_ids`` is
        copied into a fresh storage, unless it comes from :func:`batch_tokens` (then it becomes
        the batch's tensor as is).

        Args:
            input_ids: int64 ``[T]``: the ``n`` segments' tokens back to back, then room for padding.
            lens: int64 ``[n]`` segment lengths (> 0), ``sum(lens) <= T``.
            doc_ids: int64 ``[n]`` document id per segment.
            seg_start: int64 ``[n]`` token offset of each segment inside its document.
            target: bool, at least ``sum(lens)`` long: True where a token is a target (a
                loss mask); None: every token is. A segment's first token never is, so no segment
                predicts across a boundary.
            pad_id: when ``sum(lens) < T`` the rest becomes one padding segment (``input_ids`` is
                overwritten there with ``pad_id``; doc id -1, no targets).
            continue_positions: positions start at ``seg_start`` instead of 0.
        """
        lens = np.ascontiguousarray(lens, np.int64)
        has_target = target is not None
        target = np.ascontiguousarray(target, np.bool_) if has_target else _NO_TARGET
        n, size = len(lens), len(input_ids)
        # every array of the batch lives in one buffer (so a worker ships it as is, seqpack.wire)
        raw = storage_of(input_ids, n)
        if raw is None:
            raw = new_storage(size, n)
            raw[: 8 * size].view(np.int64)[:] = input_ids
        raw[-1] = 1  # claimed: no other batch is built in this storage
        offs = storage_layout(size, n)
        ids = raw[: 8 * size].view(np.int64)
        labels = raw[offs[1] : offs[1] + 8 * size].view(np.int64)
        position_ids = raw[offs[2] : offs[2] + 8 * size].view(np.int64)
        seq_idx = raw[offs[3] : offs[3] + 4 * size].view(np.int32)
        # the segment table is copied (with room for the padding segment): a batch pins no caller array
        cu = raw[offs[4] : offs[4] + 4 * (n + 2)].view(np.int32)
        out_doc = raw[offs[5] : offs[5] + 8 * (n + 1)].view(np.int64)
        out_start = raw[offs[6] : offs[6] + 8 * (n + 1)].view(np.int64)
        n_loss, n_seg, longest = batch_fields(
            ids, target, has_target, lens, np.ascontiguousarray(doc_ids, np.int64),
            np.ascontiguousarray(seg_start, np.int64), bool(continue_positions), IGNORE_INDEX, pad_id,
            labels, position_ids, seq_idx, cu, out_doc, out_start,
        )  # fmt: skip
        if n_seg <= 0:
            raise ValueError(f"a batch needs 0 < sum(lens) <= T, got {int(lens.sum())} tokens and T={size}")
        batch = cls(
            input_ids=torch.from_numpy(ids),
            labels=torch.from_numpy(labels),
            position_ids=torch.from_numpy(position_ids),
            cu_seqlens=torch.from_numpy(cu[: n_seg + 1]),
            max_seqlen=int(longest),
            seq_idx=torch.from_numpy(seq_idx),
            doc_ids=torch.from_numpy(out_doc[:n_seg]),
            seg_start=torch.from_numpy(out_start[:n_seg]),
            num_loss_tokens=int(n_loss),
            n_real_segments=n,
        )
        spans = storage_spans(size, n, n_seg)
        batch._storage = (raw, tuple(getattr(batch, span[0]) for span in spans), spans)
        return batch

    def __getstate__(self) -> dict:
        # the storage note is this process's (a pointer); pickled batches carry their tensors only
        d = dict(self.__dict__)
        d.pop("_storage", None)
        return d

    # ------------------------------------------------------------------ derived views
    @property
    def num_tokens(self) -> int:
        """``T``, padding included."""
        return int(self.input_ids.shape[0])

    @property
    def num_real_tokens(self) -> int:
        return int(self.cu_seqlens[self.n_real_segments])

    @property
    def seqlens(self) -> torch.Tensor:
        """int32 ``[n]`` segment lengths."""
        return views.seqlens(self)

    @property
    def shift_labels(self) -> torch.Tensor:
        """Pre-shifted targets: ``shift_labels[t] = labels[t+1]``, ``-100`` at each segment's end."""
        return views.shift_labels(self)

    # ------------------------------------------------------------------ consumer views (seqpack.views)
    def to_flash_attn(self) -> dict[str, Any]:
        """:func:`seqpack.views.to_flash_attn`: keyword arguments for ``flash_attn_varlen_func``."""
        return views.to_flash_attn(self)

    def to_hf(self, position_start: int = 0, seq_idx: bool = False) -> dict[str, Any]:
        """:func:`seqpack.views.to_hf`: inputs for a transformers causal LM (batch 1, no mask)."""
        return views.to_hf(self, position_start, seq_idx)

    def block_mask(self, block_size: int = 128, device: torch.device | str | None = None):
        """:func:`seqpack.views.block_mask`: FlexAttention causal + document ``BlockMask``."""
        return views.block_mask(self, block_size, device)

    def to_thd(self, pad_multiple: int = 1) -> dict[str, Any]:
        """:func:`seqpack.views.to_thd`: TransformerEngine / Megatron THD layout."""
        return views.to_thd(self, pad_multiple)

    def shard_for_cp(self, cp_size: int, rank: int) -> dict[str, Any]:
        """:func:`seqpack.views.shard_for_cp`: this context-parallel rank's zigzag share."""
        return views.shard_for_cp(self, cp_size, rank)

    def pad_to_shape(self, num_tokens: int, num_segments: int, pad_id: int = 0) -> VarlenBatch:
        """Fixed-shape copy for ``torch.compile`` / CUDA graphs: ``T == num_tokens`` and
        ``cu_seqlens`` of ``num_segments + 1`` entries, every segment non-empty.

        The real segments are kept; the rest becomes ``num_segments - n_real_segments`` padding
        segments (``doc_ids == -1``, no targets, zero loss weight): one token each, the last one
        taking the remainder. So the padding needs at least that many tokens: plan with
        ``max_segments_per_bin = num_segments - 1`` and ``capacity = num_tokens - num_segments + 1``
        and every bin fits (the reserve costs ``(num_segments - 1) / num_tokens`` of fill).
        ``max_seqlen`` stays exact (a Python int that changes per batch); a compiled
        flash-attn call may be given ``num_tokens`` instead, which the kernel accepts as a bound.
        """
        n_real, real_T = self.n_real_segments, self.num_real_tokens
        n_pad, pad = num_segments - n_real, num_tokens - real_T
        if pad < 0 or n_pad < 0:
            raise ValueError(
                f"batch of {real_T} tokens in {n_real} segments does not fit the fixed shape "
                f"({num_tokens} tokens, {num_segments} segments)"
            )
        if n_pad > pad or (pad > 0 and n_pad == 0):
            raise ValueError(
                f"fixed shape ({num_tokens} tokens, {num_segments} segments) needs {n_pad} padding segments "
                f"from {pad} padding tokens and no empty segment: leave at least one token and one segment "
                "per padding segment (plan with max_segments_per_bin = num_segments - 1 and "
                "capacity = num_tokens - num_segments + 1)"
            )
        dev = self.input_ids.device
        pad_lens = torch.ones(n_pad, dtype=torch.int64, device=dev)
        if n_pad:
            pad_lens[-1] = pad - (n_pad - 1)
        cu = torch.cat([self.cu_seqlens[: n_real + 1].long(), real_T + torch.cumsum(pad_lens, 0)])
        lens = cu[1:] - cu[:-1]
        pad_pos = torch.arange(pad, device=dev) - (cu[n_real:-1] - real_T).repeat_interleave(pad_lens)
        weights = self.loss_weights
        if weights is not None:
            weights = torch.cat([weights[:real_T], weights.new_zeros(pad)])
        return replace(
            self,
            input_ids=torch.cat([self.input_ids[:real_T], self.input_ids.new_full((pad,), pad_id)]),
            labels=torch.cat([self.labels[:real_T], self.labels.new_full((pad,), IGNORE_INDEX)]),
            position_ids=torch.cat([self.position_ids[:real_T], pad_pos]),
            cu_seqlens=cu.to(torch.int32).contiguous(),
            max_seqlen=int(lens.max()),
            seq_idx=torch.arange(num_segments, dtype=torch.int32, device=dev).repeat_interleave(lens),
            doc_ids=torch.cat([self.doc_ids[:n_real], self.doc_ids.new_full((n_pad,), -1)]),
            seg_start=torch.cat([self.seg_start[:n_real], self.seg_start.new_zeros(n_pad)]),
            loss_weights=weights,
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> VarlenBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> VarlenBatch:
        """Page-locked copy for fast host-to-device transfer; ``self`` unchanged without an accelerator.

        Pinning needs an accelerator runtime (torch raises on a CPU-only machine), and pinned
        memory only speeds up copies to one, so CPU-only training gets the batch as it is.
        """
        if not accelerator_available():
            return self
        return self._map(lambda t: t.pin_memory())

    def _map(self, fn) -> VarlenBatch:
        changes = {
            f.name: fn(getattr(self, f.name))
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **changes)

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ``ValueError`` if any invariant of the batch contract is broken."""
        cu = self.cu_seqlens
        T = self.num_tokens
        problems = []
        if cu.dtype != torch.int32 or not cu.is_contiguous():
            problems.append("cu_seqlens must be contiguous int32")
        if int(cu[0]) != 0 or int(cu[-1]) != T:
            problems.append(f"cu_seqlens must run from 0 to T={T}, got {int(cu[0])}..{int(cu[-1])}")
        lens = (cu[1:] - cu[:-1]).long()
        if (lens <= 0).any():
            problems.append("cu_seqlens must be strictly increasing (no empty segment)")
        else:
            starts = cu[:-1].long()
            seg = torch.arange(len(lens)).repeat_interleave(lens)
            if not torch.equal(self.seq_idx.long(), seg):
                problems.append("seq_idx disagrees with cu_seqlens")
            expected_pos = torch.arange(T) - starts.repeat_interleave(lens)
            offset = self.position_ids - expected_pos
            continued = torch.equal(offset, self.seg_start.repeat_interleave(lens))
            if not continued and (offset != 0).any():
                problems.append("position_ids do not restart at segment boundaries")
            if (self.labels[starts] != IGNORE_INDEX).any():
                problems.append("a segment's first label is not -100")
            if self.max_seqlen != int(lens.max()):
                problems.append(f"max_seqlen={self.max_seqlen} but longest segment is {int(lens.max())}")
        if len(self.doc_ids) != len(lens):
            problems.append("doc_ids must have one entry per segment")
        if self.num_loss_tokens != int((self.labels != IGNORE_INDEX).sum()):
            problems.append("num_loss_tokens disagrees with labels")
        if self.loss_weights is not None:
            if self.loss_weights.shape != self.labels.shape:
                problems.append(f"loss_weights must be [T={T}], got {tuple(self.loss_weights.shape)}")
            elif (self.loss_weights[self.labels == IGNORE_INDEX] != 0).any():
                problems.append("loss_weights must be 0 where labels are -100")
        if self.n_real_segments < len(lens):
            pad = slice(int(cu[self.n_real_segments]), T)
            if (self.labels[pad] != IGNORE_INDEX).any():
                problems.append("padding carries labels")
        if problems:
            raise ValueError("invalid VarlenBatch: " + "; ".join(problems))


def padding_batch(num_tokens: int, pad_id: int = 0) -> VarlenBatch:
    """The zero-loss batch: one padding segment of ``num_tokens`` tokens (``n_real_segments == 0``,
    ``num_loss_tokens == 0``). Ranks that run out of data yield these so every rank takes the same
    number of steps (DDP never hangs); positions restart at 0 like any segment."""
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be > 0, got {num_tokens}")
    empty = np.zeros(0, np.int64)
    return VarlenBatch.from_arrays(batch_tokens(num_tokens, 0), empty, empty, empty, pad_id=pad_id)
