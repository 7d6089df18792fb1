"""Data-parallel cost balancing: which micro-batch (or document) each rank gets.

Cost model (design.md section 4): a micro-batch of document segments with lengths ``l_i`` costs
``c + a * sum(l_i) + b * sum(l_i ** 2)`` (linear layers scale with tokens, document-masked attention
with the square of each document's length; ``c`` is a fixed per-micro-batch overhead). Assignment
minimizes the largest rank cost while giving every rank the same number of items, because DDP hangs
when ranks run different numbers of steps: when the count does not divide, the stream is padded
with empty, zero-loss micro-batches, never truncated.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from torchdata.nodes import BaseNode

from seqpack.batch import VarlenBatch, padding_batch
from seqpack.node import Node
from seqpack.ops import balance as kernels
from seqpack.plan import PackPlan

METHODS = ("round_robin", "sorted", "lpt", "kk", "best")


# ----------------------------------------------------------------------------- cost model
@dataclass(frozen=True)
class CostModel:
    """``cost = c + a * sum(l) + b * sum(l**2)`` per micro-batch, ``l`` in tokens per segment.

    Units are whatever the coefficients were fitted in (seconds from :meth:`fit`, or relative
    FLOPs from :meth:`transformer`). Only the ratio ``b / a`` matters for balancing.
    """

    a: float = 1.0
    b: float = 0.0
    c: float = 0.0

    def __post_init__(self) -> None:
        for name in ("a", "b", "c"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"CostModel.{name} must be finite and >= 0, got {value}")

    @classmethod
    def transformer(cls, hidden_size: int) -> CostModel:
        """FLOP ratio of a dense decoder: per layer, fwd+bwd linear ~ ``72 d^2`` per token and causal
        attention ~ ``6 d l^2`` per document, so ``b / a = 1 / (12 d)`` (``a`` normalized to 1)."""
        if hidden_size <= 0:
            raise ValueError(f"hidden_size must be > 0, got {hidden_size}")
        return cls(a=1.0, b=1.0 / (12.0 * hidden_size))

    def document_costs(self, lengths: Sequence[int] | np.ndarray) -> np.ndarray:
        """float64 ``[n]``: ``a*l + b*l^2`` per document (no per-micro-batch overhead)."""
        lengths = np.asarray(lengths, np.float64)
        return self.a * lengths + self.b * lengths * lengths

    def batch_cost(self, seqlens: Sequence[int] | np.ndarray) -> float:
        """Cost of one micro-batch with these real segment lengths (padding excluded)."""
        seqlens = np.asarray(seqlens, np.float64)
        return float(self.c + self.document_costs(seqlens).sum()) if len(seqlens) else 0.0

    def varlen_cost(self, batch: VarlenBatch) -> float:
        """Cost of a :class:`VarlenBatch`, counting only its real segments (padding costs nothing
        here: it is masked out of attention and its cost is the same on every rank)."""
        return self.batch_cost(batch.seqlens[: batch.n_real_segments].numpy())

    def plan_costs(self, plan: PackPlan) -> np.ndarray:
        """float64 ``[n_bins]`` cost of every bin of a :class:`PackPlan`."""
        seg_cost = self.document_costs(plan.seg_len)
        bins = np.repeat(np.arange(plan.n_bins), np.diff(plan.bin_offsets))
        costs = np.bincount(bins, weights=seg_cost, minlength=plan.n_bins)
        return costs + self.c * (np.diff(plan.bin_offsets) > 0)

    @classmethod
    def fit(
        cls, step_seqlens: Sequence[Sequence[int] | np.ndarray], step_times: Sequence[float]
    ) -> CostModel:
        """Least-squares fit of ``(a, b, c) >= 0`` to measured micro-batch times.

        Args:
            step_seqlens: per measured micro-batch, its real segment lengths (tokens).
            step_times: the measured time of each micro-batch (any unit; the model takes it).

        With three unknowns the non-negative least-squares problem is solved exactly by trying
        every subset of free coefficients and keeping the best non-negative solution.
        """
        if len(step_seqlens) != len(step_times):
            raise ValueError(f"{len(step_seqlens)} micro-batches but {len(step_times)} times")
        if len(step_times) < 3:
            raise ValueError("fitting a, b, c needs at least 3 measured micro-batches")
        s1 = np.array([np.sum(np.asarray(s, np.float64)) for s in step_seqlens])
        s2 = np.array([np.sum(np.asarray(s, np.float64) ** 2) for s in step_seqlens])
        y = np.asarray(step_times, np.float64)
        if not np.isfinite(y).all():
            raise ValueError(f"step_times[{int(np.flatnonzero(~np.isfinite(y))[0])}] is not finite")
        columns = np.stack([s1, s2, np.ones_like(s1)], 1)
        # scale columns so that the solve is well conditioned (sum l^2 is ~1e8 times sum l)
        scale = np.maximum(np.abs(columns).max(0), 1e-300)
        x = columns / scale
        best, best_err = np.zeros(3), float(np.sum(y * y))
        for k in (1, 2, 3):
            for free in itertools.combinations(range(3), k):
                sol, *_ = np.linalg.lstsq(x[:, free], y, rcond=None)
                if (sol < 0).any():
                    continue
                full = np.zeros(3)
                full[list(free)] = sol
                err = float(np.sum((x @ full - y) ** 2))
                if err < best_err - 1e-15 * max(best_err, 1.0):
                    best, best_err = full, err
        a, b, c = best / scale
        return cls(a=float(a), b=float(b), c=float(c))


# ----------------------------------------------------------------------------- assignment
@dataclass
class RankAssignment:
    """Items split over ``world_size`` ranks with ``per_rank`` slots each.

    Attributes:
        rank: int64 ``[n]``, the rank of each item.
        order: int64 ``[world_size, per_rank]``, item indices of each rank in increasing item order
            (so a rank keeps stream order); ``-1`` marks an empty (padding) slot.
        rank_costs: float64 ``[world_size]``, summed item costs per rank.
    """

    rank: np.ndarray
    order: np.ndarray
    rank_costs: np.ndarray

    @property
    def world_size(self) -> int:
        return int(self.order.shape[0])

    @property
    def per_rank(self) -> int:
        return int(self.order.shape[1])

    @property
    def n_padding(self) -> int:
        """Empty slots added so every rank holds ``per_rank`` items."""
        return int((self.order < 0).sum())

    @property
    def imbalance(self) -> float:
        """``max / mean`` rank cost (1.0 is perfect; 1.0 when all costs are zero)."""
        return imbalance(self.rank_costs)


def imbalance(rank_costs: Sequence[float] | np.ndarray) -> float:
    """``max(rank_costs) / mean(rank_costs)``; 1.0 for all-zero costs."""
    rank_costs = np.asarray(rank_costs, np.float64)
    mean = rank_costs.mean()
    return float(rank_costs.max() / mean) if mean > 0 else 1.0


def _check_world(world_size: int, rank: int | None = None) -> None:
    if not isinstance(world_size, (int, np.integer)) or world_size <= 0:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if rank is not None and not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")


def _check_costs(costs) -> np.ndarray:
    costs = np.asarray(costs, np.float64)
    if costs.ndim != 1:
        raise ValueError(f"costs must be 1-D, got shape {costs.shape}")
    bad = ~np.isfinite(costs) | (costs < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"costs must be finite and >= 0; costs[{i}] = {costs[i]}")
    return costs


def _kk_strided(costs_desc: np.ndarray, world_size: int) -> np.ndarray:
    """KK with initial partitions ``{p, p+m, p+2m, ...}`` (``m = n/k``) instead of consecutive
    items: consecutive sorted items have tiny spreads, which leaves too little to difference away
    the heaviest items on heavy-tailed costs; strided groups carry the whole range."""
    n = len(costs_desc)
    m = n // world_size
    perm = np.arange(n).reshape(world_size, m).T.reshape(-1)
    out = np.empty(n, np.int64)
    out[perm] = kernels.kk_assign(np.ascontiguousarray(costs_desc[perm]), world_size)
    return out


def assign_ranks(
    costs: Sequence[float] | np.ndarray,
    world_size: int,
    *,
    method: str = "best",
    per_rank: int | None = None,
) -> RankAssignment:
    """Assign items of the given costs to ``world_size`` ranks, ``per_rank`` items each.

    Args:
        costs: float ``[n]``, non-negative cost per item (micro-batch or document).
        world_size: number of data-parallel ranks (> 0).
        method: ``round_robin`` (item ``i`` to rank ``i % k``, the usual sampler), ``sorted``
            (deal items in decreasing cost round-robin), ``lpt`` (longest processing time first,
            capped at ``per_rank`` items), ``kk`` (balanced Karmarkar-Karp: the better of the
            consecutive and strided initial groupings) or ``best`` (the lowest max rank cost of all
            of these, so never worse than round-robin).
        per_rank: slots per rank; default ``ceil(n / k)``. Missing items are empty slots of zero
            cost, so every rank gets exactly ``per_rank`` (a rank's count never differs).

    Deterministic: ties break by the lower item and rank index.
    """
    _check_world(world_size)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    costs = _check_costs(costs)
    n = len(costs)
    need = -(-n // world_size)
    if per_rank is None:
        per_rank = need
    elif per_rank < need:
        raise ValueError(f"per_rank={per_rank} cannot hold {n} items on {world_size} ranks (need {need})")
    slots = world_size * per_rank
    by_cost = np.argsort(-costs, kind="stable")
    padded = np.zeros(slots, np.float64)
    padded[:n] = costs[by_cost]

    # every candidate is a rank per item in the caller's order
    candidates = []
    if method in ("round_robin", "best"):
        candidates.append(np.arange(n, dtype=np.int64) % world_size)
    if method in ("sorted", "best"):
        candidates.append(_from_sorted(np.arange(n, dtype=np.int64) % world_size, by_cost))
    if method in ("lpt", "best"):
        candidates.append(_from_sorted(kernels.lpt_assign(padded, world_size, per_rank), by_cost))
    if method in ("kk", "best"):
        candidates.append(_from_sorted(kernels.kk_assign(padded, world_size), by_cost))
        candidates.append(_from_sorted(_kk_strided(padded, world_size), by_cost))
    loads = [np.bincount(c, weights=costs, minlength=world_size).max() for c in candidates]
    return _finish(candidates[int(np.argmin(loads))], costs, world_size, per_rank)


def _from_sorted(slot_rank: np.ndarray, by_cost: np.ndarray) -> np.ndarray:
    """Ranks of items given in decreasing-cost order (padding slots after them) -> caller's order."""
    rank = np.empty(len(by_cost), np.int64)
    rank[by_cost] = slot_rank[: len(by_cost)]
    return rank


def _finish(rank: np.ndarray, costs: np.ndarray, world_size: int, per_rank: int) -> RankAssignment:
    order = np.full((world_size, per_rank), -1, np.int64)
    items = np.argsort(rank, kind="stable")  # grouped by rank, item order kept inside a rank
    counts = np.bincount(rank, minlength=world_size)
    if (counts > per_rank).any():  # cannot happen for the built-in methods; guards future ones
        raise AssertionError(f"rank {int(np.argmax(counts))} got {int(counts.max())} > {per_rank} items")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(len(rank)) - np.repeat(starts, counts)
    order[rank[items], slot] = items
    rank_costs = np.bincount(rank, weights=costs, minlength=world_size)
    return RankAssignment(rank=rank, order=order, rank_costs=rank_costs)


def step_imbalance(
    costs: Sequence[float] | np.ndarray, world_size: int, per_rank: int, *, method: str = "best"
) -> np.ndarray:
    """float64 ``[n_steps]``: max/mean rank cost of each step when a stream of micro-batch
    ``costs`` is cut into steps of ``world_size * per_rank`` and each step is assigned on its own
    (the last partial step padded with empty micro-batches)."""
    costs = _check_costs(costs)
    step = world_size * per_rank
    return np.array(
        [
            assign_ranks(costs[s : s + step], world_size, method=method, per_rank=per_rank).imbalance
            for s in range(0, len(costs), step)
        ]
    )


# ----------------------------------------------------------------------------- loader glue
# the one zero-loss padding batch lives with the batch type; this name stays for users of seqpack.empty_batch
empty_batch = padding_batch


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
    _check_world(world_size, rank)
    if micro_batches_per_rank <= 0 or window_steps <= 0:
        raise ValueError(
            "micro_batches_per_rank and window_steps must be > 0, "
            f"got {micro_batches_per_rank} and {window_steps}"
        )
    cost = CostModel(a=a, b=b, c=c)
    step = world_size * micro_batches_per_rank
    window = step * window_steps
    it = iter(batches)
    w = 0
    while True:
        chunk = list(itertools.islice(it, window))
        if not chunk:
            return
        costs = np.array([cost.varlen_cost(x) for x in chunk])
        if window_steps > 1:
            by_cost = np.argsort(-costs, kind="stable")
            steps = [by_cost[s : s + step] for s in range(0, len(chunk), step)]
            rng = np.random.default_rng([seed, w])
            steps = [steps[i] for i in rng.permutation(len(steps))]
        else:
            steps = [np.arange(len(chunk))]
        pad_tokens = max(x.num_tokens for x in chunk)
        for members in steps:
            got = assign_ranks(costs[members], world_size, method=method, per_rank=micro_batches_per_rank)
            for item in got.order[rank]:
                yield chunk[members[item]] if item >= 0 else empty_batch(pad_tokens)
        w += 1


def num_steps(n_micro_batches: int, world_size: int, micro_batches_per_rank: int = 1) -> int:
    """Optimizer steps every rank runs for a stream of ``n_micro_batches`` (known up front)."""
    _check_world(world_size)
    return -(-n_micro_batches // (world_size * micro_batches_per_rank))


def split_ranks(world_size: int, cp_size: int, rank: int) -> tuple[int, int, int]:
    """``(dp_rank, dp_size, cp_rank)`` of a global ``rank`` when ``world_size`` processes form
    ``world_size // cp_size`` data-parallel groups of ``cp_size`` consecutive ranks (Megatron's
    order: the context-parallel group is the fastest-varying dimension)."""
    _check_world(world_size, rank)
    if not isinstance(cp_size, (int, np.integer)) or cp_size <= 0:
        raise ValueError(f"cp_size must be a positive integer, got {cp_size!r}")
    if world_size % cp_size:
        raise ValueError(f"cp_size={cp_size} does not divide world_size={world_size}")
    return rank // cp_size, world_size // cp_size, rank % cp_size


# ----------------------------------------------------------------------------- loader transform
class RankBalance(Node[VarlenBatch]):
    """Lock-step balancing over the batch nodes of every data-parallel rank (loader ``balance:``).

    Each step pulls ``micro_batches_per_rank`` batches from every rank's node (rank ``r``'s
    records, exactly what rank ``r`` would have read unbalanced), assigns the step's
    ``world_size * micro_batches_per_rank`` batches to ranks with :func:`assign_ranks` and yields
    this rank's share. Every rank runs the same computation, so ranks agree without communication;
    the price is that each rank reads and packs every rank's records (``world_size`` times the
    input work), which suits moderate world sizes. When the data runs out, the last step is padded
    with :func:`empty_batch`, so every rank yields the same number of batches.

    State: every rank node's state after the current step's pull plus this rank's batches of the
    step not yet yielded, so resume is exact.
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
        _check_world(len(rank_nodes), rank)
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
        states = [None] * len(self.rank_nodes) if initial_state is None else initial_state["nodes"]
        for node, state in zip(self.rank_nodes, states):
            node.reset(state)
        self._queue: list[VarlenBatch] = [] if initial_state is None else list(initial_state["queue"])
        self._counts = {"steps": 0, "padding": 0} if initial_state is None else dict(initial_state["counts"])

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
        costs = np.array([self.cost.varlen_cost(b) for b in pulled])
        got = assign_ranks(
            costs, len(self.rank_nodes), method=self.method, per_rank=self.micro_batches_per_rank
        )
        pad_tokens = max(b.num_tokens for b in pulled)
        self._queue = [pulled[i] if i >= 0 else empty_batch(pad_tokens) for i in got.order[self.rank]]
        self._counts["steps"] += 1
        self._counts["padding"] += int((got.order[self.rank] < 0).sum())

    def get_state(self) -> dict:
        return {
            "nodes": [node.state_dict() for node in self.rank_nodes],
            "queue": list(self._queue),
            "counts": dict(self._counts),
        }

    def own_stats(self) -> dict:
        return {f"balance/{k}": v for k, v in self._counts.items()}


def balance_transform(batches: BaseNode, cfg: Mapping[str, Any] | None, ctx: Any) -> RankBalance:
    """Loader transform for a ``balance: {world_size, a, b, c, micro_batches_per_rank, method}``
    section: rebuilds every other rank's chain for this worker and wraps them in
    :class:`RankBalance`. ``world_size``, when given, must equal the loader's."""
    cfg = dict(cfg or {})
    unknown = set(cfg) - {"world_size", "a", "b", "c", "micro_batches_per_rank", "method"}
    if unknown:
        raise ValueError(f"balance: unknown keys {sorted(unknown)}")
    world = cfg.get("world_size", ctx.world_size)
    _check_world(world)
    if world != ctx.world_size:
        raise ValueError(f"balance.world_size={world} but the loader runs with world_size={ctx.world_size}")
    cost = CostModel(a=float(cfg.get("a", 1.0)), b=float(cfg.get("b", 0.0)), c=float(cfg.get("c", 0.0)))
    others = {k: v for k, v in ctx.config.items() if k != "balance"}
    if ctx.build_chain is None:
        raise ValueError("balance: the stage context has no build_chain (run it under seqpack.build_loader)")
    nodes = [
        batches if r == ctx.rank else ctx.build_chain(others, replace(ctx, rank=r, config=others))
        for r in range(world)
    ]
    return RankBalance(
        nodes,
        ctx.rank,
        cost=cost,
        micro_batches_per_rank=int(cfg.get("micro_batches_per_rank", 1)),
        method=cfg.get("method", "best"),
    )
