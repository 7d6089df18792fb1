"""How many batches a consumer's chain yields in an epoch, from lengths, without tokenizing again.

``SeqpackLoader.steps_per_epoch`` (the ``precount`` equal-steps policy) and the ``balance:``
transform (which pads every rank to the step count of the longest one) need each consumer's batch
count before training. The count must be exact: the loader raises if a rank has more batches than
counted. :func:`count_batches` builds the consumer's real chain (mixture, shuffle buffer, stage,
packer) but feeds it :class:`~seqpack.sources.lengths.IndexedDocuments` instead of reader +
tokenizer: documents with the right ids, lengths and groups from the source's cached
:class:`~seqpack.sources.lengths.LengthIndex`, tokens all zero. Every rank's count thus costs one
tokenizing pass over the data in total (the index build, once per source and tokenizer, cached on
disk), not one pass per rank.

The substitution is exact when the chain's batching depends on document lengths and groups only:
stages in :data:`LENGTH_STAGES` over plain-text or pre-tokenized sources without loss masks.
Preprocessed shards (stage ``packed_rows``) are counted from their manifests' row counts.
Otherwise (chat/SFT sources, whose turn boundaries and masks shape the batches, or other stages)
the count runs the consumer's real chain once (the old dry run), which is still exact.

No import of :mod:`seqpack.pipeline` or :mod:`seqpack.stages` here (both use this module): the
chain is built with ``ctx.build_chain``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from torchdata.nodes import BaseNode

from seqpack.plan.balance import balanced_count
from seqpack.plan.balance_config import validate_balance
from seqpack.shards import PackedRowReader
from seqpack.sources.lengths import IndexedDocuments, length_index
from seqpack.sources.reader import Reader

# stages whose batches depend only on document lengths and groups (not on token values)
LENGTH_STAGES = ("pack",)
# top-level transforms the count understands (every other one is dry-run)
BALANCE = "balance"


class NotByLengths(Exception):
    """The chain's batches may depend on more than lengths: count it by running it."""


def by_lengths_reason(cfg: dict) -> str | None:
    """Why ``cfg``'s chains cannot be counted from length indexes, or None when they can."""
    stage = cfg["stage"]["type"]
    if stage not in LENGTH_STAGES:
        return f"stage {stage!r} is not one of {LENGTH_STAGES}"
    return None


def _check_fields(reader: Reader) -> None:
    kind = reader.fields.kind
    if kind == "tokens" and reader.fields.loss_mask_key:
        raise NotByLengths(f"{reader.name}: pre-tokenized with loss masks")
    if kind not in ("text", "tokens"):
        raise NotByLengths(f"{reader.name}: {kind} records (turns and masks shape the batches)")


def indexed_documents(tokenizer: Any, folder: str | None = None) -> Callable[[Reader], BaseNode]:
    """``documents_of`` for ``build_chain``: a reader -> its consumer's documents from the index."""

    def documents_of(reader: Reader) -> BaseNode:
        _check_fields(reader)
        return IndexedDocuments(reader, length_index(reader, tokenizer, folder))

    return documents_of


def _run(node: BaseNode) -> int:
    node.reset(None)
    n = 0
    for _ in node:
        n += 1
    return n


def count_unbalanced(cfg: dict, ctx: Any, *, folder: str | None = None) -> int:
    """Batches of consumer ``ctx`` for ``cfg`` (which must hold no ``balance:`` section).

    Args:
        cfg: a validated config.
        ctx: the consumer's :class:`~seqpack.stages.StageContext` (its ``build_chain`` builds).
        folder: length-index cache folder (default :func:`seqpack.sources.lengths.cache_dir`).
    """
    if ctx.build_chain is None:
        raise ValueError("counting needs the stage context's build_chain (run it under seqpack.build_loader)")
    if by_lengths_reason(cfg) is None:
        try:
            return _run(ctx.build_chain(cfg, ctx, documents_of=indexed_documents(cfg["tokenizer"], folder)))
        except NotByLengths:
            pass
    node = ctx.build_chain(cfg, ctx)
    if isinstance(node, PackedRowReader):
        return len(node)  # preprocessed shards: rows per consumer from the manifests, nothing read
    return _run(node)


def without_balance(cfg: dict) -> dict:
    """``cfg`` without its ``balance:`` section (each rank's own, unbalanced chain)."""
    return {k: v for k, v in cfg.items() if k != BALANCE}


def rank_counts(cfg: dict, ctx: Any, *, folder: str | None = None) -> list[int]:
    """Unbalanced batch counts of worker ``ctx.worker_id`` on every rank (index ``rank``)."""
    plain = without_balance(cfg)
    return [
        count_unbalanced(plain, replace(ctx, rank=r, config=plain), folder=folder)
        for r in range(ctx.world_size)
    ]


def count_batches(cfg: dict, ctx: Any, *, folder: str | None = None) -> int:
    """Batches consumer ``ctx``'s chain yields in ``ctx.epoch``, exactly.

    With a ``balance:`` section every rank's worker ``ctx.worker_id`` yields the same count: the
    largest unbalanced count over ranks, rounded up to whole steps of ``micro_batches_per_rank``.
    """
    if cfg.get(BALANCE) is None:
        return count_unbalanced(cfg, ctx, folder=folder)
    section = validate_balance(cfg[BALANCE], ctx.world_size)
    return balanced_count(rank_counts(cfg, ctx, folder=folder), section["micro_batches_per_rank"])


__all__ = ["LENGTH_STAGES", "NotByLengths", "by_lengths_reason", "count_batches", "count_unbalanced"]
__all__ += ["indexed_documents", "rank_counts", "without_balance"]
