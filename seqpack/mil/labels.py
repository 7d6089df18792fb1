"""Slide labels for MIL: the label CSV (:func:`read_labels`, :class:`LabelTable`) and the labels of
PackMIL's hyperslides, composed from their constituent slides' labels.

A labels CSV has one slide-id column and either one label column (single-label; class names or
integers), several 0/1 columns (multi-label), or a time-bin and a censorship column (survival).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from seqpack.mil.bags import FeatureBagError

LABEL_MODES = ("soft", "max", "multi_hot")
SURVIVAL = "survival"


@dataclass
class LabelTable:
    """Slide labels from a CSV.

    Attributes:
        slide_ids: row ids in file order.
        labels: int64 ``[n]`` class indices (single-label), int64 ``[n, C]`` 0/1 (multi-label), or int64
            ``[n, 2]`` ``(time bin, censorship)`` for survival (censorship 1 = censored, 0 = event).
        classes: class names; index ``k`` of ``labels`` means ``classes[k]`` (survival: the time bins
            ``"0" .. "K-1"``).
        multi_label: whether ``labels`` is multi-hot.
        survival: whether ``labels`` holds ``(time bin, censorship)`` pairs.
    """

    slide_ids: list[str]
    labels: np.ndarray
    classes: list[str]
    multi_label: bool
    path: str = "<memory>"
    survival: bool = False
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._index = {s: i for i, s in enumerate(self.slide_ids)}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __contains__(self, slide_id: str) -> bool:
        return slide_id in self._index

    def get(self, slide_id: str) -> np.ndarray:
        """Label of one slide (int64 scalar array or ``[C]``); ``KeyError`` naming the slide if missing."""
        if slide_id not in self._index:
            raise KeyError(f"slide {slide_id!r} has no row in label file {self.path}")
        return self.labels[self._index[slide_id]]

    def batch_labels(self, rows: Sequence[np.ndarray]) -> torch.Tensor:
        """Labels of a batch's bags from their rows (as :meth:`get` returns them): int64 ``[n]``
        class indices, float32 ``[n, C]`` multi-hot, or int64 ``[n, 2]`` survival pairs."""
        if self.survival:
            return torch.from_numpy(np.array(rows, np.int64).reshape(-1, 2))
        if self.multi_label:
            arr = (
                np.stack(rows).astype(np.float32)
                if len(rows)
                else np.zeros((0, self.num_classes), np.float32)
            )
            return torch.from_numpy(arr)
        return torch.from_numpy(np.array(rows, np.int64).reshape(-1))

    def hyperslide_labels(self, groups: Sequence[tuple[np.ndarray, np.ndarray]], mode: str) -> torch.Tensor:
        """Labels of hyperslides, one per ``(rows, weights)`` group: the constituent slides' label
        rows ``[k, ...]`` and the features each contributed ``[k]``. Survival tables use
        :func:`compose_survival_label`, others :func:`compose_labels` with ``mode``: int64 ``[n, 2]``
        or float32 ``[n, C]``."""
        if self.survival:
            out = [compose_survival_label(lab[:, 0], lab[:, 1]) for lab, _ in groups]
            empty = np.zeros((0, 2), np.int64)
        else:
            out = [compose_labels(lab, w, self.num_classes, mode) for lab, w in groups]
            empty = np.zeros((0, self.num_classes), np.float32)
        return torch.from_numpy(np.stack(out) if out else empty)


def read_labels(
    path: str | os.PathLike,
    *,
    id_column: str = "slide_id",
    label_columns: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    time_column: str | None = None,
    censor_column: str | None = None,
    n_bins: int | None = None,
) -> LabelTable:
    """Read a labels CSV: ``id_column`` plus one label column (single-label) or several 0/1 columns
    (multi-label). By default every other column is a label column.

    Survival labels: pass ``time_column`` (discrete time bin, an integer ``0 .. K-1``) and
    ``censor_column`` (``1`` = censored, ``0`` = event observed; the CLAM/PORPOISE ``censorship``
    convention); ``n_bins`` fixes ``K`` (default: largest bin + 1). Other columns are ignored.

    Single-label values are class names; ``classes`` fixes their order, else integers sort
    numerically and names alphabetically. Errors name the file, row (1-based, header = row 1) and column.
    """
    path = Path(path)
    survival = time_column is not None or censor_column is not None
    if survival and (time_column is None or censor_column is None):
        raise ValueError("survival labels need both time_column and censor_column")
    if survival:
        label_columns = [time_column, censor_column]
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        if id_column not in header:
            raise FeatureBagError(f"{path}: no {id_column!r} column (columns: {header})")
        cols = list(label_columns) if label_columns is not None else [c for c in header if c != id_column]
        missing = [c for c in cols if c not in header]
        if not cols or missing:
            raise FeatureBagError(f"{path}: label columns {missing or cols} not in header {header}")
        ids: list[str] = []
        raw: list[list[str]] = []
        seen: dict[str, int] = {}
        for rowno, row in enumerate(reader, start=2):
            sid = (row.get(id_column) or "").strip()
            if not sid:
                raise FeatureBagError(f"{path} row {rowno}: empty {id_column!r}")
            if sid in seen:
                raise FeatureBagError(
                    f"{path} row {rowno}: slide {sid!r} already labelled at row {seen[sid]}"
                )
            seen[sid] = rowno
            vals = []
            for c in cols:
                v = (row.get(c) or "").strip()
                if not v:
                    raise FeatureBagError(
                        f"{path} row {rowno}, column {c!r}: missing label for slide {sid!r}"
                    )
                vals.append(v)
            ids.append(sid)
            raw.append(vals)
    if survival:
        return _survival_table(path, ids, raw, seen, time_column, censor_column, n_bins)
    if len(cols) == 1:
        values = [r[0] for r in raw]
        if classes is None:
            uniq = set(values)
            try:
                classes = [str(v) for v in sorted(uniq, key=int)]
            except ValueError:
                classes = sorted(uniq)
        lookup = {c: k for k, c in enumerate(classes)}
        labels = np.empty(len(values), np.int64)
        for i, v in enumerate(values):
            if v not in lookup:
                raise FeatureBagError(
                    f"{path} row {seen[ids[i]]}: slide {ids[i]!r} has label {v!r} not in {list(classes)}"
                )
            labels[i] = lookup[v]
        return LabelTable(ids, labels, list(classes), False, str(path))
    labels = np.empty((len(raw), len(cols)), np.int64)
    for i, r in enumerate(raw):
        for j, v in enumerate(r):
            if v not in ("0", "1"):
                raise FeatureBagError(
                    f"{path} row {seen[ids[i]]}, column {cols[j]!r}: multi-label value must be 0 or 1, "
                    f"got {v!r}"
                )
            labels[i, j] = int(v)
    return LabelTable(ids, labels, list(cols), True, str(path))


def _survival_table(
    path: Path,
    ids: list[str],
    raw: list[list[str]],
    seen: dict[str, int],
    time_column: str,
    censor_column: str,
    n_bins: int | None,
) -> LabelTable:
    labels = np.empty((len(raw), 2), np.int64)
    for i, (t, c) in enumerate(raw):
        row = seen[ids[i]]
        try:
            labels[i, 0] = int(t)
        except ValueError:
            raise FeatureBagError(
                f"{path} row {row}, column {time_column!r}: time bin must be an integer, got {t!r}"
            ) from None
        if labels[i, 0] < 0 or (n_bins is not None and labels[i, 0] >= n_bins):
            raise FeatureBagError(
                f"{path} row {row}, column {time_column!r}: time bin {t} outside [0, {n_bins or 'inf'})"
            )
        if c not in ("0", "1"):
            raise FeatureBagError(
                f"{path} row {row}, column {censor_column!r}: censorship must be 0 (event) or 1 (censored), "
                f"got {c!r}"
            )
        labels[i, 1] = int(c)
    k = n_bins if n_bins is not None else (int(labels[:, 0].max()) + 1 if len(labels) else 0)
    return LabelTable(ids, labels, [str(b) for b in range(k)], False, str(path), survival=True)


def compose_labels(
    labels: np.ndarray, weights: np.ndarray, num_classes: int, mode: str = "soft"
) -> np.ndarray:
    """Label of a hyperslide from its constituent slides' labels.

    Args:
        labels: int ``[k]`` class indices (single-label) or 0/1 ``[k, C]`` (multi-label).
        weights: ``[k]`` features each slide contributed.
        mode: ``soft``: ``sum_i w_i * y_i / sum_i w_i`` (a distribution for single-label; per-class
            weighted fraction for multi-label); ``max``: ``sum_i w_i * y_i`` divided by its max
            (PackMIL's normalization; take the argmax for single-label losses); ``multi_hot``: 1 for
            every class any constituent has.

    Returns float32 ``[C]``.
    """
    if mode not in LABEL_MODES:
        raise ValueError(f"mode must be one of {LABEL_MODES}, got {mode!r}")
    labels = np.asarray(labels)
    w = np.asarray(weights, np.float64)
    if len(w) == 0 or (w <= 0).any():
        raise ValueError("compose_labels needs at least one constituent, with positive weights")
    hot = labels.astype(np.float64) if labels.ndim == 2 else np.eye(num_classes)[labels.astype(np.int64)]
    if mode == "multi_hot":
        return (hot.max(0) > 0).astype(np.float32)
    y = (w[:, None] * hot).sum(0)
    y = y / (w.sum() if mode == "soft" else max(y.max(), 1e-12))
    return y.astype(np.float32)


def compose_survival_label(time_bins: np.ndarray, censored: np.ndarray) -> np.ndarray:
    """Survival label ``(time bin, censorship)`` of a hyperslide from its constituent slides.

    PackMIL's rule: the smallest *uncensored* time bin, as an event (censorship 0): the hyperslide
    stands for its slides together, and its first observed event is the earliest event among them.
    When every constituent is censored there is no event to take; the hyperslide is censored at the
    smallest censoring bin (each slide is known event-free up to its own censoring time, so the group's
    first event is only known to lie after the earliest of them).

    Args:
        time_bins: int ``[k]`` discrete time bins; censored: ``[k]`` 1 = censored, 0 = event.

    Returns int64 ``[2]``.
    """
    t = np.asarray(time_bins, np.int64)
    c = np.asarray(censored, np.int64)
    if len(t) == 0 or len(t) != len(c):
        raise ValueError("compose_survival_label needs at least one constituent, times and censorship alike")
    events = t[c == 0]
    if len(events):
        return np.array([events.min(), 0], np.int64)
    return np.array([t.min(), 1], np.int64)
