"""Feature bags for whole-slide-image MIL: one bag of patch features ``[N, D]`` per slide.

A :class:`FeatureBagSource` gives random access to slides by index and knows each bag's length
``N`` and the feature width ``D`` *before* loading any features (read from file headers), so the
PackMIL stage can plan a whole epoch from integers alone and load features only when a batch is
assembled. File formats live in :mod:`seqpack.mil.formats`; :class:`InMemoryBags` holds arrays.

Bad input is reported with the slide id and file: ``N = 0`` bags, a width ``D`` that differs from
the first slide, non-float or non-2-D arrays. Policies for skipping are applied by the stage, which
counts what it skipped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class FeatureBagError(ValueError):
    """A feature bag or label file is malformed; the message names slide id and file."""


def squeeze_batch(arr: np.ndarray) -> np.ndarray:
    """``[1, N, D]`` (as some extractors store bags) -> ``[N, D]``; other arrays unchanged."""
    return arr[0] if arr.ndim == 3 and arr.shape[0] == 1 else arr


def check_shape(shape: tuple, dtype, slide_id: str, where: str) -> tuple[int, int]:
    """``(N, D)`` of a bag of ``shape`` (``[N, D]`` or ``[1, N, D]``) and float ``dtype``; FeatureBagError
    naming the slide and file otherwise."""
    if len(shape) == 3 and shape[0] == 1:  # some extractors store [1, N, D]
        shape = shape[1:]
    if len(shape) != 2:
        raise FeatureBagError(
            f"slide {slide_id!r} ({where}): features must be [N, D], got shape {tuple(shape)}"
        )
    kind = np.dtype(dtype).kind if not isinstance(dtype, str) else dtype
    if kind not in ("f", "bf16"):
        raise FeatureBagError(f"slide {slide_id!r} ({where}): features must be floating point, got {dtype}")
    return int(shape[0]), int(shape[1])


def _as_2d_float(arr: np.ndarray, slide_id: str, where: str) -> np.ndarray:
    arr = squeeze_batch(arr)
    check_shape(arr.shape, arr.dtype, slide_id, where)
    return arr


class FeatureBagSource:
    """Random access to feature bags. Subclasses fill ``slide_ids``, ``lengths`` and implement ``_load``.

    Attributes:
        slide_ids: one string id per slide, in source order.
        lengths: int64 ``[n_slides]``, features per bag (``N``), read from headers.
        dim: feature width ``D`` (every non-empty bag must have it).
    """

    slide_ids: list[str]
    lengths: np.ndarray
    dim: int
    #: ``load`` returns arrays already in memory (no read): callers may gather rows from them directly
    holds_arrays: bool = False

    def __len__(self) -> int:
        return len(self.slide_ids)

    def location(self, i: int) -> str:
        """Where slide ``i`` lives (for error messages)."""
        return "<memory>"

    def load(self, i: int) -> np.ndarray:
        """Features of slide ``i``: float ``[N, D]`` numpy array (float16/float32 as stored; bf16 -> fp32)."""
        arr = _as_2d_float(self._load(i), self.slide_ids[i], self.location(i))
        if arr.shape[0] != self.lengths[i] or (arr.shape[0] > 0 and arr.shape[1] != self.dim):
            raise FeatureBagError(
                f"slide {self.slide_ids[i]!r} ({self.location(i)}): loaded shape {arr.shape} differs from "
                f"header [{self.lengths[i]}, {self.dim}]"
            )
        return arr

    def load_rows(self, i: int, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (int ``[k]``, any order, repeats allowed) of slide ``i``: ``[k, D]``, same values
        as ``load(i)[rows]``. File formats that allow it read only those rows; no shape or value
        checks beyond ``load``'s header check (the stage checks a bag once, on its first full load)."""
        rows = np.asarray(rows, np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.lengths[i]):
            raise IndexError(f"slide {self.slide_ids[i]!r}: rows outside [0, {self.lengths[i]})")
        if len(rows) * 2 < self.lengths[i]:
            part = self._load_rows(i, rows)
            if part is not None:
                return part
        return self.load(i)[rows]

    def _load_rows(self, i: int, rows: np.ndarray) -> np.ndarray | None:
        """Read only ``rows``; None when the format needs a whole read."""
        return None

    def _load(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def _finish(self, ids: list[str], shapes: list[tuple[int, int]]) -> None:
        """Set ``slide_ids``/``lengths``/``dim`` and check ids are unique and widths agree."""
        seen: dict[str, int] = {}
        for i, s in enumerate(ids):
            if s in seen:
                raise FeatureBagError(
                    f"slide id {s!r} appears twice: {self.location(seen[s])} and {self.location(i)}"
                )
            seen[s] = i
        self.slide_ids = list(ids)
        self.lengths = np.array([n for n, _ in shapes], np.int64)
        dims = [(d, i) for i, (n, d) in enumerate(shapes) if n > 0]
        self.dim = dims[0][0] if dims else (shapes[0][1] if shapes else 0)
        for d, i in dims:
            if d != self.dim:
                raise FeatureBagError(
                    f"slide {ids[i]!r} ({self.location(i)}) has feature width D={d}, but slide "
                    f"{ids[dims[0][1]]!r} has D={self.dim}"
                )

    def index_of(self, slide_id: str) -> int:
        if not hasattr(self, "_index"):
            self._index = {s: i for i, s in enumerate(self.slide_ids)}
        return self._index[slide_id]


class InMemoryBags(FeatureBagSource):
    """Bags held as arrays (synthetic data, tests, or features already in RAM)."""

    holds_arrays = True

    def __init__(self, features: Sequence[np.ndarray], slide_ids: Sequence[str] | None = None):
        ids = list(slide_ids) if slide_ids is not None else [f"slide_{i}" for i in range(len(features))]
        if len(ids) != len(features):
            raise ValueError(f"{len(features)} bags but {len(ids)} slide ids")
        self._arrays = [_as_2d_float(np.asarray(f), s, "<memory>") for f, s in zip(features, ids)]
        self._finish(ids, [a.shape for a in self._arrays])

    def _load(self, i: int) -> np.ndarray:
        return self._arrays[i]

    def _load_rows(self, i: int, rows: np.ndarray) -> np.ndarray:
        return self._arrays[i][rows]
