"""Loss weighting and the correctly normalized causal-LM loss over packed batches.

A packed causal-LM loss is ``sum_t w_t * CE_t / sum_t w_t`` over every target ``t`` of every
micro-batch of an optimizer step, on every data-parallel rank. Averaging per-micro-batch means (what
``num_items_in_batch``-less training loops do) weights a token by how full its micro-batch was. So:

- per-token weights ``w`` sit in ``VarlenBatch.loss_weights`` (aligned with ``labels``, 0 where the
  label is ``-100``): ``"token"`` mode gives every target weight 1 (token mean), ``"sample"`` mode
  gives each document's targets ``1 / (its target count)`` (every document counts equally);
- :func:`loss_normalizer` is a micro-batch's ``sum w`` (``num_loss_tokens`` when no weights);
  :func:`step_normalizer` sums it over a step's micro-batches and all-reduces it across ranks;
- :func:`packed_loss` divides each micro-batch's weighted loss sum by that step-wide normalizer, so the
  accumulated gradient is exactly the gradient of the step's loss.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

import torch
import torch.nn.functional as F

from seqpack.batch import IGNORE_INDEX, VarlenBatch

LOSS_MODES = ("token", "sample")


def _segment_targets(batch: VarlenBatch, is_target: torch.Tensor) -> torch.Tensor:
    """``[n]`` targets of each segment: ``is_target`` (``[T]``, 1 per target) summed per segment, in
    its dtype and on its device."""
    out = torch.zeros(len(batch.cu_seqlens) - 1, dtype=is_target.dtype, device=is_target.device)
    return out.index_add_(0, batch.seq_idx.long().to(is_target.device), is_target)


def loss_weights(
    batch: VarlenBatch, mode: str = "token", doc_targets: Mapping[int, int] | None = None
) -> torch.Tensor:
    """float32 ``[T]`` per-token loss weights aligned with ``batch.labels`` (0 where ``-100``).

    Args:
        mode: ``"token"`` (1 per target: token-mean loss) or ``"sample"`` (``1 / n_d`` for the
            ``n_d`` targets of document ``d``: each document weighs the same, however long).
        doc_targets: ``"sample"`` mode: total targets per document id. Give it when documents are
            split across batches (``overflow="split"``); otherwise each segment counts as a
            document of the targets it holds here.
    """
    if mode not in LOSS_MODES:
        raise ValueError(f"mode must be one of {LOSS_MODES}, got {mode!r}")
    is_target = (batch.labels != IGNORE_INDEX).to(torch.float32)
    if mode == "token":
        return is_target
    seg_lens = batch.seqlens.long()
    if doc_targets is None:
        seg_targets = _segment_targets(batch, is_target)
    else:
        ids = batch.doc_ids.tolist()
        missing = [d for d in ids[: batch.n_real_segments] if d not in doc_targets]
        if missing:
            raise KeyError(f"doc_targets has no entry for document id {missing[0]}")
        totals = [float(doc_targets[d]) if i < batch.n_real_segments else 0.0 for i, d in enumerate(ids)]
        seg_targets = torch.tensor(totals, dtype=torch.float32, device=is_target.device)
    per_seg = torch.where(seg_targets > 0, 1.0 / seg_targets.clamp(min=1e-30), torch.zeros_like(seg_targets))
    return per_seg.repeat_interleave(seg_lens) * is_target


def count_doc_targets(batches: Iterable[VarlenBatch]) -> dict[int, int]:
    """Targets per document id over ``batches`` (every piece of a split document summed), for
    ``doc_targets`` in ``"sample"`` mode."""
    out: dict[int, int] = {}
    for b in batches:
        per_seg = _segment_targets(b, (b.labels != IGNORE_INDEX).long().cpu())
        for d, n in zip(b.doc_ids[: b.n_real_segments].tolist(), per_seg[: b.n_real_segments].tolist()):
            out[d] = out.get(d, 0) + n
    return out


def with_loss_weights(
    batch: VarlenBatch, mode: str = "token", doc_targets: Mapping[int, int] | None = None
) -> VarlenBatch:
    """A copy of ``batch`` with ``loss_weights`` filled by :func:`loss_weights`."""
    return replace(batch, loss_weights=loss_weights(batch, mode, doc_targets))


def loss_normalizer(batch: VarlenBatch) -> float:
    """This micro-batch's share of the loss denominator: ``sum(loss_weights)``, or
    ``num_loss_tokens`` when the batch has no weights (token mean)."""
    if batch.loss_weights is None:
        return float(batch.num_loss_tokens)
    return float(batch.loss_weights.double().sum())


def step_normalizer(batches: Iterable[VarlenBatch | float], group=None) -> float:
    """Denominator of one optimizer step: normalizers summed over its micro-batches and, when
    ``torch.distributed`` is initialized, all-reduced (SUM) over ``group``.

    Every rank must call this (it is a collective under DDP). Items may be batches or numbers.
    """
    total = sum(x if isinstance(x, (int, float)) else loss_normalizer(x) for x in batches)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([total], dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM, group=group)
        total = float(t.item())
    return float(total)


def shifted_weights(batch: VarlenBatch) -> torch.Tensor:
    """Weights aligned with ``batch.shift_labels`` (the weight of predicting token ``t + 1`` at ``t``)."""
    w = batch.loss_weights if batch.loss_weights is not None else (batch.labels != IGNORE_INDEX).float()
    out = torch.zeros_like(w)
    out[:-1] = w[1:]
    out[batch.cu_seqlens[1:].long() - 1] = 0
    return out


def packed_loss(
    logits: torch.Tensor, batch: VarlenBatch, normalizer: float | None = None, scale: float = 1.0
) -> torch.Tensor:
    """Weighted next-token cross entropy of a packed batch, divided by ``normalizer``.

    Args:
        logits: ``[T, V]`` or ``[1, T, V]`` (unshifted; position ``t`` predicts token ``t + 1``).
        batch: the batch the logits came from; its ``shift_labels`` are the targets (never across a
            segment boundary) and its ``loss_weights`` (or 1 per target) the weights.
        normalizer: the step-wide denominator (:func:`step_normalizer`); defaults to this batch's
            own, giving the plain (weighted) mean. A zero normalizer (a step of padding batches
            only) gives a zero loss, not NaN.
        scale: multiply the result, e.g. by the world size under DDP, whose gradient averaging
            over ranks would otherwise divide the global mean once more.

    Returns a scalar float32 tensor (computed in fp32 whatever the logits' dtype).
    """
    if logits.ndim == 3:
        if logits.shape[0] != 1:
            raise ValueError(f"packed logits must have batch size 1, got shape {tuple(logits.shape)}")
        logits = logits[0]
    if logits.shape[0] != batch.num_tokens:
        raise ValueError(f"logits cover {logits.shape[0]} tokens, batch has {batch.num_tokens}")
    targets = batch.shift_labels.to(logits.device)
    ce = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="none")
    total = (ce * shifted_weights(batch).to(ce.device)).sum()
    denom = loss_normalizer(batch) if normalizer is None else float(normalizer)
    return total * (scale / denom) if denom > 0 else total * 0.0
