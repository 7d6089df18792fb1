"""Elastic resume: every old rank's loader state re-partitioned over a new topology.

What an old consumer (one rank x worker chain) has not delivered yet is exactly

1. its readers' remaining work (``Reader.remaining_work``: the work items, the current one trimmed
   to the records after the position; one list per source), and
2. the documents it holds: the not yet emitted rest of its tokenizer's batch, every buffered
   piece in its shuffle buffer and stage buffers (found in the chain state as the buffered-document
   formats of :mod:`seqpack.arena` / :mod:`seqpack.refs`), and the segments of the batches a
   ``balance:`` transform pulled but had not yielded (:meth:`RankBalance.pending`). Pieces keep
   their token offsets (``Document.start``, carried into the pack stage as ``DocBlock.offsets``),
   so a document half delivered by a split is finished from its true offset (``seg_start``, and
   positions with ``continue_positions``), not repeated.

:func:`repartition` collects both over ALL old consumers and deals them over the new consumers
(``n = world_size * max(num_workers, 1)``) by size: work items cut into equal-size contiguous
shares, buffered pieces to the consumer with the fewest carried tokens (:mod:`seqpack.elastic_deal`).
Each new consumer starts a fresh chain whose readers read exactly their items
(``Reader.state_for_work``) and whose :class:`~seqpack.sources.carried.CarriedDocuments` node serves
their documents first. So every not-yet-delivered document is delivered exactly once; the shuffle
and mixture restart (fresh RNG for the new consumer, zero counters). Counters (``stats()``) restart.

Steps: the epoch's step count continues from the furthest old rank (``step`` = max over the old
ranks: under DDP every rank has taken the same number of steps, so this is the global step of the
epoch). Each new rank's remaining batches are counted exactly when something needs them (the same
way as a fresh epoch's ``steps_per_epoch``: from length indexes, else by running the
re-partitioned chains; every new rank counts every new consumer, so all agree without
communication):

- ``even_batches="precount"``: the resumed epoch has ``epoch_steps = step + max over new ranks of
  their remaining batches`` steps (``steps_per_epoch()`` / ``len(loader)`` of this epoch); every
  new rank pads up to it, so all take the same number of steps and none has more than counted.
  The count is kept in the loader state, so a same-topology resume later in this epoch keeps it.
- ``balance:``: the new ranks' ``RankBalance`` exchange their remaining counts (state
  ``rank_counts``), so every rank agrees on each window's step count without an ``all_gather``.
- ``"allreduce"`` / ``"none"``: nothing is counted (the all-reduce finds the end).

Any state that cannot be merged is a ValueError saying why (missing ranks, mixed epochs or
topologies, data that changed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from seqpack.arena import Pieces, refetcher
from seqpack.counting import (
    BALANCE,
    NotByLengths,
    by_lengths_reason,
    indexed_documents,
    rank_counts,
    without_balance,
)
from seqpack.elastic_deal import Leftovers, deal
from seqpack.pipeline import build_chain
from seqpack.plan.balance import balanced_count
from seqpack.plan.balance_config import validate_balance
from seqpack.refs import GROUP, MASK, TURNS, is_refs, refs_state
from seqpack.sources.carried import CarriedDocuments
from seqpack.sources.lengths import IndexedDocuments
from seqpack.sources.mixture import Mixture
from seqpack.sources.records import NO_GROUP, RECORD_BITS, SHARD_BITS, Document
from seqpack.sources.tokenize import Tokenize
from seqpack.stages.balance import CountedRanks, RankBalance


def _check_topology(states: Sequence[Mapping[str, Any]]) -> tuple[int, int, int, bool]:
    """``(world_size, num_workers, epoch, between_epochs)`` shared by every old state, or ValueError."""
    for i, st in enumerate(states):
        if not isinstance(st, Mapping) or "workers" not in st or "world_size" not in st:
            raise ValueError(
                f"elastic resume: entry {i} is not a version-2 loader state (state_dict() of this seqpack); "
                "a version-1 state must first be loaded into its own topology and saved again"
            )
    world = {int(st["world_size"]) for st in states}
    workers = {int(st["num_workers"]) for st in states}
    epochs = {int(st["epoch"]) for st in states}
    if len(world) != 1 or len(workers) != 1:
        raise ValueError(
            f"elastic resume: states of different topologies (world sizes {world}, workers {workers})"
        )
    (ws,) = world
    ranks = sorted(int(st["rank"]) for st in states)
    if ranks != list(range(ws)):
        raise ValueError(
            f"elastic resume needs the state of every old rank 0..{ws - 1} exactly once, got ranks {ranks}"
        )
    if len(epochs) != 1:
        raise ValueError(f"elastic resume: the old ranks are in different epochs {sorted(epochs)}")
    # None: the rank had not started epoch ``epoch`` (its whole share is left)
    between = all(st["workers"] is None for st in states)
    return ws, next(iter(workers)), next(iter(epochs)), between


def _collect_pieces(value: Any, out: Leftovers) -> None:
    """Every buffered-document state inside ``value`` (a stage's own state, upstream excluded)."""
    if isinstance(value, Mapping):
        if "doc_ids" in value and "lens" in value:
            if is_refs(value):
                rows = np.stack(
                    [np.asarray(value[k], np.int64) for k in ("doc_ids", "starts", "lens", "flags")], axis=1
                )
                out.refs.append(rows.reshape(-1, 4))
            else:
                out.token_docs.extend(Pieces.from_state(value).documents())
            return
        for k, v in value.items():
            if k != "upstream":
                _collect_pieces(v, out)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _collect_pieces(v, out)


def _source_of(tok: Tokenize, default: int) -> int:
    return int(getattr(tok.upstream, "source_index", default))


def _flags(d: Document) -> int:
    mask, turns, group = d.loss_mask is not None, d.turn_starts is not None, d.group is not None
    return mask * MASK + turns * TURNS + group * GROUP


def _batch_pieces(batches: Sequence[Any], refetch: Any) -> np.ndarray:
    """Rows ``(doc_id, seg_start, len, flags)`` of the real segments of ``batches`` (flags: the
    document's own, read back through ``refetch``: a segment keeps its mask, turns and group)."""
    rows = []
    for b in batches:
        n = int(b.n_real_segments)
        if n:
            cu = np.asarray(b.cu_seqlens[: n + 1], np.int64)
            ids, starts = np.asarray(b.doc_ids[:n], np.int64), np.asarray(b.seg_start[:n], np.int64)
            rows.append(np.stack([ids, starts, np.diff(cu), np.zeros(n, np.int64)], axis=1))
    if not rows:
        return np.zeros((0, 4), np.int64)
    out = np.concatenate(rows)
    if refetch is None:
        raise ValueError(
            "elastic resume: the balance: transform holds batches it has not yielded, and this chain cannot "
            "re-read their documents (no reader with fetch() behind its tokenizer)"
        )
    docs = {d.doc_id: d for d in refetch(list(dict.fromkeys(out[:, 0].tolist())))}
    out[:, 3] = [_flags(docs[i]) for i in out[:, 0].tolist()]
    return out


def _collect(
    node: Any, state: Mapping | None, out: Leftovers, source: int = 0, old_counts: Any = None
) -> None:
    """Walk an old consumer's chain and its state together, collecting what it left
    (``old_counts()``: every old rank's count for this worker, for a ``balance:`` window)."""
    if state is None:
        return
    if isinstance(node, Tokenize):
        node.reset(state)  # re-reads the pending batch: its rest is known, the reader is after it
        src = _source_of(node, source)
        rest = node._docs[node._emitted :]
        if rest:
            out.refs.append(
                np.array([[d.doc_id, 0, -1, 0] for d in rest], np.int64).reshape(-1, 4)
            )  # whole documents (len -1), re-tokenized where they land
        reader = node.upstream
        out.work.setdefault(src, []).extend(reader.remaining_work(reader.state_dict()))
        out.readers.setdefault(src, reader)
        return
    if isinstance(node, Mixture):
        for i, (s, st) in enumerate(zip(node.sources, state["sources"])):
            _collect(s, st, out, i, old_counts)
        return
    if isinstance(node, RankBalance):
        # its state is the upstream's at the window's start: re-pull the window (same counts as
        # then, without communication), keep the batches not yielded, go on after the window
        if int(state.get("window", -1)) >= 0 and state.get("rank_counts") is None:
            if not isinstance(node.exchange, CountedRanks):
                state = {**state, "rank_counts": old_counts()}
        node.reset(state)
        out.refs.append(_batch_pieces(node.pending(), refetcher(node)))
        _collect(node.upstream, node.upstream.state_dict(), out, source, old_counts)
        return
    _collect_pieces({k: v for k, v in state.items() if k != "upstream"}, out)
    up = getattr(node, "upstream", None)
    if up is not None:
        _collect(up, state.get("upstream") if "upstream" in state else state, out, source, old_counts)


def _carried_state(rows: np.ndarray, token_docs: list) -> dict:
    """The CarriedDocuments state of pieces ``rows`` (by reference) and ``token_docs``."""
    return {
        "carried": refs_state(rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]) if len(rows) else None,
        "carried_tokens": Pieces.from_documents(token_docs).state_dict() if token_docs else None,
    }


def _fill(
    node: Any, state: dict, work: dict[int, list[tuple]], carried: dict, source: int = 0,
    counts: list[int] | None = None,
) -> dict:  # fmt: skip
    """``state`` (a fresh chain state) with the readers given ``work``, the carried documents and
    (``balance:``) every new rank's remaining count ``counts``."""
    state = dict(state)
    if isinstance(node, Tokenize):
        reader = node.upstream
        state["upstream"] = reader.state_for_work(work.get(_source_of(node, source), []))
        state["emitted"] = 0
        return state
    if isinstance(node, Mixture):
        state["sources"] = [
            _fill(s, st, work, carried, i) for i, (s, st) in enumerate(zip(node.sources, state["sources"]))
        ]
        return state
    if isinstance(node, CarriedDocuments):
        state.update({k: v for k, v in carried.items() if v is not None})
    if isinstance(node, RankBalance) and counts is not None:
        state["rank_counts"] = list(counts)
    up = getattr(node, "upstream", None)
    if up is not None and "upstream" in state:
        state["upstream"] = _fill(up, state["upstream"], work, carried, source, counts)
    return state


# ------------------------------------------------------------------------------------------ counting
def _zero_documents(rows: np.ndarray, token_docs: list, indexes: dict) -> list[Document]:
    """The carried pieces with all-zero tokens, lengths and groups from the length indexes."""
    order = {src: np.argsort(ix.doc_id, kind="stable") for src, ix in indexes.items()}
    shapes = []  # (doc_id, start, length, group)
    for doc_id, start, n, flags in rows.tolist():
        src = doc_id >> (SHARD_BITS + RECORD_BITS)
        ix = indexes.get(src)
        if ix is None or not len(ix.doc_id):
            raise NotByLengths(f"no length index for source {src}")
        at = order[src][min(np.searchsorted(ix.doc_id, doc_id, sorter=order[src]), len(ix.doc_id) - 1)]
        if int(ix.doc_id[at]) != doc_id:
            raise NotByLengths(f"document {doc_id} is not in its length index")
        length = n if n >= 0 else int(ix.length[at]) - start  # -1: the whole document
        group = int(ix.group[at]) if (flags & GROUP or n < 0) and ix.group[at] != NO_GROUP else None
        shapes.append((doc_id, start, length, group))
    shapes += [(d.doc_id, d.start, len(d.tokens), d.group) for d in token_docs]
    zeros = np.zeros(max([s[2] for s in shapes], default=0), np.int64)
    return [Document(i, zeros[:n], None, "", group=g, start=s) for i, s, n, g in shapes]


def _count_consumer(cfg: dict, ctx: Any, work: dict, rows: np.ndarray, token_docs: list) -> int:
    """Batches of a re-partitioned consumer's chain (``cfg`` without ``balance:``), exactly: fed
    from length indexes like a fresh epoch's count (:mod:`seqpack.counting`), else run for real."""
    if by_lengths_reason(cfg) is None:
        base, indexes = indexed_documents(cfg["tokenizer"]), {}

        def documents_of(reader: Any) -> IndexedDocuments:
            docs = base(reader)
            src = int(getattr(reader, "source_index", 0))
            indexes[src] = docs.index
            # explicit work items: the re-partitioned reader's, for counting
            return IndexedDocuments(docs.reader, docs.index, work.get(src, []))

        try:
            node = build_chain(cfg, ctx, documents_of)
            node.reset(None)
            zero = _zero_documents(rows, token_docs, indexes)
            node.reset(_fill(node, node.state_dict(), {}, _carried_state(rows[:0], zero)))
            return sum(1 for _ in node)
        except NotByLengths:
            pass
    node = build_chain(cfg, ctx)
    node.reset(None)
    node.reset(_fill(node, node.state_dict(), work, _carried_state(rows, token_docs)))
    return sum(1 for _ in node)


def repartition(states: Sequence[Mapping[str, Any]], loader: Any) -> dict:
    """This loader's (rank's) version-2 state after dealing every old consumer's leftovers over
    the new consumers (see the module docstring: documents, ``step``, ``epoch_steps``)."""
    old_ws, old_nw, epoch, between = _check_topology(states)
    W = max(loader.num_workers, 1)
    base = {
        "version": 2, "epoch": epoch, "step": 0, "real_done": False, "padded": 0, "rank": loader.rank,
        "world_size": loader.world_size, "num_workers": loader.num_workers, "next_worker": 0,
        "worker_stats": {}, "skip": None,
    }  # fmt: skip
    if between:
        return {**base, "workers": None}
    ds = loader.dataset
    template = ds.context(loader.rank, 0, epoch)
    left = Leftovers()
    old_w = max(old_nw, 1)
    old_counts: dict[int, list[int]] = {}  # old worker -> every old rank's count (balance: windows)
    for st in sorted(states, key=lambda s: int(s["rank"])):
        chains = st["workers"] if st["workers"] is not None else [None] * old_w
        if len(chains) != old_w:
            raise ValueError(
                f"elastic resume: rank {st['rank']} holds {len(chains)} worker states for {old_w}"
            )
        for w, chain_state in enumerate(chains):
            ctx = dataclasses.replace(
                template, rank=int(st["rank"]), world_size=old_ws, worker_id=w, num_workers=old_w
            )
            node = build_chain(ds.cfg, ctx)
            skip = int(st["skip"][w]) if st.get("skip") is not None else 0
            if chain_state is None or skip:
                # fresh (it had not yielded: its whole share is left), or behind the checkpoint by
                # `skip` delivered batches: make them again, so what is left is exactly the rest
                node.reset(chain_state)
                for _ in range(skip):
                    next(node)
                chain_state = node.state_dict()

            def counts_of(w: int = w, ctx: Any = ctx) -> list[int]:
                if w not in old_counts:
                    old_counts[w] = rank_counts(ds.cfg, ctx)
                return old_counts[w]

            _collect(node, chain_state, left, old_counts=counts_of)
    n_new = loader.world_size * W
    deals = deal(left, n_new)
    # the epoch's step continues from the furthest old rank (DDP: all took the same steps)
    step = max(int(st["step"]) for st in states)
    balance = ds.cfg.get(BALANCE)
    counts = None
    if balance is not None or loader.even_batches == "precount":
        plain = without_balance(ds.cfg)
        counts = [
            _count_consumer(plain, dataclasses.replace(ds.context(c // W, c % W, epoch), config=plain), *deal)
            for c, deal in enumerate(deals)
        ]
    by_worker = [[counts[r * W + w] for r in range(loader.world_size)] for w in range(W)] if counts else None
    out = {**base, "step": step}
    if loader.even_batches == "precount" and by_worker is not None:
        if balance is not None:
            per_rank = validate_balance(balance, loader.world_size)["micro_batches_per_rank"]
            rest = sum(balanced_count(c, per_rank) for c in by_worker)
        else:
            rest = max(sum(c) for c in zip(*by_worker))
        out["epoch_steps"] = step + rest
    workers = []
    for w in range(W):
        work, rows, token_docs = deals[loader.rank * W + w]
        node = build_chain(ds.cfg, ds.context(loader.rank, w, epoch))
        node.reset(None)
        rc = by_worker[w] if balance is not None and by_worker is not None else None
        workers.append(_fill(node, node.state_dict(), work, _carried_state(rows, token_docs), counts=rc))
    return {**out, "workers": workers}
