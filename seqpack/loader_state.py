"""The loader's state: checks, the upgrade of older checkpoints, and elastic re-partitioning.

A loader state (``SeqpackLoader.state_dict()``, version 2) names its topology (``rank``,
``world_size``, ``num_workers``) and holds each logical worker's chain state (``workers``) plus
whose batch is next (``next_worker``). The loader restores its workers itself: torchdata's
``StatefulDataLoader`` state is no longer used (its layout is internal, and its per-step worker
snapshots made workers slower than none). Version-1 checkpoints (written through
``StatefulDataLoader``) still load when they were taken with a snapshot at their last step (the
default ``snapshot_every_n_steps=1``).

Elastic resume (:func:`merge_states`): the list of every old rank's state is re-partitioned over
this loader's topology; see :mod:`seqpack.elastic` for how the documents are accounted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from seqpack.elastic import repartition

_KEYS = ("epoch", "step", "real_done", "padded")


def upgrade_v1(state: Mapping[str, Any], num_workers: int) -> dict:
    """A version-1 state (``"dataloader"``: torchdata's) as version 2, or ValueError saying why not."""
    dl = state["dataloader"]
    out = {k: state[k] for k in _KEYS}
    out.update(version=2, next_worker=0, worker_stats=dict(state.get("worker_stats", {})))
    if dl is None:
        out["workers"] = None
        return out
    try:
        if num_workers == 0:
            out["workers"] = [dl["dataset_state"]["chain"]]
            return out
        snap = dl["_snapshot"]
        if int(dl.get("_steps_since_snapshot", 0)) != 0:
            raise ValueError(
                f"it was taken {dl['_steps_since_snapshot']} steps after its last worker snapshot "
                "(snapshot_every_n_steps > 1), and replaying those steps needs torchdata's loader"
            )
        shots = snap["_worker_snapshots"]
        out["workers"] = [shots[f"worker_{w}"]["dataset_state"]["chain"] for w in range(num_workers)]
        out["next_worker"] = (int(snap["_last_yielded_worker_id"]) + 1) % num_workers
    except (KeyError, TypeError) as e:
        raise ValueError(f"version-1 loader state without the expected entry {e}; it cannot be loaded") from e
    return out


def check_state(state: Mapping[str, Any], loader: Any) -> dict:
    """``state`` as a version-2 state this loader can continue from, or ValueError naming the problem."""
    if not isinstance(state, Mapping):
        raise ValueError(
            f"a loader state is a dict (or a list of every rank's dicts), got {type(state).__name__}"
        )
    missing = [k for k in _KEYS if k not in state]
    if missing:
        raise ValueError(f"not a loader state: missing {missing}")
    if "dataloader" in state and "workers" not in state:
        if state["dataloader"] is not None and "_snapshot" in state["dataloader"]:
            nw = len(state["dataloader"]["_snapshot"].get("_worker_snapshots", {}))
        else:
            nw = 0
        if nw != loader.num_workers:
            raise ValueError(
                f"version-1 loader state of {nw} workers, this loader has {loader.num_workers}: load it with "
                f"num_workers={nw} (then save a version-2 state, which may change topology)"
            )
        state = upgrade_v1(state, nw)
    if state.get("version", 2) != 2:
        raise ValueError(f"loader state version {state.get('version')} is newer than this seqpack (2)")
    W = max(loader.num_workers, 1)
    topo = (state.get("rank", loader.rank), state.get("world_size", loader.world_size))
    nw = state.get("num_workers", loader.num_workers)
    if topo != (loader.rank, loader.world_size) or max(int(nw), 1) != W:
        raise ValueError(
            f"loader state of rank {topo[0]} of {topo[1]} with num_workers={nw} does not fit rank "
            f"{loader.rank} of {loader.world_size} with num_workers={loader.num_workers}; resume with the "
            "same world size and num_workers, or pass the list of EVERY old rank's state for an "
            "elastic resume"
        )
    workers = state.get("workers")
    if workers is not None and (not isinstance(workers, Sequence) or len(workers) != W):
        raise ValueError(f"loader state holds {len(workers)} worker states for {W} workers")
    skips = state.get("skip")
    if skips is not None and (
        workers is None or len(skips) != W or any(isinstance(k, bool) or int(k) < 0 for k in skips)
    ):
        raise ValueError(f"loader state: skip={list(skips)} is not one count >= 0 per worker state ({W})")
    nxt = int(state.get("next_worker", 0))
    if not 0 <= nxt < W:
        raise ValueError(f"loader state: next_worker={nxt} is not one of the {W} workers")
    return dict(state)


def merge_states(states: list[Mapping[str, Any]], loader: Any) -> dict:
    """This rank's state after re-partitioning every old rank's state (elastic resume)."""
    if not states:
        raise ValueError("elastic resume needs the list of every old rank's state, got an empty list")
    return repartition(states, loader)
