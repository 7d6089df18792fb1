"""Dataset decomposition (2^i buckets) over a document stream: the loader's ``decompose`` stage.

The planner is :func:`seqpack.plan.decompose.decompose_lengths` (Pouransari et al., NeurIPS 2024:
each document + EOT cut greedily from the front into pieces of ``2^k + 1`` tokens, piece ``k`` goes
to bucket ``D_k``). :class:`StreamingDecomposer` decomposes documents as they arrive and keeps the
pieces in bounded per-bucket FIFOs; the offline, in-memory version with cycles is
:class:`~seqpack.stages.decomposed.DecomposedDataset` (re-exported here). A step from bucket ``i``
holds ``b_i = tokens_per_step / 2^i`` pieces: exactly ``tokens_per_step`` loss targets.

Config: ``stage: {type: decompose, ...}``; decomposition parameters may be given in the stage or in
the ``curriculum:`` section (not both with different values); the curriculum section also holds the
bucket odds (``buckets``), the progress unit and the max-length schedule (``seqlen``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from seqpack.batch import VarlenBatch
from seqpack.checks import ConfigError, check_choice, check_int, check_pad_to, pad_to_kwarg, upgrade_pad_flag
from seqpack.curriculum import BucketCurriculum, CurriculumConfig, SeqlenSchedule
from seqpack.plan.decompose import (
    OVERLONG_POLICIES,
    REMAINDER_POLICIES,
    Decomposition,
    check_log2_range,
    check_tokens_per_step,
    decompose_lengths,
    decompose_one,
)
from seqpack.sources.records import Document
from seqpack.stages.context import StageContext
from seqpack.stages.decomposed import DecomposedBuckets, DecomposedDataset, decompose_documents, largest_step
from seqpack.stages.length_stage import (
    DocumentsIn,
    LengthStage,
    curriculum_of,
    documents_batch,
    length_stage_setup,
    padding,
    piece,
    placement,
    stage_seed,
    stage_value,
    validated_config,
)

STAGE_KEYS = (
    "type",
    "tokens_per_step",
    "min_log2",
    "max_log2",
    "overlong",
    "remainder",
    "pad_to",
    "buffer_tokens",
    "seed",
)


class StreamingDecomposer(LengthStage):
    """Dataset decomposition over a document stream with bounded per-bucket buffers (a Node).

    Documents are decomposed as they arrive (the same pieces as offline: the over-long draw hashes
    the document's ``doc_id``), pieces wait in FIFO buffers per bucket holding at most
    ``buffer_tokens`` tokens in all. Before each step the buffers are topped up to that bound; the
    bucket is then drawn by the seeded RNG over buckets that hold a full batch (``b_i`` pieces), with
    the curriculum's odds at the current progress (times the buffered tokens for ``odds_by_mass``).
    Buckets with positive odds that cannot fill a batch are skipped and counted
    (``renormalized_draws``). Each step has exactly ``tokens_per_step`` targets (fewer where
    documents carry a loss mask: masked tokens are emitted but are not targets).

    Args:
        upstream: a node of :class:`~seqpack.sources.records.Document` (the loader's), or a sequence
            / iterable of 1-D integer token arrays (``doc_id`` = index).
        tokens_per_step, min_log2, max_log2, overlong, seed, eot_id, remainder, pad_to: as in
            :class:`~seqpack.stages.decomposed.DecomposedDataset` (``pad_to_fixed`` is deprecated).
        buffer_tokens: at least ``n_buckets * tokens_per_step`` (default twice that), so some bucket
            is always full while the stream lasts.
        max_length: optional schedule ``t -> L``: buckets with ``2^k > L`` are left out of the draw
            (if no ready bucket is under it, the cap is lifted for that step: ``over_cap_draws``).
        draw_seed: seeds the bucket draw (default ``seed``); the same on every rank.
        step_stride, step_offset: see :class:`~seqpack.stages.length_stage.LengthStage`.

    ``n_cycles`` needs the epoch size and is only offered offline. At the end of the stream the rest
    of the buffers is dropped and counted (``remainder="drop"``: ``leftover_tokens``) or emitted as
    short batches (``"emit"``). Counters (``counts``, ``stats()`` under ``decompose/``):
    ``input_tokens == emitted_tokens + dropped_tokens + leftover_tokens + buffered``.
    """

    name = "decompose"
    COUNTERS = LengthStage.COUNTERS + ("dropped_tokens", "leftover_tokens")

    def __init__(
        self,
        upstream: DocumentsIn,
        *,
        tokens_per_step: int,
        min_log2: int = 8,
        max_log2: int = 13,
        curriculum: BucketCurriculum | None = None,
        overlong: str = "random",
        seed: int = 0,
        eot_id: int | None = None,
        buffer_tokens: int | None = None,
        remainder: str = "drop",
        pad_to: int | str | None = None,
        pad_id: int = 0,
        max_length: SeqlenSchedule | None = None,
        draw_seed: Any = None,
        step_stride: int = 1,
        step_offset: int = 0,
        **deprecated: Any,
    ):
        super().__init__()
        pad_to = pad_to_kwarg(pad_to, deprecated, "pad_to_fixed", "StreamingDecomposer")
        check_log2_range(min_log2, max_log2)
        self.tokens_per_step = check_tokens_per_step(tokens_per_step, max_log2)
        self.remainder = check_choice(remainder, "remainder", REMAINDER_POLICIES)
        self.overlong = check_choice(overlong, "overlong", OVERLONG_POLICIES)
        self.log2s = list(range(min_log2, max_log2 + 1))
        self._setup(
            upstream,
            curriculum or BucketCurriculum(),
            len(self.log2s),
            buffer_tokens,
            self.tokens_per_step,
            max_length,
            seed if draw_seed is None else draw_seed,
            step_stride,
            step_offset,
        )
        self.min_log2, self.max_log2, self.seed, self.eot_id = min_log2, max_log2, seed, eot_id
        self.pad_to = check_pad_to(pad_to, "pad_to", largest_step(self.tokens_per_step, min_log2))
        self.pad_id = pad_id
        self.per_rank = np.array([self.tokens_per_step >> k for k in self.log2s], np.int64)

    def _with_eot(self, doc: Document) -> Document:
        if self.eot_id is None:
            return doc
        mask = None if doc.loss_mask is None else np.append(doc.loss_mask, True)
        return Document(
            doc.doc_id, np.append(doc.tokens, np.int64(self.eot_id)), mask, doc.source, start=doc.start
        )

    def state_refetch(self):
        # buffered pieces were cut from documents with the EOT appended: re-read ones get it too
        fetch = super().state_refetch()
        if fetch is None or self.eot_id is None:
            return fetch
        return lambda doc_ids: [self._with_eot(d) for d in fetch(doc_ids)]

    def _add(self, doc: Document) -> None:
        doc = self._with_eot(doc)
        starts, log2s, dropped = decompose_one(
            len(doc.tokens),
            doc.doc_id,
            min_log2=self.min_log2,
            max_log2=self.max_log2,
            overlong=self.overlong,
            seed=self.seed,
        )
        self.counts["input_tokens"] += len(doc.tokens)
        self.counts["dropped_tokens"] += dropped
        for s, k in zip(starts.tolist(), log2s.tolist()):
            self.buffers.add(k - self.min_log2, piece(doc, s, (1 << k) + 1))

    def next(self) -> VarlenBatch:
        self._fill()
        counts = self.buffers.counts()
        ready = counts >= self.per_rank
        if ready.any():
            i = self._draw(ready, np.int64(1) << np.array(self.log2s, np.int64))
            take = int(self.per_rank[i])
        else:
            # stream over and no bucket can fill a batch: the rest is a remainder
            nonempty = np.flatnonzero(counts)
            if len(nonempty) == 0:
                raise StopIteration
            if self.remainder == "drop":
                self.counts["leftover_tokens"] += self.buffers.clear()
                raise StopIteration
            i = int(nonempty[0])
            take = int(counts[i])
        pieces = self.buffers.pop(i, take)
        batch = documents_batch(pieces, self.pad_to, self.pad_id)
        self.step += 1
        self.tokens_seen += batch.num_loss_tokens
        self.counts["emitted_tokens"] += sum(len(p.tokens) for p in pieces)
        return batch


# ------------------------------------------------------------------------------------------ loader stage
def validate(cfg: dict, base_dir: str | None = None) -> dict:
    """Check and complete ``stage: {type: decompose}`` against the ``curriculum:`` section.

    ``pad_to_fixed: true/false`` (stage or ``curriculum.decompose``) is the deprecated spelling of
    ``pad_to: max / null``.
    """
    cfg = {**cfg, "stage": upgrade_pad_flag(dict(cfg["stage"]), "pad_to_fixed", "stage")}
    stage, raw_cur, cur = length_stage_setup(cfg, STAGE_KEYS)
    given = set(raw_cur.get("decompose") or {})
    dec = cur.decompose
    out = {"type": "decompose"}
    out["tokens_per_step"] = stage_value(
        stage, "tokens_per_step", cur.tokens_per_step, "curriculum.tokens_per_step", None
    )
    for key, default in (
        ("min_log2", 8),
        ("max_log2", 13),
        ("overlong", "random"),
        ("remainder", "drop"),
        ("pad_to", None),
    ):
        cur_value = getattr(dec, key) if dec is not None and key in given else None
        out[key] = stage_value(stage, key, cur_value, f"curriculum.decompose.{key}", default)
    if out["tokens_per_step"] is None:
        raise ConfigError(
            "stage.tokens_per_step: missing (set it in the stage or as curriculum.tokens_per_step)"
        )
    check_int(out["tokens_per_step"], "stage.tokens_per_step", 1)
    check_log2_range(out["min_log2"], out["max_log2"], "stage")
    check_choice(out["overlong"], "stage.overlong", OVERLONG_POLICIES)
    check_choice(out["remainder"], "stage.remainder", REMAINDER_POLICIES)
    check_pad_to(out["pad_to"], "stage.pad_to", largest_step(out["tokens_per_step"], out["min_log2"]))
    out["buffer_tokens"] = check_int(stage.get("buffer_tokens"), "stage.buffer_tokens", 1, allow_none=True)
    out["seed"] = stage_seed(stage, raw_cur, cfg)
    # a dry build runs every remaining check (divisibility, buffer size, odds per bucket, cycles)
    build([], out, cur)
    return validated_config(cfg, out, raw_cur)


def build(
    docs: DocumentsIn, st: dict, cur: CurriculumConfig, ctx: StageContext | None = None
) -> StreamingDecomposer:
    """The stage of a validated ``stage`` section; ``ctx`` places it (rank, worker, epoch, pad id)."""
    epoch, stride, offset, pad_id = placement(ctx)
    return StreamingDecomposer(
        docs,
        tokens_per_step=st["tokens_per_step"],
        min_log2=st["min_log2"],
        max_log2=st["max_log2"],
        curriculum=cur.buckets or BucketCurriculum(progress=cur.progress),
        overlong=st["overlong"],
        seed=st["seed"],
        buffer_tokens=st["buffer_tokens"],
        remainder=st["remainder"],
        pad_to=st["pad_to"],
        pad_id=pad_id,
        max_length=cur.seqlen,
        # the same draws on every rank (for the same worker id): equal sequence lengths per step
        draw_seed=[st["seed"], epoch, offset],
        step_stride=stride,
        step_offset=offset,
    )


def factory(docs, stage: dict, ctx: StageContext) -> StreamingDecomposer:
    """Loader factory: :class:`StreamingDecomposer` over this consumer's documents."""
    return build(docs, stage, curriculum_of(ctx), ctx)


__all__ = ["DecomposedBuckets", "DecomposedDataset", "Decomposition", "StreamingDecomposer"]
__all__ += ["decompose_documents", "decompose_lengths", "factory", "padding", "validate"]
