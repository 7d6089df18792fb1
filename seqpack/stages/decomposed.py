"""Dataset decomposition over an in-memory corpus: :class:`DecomposedDataset` (one VarlenBatch per
step, the epoch's bucket sizes known up front, so ``n_cycles`` curricula work) and
:func:`decompose_documents` (per-bucket token pieces for offline preprocessing).

Batch convention (VarlenBatch labels are unshifted, the model shifts): a piece becomes one segment
of ``2^k + 1`` tokens whose first label is ``-100``, so the segment gives exactly ``2^k`` targets,
which are the paper's ``piece[1:]`` predicted from the inputs ``piece[:-1]``. A step from bucket
``i`` holds ``b_i = tokens_per_step / 2^i`` pieces, so **every step has exactly ``tokens_per_step``
loss targets** and ``tokens_per_step + b_i`` input tokens; ``pad_to="max"`` pads every step to
``tokens_per_step + tokens_per_step / 2^min_log2`` tokens (a final padding segment) for fixed shapes.

One bucket per step is drawn by :class:`~seqpack.curriculum.BucketSampler` from a seeded RNG that is
the same on every rank; each rank takes its own ``b_i`` pieces of the drawn batch. Exhausted buckets
leave the draw. Pieces left over at the end (fewer than a full batch) are dropped and counted
(``remainder="drop"``) or emitted as short final batches (``remainder="emit"``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from seqpack.batch import VarlenBatch
from seqpack.checks import check_choice, check_pad_to, pad_to_kwarg
from seqpack.curriculum import BucketCurriculum, BucketSampler, CurriculumConfig
from seqpack.node import Node
from seqpack.plan.decompose import (
    REMAINDER_POLICIES,
    Decomposition,
    check_log2_range,
    check_tokens_per_step,
    decompose_lengths,
)
from seqpack.sources.records import Document
from seqpack.stages.length_stage import documents_batch
from seqpack.stages.pack_offline import check_token_arrays


def with_eot(doc: np.ndarray, eot_id: int | None) -> np.ndarray:
    """``doc`` as int64 with ``eot_id`` appended (unchanged when ``eot_id`` is None)."""
    doc = np.asarray(doc, np.int64)
    return doc if eot_id is None else np.append(doc, np.int64(eot_id))


def largest_step(tokens_per_step: int, min_log2: int) -> int:
    """Input tokens of the largest step: ``tokens_per_step`` targets in pieces of the shortest bucket,
    ``tokens_per_step + tokens_per_step >> min_log2`` (what ``pad_to: max`` pads to)."""
    return tokens_per_step + (tokens_per_step >> min_log2)


@dataclass
class DecomposedBuckets:
    """Per-bucket token pieces for offline preprocessing (``preprocess --strategy decompose``).

    ``pieces[k]`` holds int64 arrays of ``2^k + 1`` tokens, ``doc_ids[k]`` / ``starts[k]`` their
    document id and offset (int64 arrays, same order); ``counts`` is ``decomposition.summary()``.
    """

    pieces: dict[int, list[np.ndarray]]
    doc_ids: dict[int, np.ndarray]
    starts: dict[int, np.ndarray]
    decomposition: Decomposition

    @property
    def counts(self) -> dict:
        return self.decomposition.summary()


def decompose_documents(
    docs: Sequence[np.ndarray],
    *,
    min_log2: int = 8,
    max_log2: int = 13,
    overlong: str = "random",
    seed: int = 0,
    eot_id: int | None = None,
    doc_ids: Sequence[int] | np.ndarray | None = None,
) -> DecomposedBuckets:
    """Decompose token arrays into per-bucket pieces (EOT appended when ``eot_id`` is given).

    Every input token (plus EOT) ends in exactly one piece or in ``dropped_tokens``.
    """
    docs = [with_eot(d, eot_id) for d in check_token_arrays(docs)]
    ids = np.arange(len(docs), dtype=np.int64) if doc_ids is None else np.asarray(doc_ids, np.int64)
    dec = decompose_lengths(
        [len(d) for d in docs],
        min_log2=min_log2,
        max_log2=max_log2,
        overlong=overlong,
        seed=seed,
        doc_keys=ids,
    )
    pieces, out_ids, out_starts = {}, {}, {}
    for k in dec.log2s:
        idx = dec.bucket(k)
        n = (1 << k) + 1
        pieces[k] = [docs[d][s : s + n] for d, s in zip(dec.piece_doc[idx], dec.piece_start[idx])]
        out_ids[k] = ids[dec.piece_doc[idx]]
        out_starts[k] = dec.piece_start[idx].copy()
    return DecomposedBuckets(pieces, out_ids, out_starts, dec)


class DecomposedDataset(Node[VarlenBatch]):
    """Dataset decomposition over an in-memory (random-access) corpus: one VarlenBatch per step.

    Args:
        docs: 1-D integer token arrays (random access; tokens are sliced when a batch is built).
        tokens_per_step: targets per step per rank; divisible by ``2^max_log2``.
        min_log2, max_log2, overlong, seed: as in :func:`~seqpack.plan.decompose.decompose_lengths`;
            ``seed`` also seeds the per-bucket shuffles and the shared bucket draw.
        curriculum: bucket odds and cycles (default: uniform odds, one cycle).
        eot_id: appended to every document before decomposing.
        rank, world_size: each step every rank takes its own ``b_i`` pieces of the same bucket.
        remainder: leftover pieces after the last full batch of each bucket: ``drop`` (counted in
            ``stats()["leftover_tokens"]``) or ``emit`` (one short batch per bucket per rank at the
            end; with ``world_size > 1`` each rank gets ``floor(n / world_size)`` and the rest is
            counted as leftover).
        pad_to: pad every batch to this many tokens; ``"max"``: the largest step,
            ``tokens_per_step + tokens_per_step >> min_log2`` (``pad_to_fixed=True`` is its deprecated name).

    A :class:`~seqpack.node.Node` with no upstream: iterate it (from where it stands), ``len(self)`` is
    the number of steps, known before training; ``state_dict()`` (plain JSON) resumes exactly.
    """

    def __init__(
        self,
        docs: Sequence[np.ndarray],
        *,
        tokens_per_step: int,
        min_log2: int = 8,
        max_log2: int = 13,
        curriculum: BucketCurriculum | None = None,
        overlong: str = "random",
        seed: int = 0,
        eot_id: int | None = None,
        doc_ids: Sequence[int] | np.ndarray | None = None,
        rank: int = 0,
        world_size: int = 1,
        remainder: str = "drop",
        pad_to: int | str | None = None,
        pad_id: int = 0,
        **deprecated: Any,
    ):
        super().__init__()
        pad_to = pad_to_kwarg(pad_to, deprecated, "pad_to_fixed", "DecomposedDataset")
        check_log2_range(min_log2, max_log2)
        self.tokens_per_step = check_tokens_per_step(tokens_per_step, max_log2)
        self.remainder = check_choice(remainder, "remainder", REMAINDER_POLICIES)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.docs = check_token_arrays(docs)
        self.eot_id = eot_id
        self.ids = np.arange(len(docs), dtype=np.int64) if doc_ids is None else np.asarray(doc_ids, np.int64)
        self.curriculum = curriculum or BucketCurriculum()
        self.rank, self.world_size = rank, world_size
        self.pad_to = check_pad_to(pad_to, "pad_to", largest_step(self.tokens_per_step, min_log2))
        self.pad_id = pad_id
        self.seed = seed
        lengths = np.array([len(d) + (eot_id is not None) for d in self.docs], np.int64)
        self.decomposition = decompose_lengths(
            lengths, min_log2=min_log2, max_log2=max_log2, overlong=overlong, seed=seed, doc_keys=self.ids
        )
        self.log2s = self.decomposition.log2s
        # shuffle each bucket independently of every other (seed, k) so adding a bucket changes nothing else
        self.order = [
            np.random.default_rng([seed, k]).permutation(self.decomposition.bucket(k)) for k in self.log2s
        ]
        self.per_rank = np.array([self.tokens_per_step >> k for k in self.log2s], np.int64)  # b_i
        self.full_batches = np.array(
            [len(o) // (b * world_size) for o, b in zip(self.order, self.per_rank)], np.int64
        )
        self._tail_per_rank = np.array(
            [
                (len(o) - n * b * world_size) // world_size
                for o, b, n in zip(self.order, self.per_rank, self.full_batches)
            ],
            np.int64,
        )
        self.reset()

    @classmethod
    def from_config(cls, docs: Sequence[np.ndarray], cfg: CurriculumConfig, **kwargs) -> DecomposedDataset:
        """Build from a validated ``curriculum:`` section (:class:`seqpack.curriculum.CurriculumConfig`);
        ``kwargs`` (``rank``, ``world_size``, ``eot_id``, ...) pass through."""
        if cfg.decompose is None or cfg.tokens_per_step is None:
            raise ValueError("curriculum: the 'decompose' stage needs 'decompose' and 'tokens_per_step'")
        d = cfg.decompose
        return cls(
            docs,
            tokens_per_step=cfg.tokens_per_step,
            min_log2=d.min_log2,
            max_log2=d.max_log2,
            curriculum=cfg.buckets or BucketCurriculum(progress=cfg.progress),
            overlong=d.overlong,
            seed=cfg.seed,
            remainder=d.remainder,
            pad_to=d.pad_to,
            **kwargs,
        )

    def reset(self, initial_state: Mapping | None = None) -> None:
        """Back to the start of the epoch, or to ``initial_state`` (a ``state_dict()``)."""
        super().reset(initial_state)
        self.sampler = BucketSampler(self.full_batches, self.curriculum, seed=self.seed)
        self.cursor = np.zeros(len(self.log2s), np.int64)
        self.tail_bucket = 0  # next bucket whose remainder to emit (remainder="emit")
        self.step = 0
        self.tokens_seen = 0
        self.bucket_history: list[int] = []
        if initial_state is None:
            return
        s = initial_state
        if list(s["bucket_pieces"]) != [len(o) for o in self.order]:
            raise ValueError(
                f"state was saved for bucket sizes {list(s['bucket_pieces'])}, this corpus has "
                f"{[len(o) for o in self.order]} (different data, seed or min/max_log2)"
            )
        self.step, self.tokens_seen = int(s["step"]), int(s["tokens_seen"])
        self.cursor = np.asarray(s["cursor"], np.int64)
        self.tail_bucket = int(s["tail_bucket"])
        self.sampler.load_state_dict(s["sampler"])

    def get_state(self) -> dict:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "cursor": self.cursor.tolist(),
            "tail_bucket": self.tail_bucket,
            "sampler": self.sampler.state_dict(),
            "bucket_pieces": [len(o) for o in self.order],
        }

    def __len__(self) -> int:
        tails = int((self._tail_per_rank > 0).sum()) if self.remainder == "emit" else 0
        return int(self.full_batches.sum()) + tails

    def progress(self) -> int:
        return self.step if self.curriculum.progress == "steps" else self.tokens_seen

    def _pieces(self, bucket: int, idx: np.ndarray) -> list[Document]:
        dec, n = self.decomposition, (1 << self.log2s[bucket]) + 1
        out = []
        for d, s in zip(dec.piece_doc[idx].tolist(), dec.piece_start[idx].tolist()):
            toks = np.asarray(self.docs[d][s : s + n], np.int64)  # copies only the piece
            if self.eot_id is not None and len(toks) < n:  # the piece reaches the appended EOT
                toks = np.append(toks, np.int64(self.eot_id))
            out.append(Document(int(self.ids[d]), toks, start=s))
        return out

    def _next_indices(self) -> tuple[int, np.ndarray] | None:
        """Bucket and piece indices of this rank's next batch (None at the end of the epoch)."""
        i = self.sampler.next(self.progress())
        if i is not None:
            b, W = int(self.per_rank[i]), self.world_size
            lo = (int(self.cursor[i]) * W + self.rank) * b
            self.cursor[i] += 1
            return i, self.order[i][lo : lo + b]
        if self.remainder == "drop":
            return None
        while self.tail_bucket < len(self.log2s) and self._tail_per_rank[self.tail_bucket] == 0:
            self.tail_bucket += 1
        if self.tail_bucket >= len(self.log2s):
            return None
        i = self.tail_bucket
        self.tail_bucket += 1
        b, W, m = int(self.per_rank[i]), self.world_size, int(self._tail_per_rank[i])
        base = int(self.full_batches[i]) * b * W
        return i, self.order[i][base + self.rank * m : base + (self.rank + 1) * m]

    def next(self) -> VarlenBatch:
        """This rank's batch of the next step; StopIteration at the end of the epoch."""
        got = self._next_indices()
        if got is None:
            raise StopIteration
        i, idx = got
        batch = documents_batch(self._pieces(i, idx), self.pad_to, self.pad_id)
        self.step += 1
        self.tokens_seen += batch.num_loss_tokens
        self.bucket_history.append(self.log2s[i])
        return batch

    def own_stats(self) -> dict:
        """Token accounting over all ranks: ``input == emitted_all_ranks + leftover + dropped``."""
        dec = self.decomposition
        piece_len = (np.int64(1) << np.array(self.log2s)) + 1
        piece_tok = np.array([len(o) for o in self.order], np.int64) * piece_len
        full_tok = self.full_batches * self.per_rank * self.world_size * piece_len
        tail_tok = self._tail_per_rank * self.world_size * piece_len * (self.remainder == "emit")
        return {
            "input_tokens": dec.input_tokens,
            "dropped_tokens": dec.dropped_tokens,
            "emitted_tokens_all_ranks": int(full_tok.sum() + tail_tok.sum()),
            "leftover_tokens": int((piece_tok - full_tok - tail_tok).sum()),
            "steps": len(self),
            "sampler": dict(self.sampler.stats),
            **{
                k: v for k, v in dec.summary().items() if k.startswith("bucket_") or k == "avg_context_length"
            },
        }
