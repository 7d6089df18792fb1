"""PackPlan and ``pack``: which piece of which document goes into which bin (pure data, no torch).

A plan is CSR over bins: the segments of bin ``b`` are ``bin_offsets[b]:bin_offsets[b+1]`` of
``seg_doc`` (document index), ``seg_start`` (token offset inside that document) and ``seg_len``
(tokens). Plans are O(n) integers; tokens are never copied here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from seqpack.ops import packing as kernels
from seqpack.plan.online import OnlinePacker
from seqpack.plan.overflow import expand_overflow

ALGORITHMS = ("bfd", "ffd", "greedy", "online")


@dataclass
class PackPlan:
    """Bins of document segments in CSR form.

    Attributes:
        bin_offsets: int64 ``[n_bins + 1]``, segment ranges per bin.
        seg_doc: int64 ``[n_segments]``, index of the source document of each segment.
        seg_start: int64 ``[n_segments]``, token offset of the segment inside its document.
        seg_len: int64 ``[n_segments]``, tokens in the segment (always > 0).
        capacity: tokens per bin.
        dropped_tokens: tokens of documents dropped by ``overflow="drop"``.
        truncated_tokens: tokens cut by ``overflow="truncate"``.
        input_tokens: sum of all input lengths.
        dropped_docs / truncated_docs: how many documents those tokens came from.
    """

    bin_offsets: np.ndarray
    seg_doc: np.ndarray
    seg_start: np.ndarray
    seg_len: np.ndarray
    capacity: int
    dropped_tokens: int = 0
    truncated_tokens: int = 0
    input_tokens: int = 0
    dropped_docs: int = 0
    truncated_docs: int = 0
    algorithm: str = "bfd"
    stats: dict = field(default_factory=dict)
    overflow: str = "split"

    @property
    def n_bins(self) -> int:
        return len(self.bin_offsets) - 1

    @property
    def n_segments(self) -> int:
        return len(self.seg_len)

    @property
    def packed_tokens(self) -> int:
        return int(self.seg_len.sum())

    @property
    def fill(self) -> float:
        """Real tokens / (n_bins * capacity); 1.0 for an empty plan."""
        return self.packed_tokens / (self.n_bins * self.capacity) if self.n_bins else 1.0

    def bin_lengths(self) -> np.ndarray:
        """Tokens per bin, int64 ``[n_bins]``."""
        sums = np.add.reduceat(self.seg_len, self.bin_offsets[:-1]) if self.n_segments else np.zeros(0)
        return sums.astype(np.int64)

    def bin(self, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(seg_doc, seg_start, seg_len)`` of bin ``b``."""
        lo, hi = self.bin_offsets[b], self.bin_offsets[b + 1]
        return self.seg_doc[lo:hi], self.seg_start[lo:hi], self.seg_len[lo:hi]

    def summary(self) -> dict:
        """Plain-dict stats for logs and JSON."""
        return {
            "algorithm": self.algorithm,
            "capacity": self.capacity,
            "bins": self.n_bins,
            "segments": self.n_segments,
            "input_tokens": self.input_tokens,
            "packed_tokens": self.packed_tokens,
            "dropped_tokens": self.dropped_tokens,
            "truncated_tokens": self.truncated_tokens,
            "dropped_docs": self.dropped_docs,
            "truncated_docs": self.truncated_docs,
            "fill": self.fill,
            **self.stats,
        }

    def validate(self, lengths: Sequence[int] | np.ndarray | None = None) -> None:
        """Raise ``AssertionError`` unless the plan is well formed (and covers ``lengths`` exactly).

        Coverage: each document's kept tokens ``[0, kept)`` are covered by exactly one segment each,
        where ``kept`` is the full length, or ``capacity`` when truncated, or 0 when dropped; and
        ``input_tokens == packed + truncated + dropped``.
        """
        off = self.bin_offsets
        assert off[0] == 0 and off[-1] == self.n_segments, "bin_offsets must span all segments"
        assert np.all(np.diff(off) > 0), "empty bin"
        assert np.all(self.seg_len > 0), "zero-length segment"
        assert np.all(self.bin_lengths() <= self.capacity), "bin over capacity"
        assert self.input_tokens == self.packed_tokens + self.truncated_tokens + self.dropped_tokens
        if lengths is None:
            return
        lengths = np.asarray(lengths, np.int64)
        order = np.lexsort((self.seg_start, self.seg_doc))
        doc, start, ln = self.seg_doc[order], self.seg_start[order], self.seg_len[order]
        if len(doc):
            first = np.r_[True, doc[1:] != doc[:-1]]
            # contiguous pieces: each starts where the previous piece of the same doc ended
            prev_end = np.r_[0, (start + ln)[:-1]]
            assert np.all(np.where(first, start == 0, start == prev_end)), "gap or overlap in a document"
        covered = np.bincount(doc, weights=ln, minlength=len(lengths)).astype(np.int64)
        assert np.all(covered <= lengths), "segment beyond document end"
        short = covered < lengths
        if self.overflow == "split_turns":
            # a conversation keeps a prefix ending wherever its last fitting turn ended
            lost = int((lengths - covered).sum())
            assert lost == self.truncated_tokens + self.dropped_tokens, "tokens lost"
            return
        assert np.all((covered[short] == 0) | (covered[short] == self.capacity)), "tokens lost"


def _check_lengths(lengths, capacity: int) -> np.ndarray:
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity <= 0:
        raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        bad = np.flatnonzero(arr != np.floor(arr)) if arr.size else []
        if len(bad):
            raise ValueError(f"lengths must be integers: lengths[{bad[0]}] = {arr[bad[0]]}")
    elif arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"lengths must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    neg = np.flatnonzero(arr < 0)
    if len(neg):
        raise ValueError(f"lengths must be >= 0: lengths[{neg[0]}] = {arr[neg[0]]}")
    return arr


def assign_bins(
    seg_len: np.ndarray, capacity: int, algorithm: str, max_segments: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Place items (offline algorithms). Returns ``(placement_order, bin_of_placed_item)``.

    ``max_segments``: at most that many items per bin (``None``: no cap).
    """
    if algorithm == "greedy":
        order = np.arange(len(seg_len), dtype=np.int64)
        if max_segments is None:
            assign, _ = kernels.next_fit_assign(seg_len, capacity)
        else:
            assign, _ = kernels.next_fit_assign_capped(seg_len, capacity, max_segments)
        return order, assign
    # stable sort keeps equal lengths in document order, so plans are deterministic;
    # lengths are bounded by capacity, so a counting sort on (capacity - length) does it in O(n + C)
    order = kernels.stable_counting_order(capacity - seg_len, capacity)
    sorted_len = np.ascontiguousarray(seg_len[order])
    if max_segments is None:
        kernel = kernels.bfd_assign if algorithm == "bfd" else kernels.ffd_assign
        assign, _ = kernel(sorted_len, capacity)
    else:
        kernel = kernels.bfd_assign_capped if algorithm == "bfd" else kernels.ffd_assign_capped
        assign, _ = kernel(sorted_len, capacity, max_segments)
    return order, assign


def _assign_online(
    item_len: np.ndarray, capacity: int, buffer_docs: int, min_fill: float
) -> tuple[np.ndarray, np.ndarray]:
    packer = OnlinePacker(capacity, buffer_docs=buffer_docs, min_fill=min_fill)
    bins = list(packer.pack_lengths(item_len))
    sizes = np.array([len(b) for b in bins], np.int64)
    order = np.concatenate(bins).astype(np.int64) if bins else np.zeros(0, np.int64)
    return order, np.repeat(np.arange(len(bins), dtype=np.int64), sizes)


def group_ids(records: Sequence, key: str) -> np.ndarray:
    """int64 ``[n_records]`` group id per record from field ``key`` (ids in order of first appearance).

    Raises ``ValueError`` naming the first record (index) that lacks the key.
    """
    ids: dict = {}
    out = np.empty(len(records), np.int64)
    for i, rec in enumerate(records):
        try:
            value = rec[key]
        except (KeyError, TypeError, IndexError):
            raise ValueError(f"record {i} has no group key {key!r} (needed by group_key)") from None
        out[i] = ids.setdefault(value, len(ids))
    return out


def _check_groups(groups, n_docs: int) -> np.ndarray:
    arr = np.asarray(groups)
    if arr.shape != (n_docs,):
        raise ValueError(f"groups must have one entry per document ({n_docs}), got shape {arr.shape}")
    return np.unique(arr, return_inverse=True)[1].astype(np.int64).reshape(-1)


def _round_bin_count(
    offsets: np.ndarray,
    seg_doc: np.ndarray,
    seg_start: np.ndarray,
    seg_len: np.ndarray,
    multiple: int,
    may_split_segments: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Split bins until their number is a multiple of ``multiple`` (no empty bins, no token lost).

    Each step halves (by tokens) the bin with the most segments; when every bin holds a single
    segment, the longest segment is cut in two (``may_split_segments`` only). New bins go last.
    """
    n_bins = len(offsets) - 1
    extra = (-n_bins) % multiple
    if extra == 0:
        return offsets, seg_doc, seg_start, seg_len, 0
    bins = [
        [(int(d), int(s), int(n)) for d, s, n in zip(seg_doc[a:b], seg_start[a:b], seg_len[a:b])]
        for a, b in zip(offsets[:-1], offsets[1:])
    ]
    for _ in range(extra):
        b = max(range(len(bins)), key=lambda i: (len(bins[i]), -i))
        if len(bins[b]) >= 2:
            lens = np.cumsum([n for _, _, n in bins[b]])
            cut = int(np.clip(np.searchsorted(lens, lens[-1] / 2) + 1, 1, len(bins[b]) - 1))
            bins.append(bins[b][cut:])
            bins[b] = bins[b][:cut]
            continue
        b = max(range(len(bins)), key=lambda i: (bins[i][0][2], -i))
        d, s, n = bins[b][0]
        if n < 2 or not may_split_segments:
            raise ValueError(
                f"cannot make the bin count a multiple of {multiple}: {len(bins)} bins of one segment each "
                + ("and no segment longer than 1 token" if n < 2 else "and overflow does not allow splitting")
            )
        bins[b] = [(d, s, n // 2)]
        bins.append([(d, s + n // 2, n - n // 2)])
    sizes = np.array([len(x) for x in bins], np.int64)
    offsets = np.zeros(len(bins) + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    flat = np.array([seg for x in bins for seg in x], np.int64).reshape(-1, 3)
    return offsets, flat[:, 0].copy(), flat[:, 1].copy(), flat[:, 2].copy(), extra


def csr_from_assignment(
    item_doc: np.ndarray, item_start: np.ndarray, item_len: np.ndarray, order: np.ndarray, assign: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Group placed items by bin (bins numbered in order of opening, placement order inside)."""
    n_bins = int(assign.max()) + 1 if len(assign) else 0
    items = order[kernels.stable_counting_order(assign, n_bins)]
    counts = np.bincount(assign, minlength=n_bins)
    offsets = np.zeros(n_bins + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets, item_doc[items], item_start[items], item_len[items]


def pack(
    lengths: Sequence[int] | np.ndarray,
    capacity: int,
    *,
    algorithm: str = "bfd",
    overflow: str = "split",
    seed: int | None = 0,
    buffer_docs: int = 10_000,
    min_fill: float = 0.99,
    max_segments_per_bin: int | None = None,
    bin_count_multiple: int | None = None,
    groups: Sequence | np.ndarray | None = None,
    turn_starts: Sequence[Sequence[int] | np.ndarray | None] | None = None,
) -> PackPlan:
    """Plan bins of ``capacity`` tokens for documents of the given token ``lengths``.

    Args:
        lengths: tokens per document, non-negative integers ``[n_docs]``.
        capacity: tokens per bin.
        algorithm: ``bfd`` (best-fit decreasing, segment tree over remaining room, O(n log C)),
            ``ffd`` (first-fit decreasing, max tree over bins, O(n log n)), ``greedy`` (next fit in
            document order) or ``online`` (bounded buffer of ``buffer_docs`` documents, see
            :class:`seqpack.plan.online.OnlinePacker`).
        overflow: what to do with documents longer than ``capacity``: ``split`` into pieces of
            ``capacity`` (nothing lost), ``truncate``, ``drop``, ``error`` or ``split_turns``
            (:func:`seqpack.plan.overflow.expand_overflow`). Lost tokens are counted in the plan.
        seed: for ``bfd``/``ffd`` the bins come out in a seeded random order, because sorting by
            length would otherwise put every long document at the start of training; ``None``
            keeps the planner's order. ``greedy`` and ``online`` keep stream order.
        buffer_docs, min_fill: ``online`` only.
        max_segments_per_bin: at most this many segments per bin (offline algorithms).
        bin_count_multiple: split bins until their number is a multiple of this (e.g. world size x
            gradient-accumulation steps, so every rank takes the same number of optimizer steps);
            nothing is padded or dropped. Bins made by splitting come last.
        groups: a group id per document (any hashable values, ``[n_docs]``); documents of different
            groups never share a bin. See :func:`group_ids` for reading them from records.
        turn_starts: per document, token offsets where its turns begin (``overflow="split_turns"``:
            long conversations are cut only there, see :func:`seqpack.plan.overflow.split_at_turns`).

    Deterministic for a given input and seed.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    for name, value in (
        ("max_segments_per_bin", max_segments_per_bin),
        ("bin_count_multiple", bin_count_multiple),
    ):
        bad = isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1
        if value is not None and bad:
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    if max_segments_per_bin is not None and algorithm == "online":
        raise ValueError("max_segments_per_bin is supported by the offline algorithms (bfd, ffd, greedy)")
    lengths = _check_lengths(lengths, capacity)
    item_doc, item_start, item_len, counts = expand_overflow(lengths, capacity, overflow, turn_starts)
    if groups is None:
        parts = [np.arange(len(item_len), dtype=np.int64)]
    else:
        item_group = _check_groups(groups, len(lengths))[item_doc]
        parts = [np.flatnonzero(item_group == g) for g in np.unique(item_group)]
    orders, assigns, n_bins = [], [], 0
    for part in parts:
        if algorithm == "online":
            order, assign = _assign_online(item_len[part], capacity, buffer_docs, min_fill)
        else:
            order, assign = assign_bins(
                np.ascontiguousarray(item_len[part]), capacity, algorithm, max_segments_per_bin
            )
        orders.append(part[order])
        assigns.append(assign + n_bins)
        n_bins += int(assign.max()) + 1 if len(assign) else 0
    order = np.concatenate(orders) if orders else np.zeros(0, np.int64)
    assign = np.concatenate(assigns) if assigns else np.zeros(0, np.int64)
    if seed is not None and algorithm in ("bfd", "ffd") and len(assign):
        # renumber bins by a seeded permutation before grouping, so shuffling costs nothing extra
        assign = np.argsort(np.random.default_rng(seed).permutation(n_bins))[assign]
    offsets, seg_doc, seg_start, seg_len = csr_from_assignment(item_doc, item_start, item_len, order, assign)
    stats = {}
    if bin_count_multiple is not None and bin_count_multiple > 1:
        offsets, seg_doc, seg_start, seg_len, added = _round_bin_count(
            offsets, seg_doc, seg_start, seg_len, int(bin_count_multiple), overflow == "split"
        )
        stats["bins_added_for_multiple"] = added
    return PackPlan(
        bin_offsets=offsets,
        seg_doc=seg_doc,
        seg_start=seg_start,
        seg_len=seg_len,
        capacity=int(capacity),
        input_tokens=int(lengths.sum()),
        algorithm=algorithm,
        stats=stats,
        overflow=overflow,
        **counts,
    )
