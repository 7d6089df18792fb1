"""Bucket odds (dataset decomposition, Pouransari et al. Algorithm 1) and the shared bucket draw.

:class:`BucketCurriculum` says how likely each length bucket is to supply the next step;
:class:`BucketSampler` draws the bucket of every step from a seeded RNG shared by all ranks, over
``n_cycles`` cycles, each owning ``1/n_cycles`` of every bucket's batches. Named curricula:
``uniform``, ``grow_linear``, ``grow_p2``; or a custom odds list; or a table of odds rows switching
at given progress.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from seqpack.checks import check_choice, check_int, choices

NAMED_ODDS = ("uniform", "grow_linear", "grow_p2")
WEIGHTINGS = ("odds", "odds_by_mass")
PROGRESS_UNITS = ("steps", "tokens")


def named_odds(name: str, n_buckets: int) -> np.ndarray:
    """Odds of a named curriculum over ``n_buckets`` buckets, shortest bucket first.

    Over D8..D13 these are the paper's rows: ``uniform`` 1 1 1 1 1 1, ``grow_linear`` 6 5 4 3 2 1,
    ``grow_p2`` 32 16 8 4 2 1.
    """
    key = name.lower().replace("-", "_")
    if key == "uniform":
        return np.ones(n_buckets)
    if key == "grow_linear":
        return np.arange(n_buckets, 0, -1, dtype=np.float64)
    if key == "grow_p2":
        return 2.0 ** np.arange(n_buckets - 1, -1, -1, dtype=np.float64)
    raise ValueError(
        f"curriculum.buckets.odds: unknown name {name!r}; allowed: {choices(NAMED_ODDS)} or a list"
    )


def check_odds(values, n_buckets: int, where: str) -> np.ndarray:
    """``values`` as float64 ``[n_buckets]`` odds: finite, >= 0, positive sum; errors name ``where``."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or len(arr) != n_buckets:
        raise ValueError(
            f"{where}: expected {n_buckets} odds (one per bucket), got {list(np.atleast_1d(arr))}"
        )
    bad = np.flatnonzero(~np.isfinite(arr) | (arr < 0))
    if len(bad):
        raise ValueError(f"{where}[{bad[0]}] = {arr[bad[0]]}: odds must be finite and >= 0")
    if arr.sum() <= 0:
        raise ValueError(f"{where}: odds must sum to a positive number, got {list(arr)}")
    return arr


@dataclass
class BucketCurriculum:
    """How likely each length bucket is to supply the next step.

    Args:
        odds: a named curriculum (``uniform``, ``grow_linear``, ``grow_p2``) or one non-negative
            weight per bucket, shortest bucket first.
        n_cycles: the data of every bucket is split into this many equal shares; cycle ``j`` only
            draws from its share, so short-to-long odds repeat ``n_cycles`` times over an epoch.
        weighting: ``odds`` draws bucket ``i`` with ``o_i / sum(o over non-empty buckets)`` (paper
            Algorithm 1); ``odds_by_mass`` multiplies each ``o_i`` by the tokens the bucket still
            holds in the cycle (the authors' code), so ``uniform`` then means uniform over tokens.
        table: optional ``[(at, odds), ...]`` rows sorted by ``at`` (progress units); the row with
            the largest ``at <= t`` is in effect (the first row before that). Overrides ``odds``.
        progress: ``steps`` or ``tokens``: the unit of ``t`` and of ``table``'s ``at``.
    """

    odds: str | Sequence[float] = "uniform"
    n_cycles: int = 1
    weighting: str = "odds"
    table: list[tuple[float, Sequence[float]]] | None = None
    progress: str = "steps"

    def __post_init__(self) -> None:
        check_int(self.n_cycles, "curriculum.buckets.n_cycles", 1)
        check_choice(self.weighting, "curriculum.buckets.weighting", WEIGHTINGS)
        check_choice(self.progress, "curriculum.progress", PROGRESS_UNITS)
        if isinstance(self.odds, str):
            named_odds(self.odds, 1)  # validates the name
        if self.table is not None:
            ats = [float(at) for at, _ in self.table]
            if not ats:
                raise ValueError("curriculum.buckets.table: needs at least one row")
            if any(b < a for a, b in zip(ats, ats[1:])):
                raise ValueError(f"curriculum.buckets.table: 'at' must be non-decreasing, got {ats}")

    def odds_for(self, n_buckets: int) -> np.ndarray:
        """Static odds over ``n_buckets`` (ignores ``table``)."""
        if isinstance(self.odds, str):
            return named_odds(self.odds, n_buckets)
        return check_odds(self.odds, n_buckets, "curriculum.buckets.odds")

    def check(self, n_buckets: int) -> None:
        """Raise if the odds (or any table row) do not fit ``n_buckets`` buckets."""
        self.odds_for(n_buckets)
        for r, (_, row) in enumerate(self.table or []):
            check_odds(row, n_buckets, f"curriculum.buckets.table[{r}].odds")

    def odds_at(self, t: float, n_buckets: int) -> np.ndarray:
        """Raw (unnormalized) odds in effect at progress ``t``."""
        if not self.table:
            return self.odds_for(n_buckets)
        row = self.table[0][1]
        for at, odds in self.table:
            if at <= t:
                row = odds
        return check_odds(row, n_buckets, "curriculum.buckets.table odds")


def draw_index(p: np.ndarray, u: float) -> int:
    """Inverse CDF of ``p`` at ``u`` (one uniform double per draw: the RNG moves the same whatever ``p``)."""
    i = min(int(np.searchsorted(np.cumsum(p), u, side="right")), len(p) - 1)
    while p[i] == 0:  # guard against a float edge at the top of the CDF
        i -= 1
    return i


class BucketSampler:
    """Draws the bucket of every step (same sequence on every rank for the same seed).

    Args:
        batches: full batches available per bucket, int ``[n_buckets]`` (shortest bucket first).
            Cycle ``j`` owns ``batches[i] * (j+1) // n_cycles - batches[i] * j // n_cycles`` of them.
        curriculum: the odds.
        seed: seeds the shared RNG (numpy PCG64).

    A drawn bucket is always non-empty in the current cycle: odds are renormalized over the buckets
    that still have batches in it (``stats["renormalized_draws"]`` counts draws where a bucket with
    positive odds was empty). If every non-empty bucket has zero odds, the draw falls back to
    weighting by remaining batches (``stats["zero_odds_fallbacks"]``) so no data is stranded. A cycle
    ends when its share is used up; ``next`` returns ``None`` after the last cycle.
    """

    def __init__(
        self,
        batches: Sequence[int] | np.ndarray,
        curriculum: BucketCurriculum | None = None,
        *,
        seed: int = 0,
    ):
        batches = np.asarray(batches, np.int64)
        if batches.ndim != 1 or (batches < 0).any():
            raise ValueError(f"batches must be a 1-D array of counts >= 0, got {batches}")
        self.curriculum = curriculum or BucketCurriculum()
        self.curriculum.check(len(batches))
        c = self.curriculum.n_cycles
        cuts = np.stack([batches * j // c for j in range(c + 1)])  # [c+1, n_buckets]
        self.remaining = (cuts[1:] - cuts[:-1]).astype(np.int64)  # [n_cycles, n_buckets]
        self.cycle = 0
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.stats = {"draws": 0, "renormalized_draws": 0, "zero_odds_fallbacks": 0}

    @property
    def n_buckets(self) -> int:
        return self.remaining.shape[1]

    @property
    def steps_left(self) -> int:
        return int(self.remaining[self.cycle :].sum())

    def probabilities(self, t: float) -> np.ndarray | None:
        """Draw probabilities over buckets at progress ``t`` in the current cycle (None when done)."""
        while self.cycle < len(self.remaining) and self.remaining[self.cycle].sum() == 0:
            self.cycle += 1
        if self.cycle >= len(self.remaining):
            return None
        left = self.remaining[self.cycle]
        odds = self.curriculum.odds_at(t, self.n_buckets)
        weights = odds * (left > 0)
        if self.curriculum.weighting == "odds_by_mass":
            weights = weights * left  # every batch holds the same tokens, so mass ∝ batches left
        if weights.sum() <= 0:
            return left / left.sum()
        return weights / weights.sum()

    def next(self, t: float = 0.0) -> int | None:
        """Draw the bucket index of the next step at progress ``t``; ``None`` when every cycle is used."""
        p = self.probabilities(t)
        if p is None:
            return None
        left = self.remaining[self.cycle]
        odds = self.curriculum.odds_at(t, self.n_buckets)
        if ((odds > 0) & (left == 0)).any():
            self.stats["renormalized_draws"] += 1
        if (odds * (left > 0)).sum() <= 0:
            self.stats["zero_odds_fallbacks"] += 1
        i = draw_index(p, self.rng.random() * p.sum())
        self.remaining[self.cycle, i] -= 1
        self.stats["draws"] += 1
        return i

    def state_dict(self) -> dict:
        return {
            "remaining": self.remaining.tolist(),
            "cycle": self.cycle,
            "rng": self.rng.bit_generator.state,
            "stats": dict(self.stats),
        }

    def load_state_dict(self, state: Mapping) -> None:
        remaining = np.asarray(state["remaining"], np.int64)
        if remaining.shape != self.remaining.shape:
            raise ValueError(
                f"state has cycles x buckets {remaining.shape}, sampler has {self.remaining.shape}"
            )
        self.remaining = remaining
        self.cycle = int(state["cycle"])
        self.rng.bit_generator.state = state["rng"]
        self.stats = dict(state["stats"])


def draw_ready_bucket(
    rng: np.random.Generator,
    odds: np.ndarray,
    ready: np.ndarray,
    mass: np.ndarray | None,
    allowed: np.ndarray | None,
    counts: dict,
) -> int:
    """Draw one bucket among ``ready`` ones with the curriculum ``odds`` (times ``mass`` when given).

    The streaming stages' draw (buckets that can fill a batch now, no epoch known up front).
    ``allowed`` (a max-length cap) restricts the draw; when no ready bucket is allowed the cap is
    lifted for this draw and counted (``over_cap_draws``). Positive odds on a bucket that cannot
    fill a batch are renormalized away (``renormalized_draws``); zero odds on every candidate fall
    back to uniform (``zero_odds_fallbacks``). One uniform double per draw, whatever the odds.
    """
    cand = ready.copy()
    if allowed is not None:
        if (ready & allowed).any():
            cand &= allowed
        else:
            counts["over_cap_draws"] += 1
    w = odds * cand
    if mass is not None:
        w = w * mass
    if ((odds > 0) & ~ready).any():
        counts["renormalized_draws"] += 1
    if w.sum() <= 0:
        counts["zero_odds_fallbacks"] += 1
        w = cand.astype(np.float64)
    counts["draws"] += 1
    return draw_index(w / w.sum(), rng.random())
