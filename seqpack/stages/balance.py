"""Data-parallel cost balancing of batch streams: :func:`balance_batches` (an iterable every rank
sees identically, split over ranks) and :class:`RankBalance` (the loader's ``balance:`` transform,
in which every rank keeps and reads only its own batches and ranks exchange only counts and costs).

The planning (cost model, rank assignment, step counts) is :mod:`seqpack.plan.balance`; this module
feeds it the costs of real batches and fills a rank's empty slots with the one zero-loss padding
batch (:func:`seqpack.batch.padding_batch`), so every rank yields the same number of batches.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torchdata.nodes import BaseNode

from seqpack.batch import VarlenBatch, padding_batch
from seqpack.counting import rank_counts
from seqpack.node import Node
from seqpack.plan.balance import CostModel, assign_ranks, check_world
from seqpack.plan.balance_config import BALANCE_KEYS, validate_balance
from seqpack.stages.context import StageContext

# the one zero-loss padding batch lives with the batch type; this name stays for users of seqpack.empty_batch
empty_batch = padding_batch


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


class CountedRanks:
    """Every rank's real micro-batch count per window, derived from each rank's epoch count.

    Needs no communication: ``rank_counts`` come from length indexes
    (:func:`seqpack.counting.rank_counts`), so every rank derives the same step counts. Other ranks'
    costs are unknown (None).
    """

    def __init__(self, rank_counts: Sequence[int]):
        self.rank_counts = [int(c) for c in rank_counts]

    def __call__(
        self, window: int, window_size: int, costs: np.ndarray
    ) -> tuple[list[int], np.ndarray | None]:
        base = window * window_size
        return [min(window_size, max(0, c - base)) for c in self.rank_counts], None


class AllGatherRanks:
    """Every rank's real micro-batch count and costs per window, by one ``all_gather`` of
    ``window_size + 1`` float64 per rank (the count, then the costs, zero-filled)."""

    def __init__(self, world_size: int, device: Any = "cpu"):
        self.world_size, self.device = world_size, device

    def __call__(
        self, window: int, window_size: int, costs: np.ndarray
    ) -> tuple[list[int], np.ndarray | None]:
        mine = np.zeros(window_size + 1, np.float64)
        mine[0], mine[1 : 1 + len(costs)] = len(costs), costs
        sent = torch.from_numpy(mine).to(self.device)
        got = [torch.empty_like(sent) for _ in range(self.world_size)]
        dist.all_gather(got, sent)
        table = torch.stack(got).cpu().numpy()
        return [int(c) for c in table[:, 0]], table[:, 1:]


def _step_costs(table: np.ndarray, counts: Sequence[int], n_steps: int, per_rank: int) -> np.ndarray:
    """float64 ``[world, n_steps]``: each rank's cost per step of a window (its costs sorted, heaviest
    first, cut into steps of ``per_rank``; padding costs 0)."""
    out = np.zeros((len(counts), n_steps * per_rank))
    for r, c in enumerate(counts):
        out[r, :c] = np.sort(table[r, :c])[::-1]
    return out.reshape(len(counts), n_steps, per_rank).sum(2)


def window_steps_order(n_steps: int, seed: Sequence[int]) -> np.ndarray:
    """The seeded order in which a window's steps (heaviest first) are yielded, same on every rank."""
    return np.random.default_rng(list(seed)).permutation(n_steps)


class RankBalance(Node[VarlenBatch]):
    """Step balancing in which every rank keeps its own batches (loader ``balance:``).

    Each rank reads only its own share. The stream is cut into windows of ``window_steps`` steps
    (``window_steps * micro_batches_per_rank`` micro-batches per rank). In a window each rank sorts
    its own micro-batches by cost, heaviest first, and cuts them into steps, so step ``j`` holds
    every rank's ``j``-th heaviest micro-batches: the ranks of one step carry similar costs when
    their shares look alike (the reader's size-balanced partition sees to that). Ranks agree on how
    many steps the window has, the largest real count over ranks rounded up to whole steps, through
    ``exchange`` (an ``all_gather`` of counts and costs, :class:`AllGatherRanks`, or every rank's
    counted total, :class:`CountedRanks`); a rank short of batches fills its lightest slots with
    :func:`empty_batch`. The window's steps are then yielded in a seeded order (same on every rank),
    so long and short steps stay mixed in time.

    State: ``{"upstream": the rank's node state at the current window's start, "window", "pos":
    micro-batches of the window already yielded, "counts"}`` (and ``"rank_counts"``, every rank's
    real micro-batch count, after an elastic resume: :mod:`seqpack.elastic`); resume re-reads that window (no
    batches in the state) and skips ``pos``, so it is exact. Counters: ``balance/steps``,
    ``balance/padding`` (padding micro-batches of this rank) and, with the ``all_gather`` exchange,
    ``balance/cost_max`` and ``balance/cost_mean`` (sums over steps of the slowest and the mean
    rank's cost: their ratio is what a synchronous step waits for).
    """

    def __init__(
        self,
        upstream: BaseNode,
        rank: int,
        world_size: int,
        *,
        cost: CostModel,
        exchange: Callable[[int, int, np.ndarray], tuple[list[int], np.ndarray | None]],
        micro_batches_per_rank: int = 1,
        window_steps: int = 16,
        seed: Sequence[int] = (0,),
        pad_tokens: int = 1,
        pad_id: int = 0,
    ):
        super().__init__()
        check_world(world_size, rank)
        if micro_batches_per_rank <= 0 or window_steps <= 0:
            raise ValueError(
                "micro_batches_per_rank and window_steps must be > 0, "
                f"got {micro_batches_per_rank} and {window_steps}"
            )
        self.upstream, self.rank, self.world_size, self.cost = upstream, rank, world_size, cost
        self.exchange, self.seed = exchange, tuple(int(x) for x in seed)
        self._exchange = exchange  # as built; a state's ``rank_counts`` replaces it (reset)
        self.per_rank = int(micro_batches_per_rank)
        self.window_size = self.per_rank * int(window_steps)
        # padding length until this rank has seen a batch (then its latest window's longest batch)
        self._initial_pad, self.pad_id = int(pad_tokens), int(pad_id)

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        state = initial_state or {}
        if "queue" in state:
            raise ValueError(
                "balance: this checkpoint holds every rank's chain state (seqpack's old balance:, in which "
                "each rank read every rank's data); it cannot resume the per-rank balancing"
            )
        self.upstream.reset(state.get("upstream"))
        # every rank's real micro-batch count from this chain's first window on, when the state names
        # it (an elastic resume counts the re-partitioned chains): exchanged as CountedRanks
        rc = state.get("rank_counts")
        self._rank_counts = None if rc is None else [int(c) for c in rc]
        self.exchange = self._exchange if rc is None else CountedRanks(self._rank_counts)
        # the window in the queue (-1: none pulled yet) and how many of its micro-batches were yielded
        self._window, self._pos = int(state.get("window", -1)), int(state.get("pos", 0))
        self._counts = dict(state.get("counts", {"steps": 0, "padding": 0}))
        self._queue: list[VarlenBatch] = []
        self._start: Any = state.get("upstream")
        self._done = False
        self.pad_tokens = self._start_pad = int(state.get("pad_tokens", self._initial_pad))
        if self._window >= 0:
            try:
                self._pull_window(count=False)  # the same batches and order as before the checkpoint
            except StopIteration:
                self._done = True
            self._queue = self._queue[self._pos :]

    def next(self) -> VarlenBatch:
        if self._done:
            raise StopIteration
        if not self._queue:
            self._window, self._pos, self._start = self._window + 1, 0, self.upstream.state_dict()
            self._start_pad = self.pad_tokens
            try:
                self._pull_window(count=True)
            except StopIteration:
                self._done = True
                raise
        self._pos += 1
        return self._queue.pop(0)

    def pending(self) -> list[VarlenBatch]:
        """The current window's batches not yet yielded (padding included), in order."""
        return list(self._queue)

    def _pull_window(self, *, count: bool) -> None:
        pulled = list(itertools.islice(self.upstream, self.window_size))
        costs = np.array([self.cost.varlen_cost(b) for b in pulled], np.float64)
        counts, table = self.exchange(self._window, self.window_size, costs)
        if counts[self.rank] != len(pulled):
            raise RuntimeError(
                f"balance: rank {self.rank} has {len(pulled)} batches in window {self._window}, the exchange "
                f"says {counts[self.rank]}; the data changed since the count"
            )
        n_steps = -(-max(counts) // self.per_rank)
        if n_steps == 0:
            raise StopIteration
        if pulled:
            self.pad_tokens = max(b.num_tokens for b in pulled)
        by_cost = np.argsort(-costs, kind="stable")
        n_pad = n_steps * self.per_rank - len(pulled)
        slots = [pulled[i] for i in by_cost] + [empty_batch(self.pad_tokens, self.pad_id)] * n_pad
        order = window_steps_order(n_steps, (*self.seed, self._window))
        self._queue = [b for j in order for b in slots[j * self.per_rank : (j + 1) * self.per_rank]]
        if count:
            self._counts["steps"] += n_steps
            self._counts["padding"] += n_pad
            if table is not None:  # every rank's costs are known: how much a step waits for its slowest rank
                step_costs = _step_costs(table, counts, n_steps, self.per_rank)
                self._counts["cost_max"] = self._counts.get("cost_max", 0.0) + float(step_costs.max(0).sum())
                self._counts["cost_mean"] = self._counts.get("cost_mean", 0.0) + float(
                    step_costs.mean(0).sum()
                )

    def get_state(self) -> dict:
        start = self.upstream.state_dict() if self._window < 0 else self._start
        # the padding length as the window started (a window of this rank's without batches reuses it)
        pad = self.pad_tokens if self._window < 0 else self._start_pad
        out = {
            "upstream": start,
            "window": self._window,
            "pos": self._pos,
            "counts": dict(self._counts),
            "pad_tokens": pad,
        }
        if self._rank_counts is not None:
            out["rank_counts"] = list(self._rank_counts)
        return out

    def own_stats(self) -> dict:
        return {f"balance/{k}": v for k, v in self._counts.items()}


def balance_transform(batches: BaseNode, cfg: Mapping[str, Any] | None, ctx: StageContext) -> RankBalance:
    """Loader transform for a ``balance: {world_size, a, b, c, micro_batches_per_rank, window_steps}``
    section: wraps this consumer's own batch node in :class:`RankBalance`.

    Ranks agree on each window's step count by an ``all_gather`` when ``torch.distributed`` is
    initialized and the chain runs in the main process; otherwise (DataLoader workers, no process
    group) from every rank's batch count for this worker, counted from length indexes
    (:func:`seqpack.counting.rank_counts`), without reading other ranks' data.
    """
    cfg = validate_balance(cfg, ctx.world_size)
    in_worker = torch.utils.data.get_worker_info() is not None
    if dist.is_available() and dist.is_initialized() and not in_worker:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        exchange: Any = AllGatherRanks(ctx.world_size, device)
    else:
        exchange = CountedRanks(rank_counts(ctx.config, ctx))
    stage = ctx.config.get("stage", {})
    sizes = [v for v in (stage.get("pad_to"), stage.get("capacity")) if isinstance(v, int) and v > 0]
    return RankBalance(
        batches,
        ctx.rank,
        ctx.world_size,
        cost=CostModel(a=cfg["a"], b=cfg["b"], c=cfg["c"]),
        exchange=exchange,
        micro_batches_per_rank=cfg["micro_batches_per_rank"],
        window_steps=cfg["window_steps"],
        seed=(ctx.seed, ctx.epoch, ctx.worker_id),
        pad_tokens=sizes[0] if sizes else 1,
        pad_id=ctx.pad_id,
    )


__all__ = ["BALANCE_KEYS", "AllGatherRanks", "CountedRanks", "RankBalance", "balance_batches"]
__all__ += ["balance_transform", "empty_batch", "rank_share", "validate_balance", "window_steps_order"]
