"""VarlenBatch: the one output type of text pipelines, and its adapters to attention consumers.

One flat token axis of ``T`` tokens holding ``n`` segments (design.md section 2). Padding, when
asked for, is its own final segment, so ``cu_seqlens[-1] == T`` always and no segment is empty.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100


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
            batch = cls.from_segments(tokens, doc_ids, seg_start=seg_start, loss_masks=loss_masks,
                                      continue_positions=continue_positions)
            return batch.pad_to_shape(pad_to, pad_segments_to, pad_id=pad_id)
        n = len(tokens)
        if n == 0:
            raise ValueError("a batch needs at least one segment")
        lens = np.fromiter((len(t) for t in tokens), np.int64, n)
        if (lens <= 0).any():
            raise ValueError(f"segment {int(np.flatnonzero(lens <= 0)[0])} is empty")
        input_ids = np.concatenate([np.asarray(t, np.int64) for t in tokens])
        if loss_masks is None:
            target = np.ones(len(input_ids), bool)
        else:
            target = np.concatenate(
                [np.ones(ln, bool) if m is None else np.asarray(m, bool) for m, ln in zip(loss_masks, lens)]
            )
            if len(target) != len(input_ids):
                raise ValueError("loss_masks must have the same lengths as tokens")
        starts = np.zeros(n, np.int64) if seg_start is None else np.asarray(seg_start, np.int64)
        doc_ids = np.asarray(doc_ids, np.int64)
        total = int(lens.sum())
        if pad_to is not None and pad_to < total:
            raise ValueError(f"pad_to={pad_to} is shorter than the {total} tokens of the batch")
        if pad_to is not None and pad_to > total:
            pad = pad_to - total
            lens = np.append(lens, pad)
            input_ids = np.concatenate([input_ids, np.full(pad, pad_id, np.int64)])
            target = np.concatenate([target, np.zeros(pad, bool)])
            starts = np.append(starts, 0)
            doc_ids = np.append(doc_ids, -1)
        return cls._from_arrays(input_ids, target, lens, doc_ids, starts, n, continue_positions)

    @classmethod
    def _from_arrays(
        cls, input_ids, target, lens, doc_ids, starts, n_real, continue_positions
    ) -> VarlenBatch:
        cu = np.zeros(len(lens) + 1, np.int32)
        np.cumsum(lens, out=cu[1:])
        seq_idx = np.repeat(np.arange(len(lens), dtype=np.int32), lens)
        position_ids = np.arange(len(input_ids), dtype=np.int64) - np.repeat(cu[:-1].astype(np.int64), lens)
        if continue_positions:
            position_ids += np.repeat(starts, lens)
        labels = np.where(target, input_ids, IGNORE_INDEX)
        labels[cu[:-1]] = IGNORE_INDEX
        return cls(
            input_ids=torch.from_numpy(input_ids),
            labels=torch.from_numpy(labels),
            position_ids=torch.from_numpy(position_ids),
            cu_seqlens=torch.from_numpy(cu),
            max_seqlen=int(lens.max()),
            seq_idx=torch.from_numpy(seq_idx),
            doc_ids=torch.from_numpy(doc_ids),
            seg_start=torch.from_numpy(starts),
            num_loss_tokens=int((labels != IGNORE_INDEX).sum()),
            n_real_segments=int(n_real),
        )

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
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    @property
    def shift_labels(self) -> torch.Tensor:
        """Pre-shifted targets: ``shift_labels[t] = labels[t+1]``, ``-100`` at each segment's end."""
        out = torch.full_like(self.labels, IGNORE_INDEX)
        out[:-1] = self.labels[1:]
        out[self.cu_seqlens[1:].long() - 1] = IGNORE_INDEX
        return out

    # ------------------------------------------------------------------ adapters
    def to_flash_attn(self) -> dict[str, Any]:
        """Keyword arguments for ``flash_attn_varlen_func`` (pass them by keyword)."""
        return {
            "cu_seqlens_q": self.cu_seqlens,
            "cu_seqlens_k": self.cu_seqlens,
            "max_seqlen_q": self.max_seqlen,
            "max_seqlen_k": self.max_seqlen,
        }

    def to_hf(self, position_start: int = 0) -> dict[str, Any]:
        """Inputs for a transformers causal LM with batch size 1 and no attention mask.

        ``input_ids``/``labels``/``position_ids`` are ``[1, T]``; the padding-free kwargs read by
        transformers' flash/flex paths are named after the installed version's signature.
        ``position_start`` offsets positions for models that do not start at 0 (RoBERTa: 2).
        """
        q_len, k_len = _hf_varlen_names()
        return {
            "input_ids": self.input_ids[None],
            "labels": self.labels[None],
            "position_ids": (self.position_ids + position_start)[None],
            "cu_seq_lens_q": self.cu_seqlens,
            "cu_seq_lens_k": self.cu_seqlens,
            q_len: self.max_seqlen,
            k_len: self.max_seqlen,
        }

    def block_mask(self, block_size: int = 128, device: torch.device | str | None = None):
        """FlexAttention causal + document ``BlockMask`` over this batch's ``T`` tokens.

        ``document_id`` is padded to a multiple of ``block_size`` with an id no token has, so mask
        evaluation over the last partial block never indexes past the end.
        """
        from torch.nn.attention.flex_attention import create_block_mask

        device = device if device is not None else self.input_ids.device
        T = self.num_tokens
        padded = -(-T // block_size) * block_size
        doc = torch.full((padded,), -1, dtype=torch.int32, device=device)
        doc[:T] = self.seq_idx.to(device)

        def causal_document(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (doc[q_idx] == doc[kv_idx])

        return create_block_mask(causal_document, None, None, T, T, device=device, BLOCK_SIZE=block_size)

    def to_thd(self, pad_multiple: int = 1) -> dict[str, Any]:
        """TransformerEngine / Megatron THD layout: each segment padded to ``pad_multiple``.

        Returns ``input_ids``, ``labels`` (``-100`` on per-segment padding), ``shift_labels``
        (pre-shifted targets, ``-100`` on each segment's last real token and on padding),
        ``position_ids`` (the batch's positions; padding continues counting), ``cu_seqlens`` (real
        lengths), ``cu_seqlens_padded`` (padded offsets, int32), ``max_seqlen`` (padded) and
        ``total_tokens`` (padded T). :meth:`shard_for_cp` cuts exactly this layout (with
        ``pad_multiple = 2 * cp_size``) into per-rank pieces.
        """
        if pad_multiple < 1:
            raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
        lens = self.seqlens.long()
        padded = (lens + pad_multiple - 1) // pad_multiple * pad_multiple
        cu_pad = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu_pad[1:] = torch.cumsum(padded, 0)
        total = int(cu_pad[-1])
        dst = cu_pad[:-1].long().repeat_interleave(lens) + (
            torch.arange(self.num_tokens) - self.cu_seqlens[:-1].long().repeat_interleave(lens)
        )
        input_ids = torch.zeros(total, dtype=torch.int64)
        labels = torch.full((total,), IGNORE_INDEX, dtype=torch.int64)
        seg = torch.arange(len(lens)).repeat_interleave(padded)
        # positions continue from each segment's first position, so continue_positions survives
        first_pos = self.position_ids.cpu()[self.cu_seqlens[:-1].long()]
        position_ids = torch.arange(total) - (cu_pad[:-1].long() - first_pos).repeat_interleave(padded)
        input_ids[dst] = self.input_ids.cpu()
        labels[dst] = self.labels.cpu()
        shift_labels = torch.full((total,), IGNORE_INDEX, dtype=torch.int64)
        shift_labels[dst] = self.shift_labels.cpu()
        return {
            "input_ids": input_ids,
            "labels": labels,
            "shift_labels": shift_labels,
            "position_ids": position_ids,
            "seq_idx": seg.to(torch.int32),
            "cu_seqlens": self.cu_seqlens.cpu(),
            "cu_seqlens_padded": cu_pad,
            "max_seqlen": int(padded.max()),
            "total_tokens": total,
        }

    def shard_for_cp(self, cp_size: int, rank: int) -> dict[str, Any]:
        """This context-parallel rank's load-balanced share of the batch (zigzag split).

        Every segment (the padding segment too) is padded to a multiple of ``2 * cp_size`` exactly
        as :meth:`to_thd` does with ``pad_multiple = 2 * cp_size``, then cut into ``2 * cp_size``
        equal chunks; rank ``r`` keeps chunks ``r`` and ``2 * cp_size - 1 - r`` of every segment, in
        that order, so each rank gets an early and a late chunk and the same causal attention work.

        Returns (``T_r = total padded tokens / cp_size``):
            ``input_ids``, ``labels``, ``shift_labels``, ``position_ids``, ``seq_idx``: ``[T_r]``.
            Positions are global inside each document (RoPE stays right). Use ``shift_labels``
            for the loss: a local shift of ``labels`` would pair tokens of different chunks.
            Padding tokens carry ``-100`` in both label fields.
            ``cu_seqlens``: int32 ``[n+1]``, real tokens of each segment held by this rank
            (a segment shorter than ``2 * cp_size`` can hold none here: zero-length entries).
            ``cu_seqlens_padded``: int32 ``[n+1]``, this rank's padded offsets.
            ``global_cu_seqlens`` / ``global_cu_seqlens_padded``: the whole batch's (what
            TransformerEngine / Megatron THD attention takes under context parallelism).
            ``index``: int64 ``[T_r]``, where each token sits in ``to_thd(2 * cp_size)``.
            ``max_seqlen`` (global padded, Python int), ``total_tokens`` (``T_r``),
            ``num_loss_tokens`` (this rank's targets; the ranks' counts sum to the batch's),
            ``cp_size``, ``cp_rank``.
        """
        if not isinstance(cp_size, (int, np.integer)) or cp_size < 1:
            raise ValueError(f"cp_size must be a positive integer, got {cp_size!r}")
        if not isinstance(rank, (int, np.integer)) or not 0 <= rank < cp_size:
            raise ValueError(f"rank must be in [0, {cp_size}) for cp_size={cp_size}, got {rank!r}")
        n_chunks = 2 * cp_size
        thd = self.to_thd(pad_multiple=n_chunks)
        cu_pad = thd["cu_seqlens_padded"].long()
        chunk = (cu_pad[1:] - cu_pad[:-1]) // n_chunks
        local = 2 * chunk
        n_local = int(local.sum())
        local_start = torch.zeros(len(chunk) + 1, dtype=torch.int64)
        local_start[1:] = torch.cumsum(local, 0)
        within = torch.arange(n_local) - local_start[:-1].repeat_interleave(local)
        chunk_t = chunk.repeat_interleave(local)
        # first half of a segment's local piece is chunk r, second half chunk 2*cp-1-r
        which = torch.where(within < chunk_t, rank, n_chunks - 1 - rank)
        index = cu_pad[:-1].repeat_interleave(local) + which * chunk_t + within % chunk_t
        lens = self.seqlens.long()
        real = (lens - rank * chunk).clamp(min=0).minimum(chunk) + (
            lens - (n_chunks - 1 - rank) * chunk
        ).clamp(min=0).minimum(chunk)
        cu_real = torch.zeros(len(chunk) + 1, dtype=torch.int32)
        cu_real[1:] = torch.cumsum(real, 0)
        shift_labels = thd["shift_labels"][index]
        return {
            "input_ids": thd["input_ids"][index],
            "labels": thd["labels"][index],
            "shift_labels": shift_labels,
            "position_ids": thd["position_ids"][index],
            "seq_idx": thd["seq_idx"][index],
            "cu_seqlens": cu_real,
            "cu_seqlens_padded": local_start.to(torch.int32),
            "global_cu_seqlens": thd["cu_seqlens"],
            "global_cu_seqlens_padded": thd["cu_seqlens_padded"],
            "index": index,
            "max_seqlen": thd["max_seqlen"],
            "total_tokens": n_local,
            "num_loss_tokens": int((shift_labels != IGNORE_INDEX).sum()),
            "cp_size": cp_size,
            "cp_rank": rank,
        }

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
    return VarlenBatch._from_arrays(
        np.full(num_tokens, pad_id, np.int64),
        np.zeros(num_tokens, bool),
        np.array([num_tokens], np.int64),
        np.array([-1], np.int64),
        np.zeros(1, np.int64),
        0,
        False,
    )


@lru_cache(maxsize=1)
def _hf_varlen_names() -> tuple[str, str]:
    """Names transformers' flash path uses for max lengths (renamed across versions)."""
    try:
        from transformers.modeling_flash_attention_utils import _flash_attention_forward

        params = inspect.signature(_flash_attention_forward).parameters
        if "max_length_q" not in params and "max_seqlen_q" in params:
            return "max_seqlen_q", "max_seqlen_k"
    except Exception:  # transformers absent or reorganised: use the collator's documented names
        pass
    return "max_length_q", "max_length_k"
