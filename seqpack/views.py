"""Consumer views of a packed batch: the arguments flash-attn, transformers, FlexAttention,
TransformerEngine/Megatron (THD) and context parallelism take (batch contract: :mod:`seqpack.batch`).

Plain functions over the batch's fields (``input_ids``, ``labels``, ``position_ids``,
``cu_seqlens``, ``max_seqlen``, ``seq_idx``); :class:`seqpack.batch.VarlenBatch` exposes each as a
method (``batch.to_hf()`` is ``to_hf(batch)``). This module knows no batch type, so the type can
import it.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any, Protocol

import numpy as np
import torch

# the label consumers skip (PyTorch's cross_entropy ignore_index, the HF / Megatron convention)
IGNORE_INDEX = -100


class PackedTokens(Protocol):
    """What the views read: one flat token axis of ``T`` tokens in segments ``cu_seqlens``."""

    input_ids: torch.Tensor  # int64 [T]
    labels: torch.Tensor  # int64 [T], unshifted
    position_ids: torch.Tensor  # int64 [T]
    cu_seqlens: torch.Tensor  # int32 [n + 1]
    max_seqlen: int
    seq_idx: torch.Tensor  # int32 [T]


def seqlens(batch: PackedTokens) -> torch.Tensor:
    """int32 ``[n]`` segment lengths."""
    return batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]


def shift_labels(batch: PackedTokens) -> torch.Tensor:
    """Pre-shifted targets ``[T]``: ``shift_labels[t] = labels[t+1]``, ``-100`` at each segment's end."""
    out = torch.full_like(batch.labels, IGNORE_INDEX)
    out[:-1] = batch.labels[1:]
    out[batch.cu_seqlens[1:].long() - 1] = IGNORE_INDEX
    return out


def to_flash_attn(batch: PackedTokens) -> dict[str, Any]:
    """Keyword arguments for ``flash_attn_varlen_func`` (pass them by keyword)."""
    return {
        "cu_seqlens_q": batch.cu_seqlens,
        "cu_seqlens_k": batch.cu_seqlens,
        "max_seqlen_q": batch.max_seqlen,
        "max_seqlen_k": batch.max_seqlen,
    }


def to_hf(batch: PackedTokens, position_start: int = 0, seq_idx: bool = False) -> dict[str, Any]:
    """Inputs for a transformers causal LM with batch size 1 and no attention mask.

    ``input_ids``/``labels``/``position_ids`` are ``[1, T]``; the padding-free kwargs read by
    transformers' flash/flex paths are named after the installed version's signature.
    ``position_start`` offsets positions for models that do not start at 0 (RoBERTa: 2).
    ``seq_idx=True`` adds ``seq_idx``, int32 ``[1, T]``, the segment of each token, as
    ``DataCollatorWithFlattening(return_seq_idx=True)`` returns it (Mamba-2 style models read it;
    the padding segment, when there is one, has its own index). Off by default because not every
    model's ``forward`` accepts unknown keyword arguments.
    """
    q_len, k_len = _hf_varlen_names()
    out = {
        "input_ids": batch.input_ids[None],
        "labels": batch.labels[None],
        "position_ids": (batch.position_ids + position_start)[None],
        "cu_seq_lens_q": batch.cu_seqlens,
        "cu_seq_lens_k": batch.cu_seqlens,
        q_len: batch.max_seqlen,
        k_len: batch.max_seqlen,
    }
    if seq_idx:
        out["seq_idx"] = batch.seq_idx.to(torch.int32)[None]
    return out


def block_mask(batch: PackedTokens, block_size: int = 128, device: torch.device | str | None = None):
    """FlexAttention causal + document ``BlockMask`` over this batch's ``T`` tokens.

    ``document_id`` is padded to a multiple of ``block_size`` with an id no token has, so mask
    evaluation over the last partial block never indexes past the end.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    device = device if device is not None else batch.input_ids.device
    T = int(batch.input_ids.shape[0])
    padded = -(-T // block_size) * block_size
    doc = torch.full((padded,), -1, dtype=torch.int32, device=device)
    doc[:T] = batch.seq_idx.to(device)

    def causal_document(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc[q_idx] == doc[kv_idx])

    return create_block_mask(causal_document, None, None, T, T, device=device, BLOCK_SIZE=block_size)


def to_thd(batch: PackedTokens, pad_multiple: int = 1) -> dict[str, Any]:
    """TransformerEngine / Megatron THD layout: each segment padded to ``pad_multiple``.

    Returns ``input_ids``, ``labels`` (``-100`` on per-segment padding), ``shift_labels``
    (pre-shifted targets, ``-100`` on each segment's last real token and on padding),
    ``position_ids`` (the batch's positions; padding continues counting), ``cu_seqlens`` (real
    lengths), ``cu_seqlens_padded`` (padded offsets, int32), ``max_seqlen`` (padded) and
    ``total_tokens`` (padded T). :func:`shard_for_cp` cuts exactly this layout (with
    ``pad_multiple = 2 * cp_size``) into per-rank pieces.
    """
    if pad_multiple < 1:
        raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
    lens = seqlens(batch).long()
    padded = (lens + pad_multiple - 1) // pad_multiple * pad_multiple
    cu_pad = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu_pad[1:] = torch.cumsum(padded, 0)
    total = int(cu_pad[-1])
    dst = cu_pad[:-1].long().repeat_interleave(lens) + (
        torch.arange(int(batch.input_ids.shape[0])) - batch.cu_seqlens[:-1].long().repeat_interleave(lens)
    )
    input_ids = torch.zeros(total, dtype=torch.int64)
    labels = torch.full((total,), IGNORE_INDEX, dtype=torch.int64)
    seg = torch.arange(len(lens)).repeat_interleave(padded)
    # positions continue from each segment's first position, so continue_positions survives
    first_pos = batch.position_ids.cpu()[batch.cu_seqlens[:-1].long()]
    position_ids = torch.arange(total) - (cu_pad[:-1].long() - first_pos).repeat_interleave(padded)
    input_ids[dst] = batch.input_ids.cpu()
    labels[dst] = batch.labels.cpu()
    shifted = torch.full((total,), IGNORE_INDEX, dtype=torch.int64)
    shifted[dst] = shift_labels(batch).cpu()
    return {
        "input_ids": input_ids,
        "labels": labels,
        "shift_labels": shifted,
        "position_ids": position_ids,
        "seq_idx": seg.to(torch.int32),
        "cu_seqlens": batch.cu_seqlens.cpu(),
        "cu_seqlens_padded": cu_pad,
        "max_seqlen": int(padded.max()),
        "total_tokens": total,
    }


def shard_for_cp(batch: PackedTokens, cp_size: int, rank: int) -> dict[str, Any]:
    """This context-parallel rank's load-balanced share of the batch (zigzag split).

    Every segment (the padding segment too) is padded to a multiple of ``2 * cp_size`` exactly
    as :func:`to_thd` does with ``pad_multiple = 2 * cp_size``, then cut into ``2 * cp_size``
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
    thd = to_thd(batch, pad_multiple=n_chunks)
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
    lens = seqlens(batch).long()
    # real tokens this rank holds of each segment: in its early chunk and in its late chunk
    early = (lens - rank * chunk).clamp(min=0).minimum(chunk)
    late = (lens - (n_chunks - 1 - rank) * chunk).clamp(min=0).minimum(chunk)
    real = early + late
    cu_real = torch.zeros(len(chunk) + 1, dtype=torch.int32)
    cu_real[1:] = torch.cumsum(real, 0)
    shifted = thd["shift_labels"][index]
    return {
        "input_ids": thd["input_ids"][index],
        "labels": thd["labels"][index],
        "shift_labels": shifted,
        "position_ids": thd["position_ids"][index],
        "seq_idx": thd["seq_idx"][index],
        "cu_seqlens": cu_real,
        "cu_seqlens_padded": local_start.to(torch.int32),
        "global_cu_seqlens": thd["cu_seqlens"],
        "global_cu_seqlens_padded": thd["cu_seqlens_padded"],
        "index": index,
        "max_seqlen": thd["max_seqlen"],
        "total_tokens": n_local,
        "num_loss_tokens": int((shifted != IGNORE_INDEX).sum()),
        "cp_size": cp_size,
        "cp_rank": rank,
    }


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
