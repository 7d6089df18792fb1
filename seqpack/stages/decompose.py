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
from seqpack.curriculum import BucketCurriculum, BucketSampler, ResumableDocs
from seqpack.node import Node
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
    loss_masks: Sequence[np.ndarray | None] | None = None,
    pad_to: int | None = None,
    pad_id: int = 0,
) -> VarlenBatch:
    """One VarlenBatch of whole pieces (each a segment; first label -100, so ``2^k`` targets each;
    fewer where a piece's ``loss_masks`` entry is False)."""
    return VarlenBatch.from_segments(
        list(pieces), doc_ids, seg_start=starts, loss_masks=loss_masks, pad_to=pad_to, pad_id=pad_id
    )


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
class _Reservoirs:
    """FIFO queues of pieces per bucket: ``(doc_id, start, tokens int64, loss_mask bool | None)``.

    ``buffered`` is the total tokens held, ``tokens[i]`` the tokens of bucket ``i``. The state is
    flat arrays (torch tensors, or plain lists when ``as_lists``), so a large buffer snapshots fast.
    """

    def __init__(self, n_buckets: int):
        self.q: list[deque] = [deque() for _ in range(n_buckets)]
        self.tokens = np.zeros(n_buckets, np.int64)

    @property
    def buffered(self) -> int:
        return int(self.tokens.sum())

    def counts(self) -> np.ndarray:
        return np.array([len(q) for q in self.q], np.int64)

    def add(self, i: int, doc_id: int, start: int, toks: np.ndarray, mask: np.ndarray | None) -> None:
        self.q[i].append((int(doc_id), int(start), toks, mask))
        self.tokens[i] += len(toks)

    def pop(self, i: int, n: int) -> list[tuple]:
        out = [self.q[i].popleft() for _ in range(n)]
        self.tokens[i] -= sum(len(p[2]) for p in out)
        return out

    def take_first_fit(self, i: int, capacity: int) -> list[tuple]:
        """Pieces of bucket ``i`` in arrival order that fit ``capacity`` tokens together (first fit);
        the oldest piece is always taken, so every piece leaves eventually."""
        q, keep, out, room = self.q[i], deque(), [], capacity
        while q:
            p = q.popleft()
            if len(p[2]) <= room:
                out.append(p)
                room -= len(p[2])
            else:
                keep.append(p)
        self.q[i] = keep
        self.tokens[i] -= capacity - room
        return out

    def clear(self) -> int:
        n = self.buffered
        self.q = [deque() for _ in self.q]
        self.tokens[:] = 0
        return n

    def state_dict(self, as_lists: bool = False) -> list[dict]:
        conv = (lambda a: a.tolist()) if as_lists else torch.from_numpy
        out = []
        for q in self.q:
            lens = np.fromiter((len(p[2]) for p in q), np.int64, len(q))
            has_mask = np.fromiter((p[3] is not None for p in q), bool, len(q))
            toks = np.concatenate([p[2] for p in q]) if q else np.zeros(0, np.int64)
            masks = [p[3] if p[3] is not None else np.ones(len(p[2]), bool) for p in q]
            mask = np.concatenate(masks) if has_mask.any() else np.zeros(0, bool)
            out.append(
                {
                    "doc": conv(np.fromiter((p[0] for p in q), np.int64, len(q))),
                    "start": conv(np.fromiter((p[1] for p in q), np.int64, len(q))),
                    "len": conv(lens),
                    "tokens": conv(toks.astype(np.int64, copy=False)),
                    "has_mask": conv(has_mask),
                    "mask": conv(mask.astype(bool, copy=False)),
                }
            )
        return out

    def load_state_dict(self, state: list[dict]) -> None:
        if len(state) != len(self.q):
            raise ValueError(f"state has {len(state)} buckets, this stage has {len(self.q)}")
        self.q = [deque() for _ in self.q]
        self.tokens[:] = 0
        for i, b in enumerate(state):
            lens = np.asarray(b["len"], np.int64)
            bounds = np.concatenate([[0], np.cumsum(lens)])
            toks = np.asarray(b["tokens"], np.int64)
            has_mask = np.asarray(b["has_mask"], bool)
            mask = np.asarray(b["mask"], bool)
            for j, (d, s) in enumerate(zip(np.asarray(b["doc"]).tolist(), np.asarray(b["start"]).tolist())):
                lo, hi = bounds[j], bounds[j + 1]
                self.add(i, d, s, toks[lo:hi], mask[lo:hi] if has_mask[j] else None)


def _as_document(item, ordinal: int) -> tuple[int, np.ndarray, np.ndarray | None]:
    """``(doc_id, int64 tokens, bool mask | None)`` of a stream item: a Document-like object (with
    ``tokens``, ``doc_id``, optional ``loss_mask``) or a bare 1-D integer token array (id = ordinal)."""
    if hasattr(item, "tokens"):
        doc_id, arr, mask = int(item.doc_id), np.asarray(item.tokens), getattr(item, "loss_mask", None)
    else:
        doc_id, arr, mask = ordinal, np.asarray(item), None
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError(
            f"document {doc_id}: expected a 1-D integer token array, got {arr.dtype} {arr.shape}"
        )
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != arr.shape:
            raise ValueError(f"document {doc_id}: loss_mask has shape {mask.shape}, tokens {arr.shape}")
    return doc_id, arr.astype(np.int64, copy=False), mask


def _draw_bucket(
    rng: np.random.Generator,
    odds: np.ndarray,
    ready: np.ndarray,
    mass: np.ndarray | None,
    allowed: np.ndarray | None,
    stats: dict,
) -> int:
    """Draw one bucket among ``ready`` ones with the curriculum ``odds`` (times ``mass`` when given).

    ``allowed`` (max-length cap) restricts the draw; when no ready bucket is allowed the cap is
    lifted for this draw and counted (``over_cap_draws``). Positive odds on a bucket that cannot
    fill a batch are renormalized away (``renormalized_draws``); zero odds on every candidate fall
    back to uniform (``zero_odds_fallbacks``). One uniform double per draw, whatever the odds.
    """
    cand = ready.copy()
    if allowed is not None:
        if (ready & allowed).any():
            cand &= allowed
        else:
            stats["over_cap_draws"] = stats.get("over_cap_draws", 0) + 1
    w = odds * cand
    if mass is not None:
        w = w * mass
    if ((odds > 0) & ~ready).any():
        stats["renormalized_draws"] += 1
    if w.sum() <= 0:
        stats["zero_odds_fallbacks"] = stats.get("zero_odds_fallbacks", 0) + 1
        w = cand.astype(np.float64)
    p = w / w.sum()
    i = min(int(np.searchsorted(np.cumsum(p), rng.random(), side="right")), len(p) - 1)
    while p[i] == 0:
        i -= 1
    stats["draws"] += 1
    return i


class _StreamBase:
    """Shared plumbing of the streaming stages: the document source, progress, RNG, resume.

    ``docs``: a sequence (resume by index), or an iterable with ``state_dict``/``load_state_dict``
    (e.g. a loader document node through :class:`_NodeSource`). Progress ``t`` of the curriculum is
    ``step * step_stride + step_offset`` (steps) or ``tokens_seen * step_stride`` (tokens): a stream
    that serves every ``step_stride``-th step of a rank (a DataLoader worker) sees the rank's step.
    """

    def _init_stream(self, docs, curriculum, max_length, draw_seed, step_stride, step_offset):
        self.source = ResumableDocs(docs)
        self.curriculum = curriculum
        self.max_length = max_length
        self.rng = np.random.Generator(np.random.PCG64(draw_seed))
        self.step_stride, self.step_offset = int(step_stride), int(step_offset)
        self.step = 0
        self.tokens_seen = 0
        self.exhausted = False
        self.tensor_state = False  # state as torch tensors (loader) or plain lists (JSON)

    def _next_doc(self) -> tuple[int, np.ndarray, np.ndarray | None] | None:
        item = self.source.pull()
        if item is None:
            return None
        doc = _as_document(item, self.source.next_doc)
        self.source.next_doc += 1
        return doc

    def progress(self) -> int:
        if self.curriculum.progress == "steps":
            return self.step * self.step_stride + self.step_offset
        return self.tokens_seen * self.step_stride

    def _allowed(self, longest: np.ndarray) -> np.ndarray | None:
        """Buckets whose longest sequence fits the max-length schedule now (None: no schedule)."""
        if self.max_length is None:
            return None
        return longest <= self.max_length(self.progress())

    def _base_state(self) -> dict:
        state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "exhausted": self.exhausted,
            "rng": self.rng.bit_generator.state,
            "reservoirs": self.reservoirs.state_dict(as_lists=not self.tensor_state),
            "stats": dict(self.stats),
        }
        return self.source.save_into(state)

    def _load_base_state(self, state: Mapping) -> None:
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.exhausted = bool(state["exhausted"])
        self.rng.bit_generator.state = state["rng"]
        self.stats = dict(state["stats"])
        self.reservoirs.load_state_dict(state["reservoirs"])
        self.source.restore_from(state)

    def __iter__(self) -> Iterator[VarlenBatch]:
        while (batch := self.next_batch()) is not None:
            yield batch

    def state_dict(self) -> dict:
        return self._base_state()

    def load_state_dict(self, state: Mapping) -> None:
        self._load_base_state(state)


class StreamingDecomposer(_StreamBase):
    """Dataset decomposition over a document stream with bounded per-bucket reservoirs.

    Documents are decomposed as they arrive (the same pieces as offline: the over-long draw hashes
    the document's id: its ``doc_id`` for Document items, else its ordinal), pieces wait in FIFO
    reservoirs per bucket holding at most ``buffer_tokens`` tokens in all. Before each step the
    reservoirs are topped up to that bound; the bucket is then drawn by the seeded RNG over buckets
    that hold a full batch (``b_i`` pieces), with the curriculum's odds at the current progress
    (times the reservoir's tokens for ``odds_by_mass``). Buckets with positive odds that cannot fill
    a batch are skipped and counted (``stats["renormalized_draws"]``). Ranks that read
    differently-distributed shards may draw different buckets on such steps; each step still has
    exactly ``tokens_per_step`` targets (fewer where documents carry a loss mask: masked tokens are
    emitted but are not targets).

    ``max_length``: optional schedule ``t -> L`` (:class:`~seqpack.curriculum.SeqlenSchedule`):
    buckets with ``2^k > L`` are left out of the draw while they are over the cap (if no ready bucket
    is under it, the cap is lifted for that step and counted in ``over_cap_draws``).

    ``buffer_tokens`` must be at least ``n_buckets * tokens_per_step`` so some bucket is always full
    while the stream lasts. ``n_cycles`` needs the epoch size and is only offered offline
    (:class:`DecomposedDataset`). At the end of the stream the reservoirs' rest is dropped and counted
    (``remainder="drop"``, ``stats["leftover_tokens"]``) or emitted as short batches (``"emit"``).
    Accounting: ``input_tokens == emitted_tokens + dropped_tokens + leftover_tokens + buffered``.
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
        max_length=None,
        draw_seed=None,
        step_stride: int = 1,
        step_offset: int = 0,
    ):
        _check_log2_range(min_log2, max_log2)
        _check_tokens_per_step(tokens_per_step, max_log2)
        if remainder not in REMAINDER_POLICIES:
            raise ValueError(f"remainder must be one of {REMAINDER_POLICIES}, got {remainder!r}")
        if overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
        curriculum = curriculum or BucketCurriculum()
        if curriculum.n_cycles != 1:
            raise ValueError(
                "curriculum.buckets.n_cycles: streaming decomposition allows only 1 (cycles need the "
                "bucket sizes up front: use DecomposedDataset offline)"
            )
        self.log2s = list(range(min_log2, max_log2 + 1))
        curriculum.check(len(self.log2s))
        n_b = len(self.log2s)
        self.buffer_tokens = int(buffer_tokens) if buffer_tokens is not None else 2 * n_b * tokens_per_step
        if self.buffer_tokens < n_b * tokens_per_step:
            raise ValueError(
                f"buffer_tokens ({self.buffer_tokens}) must be >= n_buckets * tokens_per_step "
                f"= {n_b * tokens_per_step}"
            )
        self._init_stream(
            docs, curriculum, max_length, seed if draw_seed is None else draw_seed, step_stride, step_offset
        )
        self.tokens_per_step = int(tokens_per_step)
        self.min_log2, self.max_log2, self.overlong, self.seed = min_log2, max_log2, overlong, seed
        self.eot_id = eot_id
        self.remainder = remainder
        self.pad_to = self.tokens_per_step + (self.tokens_per_step >> min_log2) if pad_to_fixed else None
        self.pad_id = pad_id
        self.per_rank = np.array([self.tokens_per_step >> k for k in self.log2s], np.int64)
        self.reservoirs = _Reservoirs(n_b)
        self.stats = {
            "input_tokens": 0,
            "dropped_tokens": 0,
            "emitted_tokens": 0,
            "leftover_tokens": 0,
            "documents": 0,
            "draws": 0,
            "renormalized_draws": 0,
            "zero_odds_fallbacks": 0,
            "over_cap_draws": 0,
            "max_buffered_tokens": 0,
        }

    @property
    def buffered(self) -> int:
        return self.reservoirs.buffered

    def _pull(self) -> bool:
        got = self._next_doc()
        if got is None:
            return False
        doc_id, arr, mask = got
        doc = _doc_with_eot(arr, self.eot_id)
        if mask is not None and self.eot_id is not None:
            mask = np.append(mask, True)
        offsets, starts, log2s, dropped = kernels.decompose_kernel(
            np.array([len(doc)], np.int64),
            np.array([doc_id], np.int64),
            self.min_log2,
            self.max_log2,
            self.overlong == "cap",
            int(self.seed),
        )
        self.stats["input_tokens"] += len(doc)
        self.stats["dropped_tokens"] += int(dropped[0])
        self.stats["documents"] += 1
        for s, k in zip(starts.tolist(), log2s.tolist()):
            n = (1 << k) + 1
            self.reservoirs.add(
                k - self.min_log2, doc_id, s, doc[s : s + n], None if mask is None else mask[s : s + n]
            )
        self.stats["max_buffered_tokens"] = max(self.stats["max_buffered_tokens"], self.buffered)
        return True

    def _fill(self) -> None:
        while not self.exhausted and self.buffered < self.buffer_tokens:
            if not self._pull():
                self.exhausted = True

    def next_batch(self) -> VarlenBatch | None:
        self._fill()
        counts = self.reservoirs.counts()
        ready = counts >= self.per_rank
        if ready.any():
            odds = self.curriculum.odds_at(self.progress(), len(self.log2s))
            mass = self.reservoirs.tokens if self.curriculum.weighting == "odds_by_mass" else None
            allowed = self._allowed(np.int64(1) << np.array(self.log2s, np.int64))
            i = _draw_bucket(self.rng, odds, ready, mass, allowed, self.stats)
            take = int(self.per_rank[i])
        else:
            # stream over and no bucket can fill a batch: the rest is a remainder
            nonempty = np.flatnonzero(counts)
            if len(nonempty) == 0:
                return None
            if self.remainder == "drop":
                self.stats["leftover_tokens"] += self.reservoirs.clear()
                return None
            i = int(nonempty[0])
            take = int(counts[i])
        segs = self.reservoirs.pop(i, take)
        any_mask = any(m is not None for *_, m in segs)
        batch = pieces_batch(
            [t for _, _, t, _ in segs],
            [d for d, _, _, _ in segs],
            [s for _, s, _, _ in segs],
            loss_masks=[m for *_, m in segs] if any_mask else None,
            pad_to=self.pad_to,
            pad_id=self.pad_id,
        )
        self.step += 1
        self.tokens_seen += batch.num_loss_tokens
        self.stats["emitted_tokens"] += sum(len(t) for _, _, t, _ in segs)
        return batch


# ---------------------------------------------------------------------------------------- loader stages
class _NodeSource:
    """A loader document node seen as an iterable with ``state_dict``/``load_state_dict``."""

    def __init__(self, node):
        self.node = node

    def __iter__(self):
        return self.node

    def state_dict(self) -> dict:
        return self.node.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.node.reset(state)


class StreamStage(Node[VarlenBatch]):
    """A streaming stage (:class:`StreamingDecomposer`, :class:`StreamingBucketing`,
    :class:`~seqpack.curriculum.SeqlenCurriculum`) as a loader node.

    ``make(source)`` builds the stream over ``upstream``; the node's state is the stream's state,
    which nests the upstream state (``"source"``), so ``reset(state)`` resumes token for token.
    """

    def __init__(self, upstream, make, name: str):
        super().__init__()
        self.upstream, self._make, self.name = upstream, make, name
        self._stream = None

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self._stream = self._make(_NodeSource(self.upstream))
        self._stream.tensor_state = True
        if initial_state is None:
            self.upstream.reset(None)
        else:
            self._stream.load_state_dict(initial_state)

    def next(self) -> VarlenBatch:
        batch = self._stream.next_batch()
        if batch is None:
            raise StopIteration
        return batch

    def get_state(self) -> dict:
        return self._stream.state_dict()

    def own_stats(self) -> dict:
        if self._stream is None:
            return {}
        out = {f"{self.name}/{k}": v for k, v in self._stream.stats.items()}
        if hasattr(self._stream, "reservoirs"):
            out[f"{self.name}/buffered_tokens"] = self._stream.reservoirs.buffered
        return out


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


STREAM_OVERFLOW = ("split", "truncate", "drop", "error")


class StreamingBucketing(_StreamBase):
    """Plain length bucketing over a document stream (the loader's ``bucket`` stage).

    Documents (after the ``overflow`` policy cuts those over the last boundary) wait in one FIFO per
    bucket, at most ``buffer_tokens`` tokens in all (default ``2 * n_buckets * batch_tokens``; at
    least ``n_buckets * batch_tokens``, so some bucket can always fill a batch). Each step draws a
    bucket among those that can fill a batch (``mode="pad"``: ``batch_tokens // boundary`` items;
    ``"pack"``: ``batch_tokens`` tokens buffered) with the curriculum's odds at the current progress
    (``odds_by_mass`` by default, i.e. proportional to the bucket's buffered tokens), and forms the
    batch inside it: ``pad`` takes the oldest ``rows`` items and pads the batch to
    ``rows * boundary`` tokens; ``pack`` takes items first-fit in arrival order up to
    ``batch_tokens`` (document masks, no padding). ``max_length`` (a schedule ``t -> L``) leaves out
    buckets whose boundary exceeds ``L`` (lifted and counted when no ready bucket is under it).

    At the end of the stream every bucket is drained in (possibly short) batches: no token is lost
    except by ``overflow="truncate"/"drop"`` (counted). Accounting:
    ``input_tokens == emitted_tokens + truncated_tokens + dropped_tokens + buffered``.
    """

    def __init__(
        self,
        docs: Sequence[np.ndarray] | Iterable[np.ndarray],
        boundaries: Sequence[int],
        *,
        batch_tokens: int,
        mode: str = "pack",
        curriculum: BucketCurriculum | None = None,
        overflow: str = "split",
        buffer_tokens: int | None = None,
        seed: int = 0,
        pad_id: int = 0,
        max_length=None,
        step_stride: int = 1,
        step_offset: int = 0,
    ):
        if mode not in BUCKET_MODES:
            raise ValueError(f"mode must be one of {BUCKET_MODES}, got {mode!r}")
        if overflow not in STREAM_OVERFLOW:
            raise ValueError(f"overflow must be one of {STREAM_OVERFLOW}, got {overflow!r}")
        self.boundaries = np.array([int(b) for b in boundaries], np.int64)
        bucket_of([1], self.boundaries)  # validates
        if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, (int, np.integer)):
            raise ValueError(f"batch_tokens must be an integer, got {batch_tokens!r}")
        if batch_tokens < self.boundaries[-1]:
            raise ValueError(
                f"batch_tokens ({batch_tokens}) must be >= the last boundary ({int(self.boundaries[-1])})"
            )
        curriculum = curriculum or BucketCurriculum(weighting="odds_by_mass")
        if curriculum.n_cycles != 1:
            raise ValueError("curriculum.buckets.n_cycles: streaming bucketing allows only 1")
        n_b = len(self.boundaries)
        curriculum.check(n_b)
        self.buffer_tokens = int(buffer_tokens) if buffer_tokens is not None else 2 * n_b * int(batch_tokens)
        if self.buffer_tokens < n_b * batch_tokens:
            raise ValueError(
                f"buffer_tokens ({self.buffer_tokens}) must be >= n_buckets * batch_tokens "
                f"= {n_b * batch_tokens}"
            )
        self._init_stream(docs, curriculum, max_length, seed, step_stride, step_offset)
        self.batch_tokens, self.mode, self.overflow, self.pad_id = int(batch_tokens), mode, overflow, pad_id
        self.rows = np.maximum(self.batch_tokens // self.boundaries, 1)
        self.reservoirs = _Reservoirs(n_b)
        self.stats = {
            "input_tokens": 0,
            "emitted_tokens": 0,
            "padding_tokens": 0,
            "truncated_tokens": 0,
            "dropped_tokens": 0,
            "documents": 0,
            "draws": 0,
            "renormalized_draws": 0,
            "zero_odds_fallbacks": 0,
            "over_cap_draws": 0,
            "max_buffered_tokens": 0,
        }

    def _pull(self) -> bool:
        got = self._next_doc()
        if got is None:
            return False
        doc_id, arr, mask = got
        n, cap = len(arr), int(self.boundaries[-1])
        self.stats["input_tokens"] += n
        self.stats["documents"] += 1
        pieces = [(0, n)] if 0 < n <= cap else []
        if n > cap:
            if self.overflow == "split":
                pieces = [(s, min(cap, n - s)) for s in range(0, n, cap)]
            elif self.overflow == "truncate":
                pieces = [(0, cap)]
                self.stats["truncated_tokens"] += n - cap
            elif self.overflow == "drop":
                self.stats["dropped_tokens"] += n
            else:
                raise ValueError(
                    f"document {doc_id} has {n} tokens > the last boundary {cap} (overflow='error')"
                )
        for s, ln in pieces:
            j = int(np.searchsorted(self.boundaries, ln, side="left"))
            self.reservoirs.add(j, doc_id, s, arr[s : s + ln], None if mask is None else mask[s : s + ln])
        self.stats["max_buffered_tokens"] = max(self.stats["max_buffered_tokens"], self.reservoirs.buffered)
        return True

    def next_batch(self) -> VarlenBatch | None:
        while not self.exhausted and self.reservoirs.buffered < self.buffer_tokens:
            if not self._pull():
                self.exhausted = True
        counts = self.reservoirs.counts()
        if self.mode == "pad":
            ready = counts >= self.rows
        else:
            ready = self.reservoirs.tokens >= self.batch_tokens
        if self.exhausted:  # the stream is over: drain every bucket, short batches included
            ready = counts > 0
        if not ready.any():
            return None
        odds = self.curriculum.odds_at(self.progress(), len(self.boundaries))
        mass = self.reservoirs.tokens if self.curriculum.weighting == "odds_by_mass" else None
        j = _draw_bucket(self.rng, odds, ready, mass, self._allowed(self.boundaries), self.stats)
        if self.mode == "pad":
            segs = self.reservoirs.pop(j, min(int(self.rows[j]), int(counts[j])))
            pad_to = len(segs) * int(self.boundaries[j])
        else:
            segs = self.reservoirs.take_first_fit(j, self.batch_tokens)
            pad_to = None
        any_mask = any(m is not None for *_, m in segs)
        batch = VarlenBatch.from_segments(
            [t for _, _, t, _ in segs],
            [d for d, _, _, _ in segs],
            seg_start=[s for _, s, _, _ in segs],
            loss_masks=[m for *_, m in segs] if any_mask else None,
            pad_to=pad_to,
            pad_id=self.pad_id,
        )
        real = sum(len(t) for _, _, t, _ in segs)
        self.step += 1
        self.tokens_seen += real
        self.stats["emitted_tokens"] += real
        self.stats["padding_tokens"] += batch.num_tokens - real
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


# ------------------------------------------------------------------------------------------ loader stages
# ``stage: {type: decompose | bucket, ...}`` in a loader config. Decomposition / bucketing parameters may
# be given in the stage or in the ``curriculum:`` section (where DecomposedDataset.from_config reads
# them), not in both with different values; the curriculum section also holds the bucket odds
# (``buckets``), the progress unit and the max-length schedule (``seqlen``).

DECOMPOSE_STAGE_KEYS = (
    "type", "tokens_per_step", "min_log2", "max_log2", "overlong", "remainder", "pad_to_fixed",
    "buffer_tokens", "seed",
)  # fmt: skip
BUCKET_STAGE_KEYS = ("type", "boundaries", "tokens_per_step", "mode", "overflow", "buffer_tokens", "seed")


def _choices(values: Sequence) -> str:
    return ", ".join(repr(v) for v in values)


def _stage_value(stage: Mapping, key: str, cur_value, cur_key: str, default):
    """The value of ``key`` from the stage or the curriculum section (not both, unless equal)."""
    if key in stage and cur_value is not None and stage[key] != cur_value:
        raise ValueError(
            f"stage.{key} ({stage[key]!r}) and {cur_key} ({cur_value!r}) disagree; set it in one place"
        )
    if key in stage:
        return stage[key]
    return default if cur_value is None else cur_value


def _check_int(value, key: str, minimum: int, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key}: expected an integer >= {minimum}, got {value!r}")
    return value


def _check_choice(value, key: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{key}: {value!r} not allowed; allowed: {_choices(allowed)}")
    return value


def _length_stage_setup(cfg: Mapping, allowed_keys: Sequence[str]) -> tuple[dict, dict, object]:
    from seqpack.curriculum import parse_curriculum_config

    stage = dict(cfg["stage"])
    unknown = sorted(set(stage) - set(allowed_keys))
    if unknown:
        raise ValueError(
            f"stage: unknown keys {unknown} for type {stage['type']!r} (allowed: {list(allowed_keys)})"
        )
    raw_cur = cfg.get("curriculum") or {}
    if not isinstance(raw_cur, Mapping):
        raise ValueError(f"curriculum: must be a mapping, got {type(raw_cur).__name__}")
    return stage, dict(raw_cur), parse_curriculum_config(raw_cur)


def _stage_seed(stage: Mapping, raw_cur: Mapping, cfg: Mapping) -> int:
    seed = _stage_value(stage, "seed", raw_cur.get("seed"), "curriculum.seed", cfg.get("seed", 0))
    return _check_int(seed, "stage.seed", 0)


def validate_decompose_stage(cfg: dict, base_dir: str | None = None) -> dict:
    """Check and complete ``stage: {type: decompose}`` against the ``curriculum:`` section."""
    stage, raw_cur, cur = _length_stage_setup(cfg, DECOMPOSE_STAGE_KEYS)
    dec = raw_cur.get("decompose") or {}
    out = {"type": "decompose"}
    for key, cur_key, default in (
        ("tokens_per_step", "curriculum.tokens_per_step", None),
        ("min_log2", "curriculum.decompose.min_log2", 8),
        ("max_log2", "curriculum.decompose.max_log2", 13),
        ("overlong", "curriculum.decompose.overlong", "random"),
        ("remainder", "curriculum.decompose.remainder", "drop"),
        ("pad_to_fixed", "curriculum.decompose.pad_to_fixed", False),
    ):
        src = raw_cur if key == "tokens_per_step" else dec
        out[key] = _stage_value(stage, key, src.get(key), cur_key, default)
    if out["tokens_per_step"] is None:
        raise ValueError(
            "stage.tokens_per_step: missing (set it in the stage or as curriculum.tokens_per_step)"
        )
    _check_int(out["tokens_per_step"], "stage.tokens_per_step", 1)
    _check_int(out["min_log2"], "stage.min_log2", 0)
    _check_int(out["max_log2"], "stage.max_log2", 0)
    _check_choice(out["overlong"], "stage.overlong", OVERLONG_POLICIES)
    _check_choice(out["remainder"], "stage.remainder", REMAINDER_POLICIES)
    if not isinstance(out["pad_to_fixed"], bool):
        raise ValueError(f"stage.pad_to_fixed: expected true or false, got {out['pad_to_fixed']!r}")
    out["buffer_tokens"] = _check_int(stage.get("buffer_tokens"), "stage.buffer_tokens", 1, allow_none=True)
    out["seed"] = _stage_seed(stage, raw_cur, cfg)
    # a dry build runs every remaining check (divisibility, buffer size, odds per bucket, cycles)
    _make_decomposer([], out, cur, 0, 1, 0)
    return {**cfg, "stage": out}


def validate_bucket_stage(cfg: dict, base_dir: str | None = None) -> dict:
    """Check and complete ``stage: {type: bucket}`` against the ``curriculum:`` section."""
    stage, raw_cur, cur = _length_stage_setup(cfg, BUCKET_STAGE_KEYS)
    out = {"type": "bucket"}
    out["boundaries"] = _stage_value(
        stage, "boundaries", raw_cur.get("boundaries"), "curriculum.boundaries", None
    )
    out["tokens_per_step"] = _stage_value(
        stage, "tokens_per_step", raw_cur.get("tokens_per_step"), "curriculum.tokens_per_step", None
    )
    b = out["boundaries"]
    if (
        not isinstance(b, list)
        or not b
        or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in b)
        or any(y <= x for x, y in zip(b, b[1:]))
    ):
        raise ValueError(
            f"stage.boundaries: a non-empty strictly increasing list of positive integers (in the stage or "
            f"as curriculum.boundaries), got {b!r}"
        )
    if out["tokens_per_step"] is None:
        out["tokens_per_step"] = b[-1]
    _check_int(out["tokens_per_step"], "stage.tokens_per_step", b[-1])
    out["mode"] = _check_choice(stage.get("mode", "pack"), "stage.mode", BUCKET_MODES)
    out["overflow"] = _check_choice(stage.get("overflow", "split"), "stage.overflow", STREAM_OVERFLOW)
    out["buffer_tokens"] = _check_int(stage.get("buffer_tokens"), "stage.buffer_tokens", 1, allow_none=True)
    out["seed"] = _stage_seed(stage, raw_cur, cfg)
    _make_bucketing([], out, cur, 0, 1, 0)
    return {**cfg, "stage": out}


def _make_decomposer(source, st: Mapping, cur, epoch: int, stride: int, offset: int, pad_id: int = 0):
    return StreamingDecomposer(
        source,
        tokens_per_step=st["tokens_per_step"],
        min_log2=st["min_log2"],
        max_log2=st["max_log2"],
        curriculum=cur.buckets or BucketCurriculum(progress=cur.progress),
        overlong=st["overlong"],
        seed=st["seed"],
        buffer_tokens=st["buffer_tokens"],
        remainder=st["remainder"],
        pad_to_fixed=st["pad_to_fixed"],
        pad_id=pad_id,
        max_length=cur.seqlen,
        # the same draws on every rank (for the same worker id): equal sequence lengths per step
        draw_seed=[st["seed"], epoch, offset],
        step_stride=stride,
        step_offset=offset,
    )


def _make_bucketing(source, st: Mapping, cur, epoch: int, stride: int, offset: int, pad_id: int = 0):
    return StreamingBucketing(
        source,
        st["boundaries"],
        batch_tokens=st["tokens_per_step"],
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


def _length_stage_factory(make, name: str):
    def factory(docs, stage: dict, ctx) -> StreamStage:
        from seqpack.curriculum import parse_curriculum_config

        cur = parse_curriculum_config(ctx.config.get("curriculum"))

        def build(source):
            return make(source, stage, cur, ctx.epoch, ctx.num_workers, ctx.worker_id, ctx.pad_id)

        return StreamStage(docs, build, name)

    return factory


def _length_stage_padding(stage: dict, ctx, last) -> VarlenBatch:
    from seqpack.batch import padding_batch

    if isinstance(last, VarlenBatch):
        return padding_batch(last.num_tokens, ctx.pad_id)
    return padding_batch(int(stage["tokens_per_step"]), ctx.pad_id)


decompose_factory = _length_stage_factory(_make_decomposer, "decompose")
bucket_factory = _length_stage_factory(_make_bucketing, "bucket")
length_stage_padding = _length_stage_padding
