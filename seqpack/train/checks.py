"""Does the model respect document boundaries? A checker and a guard.

Packing is only correct when the consumer never lets a token attend across ``cu_seqlens``. Many
setups silently break that: transformers drops its position-id packing
detection when a 2-D ``attention_mask`` is passed or a KV cache exists (``use_cache=True``), and an
attention implementation or architecture without packed-sequence support ignores the boundaries.

- :func:`check_packing` measures it: the model on the packed batch vs on each segment alone (max
  logit difference, summed loss difference).
- :func:`assert_packing_safe` raises :class:`PackingError` before a forward that would ignore the
  boundaries; :func:`install_packing_guard` runs it on every forward of a model (a pre-hook).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from seqpack.batch import IGNORE_INDEX, VarlenBatch

# transformers attention implementations that honour packed position ids / cu_seq_lens
# (masking_utils builds a block-diagonal mask for eager/sdpa/flex; the flash paths go varlen)
PACKED_ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")
# architectures whose recurrent / conv layers mix tokens without looking at positions: they need
# seq_idx or cu_seqlens passed explicitly, position ids alone leak across documents
RECURRENT_MODEL_TYPES = (
    "mamba",
    "mamba2",
    "falcon_mamba",
    "rwkv",
    "recurrent_gemma",
    "jamba",
    "zamba",
    "zamba2",
    "bamba",
    "nemotron_h",
    "granitemoehybrid",
    "lfm2",
    "qwen3_next",
)
# what recurrent/conv layers read to reset state at boundaries (attention's cu_seq_lens_q is not it)
RECURRENT_BOUNDARY_KWARGS = ("seq_idx", "cu_seqlens")


class PackingError(RuntimeError):
    """A packed batch is about to be consumed by a path that ignores document boundaries."""


@dataclass
class PackingReport:
    """What :func:`check_packing` measured.

    Attributes:
        max_logit_diff: largest ``|packed - alone|`` over every logit of every real segment.
        packed_loss_sum: summed next-token CE of the packed forward (``batch.shift_labels``).
        reference_loss_sum: the same targets, each segment run alone.
        loss_diff: ``|packed_loss_sum - reference_loss_sum| / max(1, |reference_loss_sum|)``.
        segments: real segments compared.
        worst_segment: index of the segment holding ``max_logit_diff``.
        atol: tolerance ``ok`` was judged with (on logits and on the relative loss difference).
    """

    max_logit_diff: float
    packed_loss_sum: float
    reference_loss_sum: float
    loss_diff: float
    segments: int
    worst_segment: int
    atol: float

    @property
    def ok(self) -> bool:
        return self.max_logit_diff <= self.atol and self.loss_diff <= self.atol

    def __str__(self) -> str:
        verdict = "OK" if self.ok else "CROSS-DOCUMENT LEAK"
        return (
            f"check_packing: {verdict}: max |logit diff| {self.max_logit_diff:.3g} (segment "
            f"{self.worst_segment} of {self.segments}), loss sum packed {self.packed_loss_sum:.6g} vs alone "
            f"{self.reference_loss_sum:.6g} (rel diff {self.loss_diff:.3g}, atol {self.atol:g})"
        )


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)


@torch.no_grad()
def check_packing(
    model: torch.nn.Module,
    batch: VarlenBatch,
    *,
    atol: float = 1e-4,
    position_start: int = 0,
    raise_on_leak: bool = False,
) -> PackingReport:
    """Run ``model`` on the packed ``batch`` and on each real segment alone; compare.

    The model is called the way a training loop calls it: ``model(input_ids=[1, T],
    position_ids=[1, T])``, no attention mask, no ``use_cache`` override (so a model configured
    with ``use_cache=True`` shows its leak here). Each segment alone gets its own slice of
    ``position_ids`` (so continued positions of a split document are compared like for like).
    Runs in eval mode (dropout off) and restores the previous mode.

    Args:
        atol: tolerance on logits and on the relative summed-loss difference (fp32: 1e-5 is typical
            of a correct path; leaks give differences of order 0.1 to 1).
        position_start: added to positions (RoBERTa-style models start at 2).
        raise_on_leak: raise :class:`PackingError` with the report instead of returning it.
    """
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        b = batch.to(device)
        pos = b.position_ids + position_start
        packed = _logits(model(input_ids=b.input_ids[None], position_ids=pos[None]))[0].float()
        targets = b.shift_labels
        packed_ce = F.cross_entropy(packed, targets, ignore_index=IGNORE_INDEX, reduction="none")
        worst, worst_seg, ref_sum, packed_sum = 0.0, -1, 0.0, 0.0
        cu = b.cu_seqlens.tolist()
        for s in range(b.n_real_segments):
            lo, hi = cu[s], cu[s + 1]
            out = model(input_ids=b.input_ids[None, lo:hi], position_ids=pos[None, lo:hi])
            alone = _logits(out)[0].float()
            diff = float((packed[lo:hi] - alone).abs().max())
            if diff > worst or worst_seg < 0:
                worst, worst_seg = diff, s
            ref_ce = F.cross_entropy(alone, targets[lo:hi], ignore_index=IGNORE_INDEX, reduction="sum")
            ref_sum += float(ref_ce)
            packed_sum += float(packed_ce[lo:hi].sum())
    finally:
        model.train(was_training)
    report = PackingReport(
        max_logit_diff=worst,
        packed_loss_sum=packed_sum,
        reference_loss_sum=ref_sum,
        loss_diff=abs(packed_sum - ref_sum) / max(1.0, abs(ref_sum)),
        segments=b.n_real_segments,
        worst_segment=worst_seg,
        atol=atol,
    )
    if raise_on_leak and not report.ok:
        raise PackingError(str(report))
    return report


def is_packed_positions(position_ids: torch.Tensor | None) -> bool:
    """True when ``position_ids`` restart somewhere inside a row (more than one document per row)."""
    if position_ids is None or position_ids.shape[-1] < 2:
        return False
    return bool((position_ids[..., 1:] - position_ids[..., :-1] != 1).any())


def assert_packing_safe(
    model: torch.nn.Module | None = None, inputs: Mapping[str, Any] | None = None
) -> None:
    """Raise :class:`PackingError` if this forward would let packed documents attend to each other.

    Checks (each message says what to change):
      1. ``inputs`` pass an ``attention_mask`` (2-D, or all ones) with packed ``position_ids``:
         transformers then builds a plain causal mask over the whole row.
      2. A KV cache during training: ``use_cache=True`` in ``inputs``, or in the model config while
         the model is in training mode (transformers skips packed detection when a cache exists).
      3. A transformers model whose attention implementation has no packed-sequence support.
      4. A recurrent / conv architecture (Mamba, RWKV, ...) given packed positions without
         ``seq_idx`` / ``cu_seqlens``.

    ``model`` may be any ``nn.Module``; checks 2 to 4 apply to those with a transformers ``config``.
    """
    inputs = inputs or {}
    packed = is_packed_positions(inputs.get("position_ids"))
    mask = inputs.get("attention_mask")
    if packed and mask is not None and (mask.ndim == 2 or bool((mask == 1).all())):
        raise PackingError(
            "attention_mask passed together with packed position_ids: transformers ignores document "
            "boundaries when a 2-D mask is given (every token attends to earlier documents). Pass no "
            "attention_mask for packed batches (VarlenBatch.to_hf() has none)."
        )
    config = getattr(model, "config", None)
    training = model is not None and model.training
    if inputs.get("use_cache") is True and packed:
        raise PackingError(
            "use_cache=True with packed position_ids: a KV cache disables transformers' packed-sequence "
            "detection (cross-document attention). Pass use_cache=False for packed training batches."
        )
    if config is None:
        return
    if training and getattr(config, "use_cache", False) and inputs.get("use_cache") is not False:
        raise PackingError(
            f"{type(model).__name__} is training with config.use_cache=True: transformers then builds a "
            "KV cache and skips packed-sequence detection, so packed documents attend to each other. "
            "Set model.config.use_cache = False (or pass use_cache=False)."
        )
    impl = getattr(config, "_attn_implementation", None)
    if impl is not None and impl not in PACKED_ATTN_IMPLEMENTATIONS and not str(impl).startswith("kernels-"):
        raise PackingError(
            f"attention implementation {impl!r} of {type(model).__name__} has no packed-sequence support; "
            f"use one of {PACKED_ATTN_IMPLEMENTATIONS} (attn_implementation=...)"
        )
    model_type = getattr(config, "model_type", "")
    has_boundaries = any(k in inputs for k in RECURRENT_BOUNDARY_KWARGS)
    if packed and model_type in RECURRENT_MODEL_TYPES and not has_boundaries:
        raise PackingError(
            f"{model_type} mixes tokens in recurrent/conv layers that ignore position_ids: pass seq_idx "
            "or cu_seqlens (VarlenBatch.seq_idx / cu_seqlens) or the documents leak into each other"
        )


def install_packing_guard(model: torch.nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Check every forward of ``model`` with :func:`assert_packing_safe` (a forward pre-hook on the
    keyword arguments). Returns the hook handle (``.remove()`` uninstalls it)."""

    def hook(module, args, kwargs):
        assert_packing_safe(module, kwargs)

    return model.register_forward_pre_hook(hook, with_kwargs=True)
