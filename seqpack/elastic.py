"""Elastic resume: every old rank's loader state re-partitioned over a new topology.

What an old consumer (one rank x worker chain) has not delivered yet is exactly

1. its readers' remaining work (``Reader.remaining_work``: the work items, the current one trimmed
   to the records after the position; one list per source), and
2. the documents it holds: the not yet emitted rest of its tokenizer's batch, and every buffered
   piece in its shuffle buffer and stage buffers (found in the chain state as the buffered-document
   formats of :mod:`seqpack.arena` / :mod:`seqpack.refs`; pieces keep their token offsets, so a
   document half delivered by a split is finished, not repeated).

:func:`repartition` collects both over ALL old consumers and deals them over the new consumers
(``n = world_size * max(num_workers, 1)``; item ``i`` of the concatenated lists goes to consumer
``i % n``). Each new consumer starts a fresh chain whose readers read exactly their items
(``Reader.state_for_work``) and whose :class:`~seqpack.sources.carried.CarriedDocuments` node serves
their documents first. So every not-yet-delivered document is delivered exactly once; the shuffle
and mixture restart (fresh RNG for the new consumer, zero counters), and the step count restarts at
0 (the ``precount`` padding policy counts a whole epoch: use ``allreduce`` or ``none`` after an
elastic resume). Counters (``stats()``) restart too.

Any state that cannot be merged is a ValueError saying why (missing ranks, mixed epochs or
topologies, data that changed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from seqpack.arena import Pieces
from seqpack.pipeline import build_chain
from seqpack.refs import is_refs, refs_state
from seqpack.sources.carried import CarriedDocuments
from seqpack.sources.mixture import Mixture
from seqpack.sources.tokenize import Tokenize


@dataclasses.dataclass
class _Leftovers:
    """What the old consumers left: work items per source, pieces by reference, token documents."""

    work: dict[int, list[tuple]] = dataclasses.field(default_factory=dict)
    refs: list[np.ndarray] = dataclasses.field(default_factory=list)  # rows (doc_id, start, len, flags)
    token_docs: list = dataclasses.field(default_factory=list)


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


def _collect_pieces(value: Any, out: _Leftovers) -> None:
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


def _collect(node: Any, state: Mapping | None, out: _Leftovers, source: int = 0) -> None:
    """Walk an old consumer's chain and its state together, collecting what it left."""
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
        return
    if isinstance(node, Mixture):
        for i, (s, st) in enumerate(zip(node.sources, state["sources"])):
            _collect(s, st, out, i)
        return
    _collect_pieces({k: v for k, v in state.items() if k != "upstream"}, out)
    up = getattr(node, "upstream", None)
    if up is not None:
        _collect(up, state.get("upstream") if "upstream" in state else state, out, source)


def _fill(node: Any, state: dict, work: dict[int, list[tuple]], carried: dict, source: int = 0) -> dict:
    """``state`` (a fresh chain state) with the readers given ``work`` and the carried documents."""
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
    up = getattr(node, "upstream", None)
    if up is not None and "upstream" in state:
        state["upstream"] = _fill(up, state["upstream"], work, carried, source)
    return state


def repartition(states: Sequence[Mapping[str, Any]], loader: Any) -> dict:
    """This loader's (rank's) version-2 state after dealing every old consumer's leftovers over
    the new consumers (see the module docstring)."""
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
    left = _Leftovers()
    old_w = max(old_nw, 1)
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
            _collect(node, chain_state, left)
    n_new = loader.world_size * W
    refs = np.concatenate(left.refs) if left.refs else np.zeros((0, 4), np.int64)
    workers = []
    for w in range(W):
        c = loader.rank * W + w
        mine = refs[c::n_new]
        carried = {
            "carried": refs_state(mine[:, 0], mine[:, 1], mine[:, 2], mine[:, 3]) if len(mine) else None,
            "carried_tokens": Pieces.from_documents(left.token_docs[c::n_new]).state_dict()
            if left.token_docs[c::n_new]
            else None,
        }
        work = {src: items[c::n_new] for src, items in left.work.items()}
        node = build_chain(ds.cfg, ds.context(loader.rank, w, epoch))
        node.reset(None)
        workers.append(_fill(node, node.state_dict(), work, carried))
    return {**base, "workers": workers}
