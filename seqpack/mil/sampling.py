"""PackMIL's per-slide sampling: how many features each branch gets, and which.

Per slide and epoch: a bag of ``N < small_below`` features is *small*: both branches get the whole
bag (up to the cap); otherwise the main branch gets a uniform ``floor(N * main_fraction)`` of the
features and the residual branch the rest; each branch is capped at ``max_instances`` (features
above the cap are *discarded* and counted). Draws are seeded by ``(seed, epoch, slide)`` only.
"""

from __future__ import annotations

import numpy as np


def branch_sizes(
    n: np.ndarray, *, main_fraction: float, max_instances: int, small_below: int, residual: bool = True
) -> dict[str, np.ndarray]:
    """Features per branch for bags of ``n`` features (int64 arrays, no randomness needed).

    Returns ``main``, ``residual`` (after caps), ``main_all`` (main share before the cap),
    ``discarded`` (over a cap, or the residual share when ``residual=False``) and ``shared`` (small
    bags, counted in both branches). Identity: ``main + residual + discarded - shared == n``.
    """
    n = np.asarray(n, np.int64)
    small = n < small_below
    main_all = np.where(small, n, np.maximum(np.floor(n * main_fraction).astype(np.int64), np.minimum(n, 1)))
    res_all = np.where(small, n, n - main_all)
    main = np.minimum(main_all, max_instances)
    res = np.minimum(res_all, max_instances) if residual else np.zeros_like(n)
    shared = np.where(small & residual, np.minimum(n, max_instances), 0)
    discarded = n - main - res + shared
    return {"main": main, "residual": res, "main_all": main_all, "discarded": discarded, "shared": shared}


def sample_rows(
    n: int,
    slide: int,
    epoch: int,
    seed: int,
    *,
    main_fraction: float,
    max_instances: int,
    small_below: int,
    residual: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a bag of ``n`` features given to ``(main, residual)`` in epoch ``epoch``: seeded by
    ``(seed, epoch, slide)`` only, so independent of order, rank and worker. Rows come sorted (reads
    stay sequential on disk)."""
    sz = branch_sizes(
        np.array([n]),
        main_fraction=main_fraction,
        max_instances=max_instances,
        small_below=small_below,
        residual=residual,
    )
    return draw_rows(n, int(sz["main"][0]), int(sz["residual"][0]), n < small_below, slide, epoch, seed)


def draw_rows(
    n: int, n_main: int, n_res: int, small: bool, slide: int, epoch: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The seeded draw behind ``sample_rows`` given the branch sizes (``branch_sizes``) of the bag."""
    rng = np.random.Generator(np.random.PCG64([seed, epoch, slide]))  # = default_rng(...), less overhead
    if small:
        rows = np.sort(rng.choice(n, n_main, replace=False))
        return rows, rows[:n_res].copy()
    # a uniform draw of n_main + n_res distinct rows, split in order, has the same law as shuffling
    # the bag, splitting at floor(n * p) and capping each side; it costs O(drawn) for huge bags
    take = rng.choice(n, n_main + n_res, replace=False)
    return np.sort(take[:n_main]), np.sort(take[n_main:])
