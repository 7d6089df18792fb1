"""Plain length bucketing: batches formed inside length buckets, the bucket of each step by curriculum.

Boundaries ``[b_0 < b_1 < ...]``; a document of length ``l`` goes to the first bucket with
``l <= b_j`` (:func:`~seqpack.plan.decompose.bucket_of`); documents over the last boundary follow
the ``overflow`` policy (:func:`seqpack.plan.expand_overflow`). Batches are formed inside a bucket,
padded to the bucket's boundary (``mode="pad"``) or bin-packed into ``capacity`` tokens with
document masks (``mode="pack"``: :func:`seqpack.plan.pack` best-fit decreasing, the same planner
offline and streamed); the bucket of each step follows a :class:`~seqpack.curriculum.BucketCurriculum`.

:class:`LengthBucketing` plans a whole in-memory corpus; :class:`StreamingBucketing` is the
loader's ``bucket`` stage over a document stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from seqpack.batch import IGNORE_INDEX, VarlenBatch
from seqpack.checks import check_choice, check_int, rename_kwargs
from seqpack.curriculum import BucketCurriculum, BucketSampler, CurriculumConfig, SeqlenSchedule
from seqpack.curriculum.config import check_boundaries
from seqpack.node import Node
from seqpack.plan import LENGTH_OVERFLOW, expand_overflow, pack
from seqpack.plan.decompose import bucket_of
from seqpack.sources.records import Document
from seqpack.stages.context import StageContext
from seqpack.stages.length_stage import (
    DocumentsIn,
    LengthStage,
    curriculum_of,
    documents_batch,
    fullest_bins,
    length_stage_setup,
    padding,
    piece,
    placement,
    planned_bins,
    stage_seed,
    stage_value,
    validated_config,
)
from seqpack.stages.pack_offline import check_token_arrays

BUCKET_MODES = ("pad", "pack")
# split_turns needs chat turn starts, which plain token arrays do not have
BUCKET_OVERFLOW = LENGTH_OVERFLOW  # no chat turns at this stage
STAGE_KEYS = ("type", "boundaries", "tokens_per_step", "mode", "overflow", "buffer_tokens", "seed")


def _check_setup(
    boundaries: Sequence[int], capacity: Any, deprecated: dict, mode: str, overflow: str, where: str
) -> tuple[np.ndarray, int]:
    """Checked ``(boundaries, capacity)`` of a bucketing class (``batch_tokens``: capacity's old name)."""
    check_choice(mode, "mode", BUCKET_MODES)
    check_choice(overflow, "overflow", BUCKET_OVERFLOW)
    bounds = np.array([int(b) for b in boundaries], np.int64)
    bucket_of([1], bounds)  # validates
    capacity = rename_kwargs(deprecated, {"batch_tokens": "capacity"}, where, capacity=capacity)["capacity"]
    if capacity is None:
        raise TypeError("capacity (tokens per batch) is required")
    check_int(capacity, "capacity", 1)
    if capacity < bounds[-1]:
        raise ValueError(f"capacity ({capacity}) must be >= the last boundary ({int(bounds[-1])})")
    return bounds, int(capacity)


class LengthBucketing(Node[VarlenBatch]):
    """Length bucketing over an in-memory corpus (a Node with no upstream; iterate it).

    Args:
        docs: 1-D integer token arrays (random access).
        boundaries: strictly increasing bucket upper bounds (tokens).
        capacity: tokens of a batch (its bin size); at least the last boundary. ``batch_tokens`` is
            its deprecated name.
        mode: ``pad``: ``capacity // boundary`` documents per batch, the batch padded to
            ``rows * boundary`` tokens (:func:`padded_rows` gives that 2-D view); ``pack``: the bucket's
            documents are bin-packed best-fit-decreasing into batches of ``capacity`` tokens.
        curriculum: odds over buckets (shortest first); default uniform by mass.
        overflow: documents longer than the last boundary: ``split`` into pieces of that length
            (default, nothing lost), ``truncate``, ``drop`` (counted) or ``error``.

    Every document token is emitted exactly once or counted in ``stats()`` (truncate/drop).
    """

    def __init__(
        self,
        docs: Sequence[np.ndarray],
        boundaries: Sequence[int],
        *,
        capacity: int | None = None,
        mode: str = "pad",
        curriculum: BucketCurriculum | None = None,
        overflow: str = "split",
        seed: int = 0,
        pad_id: int = 0,
        **deprecated: Any,
    ):
        super().__init__()
        bounds, self.capacity = _check_setup(
            boundaries, capacity, deprecated, mode, overflow, "LengthBucketing"
        )
        self.boundaries = bounds.tolist()
        self.docs, self.mode, self.pad_id, self.seed = check_token_arrays(docs), mode, pad_id, seed
        self.curriculum = curriculum or BucketCurriculum(weighting="odds_by_mass")
        lengths = np.array([len(d) for d in self.docs], np.int64)
        self.item_doc, self.item_start, self.item_len, self.counts = expand_overflow(
            lengths, self.boundaries[-1], overflow
        )
        self.input_tokens = int(lengths.sum())
        item_bucket = bucket_of(self.item_len, self.boundaries)
        self.batches: list[list[np.ndarray]] = []  # per bucket: list of item-index arrays
        for j, bound in enumerate(self.boundaries):
            items = np.random.default_rng([seed, j]).permutation(np.flatnonzero(item_bucket == j))
            if mode == "pad":
                rows = self.capacity // bound
                self.batches.append([items[a : a + rows] for a in range(0, len(items), rows)])
            else:
                plan = pack(self.item_len[items], self.capacity, algorithm="bfd", seed=seed)
                self.batches.append(
                    [items[plan.seg_doc[a:b]] for a, b in zip(plan.bin_offsets[:-1], plan.bin_offsets[1:])]
                )
        self.reset()

    @property
    def batch_tokens(self) -> int:
        """Deprecated name of :attr:`capacity`."""
        return self.capacity

    @classmethod
    def from_config(cls, docs: Sequence[np.ndarray], cfg: CurriculumConfig, *, mode: str = "pack", **kwargs):
        """Build from a validated ``curriculum:`` section with ``boundaries`` and ``tokens_per_step``."""
        if cfg.boundaries is None or cfg.tokens_per_step is None:
            raise ValueError("curriculum: the 'bucket' stage needs 'boundaries' and 'tokens_per_step'")
        cur = cfg.buckets or BucketCurriculum(weighting="odds_by_mass", progress=cfg.progress)
        return cls(
            docs,
            cfg.boundaries,
            capacity=cfg.tokens_per_step,
            mode=mode,
            curriculum=cur,
            seed=cfg.seed,
            **kwargs,
        )

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self.sampler = BucketSampler([len(b) for b in self.batches], self.curriculum, seed=self.seed)
        s = initial_state or {}
        self.step, self.tokens_seen = int(s.get("step", 0)), int(s.get("tokens_seen", 0))
        self.cursor = np.asarray(s.get("cursor", np.zeros(len(self.boundaries))), np.int64)
        if s:
            self.sampler.load_state_dict(s["sampler"])

    def get_state(self) -> dict:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "cursor": self.cursor.tolist(),
            "sampler": self.sampler.state_dict(),
        }

    def __len__(self) -> int:
        return sum(len(b) for b in self.batches)

    def next(self) -> VarlenBatch:
        j = self.sampler.next(self.step if self.curriculum.progress == "steps" else self.tokens_seen)
        if j is None:
            raise StopIteration
        items = self.batches[j][int(self.cursor[j])]
        self.cursor[j] += 1
        docs = [
            Document(int(d), self.docs[d][s : s + n], start=int(s))
            for d, s, n in zip(self.item_doc[items], self.item_start[items], self.item_len[items])
        ]
        batch = documents_batch(
            docs, len(items) * self.boundaries[j] if self.mode == "pad" else None, self.pad_id
        )
        self.step += 1
        self.tokens_seen += batch.num_real_tokens
        return batch

    def own_stats(self) -> dict:
        real = int(self.item_len.sum())
        padded = real
        if self.mode == "pad":
            padded = sum(len(b) * bound for bs, bound in zip(self.batches, self.boundaries) for b in bs)
        return {
            "input_tokens": self.input_tokens,
            "emitted_tokens": real,
            "padded_tokens": padded - real,
            "padding_fraction": (padded - real) / padded if padded else 0.0,
            "steps": len(self),
            **self.counts,
        }


class StreamingBucketing(LengthStage):
    """Plain length bucketing over a document stream (the loader's ``bucket`` stage; a Node).

    Documents (after the ``overflow`` policy cuts those over the last boundary) wait in one FIFO per
    bucket, at most ``buffer_tokens`` tokens in all (default ``2 * n_buckets * capacity``; at least
    ``n_buckets * capacity``, so some bucket can always fill a batch). Each step draws a bucket among
    those that can fill a batch (``mode="pad"``: ``capacity // boundary`` items; ``"pack"``:
    ``capacity`` tokens buffered) with the curriculum's odds at the current progress (``odds_by_mass``
    by default, i.e. proportional to the bucket's buffered tokens), and forms the batch inside it:
    ``pad`` takes the oldest ``rows`` items and pads the batch to ``rows * boundary`` tokens; ``pack``
    plans the bucket's buffer best-fit-decreasing (:func:`seqpack.plan.pack`, as
    :class:`LengthBucketing` does) and emits the fullest bin (the one holding the oldest item on a
    tie); the rest stays buffered. ``max_length`` (a schedule ``t -> L``) leaves out buckets whose
    boundary exceeds ``L`` (lifted and counted when no ready bucket is under it).

    At the end of the stream every bucket is drained in (possibly short) batches: no token is lost
    except by ``overflow="truncate"/"drop"`` (counted). Counters (``stats()`` under ``bucket/``):
    ``input_tokens == emitted_tokens + truncated_tokens + dropped_tokens + buffered``.
    """

    name = "bucket"
    COUNTERS = LengthStage.COUNTERS + (
        "padding_tokens",
        "truncated_tokens",
        "truncated_docs",
        "dropped_tokens",
        "dropped_docs",
    )

    def __init__(
        self,
        upstream: DocumentsIn,
        boundaries: Sequence[int],
        *,
        capacity: int | None = None,
        mode: str = "pack",
        curriculum: BucketCurriculum | None = None,
        overflow: str = "split",
        buffer_tokens: int | None = None,
        seed: Any = 0,
        pad_id: int = 0,
        max_length: SeqlenSchedule | None = None,
        step_stride: int = 1,
        step_offset: int = 0,
        **deprecated: Any,
    ):
        super().__init__()
        self.boundaries, self.capacity = _check_setup(
            boundaries, capacity, deprecated, mode, overflow, "StreamingBucketing"
        )
        self.mode, self.overflow, self.pad_id = mode, overflow, pad_id
        self.rows = np.maximum(self.capacity // self.boundaries, 1)
        self._setup(
            upstream,
            curriculum or BucketCurriculum(weighting="odds_by_mass"),
            len(self.boundaries),
            buffer_tokens,
            self.capacity,
            max_length,
            seed,
            step_stride,
            step_offset,
        )

    def _add(self, doc: Document) -> None:
        n, cap = len(doc.tokens), int(self.boundaries[-1])
        self.counts["input_tokens"] += n
        starts, lens = [0] if n else [], [n] if n else []
        if n > cap:  # the overflow policy decides what of a too-long document goes on
            try:
                _, starts, lens, lost = expand_overflow(np.array([n], np.int64), cap, self.overflow)
            except ValueError as e:
                raise ValueError(f"document {doc.doc_id} ({n} tokens, last boundary {cap}): {e}") from e
            for key, value in lost.items():
                self.counts[key] += value
            starts, lens = starts.tolist(), lens.tolist()
        for s, ln in zip(starts, lens):
            self.buffers.add(int(np.searchsorted(self.boundaries, ln, side="left")), piece(doc, s, ln))

    def _fullest_bin(self, j: int) -> np.ndarray:
        """Queue positions of the fullest bin of a best-fit-decreasing plan of bucket ``j``'s buffer."""
        bins, loads = planned_bins(self.buffers.lengths(j), self.capacity)
        return bins[fullest_bins(bins, loads, 1)[0]]

    def next(self) -> VarlenBatch:
        self._fill()
        counts = self.buffers.counts()
        ready = counts >= self.rows if self.mode == "pad" else self.buffers.tokens >= self.capacity
        if self.exhausted:  # the stream is over: drain every bucket, short batches included
            ready = counts > 0
        if not ready.any():
            raise StopIteration
        j = self._draw(ready, self.boundaries)
        if self.mode == "pad":
            docs = self.buffers.pop(j, min(int(self.rows[j]), int(counts[j])))
            pad_to = len(docs) * int(self.boundaries[j])
        else:
            docs, pad_to = self.buffers.take(j, self._fullest_bin(j)), None
        batch = documents_batch(docs, pad_to, self.pad_id)
        real = sum(len(d.tokens) for d in docs)
        self.step += 1
        self.tokens_seen += real
        self.counts["emitted_tokens"] += real
        self.counts["padding_tokens"] += batch.num_tokens - real
        return batch


def padded_rows(batch: VarlenBatch, row_len: int) -> dict[str, torch.Tensor]:
    """2-D view of a batch's real segments, one row each, right-padded to ``row_len``.

    Returns ``input_ids``/``labels``/``position_ids``/``attention_mask`` of shape ``[n, row_len]``
    (labels ``-100`` and mask 0 on padding), the layout a padded-bucket consumer expects.
    """
    n = batch.n_real_segments
    lens = batch.seqlens[:n].long()
    if int(lens.max()) > row_len:
        raise ValueError(f"a segment has {int(lens.max())} tokens > row_len {row_len}")
    ids = torch.zeros(n, row_len, dtype=torch.int64)
    labels = torch.full((n, row_len), IGNORE_INDEX, dtype=torch.int64)
    pos = torch.zeros(n, row_len, dtype=torch.int64)
    mask = torch.zeros(n, row_len, dtype=torch.int64)
    for r in range(n):
        a, b = int(batch.cu_seqlens[r]), int(batch.cu_seqlens[r + 1])
        ids[r, : b - a] = batch.input_ids[a:b]
        labels[r, : b - a] = batch.labels[a:b]
        pos[r, : b - a] = batch.position_ids[a:b]
        mask[r, : b - a] = 1
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "attention_mask": mask}


# ------------------------------------------------------------------------------------------ loader stage
def validate(cfg: dict, base_dir: str | None = None) -> dict:
    """Check and complete ``stage: {type: bucket}`` against the ``curriculum:`` section."""
    stage, raw_cur, cur = length_stage_setup(cfg, STAGE_KEYS)
    out = {"type": "bucket"}
    # boundaries and tokens per step may come from the curriculum section (shared with its plot)
    b = stage_value(stage, "boundaries", cur.boundaries, "curriculum.boundaries", None)
    out["boundaries"] = b = check_boundaries(b, "stage.boundaries")
    tps = stage_value(stage, "tokens_per_step", cur.tokens_per_step, "curriculum.tokens_per_step", None)
    out["tokens_per_step"] = check_int(b[-1] if tps is None else tps, "stage.tokens_per_step", b[-1])
    out["mode"] = check_choice(stage.get("mode", "pack"), "stage.mode", BUCKET_MODES)
    out["overflow"] = check_choice(stage.get("overflow", "split"), "stage.overflow", BUCKET_OVERFLOW)
    out["buffer_tokens"] = check_int(stage.get("buffer_tokens"), "stage.buffer_tokens", 1, allow_none=True)
    out["seed"] = stage_seed(stage, raw_cur, cfg)
    build([], out, cur)
    return validated_config(cfg, out, raw_cur)


def build(
    docs: DocumentsIn, st: dict, cur: CurriculumConfig, ctx: StageContext | None = None
) -> StreamingBucketing:
    """The stage of a validated ``stage`` section; ``ctx`` places it (rank, worker, epoch, pad id)."""
    epoch, stride, offset, pad_id = placement(ctx)
    return StreamingBucketing(
        docs,
        st["boundaries"],
        capacity=st["tokens_per_step"],
        mode=st["mode"],
        curriculum=cur.buckets or BucketCurriculum(weighting="odds_by_mass", progress=cur.progress),
        overflow=st["overflow"],
        buffer_tokens=st["buffer_tokens"],
        seed=[st["seed"], epoch, offset],
        pad_id=pad_id,
        max_length=cur.seqlen,
        step_stride=stride,
        step_offset=offset,
    )


def factory(docs, stage: dict, ctx: StageContext) -> StreamingBucketing:
    """Loader factory: :class:`StreamingBucketing` over this consumer's documents."""
    return build(docs, stage, curriculum_of(ctx), ctx)


__all__ = ["BUCKET_MODES", "BUCKET_OVERFLOW", "LengthBucketing", "StreamingBucketing", "bucket_of"]
__all__ += ["factory", "padded_rows", "padding", "validate"]
