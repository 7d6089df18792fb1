"""Offline packing of in-memory documents: plan every bin with :func:`seqpack.pack`, then build one
VarlenBatch per bin (tokens are sliced, never copied, until the batch is built).

``pack_documents`` for token arrays, ``pack_chats`` for tokenized conversations (loss masks and
turn starts follow every piece), ``batches_from_plan`` for a plan made elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from seqpack.batch import VarlenBatch
from seqpack.plan import PackPlan, pack
from seqpack.sources.chat import ChatDocument


def check_token_arrays(docs: Sequence[np.ndarray], name: str = "docs") -> list[np.ndarray]:
    """Validate a ragged list of 1-D integer token arrays; errors name the first bad index."""
    out = []
    for i, d in enumerate(docs):
        a = np.asarray(d)
        if a.ndim != 1:
            raise ValueError(f"{name}[{i}] must be 1-D, got shape {a.shape}")
        if a.size and a.dtype.kind not in "iu":
            raise ValueError(f"{name}[{i}] must hold integer token ids, got dtype {a.dtype}")
        out.append(a.astype(np.int64, copy=False))
    return out


def check_loss_masks(loss_masks: Sequence[np.ndarray | None] | None, docs: Sequence[np.ndarray]) -> None:
    """One optional bool mask per document, each as long as its document; errors name the index."""
    if loss_masks is None:
        return
    if len(loss_masks) != len(docs):
        raise ValueError(f"loss_masks has {len(loss_masks)} entries for {len(docs)} docs")
    for i, (m, d) in enumerate(zip(loss_masks, docs)):
        if m is not None and len(m) != len(d):
            raise ValueError(f"loss_masks[{i}] has length {len(m)}, docs[{i}] has {len(d)}")


def batches_from_plan(
    plan: PackPlan,
    docs: Sequence[np.ndarray],
    *,
    doc_ids: Sequence[int] | np.ndarray | None = None,
    loss_masks: Sequence[np.ndarray | None] | None = None,
    pad_to: int | None = None,
    pad_id: int = 0,
    continue_positions: bool = False,
) -> Iterator[VarlenBatch]:
    """One VarlenBatch per bin of ``plan`` over the documents' token arrays.

    ``doc_ids``: the id reported for document ``i`` (default ``i``); ``loss_masks``: per document a
    bool array or None; ``pad_to``: tokens per batch (a final padding segment).
    """
    for b in range(plan.n_bins):
        seg_doc, seg_start, seg_len = plan.bin(b)
        toks = [docs[d][s : s + n] for d, s, n in zip(seg_doc, seg_start, seg_len)]
        masks = None
        if loss_masks is not None:
            masks = [
                None if loss_masks[d] is None else np.asarray(loss_masks[d], bool)[s : s + n]
                for d, s, n in zip(seg_doc, seg_start, seg_len)
            ]
        ids = seg_doc if doc_ids is None else np.asarray(doc_ids, np.int64)[seg_doc]
        yield VarlenBatch.from_segments(
            toks,
            ids,
            seg_start=seg_start,
            loss_masks=masks,
            pad_to=pad_to,
            pad_id=pad_id,
            continue_positions=continue_positions,
        )


def pack_documents(
    docs: Iterable[np.ndarray],
    capacity: int,
    *,
    algorithm: str = "bfd",
    overflow: str = "split",
    loss_masks: Sequence[np.ndarray | None] | None = None,
    pad_to: int | None = None,
    pad_id: int = 0,
    seed: int | None = 0,
    continue_positions: bool = False,
) -> Iterator[VarlenBatch]:
    """Pack in-memory token arrays into VarlenBatches of at most ``capacity`` tokens.

    Args:
        docs: 1-D integer token arrays, one per document; document ``i`` gets ``doc_ids == i``.
        capacity: tokens per batch.
        algorithm, overflow, seed: as in :func:`seqpack.pack`.
        loss_masks: optional per-document bool arrays (True = token contributes to the loss); they
            survive splitting.
        pad_to: pad every batch to this many tokens (a final padding segment), e.g. ``capacity``.
    """
    docs = check_token_arrays(list(docs))
    check_loss_masks(loss_masks, docs)
    plan = pack([len(d) for d in docs], capacity, algorithm=algorithm, overflow=overflow, seed=seed)
    yield from batches_from_plan(
        plan, docs, loss_masks=loss_masks, pad_to=pad_to, pad_id=pad_id, continue_positions=continue_positions
    )


def pack_chats(
    docs: Sequence[ChatDocument],
    capacity: int,
    *,
    algorithm: str = "bfd",
    overflow: str = "split_turns",
    pad_to: int | None = None,
    pad_id: int = 0,
    seed: int | None = 0,
    continue_positions: bool = False,
    **plan_options: Any,
) -> tuple[PackPlan, Iterator[VarlenBatch]]:
    """Plan and materialize packed batches of conversations; loss masks follow every piece.

    ``overflow="split_turns"`` (default) cuts a conversation longer than ``capacity`` only at
    :attr:`~seqpack.sources.chat.ChatDocument.turn_starts`; what cannot fit is counted in
    ``plan.truncated_tokens``. ``plan_options`` go to :func:`seqpack.pack` (``max_segments_per_bin``,
    ``groups``, ...). Returns the plan (its counters are the report) and an iterator of batches.
    """
    plan = pack(
        [len(d) for d in docs],
        capacity,
        algorithm=algorithm,
        overflow=overflow,
        seed=seed,
        turn_starts=[d.turn_starts for d in docs],
        **plan_options,
    )
    batches = batches_from_plan(
        plan,
        [d.tokens for d in docs],
        doc_ids=[d.doc_id for d in docs],
        loss_masks=[d.loss_mask for d in docs],
        pad_to=pad_to,
        pad_id=pad_id,
        continue_positions=continue_positions,
    )
    return plan, batches
