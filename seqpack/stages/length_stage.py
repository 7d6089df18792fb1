"""The shared base of the streaming length stages (``decompose``, ``bucket``; ``seqlen`` uses the helpers).

A length stage is a :class:`~seqpack.node.Node` over an upstream node of
:class:`~seqpack.sources.records.Document`. It keeps pieces of documents in one FIFO per length
bucket (:class:`BucketBuffers`, at most ``buffer_tokens`` tokens in all), draws the bucket of each
step with the curriculum's odds among the buckets that can fill a batch (the same seeded RNG on
every rank), and builds the step's batch inside the drawn bucket.

State (``get_state``): the upstream's state under ``"upstream"``, step and token counters, the
draw RNG, the buffered pieces in the one buffered-documents format
(:func:`~seqpack.sources.records.documents_to_state`: flat tensors) and the counters.
``reset(state)`` resumes token for token.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from torchdata.nodes import BaseNode

from seqpack.arena import documents_from_state, documents_to_state, refetcher
from seqpack.batch import VarlenBatch, padding_batch
from seqpack.checks import ConfigError, check_int, check_keys, check_mapping
from seqpack.curriculum import BucketCurriculum, CurriculumConfig, SeqlenSchedule, parse_curriculum_config
from seqpack.curriculum.config import upgrade_curriculum_section
from seqpack.curriculum.odds import draw_ready_bucket
from seqpack.node import Node, SequenceNode
from seqpack.plan import pack
from seqpack.sources.records import Document
from seqpack.stages.context import StageContext
from seqpack.stages.pack_offline import check_token_arrays

DocumentsIn = BaseNode | Sequence[np.ndarray] | Iterable[np.ndarray]


# ------------------------------------------------------------------------------------------ documents
def as_document_node(docs: DocumentsIn) -> BaseNode:
    """``docs`` itself when it is a node (of Documents); else a :class:`SequenceNode` of Documents made
    from the token arrays (``doc_id`` = index; 1-D integer arrays, errors name ``docs[i]``)."""
    if isinstance(docs, BaseNode):
        return docs
    items = list(docs)
    if all(isinstance(d, Document) for d in items):
        return SequenceNode(items)
    return SequenceNode([Document(i, a) for i, a in enumerate(check_token_arrays(items))])


def checked_document(doc: Document) -> Document:
    """``doc`` with int64 tokens and a bool mask (or None) of the same shape; errors name its id."""
    arr = np.asarray(doc.tokens)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError(
            f"document {doc.doc_id}: expected a 1-D integer token array, got {arr.dtype} {arr.shape}"
        )
    mask = doc.loss_mask
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != arr.shape:
            raise ValueError(f"document {doc.doc_id}: loss_mask has shape {mask.shape}, tokens {arr.shape}")
    if arr.dtype != np.int64 or mask is not doc.loss_mask:
        return Document(
            doc.doc_id, arr.astype(np.int64), mask, doc.source, doc.turn_starts, doc.group, doc.start
        )
    return doc


def piece(doc: Document, start: int, n: int) -> Document:
    """Tokens ``[start, start + n)`` of ``doc`` as a Document (views, no copy; ``start`` is kept absolute)."""
    mask = None if doc.loss_mask is None else doc.loss_mask[start : start + n]
    return Document(doc.doc_id, doc.tokens[start : start + n], mask, doc.source, start=doc.start + start)


def documents_batch(docs: Sequence[Document], pad_to: int | None = None, pad_id: int = 0) -> VarlenBatch:
    """One VarlenBatch with a segment per document piece (first label -100 each), padded to ``pad_to``."""
    masks = [d.loss_mask for d in docs]
    return VarlenBatch.from_segments(
        [d.tokens for d in docs],
        [d.doc_id for d in docs],
        seg_start=[d.start for d in docs],
        loss_masks=masks if any(m is not None for m in masks) else None,
        pad_to=pad_to,
        pad_id=pad_id,
    )


def planned_bins(lengths: np.ndarray, capacity: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Best-fit-decreasing bins (:func:`seqpack.plan.pack`) of items of ``lengths`` (each at most
    ``capacity``): the bins as arrays of item indices, each in ascending (arrival) order, and the
    tokens of each bin (int64 ``[n_bins]``)."""
    plan = pack(lengths, capacity, algorithm="bfd", seed=None)
    cuts = plan.bin_offsets
    bins = [np.sort(plan.seg_doc[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    return bins, np.add.reduceat(plan.seg_len, cuts[:-1]) if len(bins) else np.zeros(0, np.int64)


def fullest_bins(bins: list[np.ndarray], loads: np.ndarray, n: int) -> list[int]:
    """Indices of the ``n`` fullest bins (the bin holding the oldest item first on a tie), oldest first."""
    first = np.array([b[0] for b in bins], np.int64)
    best = np.lexsort((first, -loads))[:n]
    return best[np.argsort(first[best])].tolist()


# ------------------------------------------------------------------------------------------ buffers
class BucketBuffers:
    """One FIFO of buffered pieces (Documents) per bucket; ``tokens[i]`` the tokens held by bucket ``i``."""

    def __init__(self, n_buckets: int):
        self.q: list[deque[Document]] = [deque() for _ in range(n_buckets)]
        self.tokens = np.zeros(n_buckets, np.int64)

    @property
    def buffered(self) -> int:
        return int(self.tokens.sum())

    def counts(self) -> np.ndarray:
        return np.array([len(q) for q in self.q], np.int64)

    def lengths(self, i: int) -> np.ndarray:
        return np.fromiter((len(d.tokens) for d in self.q[i]), np.int64, len(self.q[i]))

    def add(self, i: int, doc: Document) -> None:
        self.q[i].append(doc)
        self.tokens[i] += len(doc.tokens)

    def pop(self, i: int, n: int) -> list[Document]:
        """The ``n`` oldest pieces of bucket ``i``."""
        out = [self.q[i].popleft() for _ in range(n)]
        self.tokens[i] -= sum(len(d.tokens) for d in out)
        return out

    def take(self, i: int, positions: np.ndarray) -> list[Document]:
        """The pieces at queue ``positions`` of bucket ``i`` (in queue order); the rest stay in order."""
        items = list(self.q[i])
        chosen = np.zeros(len(items), bool)
        chosen[positions] = True
        out = [d for d, c in zip(items, chosen) if c]
        self.q[i] = deque(d for d, c in zip(items, chosen) if not c)
        self.tokens[i] -= sum(len(d.tokens) for d in out)
        return out

    def clear(self) -> int:
        n = self.buffered
        self.q = [deque() for _ in self.q]
        self.tokens[:] = 0
        return n

    def state(self, by_ref: bool = False) -> dict:
        flat = [d for q in self.q for d in q]
        return {"documents": documents_to_state(flat, by_ref), "bucket_sizes": [len(q) for q in self.q]}

    def load(self, state: Mapping, refetch=None) -> None:
        sizes = [int(n) for n in state["bucket_sizes"]]
        if len(sizes) != len(self.q):
            raise ValueError(f"state has {len(sizes)} buckets, this stage has {len(self.q)}")
        self.clear()
        docs = iter(documents_from_state(state["documents"], refetch))
        for i, n in enumerate(sizes):
            for _ in range(n):
                self.add(i, next(docs))


# ------------------------------------------------------------------------------------------ the stage
class LengthStage(Node[VarlenBatch]):
    """Base of :class:`~seqpack.stages.decompose.StreamingDecomposer` and
    :class:`~seqpack.stages.bucket.StreamingBucketing`: source, buffers, draw, progress, state.

    Progress ``t`` of the curriculum is ``step * step_stride + step_offset`` (steps) or
    ``tokens_seen * step_stride`` (tokens): a stage that serves every ``step_stride``-th step of a
    rank (a DataLoader worker) sees the rank's step. Subclasses set ``name`` (the stats prefix),
    implement ``_add(doc)`` (pieces of a new document into the buffers) and ``next()``.
    """

    name = "length"
    COUNTERS = (
        "input_tokens",
        "emitted_tokens",
        "documents",
        "draws",
        "renormalized_draws",
        "zero_odds_fallbacks",
        "over_cap_draws",
        "max_buffered_tokens",
    )

    def _setup(
        self,
        upstream: DocumentsIn,
        curriculum: BucketCurriculum,
        n_buckets: int,
        buffer_tokens: int | None,
        step_tokens: int,
        max_length: SeqlenSchedule | None,
        draw_seed,
        step_stride: int,
        step_offset: int,
    ) -> None:
        if curriculum.n_cycles != 1:
            raise ValueError(
                f"curriculum.buckets.n_cycles: streaming {self.name} allows only 1 (cycles need the bucket "
                "sizes up front: use the offline class)"
            )
        curriculum.check(n_buckets)
        self.buffer_tokens = int(buffer_tokens) if buffer_tokens is not None else 2 * n_buckets * step_tokens
        if self.buffer_tokens < n_buckets * step_tokens:
            raise ValueError(
                f"buffer_tokens ({self.buffer_tokens}) must be >= n_buckets * {step_tokens} (a full batch "
                f"of every bucket) = {n_buckets * step_tokens}"
            )
        self.upstream = as_document_node(upstream)
        self.curriculum, self.n_buckets, self.max_length = curriculum, n_buckets, max_length
        self.draw_seed = draw_seed
        self.step_stride, self.step_offset = int(step_stride), int(step_offset)
        self.step = self.tokens_seen = 0  # progress, readable before the first step
        self.counts = dict.fromkeys(self.COUNTERS, 0)

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self.rng = np.random.Generator(np.random.PCG64(self.draw_seed))
        self.buffers = BucketBuffers(self.n_buckets)
        s = initial_state or {}
        self.upstream.reset(s.get("upstream"))
        self._refetch = self.state_refetch()
        self.step, self.tokens_seen = int(s.get("step", 0)), int(s.get("tokens_seen", 0))
        self.exhausted = bool(s.get("exhausted", False))
        self.counts = dict(s["counts"]) if s else dict.fromkeys(self.COUNTERS, 0)
        if s:
            self.rng.bit_generator.state = s["rng"]
            self.buffers.load(s["buffer"], self._refetch)

    def state_refetch(self):
        """How buffered documents saved by reference are re-read (None: the state keeps tokens).
        A subclass that changes documents before buffering them applies the same change here."""
        return refetcher(self.upstream)

    def get_state(self) -> dict:
        return {
            "upstream": self.upstream.state_dict(),
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "exhausted": self.exhausted,
            "rng": self.rng.bit_generator.state,
            "buffer": self.buffers.state(self._refetch is not None),
            "counts": dict(self.counts),
        }

    def own_stats(self) -> dict:
        out = {f"{self.name}/{k}": v for k, v in self.counts.items()}
        if hasattr(self, "buffers"):
            out[f"{self.name}/buffered_tokens"] = self.buffers.buffered
        return out

    @property
    def buffered(self) -> int:
        """Tokens waiting in the buffers."""
        return self.buffers.buffered

    def progress(self) -> int:
        if self.curriculum.progress == "steps":
            return self.step * self.step_stride + self.step_offset
        return self.tokens_seen * self.step_stride

    def _add(self, doc: Document) -> None:
        raise NotImplementedError

    def _fill(self) -> None:
        """Pull documents until the buffers hold ``buffer_tokens`` tokens or the upstream is done."""
        while not self.exhausted and self.buffers.buffered < self.buffer_tokens:
            try:
                doc = checked_document(next(self.upstream))
            except StopIteration:
                self.exhausted = True
                break
            self.counts["documents"] += 1
            self._add(doc)
            self.counts["max_buffered_tokens"] = max(
                self.counts["max_buffered_tokens"], self.buffers.buffered
            )

    def _draw(self, ready: np.ndarray, longest: np.ndarray) -> int:
        """The bucket of this step among ``ready`` ones; ``longest[i]`` is bucket ``i``'s longest sequence,
        compared with the max-length schedule (when there is one)."""
        t = self.progress()
        odds = self.curriculum.odds_at(t, self.n_buckets)
        mass = self.buffers.tokens if self.curriculum.weighting == "odds_by_mass" else None
        allowed = None if self.max_length is None else longest <= self.max_length(t)
        return draw_ready_bucket(self.rng, odds, ready, mass, allowed, self.counts)


# ------------------------------------------------------------------------------------------ config
def stage_value(stage: Mapping, key: str, cur_value: Any, cur_key: str, default: Any) -> Any:
    """The value of ``key`` from the stage or the curriculum section (not both, unless equal)."""
    if key in stage and cur_value is not None and stage[key] != cur_value:
        raise ConfigError(
            f"stage.{key} ({stage[key]!r}) and {cur_key} ({cur_value!r}) disagree; set it in one place"
        )
    if key in stage:
        return stage[key]
    return default if cur_value is None else cur_value


def length_stage_setup(cfg: Mapping, allowed_keys: Sequence[str]) -> tuple[dict, dict, CurriculumConfig]:
    """``(stage, curriculum section with old keys renamed, parsed curriculum)`` of a loader config."""
    stage = dict(cfg["stage"])
    check_keys(stage, allowed_keys, "stage")
    raw_cur = upgrade_curriculum_section(check_mapping(cfg.get("curriculum") or {}, "curriculum"))
    return stage, raw_cur, parse_curriculum_config(raw_cur)


def validated_config(cfg: Mapping, stage: dict, raw_cur: dict) -> dict:
    """The whole config with the checked ``stage`` and (when given) the upgraded ``curriculum``."""
    out = {**cfg, "stage": stage}
    if cfg.get("curriculum") is not None:
        out["curriculum"] = raw_cur
    return out


def stage_seed(stage: Mapping, raw_cur: Mapping, cfg: Mapping) -> int:
    seed = stage_value(stage, "seed", raw_cur.get("seed"), "curriculum.seed", cfg.get("seed", 0))
    return check_int(seed, "stage.seed", 0)


def placement(ctx: StageContext | None) -> tuple[int, int, int, int]:
    """``(epoch, step_stride, step_offset, pad_id)`` of a stage built for ``ctx`` (a dry build: epoch 0,
    one worker). Workers of a rank interleave steps: worker ``w`` of ``W`` takes steps ``w, w+W, ...``."""
    return (0, 1, 0, 0) if ctx is None else (ctx.epoch, ctx.num_workers, ctx.worker_id, ctx.pad_id)


def curriculum_of(ctx: StageContext) -> CurriculumConfig:
    return parse_curriculum_config(ctx.config.get("curriculum"))


def padding(stage: dict, ctx: StageContext, last: Any) -> VarlenBatch:
    """Zero-loss batch for a rank that ran out: as long as its last batch, else ``tokens_per_step``."""
    if isinstance(last, VarlenBatch):
        return padding_batch(last.num_tokens, ctx.pad_id)
    return padding_batch(int(stage["tokens_per_step"]), ctx.pad_id)
