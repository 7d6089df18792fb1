"""Data-parallel cost balancing of batch streams: :func:`balance_batches` (an iterable every rank
sees identically) and :class:`RankBalance` (the loader's ``balance:`` transform).

The planning (cost model, rank assignment) is :mod:`seqpack.plan.balance`; this module only feeds
it the costs of real batches and fills a rank's empty slots with the one zero-loss padding batch
(:func:`seqpack.batch.padding_batch`), so every rank yields the same number of batches.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from torchdata.nodes import BaseNode

from seqpack.batch import VarlenBatch, padding_batch
from seqpack.checks import ConfigError, check_choice, check_float, check_int, check_keys, check_mapping
from seqpack.node import Node
from seqpack.plan.balance import METHODS, CostModel, assign_ranks, check_world
from seqpack.stages.context import StageContext

# the one zero-loss padding batch lives with the batch type; this name stays for users of seqpack.empty_batch
empty_batch = padding_batch

BALANCE_KEYS = ("world_size", "a", "b", "c", "micro_batches_per_rank", "method")


def rank_share(
    batches: Sequence[VarlenBatch],
    costs: np.ndarray,
    world_size: int,
    rank: int,
    *,
    per_rank: int,
    method: str,
    pad_tokens: int,
) -> tuple[list[VarlenBatch], int]:
    """``rank``'s ``per_rank`` batches of one step and how many of them are padding.

    Args:
        batches: the step's micro-batches (at most ``world_size * per_rank``), identical on every rank.
        costs: float64 ``[len(batches)]``, their costs.
        pad_tokens: length (tokens) of the padding batch filling an empty slot.
    """
    got = assign_ranks(costs, world_size, method=method, per_rank=per_rank)
    mine = got.order[rank]
    return [batches[i] if i >= 0 else empty_batch(pad_tokens) for i in mine], int((mine < 0).sum())


def balance_batches(
    batches: Iterable[VarlenBatch],
    world_size: int,
    rank: int,
    a: float = 1.0,
    b: float = 0.0,
    *,
    c: float = 0.0,
    micro_batches_per_rank: int = 1,
    window_steps: int = 1,
    method: str = "best",
    seed: int = 0,
) -> Iterator[VarlenBatch]:
    """This rank's micro-batches from a global stream that every rank sees identically.

    The stream is cut into windows of ``window_steps`` optimizer steps; a step is
    ``world_size * micro_batches_per_rank`` micro-batches. Inside a window, micro-batches are
    sorted by cost and cut into steps (so one step holds micro-batches of similar cost: with one
    micro-batch per rank this is the only balancing possible), the steps are put in a seeded
    random order, and each step's micro-batches are assigned to ranks with ``method``. Every rank
    yields exactly ``micro_batches_per_rank`` batches per step; the stream's last step is padded
    with :func:`empty_batch` (shaped like the window's longest batch), never truncated.

    ``window_steps=1`` keeps the stream's step boundaries (only the rank split changes).
    """
    check_world(world_size, rank)
    if micro_batches_per_rank <= 0 or window_steps <= 0:
        raise ValueError(
            "micro_batches_per_rank and window_steps must be > 0, "
            f"got {micro_batches_per_rank} and {window_steps}"
        )
    cost = CostModel(a=a, b=b, c=c)
    step = world_size * micro_batches_per_rank
    window = step * window_steps
    it = iter(batches)
    for w in itertools.count():
        chunk = list(itertools.islice(it, window))
        if not chunk:
            return
        costs = np.array([cost.varlen_cost(x) for x in chunk])
        if window_steps > 1:
            # similar costs share a step; the seeded order keeps long and short steps mixed in time
            by_cost = np.argsort(-costs, kind="stable")
            steps = [by_cost[s : s + step] for s in range(0, len(chunk), step)]
            rng = np.random.default_rng([seed, w])
            steps = [steps[i] for i in rng.permutation(len(steps))]
        else:
            steps = [np.arange(len(chunk))]
        pad_tokens = max(x.num_tokens for x in chunk)
        for members in steps:
            mine, _ = rank_share(
                [chunk[i] for i in members],
                costs[members],
                world_size,
                rank,
                per_rank=micro_batches_per_rank,
                method=method,
                pad_tokens=pad_tokens,
            )
            yield from mine


class RankBalance(Node[VarlenBatch]):
    """Lock-step balancing over the batch nodes of every data-parallel rank (loader ``balance:``).

    Each step pulls ``micro_batches_per_rank`` batches from every rank's node (rank ``r``'s
    records, exactly what rank ``r`` would have read unbalanced), assigns the step's
    ``world_size * micro_batches_per_rank`` batches to ranks with :func:`assign_ranks` and yields
    this rank's share. Every rank runs the same computation, so ranks agree without communication;
    the price is that each rank reads and packs every rank's records (``world_size`` times the
    input work), which suits moderate world sizes. When the data runs out, the last step is padded
    with :func:`empty_batch`, so every rank yields the same number of batches.

    State: ``{"upstream": [state of every rank's node after the current step's pull], "queue":
    this rank's batches of the step not yet yielded (at most micro_batches_per_rank), "counts"}``,
    so resume is exact. States saved under the old key ``"nodes"`` load too.
    """

    def __init__(
        self,
        rank_nodes: Sequence[BaseNode],
        rank: int,
        *,
        cost: CostModel,
        micro_batches_per_rank: int = 1,
        method: str = "best",
    ):
        super().__init__()
        check_world(len(rank_nodes), rank)
        if micro_batches_per_rank <= 0:
            raise ValueError(f"micro_batches_per_rank must be > 0, got {micro_batches_per_rank}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.rank_nodes = list(rank_nodes)
        self.rank, self.cost, self.method = rank, cost, method
        self.micro_batches_per_rank = int(micro_batches_per_rank)
        self.upstream = self.rank_nodes[rank]  # stats() of the rank's own chain

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        state = initial_state or {}
        states = state.get("upstream", state.get("nodes")) or [None] * len(self.rank_nodes)
        for node, node_state in zip(self.rank_nodes, states):
            node.reset(node_state)
        self._queue: list[VarlenBatch] = list(state.get("queue", []))
        self._counts = dict(state.get("counts", {"steps": 0, "padding": 0}))

    def next(self) -> VarlenBatch:
        if not self._queue:
            self._pull_step()
        return self._queue.pop(0)

    def _pull_step(self) -> None:
        pulled: list[VarlenBatch] = []
        for node in self.rank_nodes:
            for _ in range(self.micro_batches_per_rank):
                try:
                    pulled.append(next(node))
                except StopIteration:
                    break
        if not pulled:
            raise StopIteration
        self._queue, n_padding = rank_share(
            pulled,
            np.array([self.cost.varlen_cost(b) for b in pulled]),
            len(self.rank_nodes),
            self.rank,
            per_rank=self.micro_batches_per_rank,
            method=self.method,
            pad_tokens=max(b.num_tokens for b in pulled),
        )
        self._counts["steps"] += 1
        self._counts["padding"] += n_padding

    def get_state(self) -> dict:
        return {
            "upstream": [node.state_dict() for node in self.rank_nodes],
            "queue": list(self._queue),
            "counts": dict(self._counts),
        }

    def own_stats(self) -> dict:
        return {f"balance/{k}": v for k, v in self._counts.items()}


def validate_balance(section: Mapping[str, Any] | None, world_size: int) -> dict[str, Any]:
    """The ``balance:`` section checked and completed with defaults; ConfigError naming ``balance.<key>``.

    ``world_size``, when given, must equal the loader's ``world_size``.
    """
    cfg = dict(check_mapping(section or {}, "balance"))
    check_keys(cfg, BALANCE_KEYS, "balance")
    out: dict[str, Any] = {
        "world_size": check_int(cfg.get("world_size", world_size), "balance.world_size", minimum=1),
        "micro_batches_per_rank": check_int(
            cfg.get("micro_batches_per_rank", 1), "balance.micro_batches_per_rank", minimum=1
        ),
        "method": check_choice(cfg.get("method", "best"), "balance.method", METHODS),
    }
    if out["world_size"] != world_size:
        raise ConfigError(
            f"balance.world_size: {out['world_size']} but the loader runs with world_size={world_size}"
        )
    for key, default in (("a", 1.0), ("b", 0.0), ("c", 0.0)):
        value = check_float(cfg.get(key, default), f"balance.{key}", minimum=0.0)
        if not math.isfinite(value):
            raise ConfigError(f"balance.{key}: must be finite, got {value}")
        out[key] = value
    return out


def balance_transform(batches: BaseNode, cfg: Mapping[str, Any] | None, ctx: StageContext) -> RankBalance:
    """Loader transform for a ``balance: {world_size, a, b, c, micro_batches_per_rank, method}``
    section: rebuilds every other rank's chain for this worker and wraps them in
    :class:`RankBalance`. ``world_size``, when given, must equal the loader's."""
    cfg = validate_balance(cfg, ctx.world_size)
    if ctx.build_chain is None:
        raise ValueError("balance: the stage context has no build_chain (run it under seqpack.build_loader)")
    others = {k: v for k, v in ctx.config.items() if k != "balance"}
    nodes = [
        batches if r == ctx.rank else ctx.build_chain(others, replace(ctx, rank=r, config=others))
        for r in range(ctx.world_size)
    ]
    return RankBalance(
        nodes,
        ctx.rank,
        cost=CostModel(a=cfg["a"], b=cfg["b"], c=cfg["c"]),
        micro_batches_per_rank=cfg["micro_batches_per_rank"],
        method=cfg["method"],
    )


__all__ = ["BALANCE_KEYS", "RankBalance", "balance_batches", "balance_transform", "empty_batch"]
__all__ += ["rank_share", "validate_balance"]
