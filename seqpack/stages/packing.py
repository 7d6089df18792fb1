"""Bin-packing with document masks: where a document's tokens become a VarlenBatch.

``pack_documents`` packs in-memory token arrays offline (global plan, then one batch per bin).
``OnlinePacker`` is the bounded-buffer best-fit packer that the streaming loader stage and
``pack(algorithm="online")`` share, so a streamed run and an offline plan agree bin for bin.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from seqpack.batch import IGNORE_INDEX, VarlenBatch, padding_batch
from seqpack.node import Node
from seqpack.ops import packing as kernels
from seqpack.ops.segments import assemble_batch, gather_segments, gather_two
from seqpack.plan import PackPlan, pack, split_at_turns
from seqpack.sources.blocks import DocBlock, pull_block
from seqpack.sources.records import NO_GROUP
from seqpack.stages.context import StageContext


class OnlinePacker:
    """Bounded-buffer best-fit packer over ``(key, length)`` items.

    Items wait in a buffer of at most ``buffer_docs``. When it is full, the buffer is packed
    best-fit-decreasing; bins at least ``min_fill`` full (or holding an item that has waited
    ``max_age`` windows) are emitted, the rest are carried to the next window. If nothing qualifies,
    the bin of the oldest item is emitted so the stream always moves. Bins come out as int64 arrays
    of keys, items in arrival order.

    ``max_segments``: at most that many items per bin (``None``: no cap). ``grouped``: every item
    comes with a group id (:meth:`add_many` ``groups=``) and items of different groups never share
    a bin (each group is packed on its own inside a window). Both off by default, which leaves the
    packing exactly as without them.

    The buffer (keys, lengths, ages, groups) is the whole state: ``state_dict`` /
    ``load_state_dict`` give exact resume.
    """

    def __init__(
        self,
        capacity: int,
        *,
        buffer_docs: int = 10_000,
        min_fill: float = 0.99,
        max_age: int = 4,
        max_segments: int | None = None,
        grouped: bool = False,
    ):
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        if buffer_docs < 1:
            raise ValueError(f"buffer_docs must be >= 1, got {buffer_docs}")
        if not 0.0 <= min_fill <= 1.0:
            raise ValueError(f"min_fill must be in [0, 1], got {min_fill}")
        if max_segments is not None and (isinstance(max_segments, bool) or int(max_segments) < 1):
            raise ValueError(f"max_segments must be a positive integer or None, got {max_segments!r}")
        self.max_segments = None if max_segments is None else int(max_segments)
        self.grouped = bool(grouped)
        self._groups = np.zeros(0, np.int64)
        self.capacity = int(capacity)
        self.buffer_docs = int(buffer_docs)
        self.min_tokens = int(np.ceil(min_fill * capacity))
        self.max_age = int(max_age)
        self._keys = np.zeros(0, np.int64)
        self._lens = np.zeros(0, np.int64)
        self._ages = np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: int, length: int, group: int | None = None) -> list[np.ndarray]:
        """Buffer one item (``0 < length <= capacity``); returns the bins that became ready."""
        groups = None if group is None else np.array([group], np.int64)
        return self.add_many(np.array([key], np.int64), np.array([length], np.int64), groups)

    def add_many(
        self, keys: np.ndarray, lengths: np.ndarray, groups: np.ndarray | None = None
    ) -> list[np.ndarray]:
        """Buffer items in arrival order; returns the bins that became ready (maybe none).

        ``groups``: int64 group id per item, required when the packer is ``grouped``.
        """
        lengths = np.asarray(lengths, np.int64)
        if len(lengths) and (lengths.min() <= 0 or lengths.max() > self.capacity):
            raise ValueError(f"item lengths must be in [1, {self.capacity}]")
        keys = np.asarray(keys, np.int64)
        if self.grouped:
            if groups is None or len(groups) != len(keys):
                raise ValueError("a grouped OnlinePacker needs one group id per item (groups=)")
            groups = np.asarray(groups, np.int64)
        out: list[np.ndarray] = []
        pos = 0
        while pos < len(keys):
            take = min(self.buffer_docs - len(self._keys), len(keys) - pos)
            self._keys = np.concatenate([self._keys, keys[pos : pos + take]])
            self._lens = np.concatenate([self._lens, lengths[pos : pos + take]])
            self._ages = np.concatenate([self._ages, np.zeros(take, np.int64)])
            if self.grouped:
                self._groups = np.concatenate([self._groups, groups[pos : pos + take]])
            pos += take
            if len(self._keys) >= self.buffer_docs:
                out.extend(self._window(final=False))
        return out

    def pack_items(self, item_doc, item_start, item_len) -> Iterator[np.ndarray]:
        """Offline driver used by ``pack``: keys are item indices."""
        yield from self.add_many(np.arange(len(item_len), dtype=np.int64), item_len)

    def flush(self) -> list[np.ndarray]:
        """Emit every buffered item (end of stream)."""
        return self._window(final=True) if len(self._keys) else []

    def _assign(self) -> tuple[np.ndarray, int]:
        """Best-fit-decreasing bin of every buffered item (per group when grouped)."""
        parts = [np.arange(len(self._lens))]
        if self.grouped:
            _, inv = np.unique(self._groups, return_inverse=True)
            by_group = np.argsort(inv.reshape(-1), kind="stable")
            parts = np.split(by_group, np.flatnonzero(np.diff(inv.reshape(-1)[by_group])) + 1)
        bin_of = np.empty(len(self._lens), np.int64)
        n_bins = 0
        for part in parts:
            lens = self._lens[part]
            order = np.argsort(-lens, kind="stable")
            sorted_len = np.ascontiguousarray(lens[order])
            if self.max_segments is None:
                assign_sorted, nb = kernels.bfd_assign(sorted_len, self.capacity)
            else:
                assign_sorted, nb = kernels.bfd_assign_capped(sorted_len, self.capacity, self.max_segments)
            bin_of[part[order]] = assign_sorted + n_bins
            n_bins += int(nb)
        return bin_of, n_bins

    def _window(self, final: bool) -> list[np.ndarray]:
        bin_of, n_bins = self._assign()
        loads = kernels.bin_loads(bin_of, self._lens, n_bins)
        if final:
            ready = np.ones(n_bins, bool)
        else:
            ready = loads >= self.min_tokens
            ready[bin_of[self._ages >= self.max_age]] = True
            if not ready.any():
                ready[bin_of[0]] = True
        emit = ready[bin_of]
        # bins in order of their earliest item; items inside a bin in arrival order
        idx = np.flatnonzero(emit)
        first_item = np.full(n_bins, len(self._keys), np.int64)
        np.minimum.at(first_item, bin_of[idx], idx)
        idx = idx[np.lexsort((idx, first_item[bin_of[idx]]))]
        cuts = np.flatnonzero(np.diff(bin_of[idx])) + 1
        bins = np.split(self._keys[idx], cuts)
        keep = ~emit
        self._keys, self._lens, self._ages = self._keys[keep], self._lens[keep], self._ages[keep] + 1
        if self.grouped:
            self._groups = self._groups[keep]
        return bins

    def state_dict(self) -> dict:
        state = {"keys": self._keys.tolist(), "lens": self._lens.tolist(), "ages": self._ages.tolist()}
        if self.grouped:
            state["groups"] = self._groups.tolist()
        return state

    def load_state_dict(self, state: dict) -> None:
        self._keys = np.asarray(state["keys"], np.int64)
        self._lens = np.asarray(state["lens"], np.int64)
        self._ages = np.asarray(state["ages"], np.int64)
        if self.grouped:
            if "groups" not in state:
                raise ValueError("state has no group ids but the packer is grouped (group_key changed?)")
            self._groups = np.asarray(state["groups"], np.int64)


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
    """Materialize one VarlenBatch per bin of ``plan`` (tokens are sliced, not copied, until here)."""
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
    if loss_masks is not None:
        if len(loss_masks) != len(docs):
            raise ValueError(f"loss_masks has {len(loss_masks)} entries for {len(docs)} docs")
        for i, (m, d) in enumerate(zip(loss_masks, docs)):
            if m is not None and len(m) != len(d):
                raise ValueError(f"loss_masks[{i}] has length {len(m)}, docs[{i}] has {len(d)}")
    plan = pack([len(d) for d in docs], capacity, algorithm=algorithm, overflow=overflow, seed=seed)
    yield from batches_from_plan(
        plan, docs, loss_masks=loss_masks, pad_to=pad_to, pad_id=pad_id, continue_positions=continue_positions
    )


# ---------------------------------------------------------------------------------------------
# Streaming stage: documents in, VarlenBatches out (the loader's ``stage: {type: "pack"}``).

STREAM_ALGORITHMS = ("online", "bfd", "ffd", "greedy")
STREAM_OVERFLOW = ("split", "truncate", "drop", "error", "split_turns")


class PackStage(Node[VarlenBatch]):
    """Streaming packer stage over a document node (torchdata ``BaseNode`` protocol).

    Pulls documents from ``upstream`` in blocks (:func:`~seqpack.sources.blocks.pull_block`: the
    upstream's own ``next_block`` when it has one, else ``next()`` one document at a time) and
    yields :class:`VarlenBatch` of at most ``capacity`` tokens (padded to ``pad_to`` when set).

    Tokens of waiting pieces live in two arrays: the new block's values, read in place (e.g. an
    int32 Arrow buffer, never copied before the batch), and an int64 copy of the pieces the packer
    carried over from earlier fills (so a buffered piece pins no old row group). Every bin is a
    list of ranges of the two, turned into a batch by one numba call
    (:func:`seqpack.ops.segments.assemble_batch`), not per document.

    Args:
        upstream: node yielding Documents (or blocks of them).
        capacity: tokens per batch.
        algorithm: ``"online"`` (default: :class:`OnlinePacker`, bounded buffer of ``buffer_docs``
            pieces, bins emitted once ``min_fill`` full or ``max_age`` windows old, the rest carried),
            or ``"bfd"``/``"ffd"``/``"greedy"``: windows of ``buffer_docs`` documents planned with
            :func:`seqpack.pack` and emitted whole (no carry between windows).
        overflow: documents longer than ``capacity``: ``split`` (default, nothing lost),
            ``truncate``, ``drop`` (both counted in :meth:`own_stats`), ``error``, or
            ``split_turns``: cut only at a chat document's ``turn_starts``
            (:func:`seqpack.plan.split_at_turns`; a single turn longer than ``capacity`` is cut there
            and the rest of its conversation counted as truncated; documents without turn starts
            are truncated to ``capacity``).
        pad_to: pad every batch to this many tokens (``None``: no padding).
        continue_positions: positions of a split document's later pieces continue from the offset.
        max_segments_per_bin: at most this many segments per batch (``None``: no cap).
        group_key: when set, documents of different ``Document.group`` (read from that record
            field, see :class:`~seqpack.sources.fields.FieldSpec`) never share a batch; documents
            without a group form one group of their own.
        pad_to_shape: ``(T, S)`` fixed-shape mode: every batch has exactly ``T`` tokens and ``S``
            segments (:meth:`VarlenBatch.pad_to_shape`, no empty segment); needs
            ``capacity <= T - S + 1`` and ``max_segments_per_bin <= S - 1`` (the default then).

    These options build batches one per bin with the per-option step added (split_turns: a Python
    loop over the long documents of a block only; fixed shapes: one ``pad_to_shape`` per batch);
    with all of them off the stage is exactly the fast path.

    State: the upstream state, the packer's buffer, the bins not yet yielded, and the tokens of
    the pieces waiting in them (flat tensors), so resume is exact. Counters:
    ``tokens_in == packed_tokens + truncated_tokens + dropped_tokens + tokens still buffered``.
    """

    def __init__(
        self,
        upstream,
        capacity: int,
        *,
        algorithm: str = "online",
        buffer_docs: int = 1000,
        min_fill: float = 0.99,
        max_age: int = 4,
        overflow: str = "split",
        pad_to: int | None = None,
        pad_id: int = 0,
        continue_positions: bool = False,
        seed: int | None = 0,
        max_segments_per_bin: int | None = None,
        group_key: str | None = None,
        pad_to_shape: tuple[int, int] | None = None,
    ):
        super().__init__()
        if algorithm not in STREAM_ALGORITHMS:
            raise ValueError(f"algorithm must be one of {STREAM_ALGORITHMS}, got {algorithm!r}")
        if overflow not in STREAM_OVERFLOW:
            raise ValueError(f"overflow must be one of {STREAM_OVERFLOW}, got {overflow!r}")
        if max_segments_per_bin is not None and (
            isinstance(max_segments_per_bin, bool) or int(max_segments_per_bin) < 1
        ):
            raise ValueError(f"max_segments_per_bin must be a positive integer, got {max_segments_per_bin!r}")
        if pad_to_shape is not None:
            T, S = (int(x) for x in pad_to_shape)
            if S < 1 or T < S:
                raise ValueError(f"pad_to_shape=({T}, {S}) needs segments >= 1 and tokens >= segments")
            if pad_to is not None:
                raise ValueError("pad_to and pad_to_shape are exclusive (pad_to_shape fixes the tokens)")
            if capacity > T - S + 1:
                raise ValueError(
                    f"capacity={capacity} leaves too few padding tokens for pad_to_shape=({T}, {S}): "
                    f"use capacity <= tokens - segments + 1 = {T - S + 1}"
                )
            if max_segments_per_bin is None:
                max_segments_per_bin = S - 1
            if max_segments_per_bin > S - 1:
                raise ValueError(
                    f"max_segments_per_bin={max_segments_per_bin} leaves no padding segment for "
                    f"pad_to_shape=({T}, {S}): use at most segments - 1 = {S - 1}"
                )
            pad_to_shape = (T, S)
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        if pad_to is not None and pad_to < capacity:
            raise ValueError(f"pad_to={pad_to} is smaller than capacity={capacity}")
        if buffer_docs < 1:
            raise ValueError(f"buffer_docs must be >= 1, got {buffer_docs}")
        self.upstream = upstream
        self.capacity, self.algorithm, self.buffer_docs = int(capacity), algorithm, int(buffer_docs)
        self.min_fill, self.max_age, self.overflow = float(min_fill), int(max_age), overflow
        self.pad_to, self.pad_id, self.continue_positions = pad_to, int(pad_id), bool(continue_positions)
        self.seed = seed
        self.max_segments = None if max_segments_per_bin is None else int(max_segments_per_bin)
        self.group_key, self.pad_to_shape = group_key, pad_to_shape

    # ---------------------------------------------------------------- state
    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self._packer = OnlinePacker(
            self.capacity,
            buffer_docs=self.buffer_docs,
            min_fill=self.min_fill,
            max_age=self.max_age,
            max_segments=self.max_segments,
            grouped=self.group_key is not None,
        )
        self._set_arena(_EMPTY, _EMPTY, _NO_MASK, _NO_MASK, False, 0, _EMPTY, _EMPTY, _EMPTY, _EMPTY)
        self._set_bins([])
        if initial_state is None:
            self.upstream.reset(None)
            self._key = 0
            self._exhausted = False
            self._counts = {
                "tokens_in": 0,
                "packed_tokens": 0,
                "truncated_tokens": 0,
                "dropped_tokens": 0,
                "documents": 0,
                "batches": 0,
            }
            return
        s = initial_state
        self.upstream.reset(s["upstream"])
        self._exhausted = bool(s["exhausted"])
        self._counts = dict(s["counts"])
        self._packer.load_state_dict(s["packer"])
        p = s["pieces"]
        lens = np.asarray(p["lens"], np.int64)
        src = np.zeros(len(lens), np.int64)
        if len(lens):
            np.cumsum(lens[:-1], out=src[1:])
        has_mask = bool(p["has_mask"])
        self._set_arena(
            np.asarray(p["tokens"], np.int64), _EMPTY, np.asarray(p["mask"], bool) if has_mask else _NO_MASK,
            _NO_MASK, has_mask, 0, src, lens, np.asarray(p["doc_ids"], np.int64),
            np.asarray(p["seg_start"], np.int64),
        )
        self._key = len(lens)
        self._set_bins([np.asarray(b, np.int64) for b in s["ready"]])

    def get_state(self) -> dict:
        # the pending pieces (packer buffer + bins not yet yielded), renumbered 0..m-1 in key order
        ready = self._ready_bins()
        pending = np.sort(np.concatenate([self._packer._keys, *ready]))
        i = pending - self._base
        lens = self._len[i]
        dest = np.zeros(len(i), np.int64)
        if len(i):
            np.cumsum(lens[:-1], out=dest[1:])
        tokens = np.empty(int(lens.sum()), np.int64)
        gather_two(self._first, self._second, self._src[i], lens, dest, tokens)
        mask = torch.zeros(0, dtype=torch.bool)
        if self._has_mask:
            m = np.empty(len(tokens), bool)
            gather_two(self._first_mask, self._second_mask, self._src[i], lens, dest, m)
            mask = torch.from_numpy(m)
        packer = self._packer.state_dict()
        packer["keys"] = np.searchsorted(pending, self._packer._keys).tolist()
        return {
            "upstream": self.upstream.state_dict(),
            "exhausted": self._exhausted,
            "counts": dict(self._counts),
            "packer": packer,
            "ready": [np.searchsorted(pending, b).tolist() for b in ready],
            "pieces": {
                "lens": torch.from_numpy(lens.copy()),
                "doc_ids": torch.from_numpy(self._doc[i].copy()),
                "seg_start": torch.from_numpy(self._seg[i].copy()),
                "tokens": torch.from_numpy(tokens),
                "has_mask": self._has_mask,
                "mask": mask,
            },
        }

    def own_stats(self) -> dict:
        return {f"pack/{k}": v for k, v in self._counts.items()}

    # ---------------------------------------------------------------- arena and bins
    def _set_arena(
        self, first, second, first_mask, second_mask, has_mask, base, src, length, doc_id, seg_start
    ) -> None:
        """Piece table of keys ``base .. base + len(src) - 1``: piece ``k`` is the tokens
        ``(first ++ second)[src[k - base] : ... + length[k - base]]`` (masks aligned if ``has_mask``)."""
        self._first, self._second, self._has_mask = first, second, bool(has_mask)
        self._first_mask, self._second_mask = first_mask, second_mask
        self._base = int(base)
        self._src, self._len, self._doc, self._seg = src, length, doc_id, seg_start

    def _set_bins(self, bins: list[np.ndarray]) -> None:
        """Bins to yield, as one flat key array + offsets (piece arrays gathered once per fill)."""
        keys = np.concatenate(bins) if bins else _EMPTY
        self._bin_off = np.zeros(len(bins) + 1, np.int64)
        if bins:
            np.cumsum([len(b) for b in bins], out=self._bin_off[1:])
        self._bin_keys = keys
        i = keys - self._base
        self._b_src, self._b_len = self._src[i], self._len[i]
        self._b_doc, self._b_seg = self._doc[i], self._seg[i]
        self._b_next = 0

    def _ready_bins(self) -> list[np.ndarray]:
        off = self._bin_off
        return [self._bin_keys[off[b] : off[b + 1]] for b in range(self._b_next, len(off) - 1)]

    def _refill_arena(self, blocks: list[DocBlock], pieces: list[tuple[np.ndarray, ...]]) -> np.ndarray:
        """Carried pieces copied into a fresh int64 ``first`` array, new pieces (doc, start, length)
        of ``blocks`` read in place from ``second`` (one block's values, no copy) or copied there
        (several blocks); returns the new pieces' keys."""
        carried = self._packer._keys
        j = carried - self._base
        c_len = self._len[j]
        c_dest = np.zeros(len(j), np.int64)
        if len(j):
            np.cumsum(c_len[:-1], out=c_dest[1:])
        first = np.empty(int(c_len.sum()), np.int64)
        has_mask = self._has_mask or any(b.mask is not None for b in blocks)
        gather_two(self._first, self._second, self._src[j], c_len, c_dest, first)
        first_mask = np.ones(len(first), bool) if has_mask else _NO_MASK
        if self._has_mask:
            gather_two(self._first_mask, self._second_mask, self._src[j], c_len, c_dest, first_mask)
        n0 = len(first)
        srcs, lens, docs, segs = [c_dest], [c_len], [self._doc[j]], [self._seg[j]]
        if len(blocks) == 1:
            block = blocks[0]
            doc, start, length = pieces[0]
            second = block.values
            second_mask = _NO_MASK
            if has_mask:
                second_mask = block.mask if block.mask is not None else np.ones(len(second), bool)
            srcs.append(n0 + block.starts[doc] + start)
            lens.append(length)
            docs.append(block.doc_ids[doc])
            segs.append(start)
        else:
            n_new = sum(int(p[2].sum()) for p in pieces)
            second = np.empty(n_new, np.int64)
            second_mask = np.ones(n_new, bool) if has_mask else _NO_MASK
            at = 0
            for block, (doc, start, length) in zip(blocks, pieces):
                dest = np.zeros(len(length), np.int64)
                if len(length):
                    np.cumsum(length[:-1], out=dest[1:])
                dest += at
                src = block.starts[doc] + start
                gather_segments(block.values, src, length, dest, second)
                if block.mask is not None:
                    gather_segments(block.mask, src, length, dest, second_mask)
                srcs.append(n0 + dest)
                lens.append(length)
                docs.append(block.doc_ids[doc])
                segs.append(start)
                at += int(length.sum())
        # keys: carried ones keep theirs (the packer holds them), new ones continue the count
        m = sum(len(x) for x in lens) - len(carried)
        base = int(carried.min()) if len(carried) else self._key
        size = self._key + m - base
        src_t, len_t = np.zeros(size, np.int64), np.ones(size, np.int64)
        doc_t, seg_t = np.zeros(size, np.int64), np.zeros(size, np.int64)
        new_keys = np.arange(self._key, self._key + m, dtype=np.int64)
        idx = np.concatenate([carried, new_keys]) - base
        src_t[idx], len_t[idx] = np.concatenate(srcs), np.concatenate(lens)
        doc_t[idx], seg_t[idx] = np.concatenate(docs), np.concatenate(segs)
        self._set_arena(first, second, first_mask, second_mask, has_mask, base, src_t, len_t, doc_t, seg_t)
        self._key += m
        return new_keys

    # ---------------------------------------------------------------- pieces
    def _online_pieces(self, block: DocBlock) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(document index in block, offset inside the document, length) of each piece."""
        lens, cap = block.lengths, self.capacity
        long = lens > cap
        if self.overflow == "split_turns" and long.any():
            return self._turn_pieces(block, long)
        if not long.any():
            doc = np.flatnonzero(lens > 0) if (lens <= 0).any() else np.arange(len(lens))
            return doc, np.zeros(len(doc), np.int64), lens[doc]
        if self.overflow == "split":
            n_pieces = -(-lens // cap)
            doc = np.repeat(np.arange(len(lens)), n_pieces)
            first = np.cumsum(n_pieces) - n_pieces
            start = (np.arange(len(doc)) - np.repeat(first, n_pieces)) * cap
            return doc, start, np.minimum(cap, lens[doc] - start)
        if self.overflow == "truncate":
            self._counts["truncated_tokens"] += int((lens[long] - cap).sum())
            doc = np.flatnonzero(lens > 0)
            return doc, np.zeros(len(doc), np.int64), np.minimum(lens[doc], cap)
        if self.overflow == "drop":
            self._counts["dropped_tokens"] += int(lens[long].sum())
            doc = np.flatnonzero((lens > 0) & ~long)
            return doc, np.zeros(len(doc), np.int64), lens[doc]
        i = int(np.flatnonzero(long)[0])
        raise ValueError(
            f"document {int(block.doc_ids[i])} has {int(lens[i])} tokens > capacity {cap} (overflow='error')"
        )

    def _turn_pieces(self, block: DocBlock, long: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``split_turns``: short documents whole, long ones cut by :func:`seqpack.plan.split_at_turns`."""
        lens, turns = block.lengths, block.turn_starts
        doc = [np.flatnonzero((lens > 0) & ~long)]
        start, length = [np.zeros(len(doc[0]), np.int64)], [lens[doc[0]]]
        for i in np.flatnonzero(long):
            bounds = turns[i] if turns is not None and turns[i] is not None else _EMPTY
            st, ln, cut = split_at_turns(int(lens[i]), bounds, self.capacity)
            doc.append(np.full(len(st), i, np.int64))
            start.append(np.asarray(st, np.int64))
            length.append(np.asarray(ln, np.int64))
            if cut:
                self._counts["truncated_tokens"] += cut
                self._counts["truncated_docs"] = self._counts.get("truncated_docs", 0) + 1
        doc_a = np.concatenate(doc)
        order = np.argsort(doc_a, kind="stable")  # documents in block order, pieces in order
        return doc_a[order], np.concatenate(start)[order], np.concatenate(length)[order]

    def _groups_of(self, block: DocBlock, doc: np.ndarray) -> np.ndarray | None:
        if self.group_key is None:
            return None
        if block.groups is None:
            return np.full(len(doc), NO_GROUP, np.int64)
        return block.groups[doc]

    def _take(self, block: DocBlock) -> None:
        self._counts["documents"] += int((block.lengths > 0).sum())
        self._counts["tokens_in"] += block.num_tokens

    # ---------------------------------------------------------------- filling
    def _pull(self, limit: int) -> DocBlock | None:
        if self._exhausted:
            return None
        try:
            return pull_block(self.upstream, max(1, limit))
        except StopIteration:
            self._exhausted = True
            return None

    def _fill_online(self) -> None:
        block = self._pull(self.buffer_docs - len(self._packer))
        bins: list[np.ndarray] = []
        if block is not None and len(block):
            self._take(block)
            pieces = self._online_pieces(block)
            keys = self._refill_arena([block], [pieces])
            if len(keys):
                bins = self._packer.add_many(keys, pieces[2], self._groups_of(block, pieces[0]))
        if self._exhausted:
            bins += self._packer.flush()
        self._set_bins(bins)

    def _fill_window(self) -> None:
        blocks, n = [], 0
        while n < self.buffer_docs:
            block = self._pull(self.buffer_docs - n)
            if block is None:
                break
            block = block.take(np.flatnonzero(block.lengths > 0)) if (block.lengths <= 0).any() else block
            if len(block):
                blocks.append(block)
                n += len(block)
        if not blocks:
            self._set_bins([])
            return
        lengths = np.concatenate([b.lengths for b in blocks])
        options = {}
        if self.max_segments is not None:
            options["max_segments_per_bin"] = self.max_segments
        if self.group_key is not None:
            options["groups"] = np.concatenate([self._groups_of(b, np.arange(len(b))) for b in blocks])
        if self.overflow == "split_turns":
            options["turn_starts"] = [
                None if b.turn_starts is None else b.turn_starts[i] for b in blocks for i in range(len(b))
            ]
        plan = pack(
            lengths, self.capacity, algorithm=self.algorithm, overflow=self.overflow, seed=self.seed,
            **options,
        )
        self._counts["truncated_tokens"] += int(plan.truncated_tokens)
        self._counts["dropped_tokens"] += int(plan.dropped_tokens)
        if self.overflow == "split_turns" and plan.truncated_docs:
            self._counts["truncated_docs"] = self._counts.get("truncated_docs", 0) + int(plan.truncated_docs)
        doc0 = np.cumsum([0] + [len(b) for b in blocks])
        seg_blk = np.searchsorted(doc0, plan.seg_doc, side="right") - 1
        order = np.argsort(seg_blk, kind="stable")  # segments grouped by block, plan order inside
        pieces = []
        for i, block in enumerate(blocks):
            self._take(block)
            sel = order[np.searchsorted(seg_blk[order], i) : np.searchsorted(seg_blk[order], i + 1)]
            pieces.append((plan.seg_doc[sel] - doc0[i], plan.seg_start[sel], plan.seg_len[sel]))
        keys = self._refill_arena(blocks, pieces)
        seg_key = np.empty(len(plan.seg_doc), np.int64)
        seg_key[order] = keys
        self._set_bins(np.split(seg_key, plan.bin_offsets[1:-1]))

    # ---------------------------------------------------------------- output
    def next(self) -> VarlenBatch:
        while self._b_next >= len(self._bin_off) - 1:
            if self._exhausted and not len(self._packer):
                raise StopIteration
            if self.algorithm == "online":
                self._fill_online()
            else:
                self._fill_window()
        b = self._b_next
        self._b_next += 1
        a, z = self._bin_off[b], self._bin_off[b + 1]
        n = int(z - a)
        seg_len = self._b_len[a:z]
        total = int(seg_len.sum())
        size = total if self.pad_to is None else int(self.pad_to)
        input_ids = np.empty(size, np.int64)
        labels = np.empty(size, np.int64)
        position_ids = np.empty(size, np.int64)
        seq_idx = np.empty(size, np.int32)
        cu = np.empty(n + 2, np.int32)
        doc_ids = np.empty(n + 1, np.int64)
        seg_start = np.empty(n + 1, np.int64)
        n_loss, n_seg, longest = assemble_batch(
            self._first, self._second, self._first_mask, self._second_mask, self._has_mask,
            self._b_src[a:z], seg_len, self._b_seg[a:z], self._b_doc[a:z], size, self.pad_id,
            self.continue_positions, IGNORE_INDEX, input_ids, labels, position_ids, seq_idx, cu, doc_ids,
            seg_start,
        )
        self._counts["packed_tokens"] += total
        self._counts["batches"] += 1
        batch = VarlenBatch(
            input_ids=torch.from_numpy(input_ids),
            labels=torch.from_numpy(labels),
            position_ids=torch.from_numpy(position_ids),
            cu_seqlens=torch.from_numpy(cu[: n_seg + 1]),
            max_seqlen=int(longest),
            seq_idx=torch.from_numpy(seq_idx),
            doc_ids=torch.from_numpy(doc_ids[:n_seg]),
            seg_start=torch.from_numpy(seg_start[:n_seg]),
            num_loss_tokens=int(n_loss),
            n_real_segments=n,
        )
        if self.pad_to_shape is not None:
            batch = batch.pad_to_shape(*self.pad_to_shape, pad_id=self.pad_id)
        return batch


def pack_factory(docs: Node, cfg: dict, ctx: StageContext) -> PackStage:
    kw = {
        k: cfg[k]
        for k in (
            "algorithm",
            "buffer_docs",
            "min_fill",
            "max_age",
            "overflow",
            "pad_to",
            "continue_positions",
            "max_segments_per_bin",
            "group_key",
        )
        if k in cfg
    }
    shape = cfg.get("pad_to_shape")
    if shape is not None:
        kw["pad_to_shape"] = (shape["tokens"], shape["segments"])
    return PackStage(docs, cfg["capacity"], pad_id=ctx.pad_id, seed=cfg.get("seed", ctx.seed), **kw)


def pack_padding(cfg: dict, ctx: StageContext, last: Any) -> VarlenBatch:
    shape = cfg.get("pad_to_shape")
    if shape is not None:
        return padding_batch(shape["tokens"], ctx.pad_id).pad_to_shape(
            shape["tokens"], shape["segments"], pad_id=ctx.pad_id
        )
    return padding_batch(int(cfg.get("pad_to") or cfg["capacity"]), ctx.pad_id)


_EMPTY = np.zeros(0, np.int64)
_NO_MASK = np.zeros(0, bool)
