"""The pack stage: a document stream in, VarlenBatches of at most ``capacity`` tokens out, with
document masks (the loader's ``stage: {type: pack, ...}``).

Per fill: pull a block of documents, cut the over-long ones by the overflow policy
(:func:`seqpack.plan.expand_overflow`), put the pieces' tokens in the :class:`~seqpack.arena.Arena`,
place the pieces into bins (:class:`~seqpack.plan.OnlinePacker`, or :func:`seqpack.pack` over a
window), then build one batch per bin (:meth:`VarlenBatch.from_arrays`). The stage's config keys
are checked in :mod:`seqpack.stages.pack_config`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torchdata.nodes import BaseNode

from seqpack.arena import Arena, refetcher
from seqpack.batch import VarlenBatch, batch_tokens, padding_batch
from seqpack.node import Node
from seqpack.plan import PACK_OVERFLOW, OnlinePacker, expand_overflow, pack
from seqpack.sources.blocks import DocBlock, pull_block
from seqpack.sources.records import NO_GROUP
from seqpack.stages.context import StageContext
from seqpack.stages.pack_config import STREAM_ALGORITHMS, check_pad_to

_EMPTY = np.zeros(0, np.int64)


class PackStage(Node[VarlenBatch]):
    """Streaming packer stage over a document node (torchdata ``BaseNode`` protocol).

    Pulls documents from ``upstream`` in blocks (:func:`~seqpack.sources.blocks.pull_block`) and
    yields :class:`VarlenBatch` of at most ``capacity`` tokens (padded as ``pad_to`` says).

    Args:
        upstream: node yielding Documents (or blocks of them).
        capacity: tokens per batch.
        algorithm: ``"online"`` (default: :class:`~seqpack.plan.OnlinePacker`, bounded buffer of
            ``buffer_docs`` pieces, bins emitted once ``min_fill`` full or ``max_age`` windows old,
            the rest carried; until the buffer first fills, documents come ``warmup_docs`` at a time
            and bins already ``min_fill`` full are emitted after each, so the first batch does not
            wait for ``buffer_docs`` documents), or ``"bfd"``/``"ffd"``/``"greedy"``: windows of
            ``buffer_docs`` documents planned with :func:`seqpack.pack` and emitted whole (no carry
            between windows).
        overflow: documents longer than ``capacity`` (:func:`seqpack.plan.expand_overflow`):
            ``split`` (default, nothing lost), ``truncate``, ``drop`` (both counted in
            :meth:`own_stats`), ``error``, or ``split_turns``: cut only at a chat document's
            ``turn_starts`` (documents without turn starts keep their first ``capacity`` tokens).
        pad_to: None (no padding); an int: every batch has this many tokens (a final padding
            segment); ``"max"``: ``capacity``; ``{"tokens": T, "segments": S}`` (or ``(T, S)``):
            fixed shape, every batch has exactly ``T`` tokens and ``S`` segments
            (:meth:`VarlenBatch.pad_to_shape`, no empty segment), which needs
            ``capacity <= T - S + 1`` and ``max_segments_per_bin <= S - 1`` (the default then).
        continue_positions: positions of a split document's later pieces continue from the offset.
        max_segments_per_bin: at most this many segments per batch (``None``: no cap).
        group_key: when set, documents of different ``Document.group`` never share a batch;
            documents without a group form one group of their own.
        pad_to_shape: deprecated name of a fixed-shape ``pad_to`` (DeprecationWarning).

    State: the upstream's (key ``"upstream"``), the packer's buffer, the bins not yet yielded and
    the waiting pieces in the one buffered-documents format (:mod:`seqpack.arena`), so resume is
    exact. Counters: ``tokens_in == packed_tokens + truncated_tokens + dropped_tokens + buffered``.
    """

    def __init__(
        self,
        upstream: BaseNode,
        capacity: int,
        *,
        algorithm: str = "online",
        buffer_docs: int = 1000,
        warmup_docs: int = 64,
        min_fill: float = 0.99,
        max_age: int = 4,
        overflow: str = "split",
        pad_to: int | str | Mapping | tuple[int, int] | None = None,
        pad_id: int = 0,
        continue_positions: bool = False,
        seed: int | None = 0,
        max_segments_per_bin: int | None = None,
        group_key: str | None = None,
        pad_to_shape: tuple[int, int] | Mapping | None = None,
    ):
        super().__init__()
        if pad_to_shape is not None:
            warnings.warn(
                "PackStage(pad_to_shape=...) is deprecated; use pad_to={'tokens': T, 'segments': S}",
                DeprecationWarning,
                stacklevel=2,
            )
            if pad_to is not None:
                raise ValueError("give only pad_to (pad_to_shape is its deprecated fixed-shape name)")
            pad_to = pad_to_shape
        if algorithm not in STREAM_ALGORITHMS:
            raise ValueError(f"algorithm must be one of {STREAM_ALGORITHMS}, got {algorithm!r}")
        if overflow not in PACK_OVERFLOW:
            raise ValueError(f"overflow must be one of {PACK_OVERFLOW}, got {overflow!r}")
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        if buffer_docs < 1:
            raise ValueError(f"buffer_docs must be >= 1, got {buffer_docs}")
        if max_segments_per_bin is not None and (
            isinstance(max_segments_per_bin, bool) or int(max_segments_per_bin) < 1
        ):
            raise ValueError(f"max_segments_per_bin must be a positive integer, got {max_segments_per_bin!r}")
        tokens, segments, max_segments_per_bin = check_pad_to(pad_to, capacity, max_segments_per_bin)
        self.upstream = upstream
        self.capacity, self.algorithm, self.buffer_docs = int(capacity), algorithm, int(buffer_docs)
        if warmup_docs < 0:
            raise ValueError(f"warmup_docs must be >= 0, got {warmup_docs}")
        self.warmup_docs = int(warmup_docs)
        self.min_fill, self.max_age, self.overflow = float(min_fill), int(max_age), overflow
        self.pad_to, self.pad_segments = tokens, segments
        self.pad_id, self.continue_positions = int(pad_id), bool(continue_positions)
        self.seed = seed
        self.max_segments = None if max_segments_per_bin is None else int(max_segments_per_bin)
        self.group_key = group_key

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
            warmup=self.warmup_docs,
        )
        self._refetch = refetcher(self.upstream)
        if initial_state is None:
            self.upstream.reset(None)
            self._arena = Arena()
            self._exhausted = False
            self._counts = dict.fromkeys(
                ("tokens_in", "packed_tokens", "truncated_tokens", "dropped_tokens", "documents", "batches"),
                0,
            )
            self._set_bins([])
            return
        s = initial_state
        self.upstream.reset(s["upstream"])
        self._exhausted = bool(s["exhausted"])
        self._counts = dict(s["counts"])
        self._packer.load_state_dict(s["packer"])
        self._arena = Arena.from_state(s["pieces"], self._refetch)
        if "ready_lens" in s:  # one flat tensor of keys + bin lengths
            flat = np.asarray(s["ready"], np.int64)
            self._set_bins(np.split(flat, np.cumsum(s["ready_lens"])[:-1]) if len(s["ready_lens"]) else [])
        else:  # a list per bin (states written before the flat form)
            self._set_bins([np.asarray(b, np.int64) for b in s["ready"]])

    def get_state(self) -> dict:
        # the pending pieces (packer buffer + bins not yet yielded), renumbered 0..m-1 in key order;
        # taken after every batch with workers, so no per-bin Python
        off = self._bin_off[self._b_next :]
        ready = self._bin_keys[off[0] :]
        waiting = self._packer.pending_keys()
        pending = np.sort(np.concatenate([waiting, ready]))
        return {
            "upstream": self.upstream.state_dict(),
            "exhausted": self._exhausted,
            "counts": dict(self._counts),
            "packer": self._packer.state_dict(keys=np.searchsorted(pending, waiting)),
            # bins built but not yielded: keys renumbered into ``pieces``, flat + lengths
            "ready": torch.from_numpy(np.searchsorted(pending, ready)),
            "ready_lens": np.diff(off).tolist(),
            "pieces": self._arena.state_dict(pending, by_ref=self._refetch is not None),
        }

    def own_stats(self) -> dict:
        return {f"pack/{k}": v for k, v in self._counts.items()}

    # ---------------------------------------------------------------- bins
    def _set_bins(self, bins: list[np.ndarray]) -> None:
        """Bins to yield, as one flat key array + offsets (piece rows looked up once per fill)."""
        self._bin_keys = np.concatenate(bins) if bins else _EMPTY
        self._bin_off = np.zeros(len(bins) + 1, np.int64)
        if bins:
            np.cumsum([len(b) for b in bins], out=self._bin_off[1:])
        self._b_src, self._b_len, self._b_doc, self._b_start = self._arena.rows(self._bin_keys)
        self._b_next = 0

    # ---------------------------------------------------------------- pieces
    def _count_lost(self, counts: Mapping[str, int]) -> None:
        self._counts["truncated_tokens"] += int(counts["truncated_tokens"])
        self._counts["dropped_tokens"] += int(counts["dropped_tokens"])
        if self.overflow == "split_turns" and counts["truncated_docs"]:
            # only split_turns counts documents (it is the policy that may cut a conversation short)
            self._counts.setdefault("truncated_docs", 0)
            self._counts["truncated_docs"] += int(counts["truncated_docs"])

    def _pieces(self, block: DocBlock) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(document index in block, offset inside the document, length) of each piece."""
        turns = None
        if self.overflow == "split_turns":
            turns = block.turn_starts if block.turn_starts is not None else [None] * len(block)
        doc, start, length, counts = expand_overflow(
            block.lengths, self.capacity, self.overflow, turns, doc_ids=block.doc_ids
        )
        self._count_lost(counts)
        return doc, start, length

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
        want = self.buffer_docs - len(self._packer)
        if self._packer.warming:  # small pulls until the buffer first fills: the first batch comes early
            want = min(want, self.warmup_docs)
        block = self._pull(want)
        bins: list[np.ndarray] = []
        if block is not None and len(block):
            self._take(block)
            pieces = self._pieces(block)
            keys = self._arena.refill(self._packer.pending_keys(), [block], [pieces])
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
            lengths,
            self.capacity,
            algorithm=self.algorithm,
            overflow=self.overflow,
            seed=self.seed,
            **options,
        )
        self._count_lost(
            {
                "truncated_tokens": plan.truncated_tokens,
                "dropped_tokens": plan.dropped_tokens,
                "truncated_docs": plan.truncated_docs,
            }
        )
        doc0 = np.cumsum([0] + [len(b) for b in blocks])
        seg_blk = np.searchsorted(doc0, plan.seg_doc, side="right") - 1
        order = np.argsort(seg_blk, kind="stable")  # segments grouped by block, plan order inside
        pieces = []
        for i, block in enumerate(blocks):
            self._take(block)
            sel = order[np.searchsorted(seg_blk[order], i) : np.searchsorted(seg_blk[order], i + 1)]
            pieces.append((plan.seg_doc[sel] - doc0[i], plan.seg_start[sel], plan.seg_len[sel]))
        keys = self._arena.refill(self._packer.pending_keys(), blocks, pieces)
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
        seg_len = self._b_len[a:z]
        total = int(seg_len.sum())
        # fixed shapes pad by pad_to_shape below (several padding segments)
        size = total if self.pad_to is None or self.pad_segments is not None else self.pad_to
        tokens = batch_tokens(size, z - a)  # the head of the batch's one buffer
        target = self._arena.gather(self._b_src[a:z], seg_len, tokens)
        batch = VarlenBatch.from_arrays(
            tokens, seg_len, self._b_doc[a:z], self._b_start[a:z], target=target, pad_id=self.pad_id,
            continue_positions=self.continue_positions,
        )  # fmt: skip
        self._counts["packed_tokens"] += total
        self._counts["batches"] += 1
        if self.pad_segments is not None:
            batch = batch.pad_to_shape(self.pad_to, self.pad_segments, pad_id=self.pad_id)
        return batch


# ------------------------------------------------------------------------------------------ registry
def pack_factory(docs: Node, cfg: dict, ctx: StageContext) -> PackStage:
    """The registry's factory: a :class:`PackStage` over ``docs`` from a validated ``stage`` mapping."""
    keys = (
        "algorithm", "buffer_docs", "warmup_docs", "min_fill", "max_age", "overflow", "pad_to",
        "continue_positions",
    )  # fmt: skip
    kw = {k: cfg[k] for k in (*keys, "max_segments_per_bin", "group_key") if k in cfg}
    return PackStage(docs, cfg["capacity"], pad_id=ctx.pad_id, seed=cfg.get("seed", ctx.seed), **kw)


def pack_padding(cfg: dict, ctx: StageContext, last: Any) -> VarlenBatch:
    """The zero-loss batch of a rank that ran out: the shape every batch of this stage has."""
    tokens, segments, _ = check_pad_to(cfg.get("pad_to"), cfg["capacity"])
    batch = padding_batch(tokens or cfg["capacity"], ctx.pad_id)
    return batch if segments is None else batch.pad_to_shape(tokens, segments, pad_id=ctx.pad_id)
