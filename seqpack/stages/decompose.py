"""Dataset decomposition (2^i buckets) and plain length bucketing (design.md section 4).

**Dataset decomposition** (Pouransari et al., NeurIPS 2024). Each document (with its EOT) is cut
greedily from the front into pieces of ``2^k + 1`` tokens, ``k = floor(log2(remaining - 1))``; a
piece goes to bucket ``D_k``. Over-long pieces (``k > max_log2``) get a random ``k`` with
``P(k) ∝ 2^(max_log2 - k)`` (or ``max_log2`` with ``overlong="cap"``); the tail once ``k < min_log2``
is dropped and counted. Every training sequence comes from one document, so there is no
cross-document attention and no mask.

Batch convention (VarlenBatch labels are unshifted, the model shifts): a piece becomes one segment
of ``2^k + 1`` tokens whose first label is ``-100``, so the segment gives exactly ``2^k`` targets,
which are the paper's ``piece[1:]`` predicted from the inputs ``piece[:-1]``. The segment's last
position predicts nothing (its logits are unused). A step from bucket ``i`` holds
``b_i = tokens_per_step / 2^i`` pieces, so **every step has exactly ``tokens_per_step`` loss targets**
(``batch.num_loss_tokens``) and ``tokens_per_step + b_i`` input tokens; ``pad_to_fixed=True`` pads
every step to ``tokens_per_step + tokens_per_step / 2^min_log2`` tokens (a final padding segment) for
fixed shapes. The paper's input length of a piece is ``2^k``; attention cost figures use that.

One bucket per step is drawn by :class:`seqpack.curriculum.BucketSampler` from a seeded RNG that is
the same on every rank; each rank takes its own ``b_i`` pieces of the drawn batch. Exhausted buckets
leave the draw. Pieces left over at the end (fewer than a full batch) are dropped and counted
(``remainder="drop"``) or emitted as short final batches (``remainder="emit"``).

**Length bucketing**: boundaries ``[b_0 < b_1 < ...]``, a document of length ``l`` goes to the first
bucket with ``l <= b_j``; batches are formed inside a bucket, padded to the bucket's boundary
(``mode="pad"``) or bin-packed with document masks (``mode="pack"``); the bucket of each step follows
a :class:`~seqpack.curriculum.BucketCurriculum`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from seqpack.batch import IGNORE_INDEX, VarlenBatch
from seqpack.curriculum import BucketCurriculum, BucketSampler
from seqpack.ops import decompose as kernels
from seqpack.plan import OVERFLOW_POLICIES, expand_overflow, pack

OVERLONG_POLICIES = ("random", "cap")
REMAINDER_POLICIES = ("drop", "emit")
BUCKET_MODES = ("pad", "pack")


def _check_log2_range(min_log2: int, max_log2: int) -> None:
    for name, v in (("min_log2", min_log2), ("max_log2", max_log2)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v <= 40:
            raise ValueError(f"{name} must be an integer in [0, 40], got {v!r}")
    if max_log2 < min_log2:
        raise ValueError(f"max_log2 ({max_log2}) must be >= min_log2 ({min_log2})")


def _check_tokens_per_step(tokens_per_step: int, max_log2: int) -> None:
    if (
        isinstance(tokens_per_step, bool)
        or not isinstance(tokens_per_step, (int, np.integer))
        or tokens_per_step <= 0
    ):
        raise ValueError(f"tokens_per_step must be a positive integer, got {tokens_per_step!r}")
    if tokens_per_step % (1 << max_log2):
        raise ValueError(
            f"tokens_per_step ({tokens_per_step}) must be divisible by the largest bucket 2^max_log2 = "
            f"{1 << max_log2}, so every bucket's batch holds exactly tokens_per_step targets"
        )


# ------------------------------------------------------------------------------------------ decomposition
@dataclass
class Decomposition:
    """Pieces of a decomposed corpus (pure data, no tokens).

    Attributes:
        piece_offsets: int64 ``[n_docs + 1]``, CSR of pieces per document (document order).
        piece_doc: int64 ``[n_pieces]``, document index of each piece.
        piece_start: int64 ``[n_pieces]``, token offset of the piece inside its document.
        piece_log2: int64 ``[n_pieces]``, bucket ``k``; the piece covers ``2^k + 1`` tokens.
        dropped_per_doc: int64 ``[n_docs]``, tail tokens too short for ``D_min`` (counted, not emitted).
        min_log2, max_log2: bucket range.
        input_tokens: sum of document lengths (EOT included when the caller added it).
    """

    piece_offsets: np.ndarray
    piece_doc: np.ndarray
    piece_start: np.ndarray
    piece_log2: np.ndarray
    dropped_per_doc: np.ndarray
    min_log2: int
    max_log2: int
    input_tokens: int

    @property
    def n_pieces(self) -> int:
        return len(self.piece_log2)

    @property
    def piece_len(self) -> np.ndarray:
        """Tokens per piece, ``2^k + 1``."""
        return (np.int64(1) << self.piece_log2) + 1

    @property
    def dropped_tokens(self) -> int:
        return int(self.dropped_per_doc.sum())

    @property
    def log2s(self) -> list[int]:
        return list(range(self.min_log2, self.max_log2 + 1))

    def bucket_pieces(self) -> np.ndarray:
        """Pieces per bucket, int64 ``[max_log2 - min_log2 + 1]`` (D_min first)."""
        return np.bincount(self.piece_log2 - self.min_log2, minlength=self.max_log2 - self.min_log2 + 1)

    def bucket_tokens(self) -> np.ndarray:
        """Tokens per bucket (``2^k + 1`` per piece)."""
        return self.bucket_pieces() * ((np.int64(1) << np.arange(self.min_log2, self.max_log2 + 1)) + 1)

    def bucket(self, k: int) -> np.ndarray:
        """Piece indices of bucket ``D_k`` in document order."""
        return np.flatnonzero(self.piece_log2 == k)

    def validate(self, lengths: Sequence[int] | np.ndarray) -> None:
        """Assert conservation: per document, pieces tile a prefix and pieces + dropped == length."""
        lengths = np.asarray(lengths, np.int64)
        per_doc = np.zeros(len(lengths), np.int64)
        np.add.at(per_doc, self.piece_doc, self.piece_len)
        if not np.array_equal(per_doc + self.dropped_per_doc, lengths):
            bad = int(np.flatnonzero(per_doc + self.dropped_per_doc != lengths)[0])
            raise AssertionError(
                f"document {bad}: pieces {per_doc[bad]} + dropped {self.dropped_per_doc[bad]} "
                f"!= {lengths[bad]}"
            )
        first = self.piece_offsets[:-1][np.diff(self.piece_offsets) > 0]
        expected_start = np.cumsum(self.piece_len) - self.piece_len
        expected_start -= np.repeat(
            expected_start[first], np.diff(self.piece_offsets)[np.diff(self.piece_offsets) > 0]
        )
        if not np.array_equal(expected_start, self.piece_start):
            raise AssertionError("pieces do not tile their documents from the front")
        if (self.dropped_per_doc > (1 << self.min_log2)).any():
            raise AssertionError("a document dropped a tail long enough for the smallest bucket")

    def summary(self) -> dict:
        """Plain-dict stats: tokens per bucket, drops, average context length (inputs of ``2^k``)."""
        n_in = (np.int64(1) << self.piece_log2).astype(np.float64)
        return {
            "input_tokens": self.input_tokens,
            "piece_tokens": int(self.piece_len.sum()),
            "dropped_tokens": self.dropped_tokens,
            "dropped_docs": int((self.dropped_per_doc > 0).sum()),
            "n_pieces": self.n_pieces,
            "bucket_pieces": {f"D{k}": int(c) for k, c in zip(self.log2s, self.bucket_pieces())},
            "bucket_tokens": {f"D{k}": int(c) for k, c in zip(self.log2s, self.bucket_tokens())},
            # average context a token sees: sum l(l-1)/2 / sum l over input sequences
            "avg_context_length": float((n_in * (n_in - 1) / 2).sum() / max(n_in.sum(), 1.0)),
        }


def decompose_lengths(
    lengths: Sequence[int] | np.ndarray,
    *,
    min_log2: int = 8,
    max_log2: int = 13,
    overlong: str = "random",
    seed: int = 0,
    doc_keys: Sequence[int] | np.ndarray | None = None,
) -> Decomposition:
    """Decompose documents of the given token ``lengths`` (EOT included) into 2^k buckets.

    Args:
        lengths: int ``[n_docs]`` tokens per document, >= 0.
        min_log2, max_log2: smallest and largest bucket exponent (paper: 8 and 13).
        overlong: ``random`` (``P(k) ∝ 2^(max_log2-k)``) or ``cap`` (always ``max_log2``) for pieces
            that would exceed ``2^max_log2``.
        seed: seeds the over-long draws, which hash ``(seed, doc_key, piece index)`` so the result
            does not depend on order, sharding or streaming.
        doc_keys: global id of each document for that hash (default: its index).
    """
    _check_log2_range(min_log2, max_log2)
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
    arr = np.asarray(lengths)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError(f"lengths must be a 1-D integer array, got {arr.dtype} {arr.shape}")
    arr = arr.astype(np.int64, copy=False)
    neg = np.flatnonzero(arr < 0)
    if len(neg):
        raise ValueError(f"lengths must be >= 0: lengths[{neg[0]}] = {arr[neg[0]]}")
    keys = np.arange(len(arr), dtype=np.int64) if doc_keys is None else np.asarray(doc_keys, np.int64)
    if len(keys) != len(arr):
        raise ValueError(f"doc_keys has {len(keys)} entries for {len(arr)} lengths")
    offsets, starts, log2s, dropped = kernels.decompose_kernel(
        np.ascontiguousarray(arr),
        np.ascontiguousarray(keys),
        min_log2,
        max_log2,
        overlong == "cap",
        int(seed),
    )
    piece_doc = np.repeat(np.arange(len(arr), dtype=np.int64), np.diff(offsets))
    return Decomposition(
        offsets, piece_doc, starts, log2s, dropped, int(min_log2), int(max_log2), int(arr.sum())
    )


def _doc_with_eot(doc: np.ndarray, eot_id: int | None) -> np.ndarray:
    doc = np.asarray(doc, np.int64)
    return doc if eot_id is None else np.append(doc, np.int64(eot_id))


def _piece_tokens(doc: np.ndarray, start: int, n: int, eot_id: int | None) -> np.ndarray:
    """Tokens ``[start, start + n)`` of ``doc`` + EOT, copying only the piece (not the whole document)."""
    piece = np.asarray(doc[start : start + n], np.int64)
    if eot_id is not None and len(piece) < n:  # the piece reaches the appended EOT
        piece = np.append(piece, np.int64(eot_id))
    return piece


def _check_docs(docs: Sequence[np.ndarray]) -> None:
    for i, d in enumerate(docs):
        a = np.asarray(d)
        if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
            raise ValueError(f"docs[{i}] must be a 1-D integer token array, got {a.dtype} {a.shape}")


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
    _check_docs(docs)
    docs = [_doc_with_eot(d, eot_id) for d in docs]
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


def pieces_batch(
    pieces: Sequence[np.ndarray],
    doc_ids: Sequence[int],
    starts: Sequence[int],
    *,
    pad_to: int | None = None,
    pad_id: int = 0,
) -> VarlenBatch:
    """One VarlenBatch of whole pieces (each a segment; first label -100, so ``2^k`` targets each)."""
    return VarlenBatch.from_segments(list(pieces), doc_ids, seg_start=starts, pad_to=pad_to, pad_id=pad_id)


# ------------------------------------------------------------------------------------------ offline stage
class DecomposedDataset:
    """Dataset decomposition over an in-memory (random-access) corpus: one VarlenBatch per step.

    Args:
        docs: 1-D integer token arrays (random access; tokens are sliced when a batch is built).
        tokens_per_step: targets per step per rank; divisible by ``2^max_log2``.
        min_log2, max_log2, overlong, seed: as in :func:`decompose_lengths`; ``seed`` also seeds the
            per-bucket shuffles and the shared bucket draw.
        curriculum: bucket odds and cycles (default: uniform odds, one cycle).
        eot_id: appended to every document before decomposing.
        rank, world_size: each step every rank takes its own ``b_i`` pieces of the same bucket.
        remainder: leftover pieces after the last full batch of each bucket: ``drop`` (counted in
            ``stats()["leftover_tokens"]``) or ``emit`` (one short batch per bucket per rank at the
            end; with ``world_size > 1`` each rank gets ``floor(n / world_size)`` and the rest is
            counted as leftover).
        pad_to_fixed: pad every batch to ``tokens_per_step + tokens_per_step >> min_log2`` tokens.

    ``len(self)`` is the number of steps, known before training. ``state_dict`` resumes exactly.
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
        pad_to_fixed: bool = False,
        pad_id: int = 0,
    ):
        _check_log2_range(min_log2, max_log2)
        _check_tokens_per_step(tokens_per_step, max_log2)
        if remainder not in REMAINDER_POLICIES:
            raise ValueError(f"remainder must be one of {REMAINDER_POLICIES}, got {remainder!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        _check_docs(docs)
        self.docs = docs
        self.eot_id = eot_id
        self.ids = np.arange(len(docs), dtype=np.int64) if doc_ids is None else np.asarray(doc_ids, np.int64)
        self.tokens_per_step = int(tokens_per_step)
        self.curriculum = curriculum or BucketCurriculum()
        self.rank, self.world_size = rank, world_size
        self.remainder = remainder
        self.pad_to = self.tokens_per_step + (self.tokens_per_step >> min_log2) if pad_to_fixed else None
        self.pad_id = pad_id
        self.seed = seed
        lengths = np.array([len(d) + (eot_id is not None) for d in docs], np.int64)
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
    def from_config(cls, docs: Sequence[np.ndarray], cfg, **kwargs) -> DecomposedDataset:
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
            pad_to_fixed=d.pad_to_fixed,
            **kwargs,
        )

    def reset(self) -> None:
        """Back to the start of the epoch."""
        self.sampler = BucketSampler(self.full_batches, self.curriculum, seed=self.seed)
        self.cursor = np.zeros(len(self.log2s), np.int64)
        self.tail_bucket = 0  # next bucket whose remainder to emit (remainder="emit")
        self.step = 0
        self.tokens_seen = 0
        self.bucket_history: list[int] = []

    def __len__(self) -> int:
        tails = int((self._tail_per_rank > 0).sum()) if self.remainder == "emit" else 0
        return int(self.full_batches.sum()) + tails

    def progress(self) -> int:
        return self.step if self.curriculum.progress == "steps" else self.tokens_seen

    def _batch(self, bucket: int, idx: np.ndarray) -> VarlenBatch:
        dec = self.decomposition
        k = self.log2s[bucket]
        n = (1 << k) + 1
        toks = [
            _piece_tokens(self.docs[d], s, n, self.eot_id)
            for d, s in zip(dec.piece_doc[idx], dec.piece_start[idx])
        ]
        return pieces_batch(
            toks, self.ids[dec.piece_doc[idx]], dec.piece_start[idx], pad_to=self.pad_to, pad_id=self.pad_id
        )

    def next_batch(self) -> VarlenBatch | None:
        """This rank's batch of the next step, or ``None`` at the end of the epoch."""
        i = self.sampler.next(self.progress())
        if i is not None:
            b, W = int(self.per_rank[i]), self.world_size
            lo = (int(self.cursor[i]) * W + self.rank) * b
            self.cursor[i] += 1
            idx = self.order[i][lo : lo + b]
        else:
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
            idx = self.order[i][base + self.rank * m : base + (self.rank + 1) * m]
        batch = self._batch(i, idx)
        self.step += 1
        self.tokens_seen += batch.num_loss_tokens
        self.bucket_history.append(self.log2s[i])
        return batch

    def __iter__(self) -> Iterator[VarlenBatch]:
        while (batch := self.next_batch()) is not None:
            yield batch

    def stats(self) -> dict:
        """Token accounting over all ranks: ``input == emitted_all_ranks + leftover + dropped``."""
        dec = self.decomposition
        piece_tok = np.array([(len(o)) * ((1 << k) + 1) for o, k in zip(self.order, self.log2s)], np.int64)
        full_tok = (
            self.full_batches * self.per_rank * self.world_size * ((np.int64(1) << np.array(self.log2s)) + 1)
        )
        tail_tok = (
            self._tail_per_rank * self.world_size * ((np.int64(1) << np.array(self.log2s)) + 1)
            if self.remainder == "emit"
            else np.zeros(len(self.log2s), np.int64)
        )
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

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "cursor": self.cursor.tolist(),
            "tail_bucket": self.tail_bucket,
            "sampler": self.sampler.state_dict(),
            "bucket_pieces": [len(o) for o in self.order],
        }

    def load_state_dict(self, state: Mapping) -> None:
        if list(state["bucket_pieces"]) != [len(o) for o in self.order]:
            raise ValueError(
                f"state was saved for bucket sizes {list(state['bucket_pieces'])}, this corpus has "
                f"{[len(o) for o in self.order]} (different data, seed or min/max_log2)"
            )
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.cursor = np.asarray(state["cursor"], np.int64)
        self.tail_bucket = int(state["tail_bucket"])
        self.sampler.load_state_dict(state["sampler"])


# ---------------------------------------------------------------------------------------- streaming stage
class StreamingDecomposer:
    """Dataset decomposition over a document stream with bounded per-bucket reservoirs.

    Documents are decomposed as they arrive (the same pieces as offline: the over-long draw hashes
    the document's ordinal), pieces wait in FIFO reservoirs per bucket holding at most
    ``buffer_tokens`` tokens in all. Before each step the reservoirs are topped up to that bound; the
    bucket is then drawn by the shared seeded RNG over buckets that hold a full batch (``b_i``
    pieces), with the curriculum's odds at the current progress (times the reservoir's tokens for
    ``odds_by_mass``). Buckets with positive odds that cannot fill a batch are skipped and counted
    (``stats["renormalized_draws"]``). Ranks that read differently-distributed shards may draw
    different buckets on such steps; each step still has exactly ``tokens_per_step`` targets.

    ``buffer_tokens`` must be at least ``n_buckets * tokens_per_step`` so some bucket is always full
    while the stream lasts. ``n_cycles`` needs the epoch size and is only offered offline
    (:class:`DecomposedDataset`). At the end of the stream the reservoirs' rest is dropped and counted
    (``remainder="drop"``) or emitted as short batches (``"emit"``).
    """

    def __init__(
        self,
        docs: Sequence[np.ndarray] | Iterable[np.ndarray],
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
        pad_to_fixed: bool = False,
        pad_id: int = 0,
    ):
        _check_log2_range(min_log2, max_log2)
        _check_tokens_per_step(tokens_per_step, max_log2)
        if remainder not in REMAINDER_POLICIES:
            raise ValueError(f"remainder must be one of {REMAINDER_POLICIES}, got {remainder!r}")
        self.curriculum = curriculum or BucketCurriculum()
        if self.curriculum.n_cycles != 1:
            raise ValueError("n_cycles > 1 needs the bucket sizes up front: use DecomposedDataset (offline)")
        self.log2s = list(range(min_log2, max_log2 + 1))
        self.curriculum.check(len(self.log2s))
        n_b = len(self.log2s)
        self.buffer_tokens = int(buffer_tokens) if buffer_tokens is not None else 2 * n_b * tokens_per_step
        if self.buffer_tokens < n_b * tokens_per_step:
            raise ValueError(
                f"buffer_tokens ({self.buffer_tokens}) must be >= n_buckets * tokens_per_step "
                f"= {n_b * tokens_per_step}"
            )
        self.docs = docs
        self._random_access = isinstance(docs, Sequence)
        self._iter = None
        self.tokens_per_step = int(tokens_per_step)
        self.min_log2, self.max_log2, self.overlong, self.seed = min_log2, max_log2, overlong, seed
        self.eot_id = eot_id
        self.remainder = remainder
        self.pad_to = self.tokens_per_step + (self.tokens_per_step >> min_log2) if pad_to_fixed else None
        self.pad_id = pad_id
        self.per_rank = np.array([self.tokens_per_step >> k for k in self.log2s], np.int64)
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.reservoirs: list[deque] = [deque() for _ in self.log2s]  # (doc_id, start, tokens)
        self.buffered = 0
        self.next_doc = 0
        self.step = 0
        self.tokens_seen = 0
        self.exhausted = False
        self.stats = {
            "input_tokens": 0,
            "dropped_tokens": 0,
            "emitted_tokens": 0,
            "leftover_tokens": 0,
            "draws": 0,
            "renormalized_draws": 0,
            "max_buffered_tokens": 0,
        }

    def _pull(self) -> bool:
        if self._random_access:
            if self.next_doc >= len(self.docs):
                return False
            doc = self.docs[self.next_doc]
        else:
            if self._iter is None:
                self._iter = iter(self.docs)
            doc = next(self._iter, None)
            if doc is None:
                return False
        a = np.asarray(doc)
        if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
            raise ValueError(
                f"document {self.next_doc}: expected a 1-D integer token array, got {a.dtype} {a.shape}"
            )
        doc = _doc_with_eot(a, self.eot_id)
        d = self.next_doc
        self.next_doc += 1
        offsets, starts, log2s, dropped = kernels.decompose_kernel(
            np.array([len(doc)], np.int64),
            np.array([d], np.int64),
            self.min_log2,
            self.max_log2,
            self.overlong == "cap",
            int(self.seed),
        )
        self.stats["input_tokens"] += len(doc)
        self.stats["dropped_tokens"] += int(dropped[0])
        for s, k in zip(starts, log2s):
            n = (1 << int(k)) + 1
            self.reservoirs[int(k) - self.min_log2].append((d, int(s), doc[s : s + n]))
            self.buffered += n
        self.stats["max_buffered_tokens"] = max(self.stats["max_buffered_tokens"], self.buffered)
        return True

    def _fill(self) -> None:
        while not self.exhausted and self.buffered < self.buffer_tokens:
            if not self._pull():
                self.exhausted = True

    def progress(self) -> int:
        return self.step if self.curriculum.progress == "steps" else self.tokens_seen

    def next_batch(self) -> VarlenBatch | None:
        self._fill()
        counts = np.array([len(r) for r in self.reservoirs], np.int64)
        ready = counts >= self.per_rank
        if ready.any():
            odds = self.curriculum.odds_at(self.progress(), len(self.log2s))
            w = odds * ready
            if self.curriculum.weighting == "odds_by_mass":
                w = w * counts * ((np.int64(1) << np.array(self.log2s)) + 1)
            if ((odds > 0) & ~ready).any():
                self.stats["renormalized_draws"] += 1
            if w.sum() <= 0:
                w = ready.astype(np.float64)  # zero odds on every ready bucket: fall back to uniform
            p = w / w.sum()
            i = int(np.searchsorted(np.cumsum(p), self.rng.random(), side="right"))
            i = min(i, len(p) - 1)
            while p[i] == 0:
                i -= 1
            take = int(self.per_rank[i])
            self.stats["draws"] += 1
        else:
            # stream over and no bucket can fill a batch: the rest is a remainder
            nonempty = np.flatnonzero(counts)
            if len(nonempty) == 0:
                return None
            if self.remainder == "drop":
                self.stats["leftover_tokens"] += self.buffered
                self.buffered = 0
                for r in self.reservoirs:
                    r.clear()
                return None
            i = int(nonempty[0])
            take = int(counts[i])
        segs = [self.reservoirs[i].popleft() for _ in range(take)]
        n_tok = sum(len(t) for _, _, t in segs)
        self.buffered -= n_tok
        batch = pieces_batch(
            [t for _, _, t in segs],
            [d for d, _, _ in segs],
            [s for _, s, _ in segs],
            pad_to=self.pad_to,
            pad_id=self.pad_id,
        )
        self.step += 1
        self.tokens_seen += batch.num_loss_tokens
        self.stats["emitted_tokens"] += n_tok
        return batch

    def __iter__(self) -> Iterator[VarlenBatch]:
        while (batch := self.next_batch()) is not None:
            yield batch

    def state_dict(self) -> dict:
        # Reservoir pieces are references (doc, start, k) for random-access sources, tokens otherwise.
        def piece(d, s, t):
            return (d, s, len(t)) if self._random_access else (d, s, t.tolist())

        state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "next_doc": self.next_doc,
            "exhausted": self.exhausted,
            "rng": self.rng.bit_generator.state,
            "reservoirs": [[piece(*p) for p in r] for r in self.reservoirs],
            "stats": dict(self.stats),
        }
        if not self._random_access:
            if not hasattr(self.docs, "state_dict"):
                raise TypeError(
                    "resume needs docs to be a Sequence or to have state_dict()/load_state_dict()"
                )
            state["source"] = self.docs.state_dict()
        return state

    def load_state_dict(self, state: Mapping) -> None:
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.next_doc = int(state["next_doc"])
        self.exhausted = bool(state["exhausted"])
        self.rng.bit_generator.state = state["rng"]
        self.stats = dict(state["stats"])
        self.reservoirs = [deque() for _ in self.log2s]
        self.buffered = 0
        for r, pieces in zip(self.reservoirs, state["reservoirs"]):
            for d, s, t in pieces:
                if self._random_access:
                    toks = _piece_tokens(self.docs[d], s, t, self.eot_id)
                else:
                    toks = np.asarray(t, np.int64)
                r.append((int(d), int(s), toks))
                self.buffered += len(toks)
        if not self._random_access:
            self.docs.load_state_dict(state["source"])
            self._iter = None


# ---------------------------------------------------------------------------------------- length bucketing
def bucket_of(lengths: Sequence[int] | np.ndarray, boundaries: Sequence[int]) -> np.ndarray:
    """Bucket index of each length: the first ``j`` with ``length <= boundaries[j]``; ``len(boundaries)``
    for lengths above the last boundary."""
    b = np.asarray(boundaries, np.int64)
    if b.ndim != 1 or len(b) == 0 or (b <= 0).any() or (np.diff(b) <= 0).any():
        raise ValueError(
            f"boundaries must be a non-empty strictly increasing list of positive ints, got {list(b)}"
        )
    return np.searchsorted(b, np.asarray(lengths, np.int64), side="left")


class LengthBucketing:
    """Plain length bucketing: batches formed inside length buckets, bucket per step by curriculum.

    Args:
        docs: 1-D integer token arrays (random access).
        boundaries: strictly increasing bucket upper bounds (tokens).
        batch_tokens: token budget of a batch; must be >= the last boundary.
        mode: ``pad``: ``batch_tokens // boundary`` documents per batch, the batch padded to
            ``rows * boundary`` tokens (the padding a ``[rows, boundary]`` layout would carry;
            :func:`padded_rows` gives that 2-D view); ``pack``: the bucket's documents are bin-packed
            best-fit into batches of ``batch_tokens`` with document masks (no padding).
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
        batch_tokens: int,
        mode: str = "pad",
        curriculum: BucketCurriculum | None = None,
        overflow: str = "split",
        seed: int = 0,
        pad_id: int = 0,
    ):
        if mode not in BUCKET_MODES:
            raise ValueError(f"mode must be one of {BUCKET_MODES}, got {mode!r}")
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
        _check_docs(docs)
        self.boundaries = [int(b) for b in boundaries]
        bucket_of([1], self.boundaries)  # validates
        if batch_tokens < self.boundaries[-1]:
            raise ValueError(
                f"batch_tokens ({batch_tokens}) must be >= the last boundary ({self.boundaries[-1]})"
            )
        self.docs, self.mode, self.batch_tokens, self.pad_id, self.seed = (
            docs,
            mode,
            int(batch_tokens),
            pad_id,
            seed,
        )
        self.curriculum = curriculum or BucketCurriculum(weighting="odds_by_mass")
        lengths = np.array([len(d) for d in docs], np.int64)
        self.item_doc, self.item_start, self.item_len, self.counts = expand_overflow(
            lengths, self.boundaries[-1], overflow
        )
        self.input_tokens = int(lengths.sum())
        item_bucket = bucket_of(self.item_len, self.boundaries)
        self.batches: list[list[np.ndarray]] = []  # per bucket: list of item-index arrays
        for j, bound in enumerate(self.boundaries):
            items = np.random.default_rng([seed, j]).permutation(np.flatnonzero(item_bucket == j))
            if mode == "pad":
                rows = self.batch_tokens // bound
                self.batches.append([items[a : a + rows] for a in range(0, len(items), rows)])
            else:
                plan = pack(self.item_len[items], self.batch_tokens, algorithm="bfd", seed=seed)
                self.batches.append(
                    [
                        items[plan.seg_doc[plan.bin_offsets[b] : plan.bin_offsets[b + 1]]]
                        for b in range(plan.n_bins)
                    ]
                )
        self.reset()

    @classmethod
    def from_config(cls, docs: Sequence[np.ndarray], cfg, *, mode: str = "pack", **kwargs) -> LengthBucketing:
        """Build from a validated ``curriculum:`` section with ``boundaries`` and ``tokens_per_step``."""
        if cfg.boundaries is None or cfg.tokens_per_step is None:
            raise ValueError("curriculum: the 'bucket' stage needs 'boundaries' and 'tokens_per_step'")
        cur = cfg.buckets or BucketCurriculum(weighting="odds_by_mass", progress=cfg.progress)
        return cls(
            docs,
            cfg.boundaries,
            batch_tokens=cfg.tokens_per_step,
            mode=mode,
            curriculum=cur,
            seed=cfg.seed,
            **kwargs,
        )

    def reset(self) -> None:
        self.sampler = BucketSampler([len(b) for b in self.batches], self.curriculum, seed=self.seed)
        self.cursor = np.zeros(len(self.boundaries), np.int64)
        self.step = 0
        self.tokens_seen = 0

    def __len__(self) -> int:
        return sum(len(b) for b in self.batches)

    def next_batch(self) -> VarlenBatch | None:
        t = self.step if self.curriculum.progress == "steps" else self.tokens_seen
        j = self.sampler.next(t)
        if j is None:
            return None
        items = self.batches[j][int(self.cursor[j])]
        self.cursor[j] += 1
        toks = [
            np.asarray(self.docs[d], np.int64)[s : s + n]
            for d, s, n in zip(self.item_doc[items], self.item_start[items], self.item_len[items])
        ]
        pad_to = len(items) * self.boundaries[j] if self.mode == "pad" else None
        batch = VarlenBatch.from_segments(
            toks, self.item_doc[items], seg_start=self.item_start[items], pad_to=pad_to, pad_id=self.pad_id
        )
        self.step += 1
        self.tokens_seen += batch.num_real_tokens
        return batch

    def __iter__(self) -> Iterator[VarlenBatch]:
        while (batch := self.next_batch()) is not None:
            yield batch

    def stats(self) -> dict:
        real = int(self.item_len.sum())
        padded = (
            sum(len(b) * bound for bs, bound in zip(self.batches, self.boundaries) for b in bs)
            if self.mode == "pad"
            else real
        )
        return {
            "input_tokens": self.input_tokens,
            "emitted_tokens": real,
            "padded_tokens": padded - real,
            "padding_fraction": (padded - real) / padded if padded else 0.0,
            "steps": len(self),
            **self.counts,
        }

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "cursor": self.cursor.tolist(),
            "sampler": self.sampler.state_dict(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.cursor = np.asarray(state["cursor"], np.int64)
        self.sampler.load_state_dict(state["sampler"])


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
