"""Synthetic whole-slide feature bags whose label depends on a few instances (MIL sanity task).

Each slide is a bag of ``N`` patch features ``[N, D]``, background instances ``~ N(0, I)``. Class 0
bags hold only background; a class ``c >= 1`` bag also holds ``max(key_min, round(key_fraction * N))``
*key* instances shifted by ``key_shift`` along a class-specific random unit direction, so a model must
find a few percent of the instances to tell classes apart. Classes are balanced (a permutation of
``i % n_classes``). Bag sizes follow a long tail: ``N ~ lognormal(log(median), sigma)``, rounded and
clipped to ``[n_min, n_max]``.

Used by ``benchmarks/mil.py`` (PANDA-like sizes: median 1,500, sigma 1.2, clip [200, 200,000]) and
``examples/wsi_packmil.py`` (the same task at smaller sizes).
"""

from __future__ import annotations

import numpy as np


def synthetic_feature_bags(
    n_slides: int,
    *,
    dim: int = 64,
    n_classes: int = 3,
    median: float = 1500,
    sigma: float = 1.2,
    n_min: int = 200,
    n_max: int = 200_000,
    key_fraction: float = 0.02,
    key_min: int = 8,
    key_shift: float = 2.5,
    seed: int = 0,
    dtype: type = np.float16,
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Returns ``(bags, labels, sizes)``: ``n_slides`` arrays ``[N_i, dim]`` of ``dtype`` (float16 by
    default, as feature extractors usually write them), int64 class labels ``[n_slides]`` and the bag
    sizes int64 ``[n_slides]``. Deterministic for a given ``seed``."""
    rng = np.random.default_rng(seed)
    sizes = np.clip(np.round(rng.lognormal(np.log(median), sigma, n_slides)), n_min, n_max).astype(np.int64)
    labels = rng.permutation(np.arange(n_slides) % n_classes).astype(np.int64)
    directions = rng.standard_normal((n_classes, dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    bags = []
    for n, y in zip(sizes.tolist(), labels.tolist()):
        x = rng.standard_normal((n, dim), dtype=np.float32)
        if y > 0:
            k = min(n, max(key_min, round(key_fraction * n)))
            x[rng.choice(n, size=k, replace=False)] += key_shift * directions[y]
        bags.append(x.astype(dtype))
    return bags, labels, sizes
