"""Length planners of the length-aware stages: dataset decomposition and plain length buckets.

Pure data (numpy and the numba kernel of ``ops/decompose.py``, no torch, no tokens): lengths in,
plans out. The stages in ``stages/decompose.py`` and ``stages/bucket.py`` turn plans into batches.

**Dataset decomposition** (Pouransari et al., NeurIPS 2024): each document (with its EOT) is cut
greedily from the front into pieces of ``2^k + 1`` tokens, ``k = floor(log2(remaining - 1))``; a
piece goes to bucket ``D_k``. Over-long pieces (``k > max_log2``) get a random ``k`` with
``P(k) ∝ 2^(max_log2 - k)`` (or ``max_log2`` with ``overlong="cap"``); the tail once
``k < min_log2`` is dropped and counted.

**Length buckets**: boundaries ``[b_0 < b_1 < ...]``; a length ``l`` goes to the first bucket with
``l <= b_j`` (:func:`bucket_of`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from seqpack.checks import check_choice, check_int
from seqpack.ops import decompose as kernels

OVERLONG_POLICIES = ("random", "cap")
# pieces left after the last full batch of a bucket: dropped and counted, or emitted as short batches
REMAINDER_POLICIES = ("drop", "emit")
MAX_LOG2 = 40  # 2^40 tokens: far beyond any document, keeps 2^k in int64


def check_log2_range(min_log2: int, max_log2: int, where: str = "") -> None:
    """Both exponents integers in ``[0, 40]`` and ``min_log2 <= max_log2`` (errors name ``where.key``)."""
    prefix = f"{where}." if where else ""
    check_int(min_log2, f"{prefix}min_log2", 0, MAX_LOG2)
    check_int(max_log2, f"{prefix}max_log2", 0, MAX_LOG2)
    if max_log2 < min_log2:
        raise ValueError(f"{prefix}max_log2 ({max_log2}) must be >= min_log2 ({min_log2})")


def check_tokens_per_step(tokens_per_step: int, max_log2: int, where: str = "tokens_per_step") -> int:
    """A positive int divisible by ``2^max_log2``, so every bucket's batch holds exactly that many targets."""
    check_int(tokens_per_step, where, 1)
    if tokens_per_step % (1 << max_log2):
        raise ValueError(
            f"{where} ({tokens_per_step}) must be divisible by the largest bucket 2^max_log2 = "
            f"{1 << max_log2}, so every bucket's batch holds exactly tokens_per_step targets"
        )
    return int(tokens_per_step)


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
        counts = np.diff(self.piece_offsets)
        first = self.piece_offsets[:-1][counts > 0]
        expected_start = np.cumsum(self.piece_len) - self.piece_len
        expected_start -= np.repeat(expected_start[first], counts[counts > 0])
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
    check_log2_range(min_log2, max_log2)
    check_choice(overlong, "overlong", OVERLONG_POLICIES)
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


def decompose_one(
    length: int, doc_key: int, *, min_log2: int, max_log2: int, overlong: str, seed: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Pieces of one document, for streams: ``(piece_start, piece_log2, dropped_tokens)``.

    The same kernel and draws as :func:`decompose_lengths` (the parameters are not re-checked per
    document: the caller checked them once with :func:`check_log2_range`).
    """
    _, starts, log2s, dropped = kernels.decompose_kernel(
        np.array([length], np.int64),
        np.array([doc_key], np.int64),
        min_log2,
        max_log2,
        overlong == "cap",
        int(seed),
    )
    return starts, log2s, int(dropped[0])


def bucket_of(lengths: Sequence[int] | np.ndarray, boundaries: Sequence[int]) -> np.ndarray:
    """Bucket index of each length: the first ``j`` with ``length <= boundaries[j]``; ``len(boundaries)``
    for lengths above the last boundary."""
    b = np.asarray(boundaries, np.int64)
    if b.ndim != 1 or len(b) == 0 or (b <= 0).any() or (np.diff(b) <= 0).any():
        raise ValueError(
            f"boundaries must be a non-empty strictly increasing list of positive ints, got {list(b)}"
        )
    return np.searchsorted(b, np.asarray(lengths, np.int64), side="left")


__all__ = [
    "OVERLONG_POLICIES",
    "REMAINDER_POLICIES",
    "Decomposition",
    "bucket_of",
    "check_log2_range",
    "check_tokens_per_step",
]
__all__ += ["decompose_lengths", "decompose_one"]
