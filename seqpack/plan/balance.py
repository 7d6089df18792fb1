"""Data-parallel cost balancing, the pure part: which micro-batch (or document) each rank gets.

Cost model: a micro-batch of document segments with lengths ``l_i`` costs
``c + a * sum(l_i) + b * sum(l_i ** 2)`` (linear layers scale with tokens, document-masked attention
with the square of each document's length; ``c`` is a fixed per-micro-batch overhead). Assignment
minimizes the largest rank cost while giving every rank the same number of items, because DDP hangs
when ranks run different numbers of steps: when the count does not divide, the stream is padded
with empty, zero-loss micro-batches, never truncated.

Lengths and costs in, assignments out: numpy only (no torch). The loader side (balancing a stream of
batches, the ``balance:`` transform) is :mod:`seqpack.stages.balance`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from seqpack.ops import balance as kernels

METHODS = ("round_robin", "sorted", "lpt", "kk", "best")


class BinLayout(Protocol):
    """What :meth:`CostModel.plan_costs` reads of a :class:`~seqpack.plan.PackPlan`."""

    bin_offsets: np.ndarray  # int64 [n_bins + 1]
    seg_len: np.ndarray  # int64 [n_segments]


class Segmented(Protocol):
    """What :meth:`CostModel.varlen_cost` reads of a :class:`~seqpack.batch.VarlenBatch`."""

    cu_seqlens: Any  # int32 [n + 1]: a CPU torch tensor or a numpy array
    n_real_segments: int


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

    def varlen_cost(self, batch: Segmented) -> float:
        """Cost of a :class:`~seqpack.batch.VarlenBatch` (any object with ``cu_seqlens`` on the CPU and
        ``n_real_segments``), counting only its real segments (padding costs nothing here: it is
        masked out of attention and its cost is the same on every rank)."""
        seqlens = np.diff(np.asarray(batch.cu_seqlens, np.int64))
        return self.batch_cost(seqlens[: batch.n_real_segments])

    def plan_costs(self, plan: BinLayout) -> np.ndarray:
        """float64 ``[n_bins]`` cost of every bin of a :class:`~seqpack.plan.PackPlan`."""
        seg_cost = self.document_costs(plan.seg_len)
        per_bin = np.diff(plan.bin_offsets)
        n_bins = len(per_bin)
        bins = np.repeat(np.arange(n_bins), per_bin)
        costs = np.bincount(bins, weights=seg_cost, minlength=n_bins)
        return costs + self.c * (per_bin > 0)

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


def check_world(world_size: int, rank: int | None = None) -> None:
    """ValueError unless ``world_size`` is a positive integer and ``rank``, when given, is in
    ``[0, world_size)``."""
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
    check_world(world_size)
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


def num_steps(n_micro_batches: int, world_size: int, micro_batches_per_rank: int = 1) -> int:
    """Optimizer steps every rank runs for a stream of ``n_micro_batches`` (known up front)."""
    check_world(world_size)
    return -(-n_micro_batches // (world_size * micro_batches_per_rank))


def balanced_count(rank_counts: Sequence[int], micro_batches_per_rank: int = 1) -> int:
    """Micro-batches every rank yields when each keeps its own ``rank_counts[r]`` micro-batches and
    the short ranks are padded: the largest count rounded up to whole steps."""
    if micro_batches_per_rank <= 0:
        raise ValueError(f"micro_batches_per_rank must be > 0, got {micro_batches_per_rank}")
    most = max((int(c) for c in rank_counts), default=0)
    return -(-most // micro_batches_per_rank) * micro_batches_per_rank


def split_ranks(world_size: int, cp_size: int, rank: int) -> tuple[int, int, int]:
    """``(dp_rank, dp_size, cp_rank)`` of a global ``rank`` when ``world_size`` processes form
    ``world_size // cp_size`` data-parallel groups of ``cp_size`` consecutive ranks (Megatron's
    order: the context-parallel group is the fastest-varying dimension)."""
    check_world(world_size, rank)
    if not isinstance(cp_size, (int, np.integer)) or cp_size <= 0:
        raise ValueError(f"cp_size must be a positive integer, got {cp_size!r}")
    if world_size % cp_size:
        raise ValueError(f"cp_size={cp_size} does not divide world_size={world_size}")
    return rank // cp_size, world_size // cp_size, rank % cp_size


__all__ = ["METHODS", "CostModel", "RankAssignment", "assign_ranks", "balanced_count", "check_world"]
__all__ += ["imbalance"]
__all__ += ["num_steps", "split_ranks", "step_imbalance"]
