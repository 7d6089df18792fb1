"""Work items and the size-balanced partition of one source over ``n`` consumers.

A *work item* is a contiguous range of raw records of one unit: ``(shard, unit, first, stop)``,
``stop`` exclusive, ``-1`` meaning "to the end of the unit". Raw coordinates are row numbers for
record-addressed units (Parquet row groups, Arrow batches, HF chunks, tar samples) and offsets in
the decompressed byte stream for line-based files (see :mod:`seqpack.sources.lines` for the rule
that gives each line to exactly one range).

The partition (:func:`split_work`): lay the units out in the canonical order (the same on every
consumer: shard by shard, optionally permuted per epoch), each with a *size* from metadata
(uncompressed column bytes of a row group, decompressed bytes of a file, ...), and cut the
concatenation into ``n`` pieces of equal size. Consumer ``k`` gets the piece
``[k * total / n, (k + 1) * total / n)``:

- a unit that can be split (its raw extent is known) is cut where the boundary falls, in
  proportion to its size (at most ``n - 1`` cuts over the whole source, so at most ``n - 1``
  units are read by two consumers);
- a unit that cannot be split goes whole to the consumer that holds its middle.

So consumers get equal sizes within one unsplittable unit (or one record), every record belongs
to exactly one consumer, and a source with one big file still feeds every consumer.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from seqpack.sources.paths import spec_text
from seqpack.sources.records import SourceError

WorkItem = tuple[int, int, int, int]  # (shard, unit, first raw, stop raw or -1)


@dataclass(frozen=True)
class UnitSize:
    """One unit of the canonical order.

    Attributes:
        shard: file index in the source.
        unit: unit index in the file.
        size: how much data the unit holds (bytes; any consistent unit works), >= 0.
        extent: raw coordinates in the unit (rows, or decompressed bytes), or None when the unit
            cannot be split (read whole by one consumer).
    """

    shard: int
    unit: int
    size: float
    extent: int | None = None


def split_work(units: Sequence[UnitSize], n: int) -> list[list[WorkItem]]:
    """Every consumer's work items (see the module docstring): ``out[k]`` in canonical order."""
    plans: list[list[WorkItem]] = [[] for _ in range(n)]
    sizes = [max(float(u.size), 0.0) for u in units]
    total = sum(sizes)
    if total <= 0:  # nothing measurable: whole units in turn
        for i, u in enumerate(units):
            plans[i % n].append((u.shard, u.unit, 0, -1))
        return plans
    bounds = [total * k / n for k in range(n)] + [float("inf")]  # the last piece runs to the end
    c0, k = 0.0, 0
    for u, size in zip(units, sizes):
        c1 = c0 + size
        if u.extent is None or u.extent < 2 or size == 0:
            mid = (c0 + c1) / 2
            while k < n - 1 and bounds[k + 1] <= mid:
                k += 1
            plans[k].append((u.shard, u.unit, 0, -1))
        else:
            while k < n - 1 and bounds[k + 1] <= c0:
                k += 1
            j = k
            while j < n:
                lo, hi = max(c0, bounds[j]), min(c1, bounds[j + 1])
                first = 0 if lo <= c0 else _cut(lo, c0, size, u.extent)
                stop = -1 if hi >= c1 else _cut(hi, c0, size, u.extent)
                if stop == -1 or stop > first:
                    plans[j].append((u.shard, u.unit, first, stop))
                if hi >= c1:
                    break
                j += 1
            k = min(j, n - 1)
        c0 = c1
    return plans


def split_by_lengths(units: Sequence[UnitSize], index, n: int) -> list[list[WorkItem]]:
    """Like :func:`split_work`, cut by exact token counts: ``index`` (a
    :class:`~seqpack.sources.lengths.LengthIndex` of the source) gives every record's raw coordinate
    and token length, and each record goes to the consumer holding its middle token, so consumers'
    token counts differ by at most one record (byte sizes only estimate tokens: measured, bytes
    per token vary ~6% between parts of one corpus). A unit's ranges start at the raw coordinate
    of their first indexed record and tile it, so records absent from the index (skipped as bad)
    still belong to exactly one consumer."""
    per_unit = []
    for u in units:
        rows = index.unit_slice(u.shard, u.unit)
        per_unit.append((u, index.raw[rows], index.length[rows]))
    total = float(sum(int(lens.sum()) for _, _, lens in per_unit))
    if total <= 0:
        return split_work(units, n)
    plans: list[list[WorkItem]] = [[] for _ in range(n)]
    c0 = 0.0
    for u, raws, lens in per_unit:
        ends = c0 + np.cumsum(lens, dtype=np.float64)
        mids = ends - lens / 2.0
        owner = np.minimum((mids * n / total).astype(np.int64), n - 1)
        if len(owner) == 0:  # no indexed record: whole, to the consumer at this point
            plans[min(int(c0 * n / total), n - 1)].append((u.shard, u.unit, 0, -1))
            continue
        starts = np.flatnonzero(np.diff(owner, prepend=-1))  # first record of each consumer's run
        for j, at in enumerate(starts):
            first = 0 if j == 0 else int(raws[at])
            stop = -1 if j == len(starts) - 1 else int(raws[starts[j + 1]])
            plans[int(owner[at])].append((u.shard, u.unit, first, stop))
        c0 = float(ends[-1])
    return plans


def _cut(t: float, c0: float, size: float, extent: int) -> int:
    """Raw coordinate of position ``t`` inside a unit spanning ``[c0, c0 + size)``: the same value
    on both sides of a boundary, so neighbouring pieces tile the unit."""
    return min(max(int((t - c0) / size * extent), 0), extent)


def remaining_items(plan: Sequence[WorkItem], pos: int, next_raw: int) -> list[WorkItem]:
    """The items of ``plan`` not yet read at position ``(pos, next_raw)``: the current item
    trimmed to the raw records from ``next_raw`` on, then every later item."""
    if pos >= len(plan):
        return []
    shard, unit, first, stop = plan[pos]
    first = max(first, int(next_raw))
    out = [tuple(it) for it in plan[pos + 1 :]]
    if stop < 0 or first < stop:
        out.insert(0, (shard, unit, first, stop))
    return out  # type: ignore[return-value]


def plan_digest(plan: Sequence[WorkItem]) -> str:
    """A short fingerprint of a plan (saved in the reader state, checked on load)."""
    text = ";".join(",".join(str(int(v)) for v in it) for it in plan)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def check_items(items, units: set[tuple[int, int]], where: str) -> list[WorkItem]:
    """``items`` as a list of int 4-tuples naming existing units; ValueError naming the bad one."""
    out: list[WorkItem] = []
    for i, it in enumerate(items):
        try:
            shard, unit, first, stop = (int(v) for v in it)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: work item {i} is not (shard, unit, first, stop): {it!r}") from None
        if (shard, unit) not in units:
            raise ValueError(
                f"{where}: work item {i} names unit {unit} of shard {shard}, which the files lack"
            )
        if first < 0 or (stop >= 0 and stop < first):
            raise ValueError(f"{where}: work item {i} has an empty or negative range {first}..{stop}")
        out.append((shard, unit, first, stop))
    return out


def reader_state(pos: dict, plan: Sequence[WorkItem], explicit: bool, reader, stats: dict) -> dict:
    """A reader's state: position ``pos`` (``pos``, ``next_raw``) in ``plan``, the unit count,
    consumer and epoch it was made for, the plan's digest, and the plan itself when it is not the
    canonical one of that consumer (``explicit``)."""
    state = {
        **pos,
        "n_units": len(reader.units()),
        "consumer": list(reader.consumer),
        "epoch": reader.epoch,
        "digest": plan_digest(plan),
        "stats": stats,
    }
    if explicit:
        state["plan"] = [list(it) for it in plan]
    return state


def state_plan(
    state: dict, reader, n_units: int, canonical: Callable[[tuple[int, int]], list[WorkItem]]
) -> tuple[list[WorkItem], bool]:
    """``(plan, explicit)`` of a saved reader state, checked against ``reader``'s files (``n_units``
    units now; ``canonical((k, n))`` gives a consumer's canonical plan). ValueError says why not."""
    name = reader.name
    if not isinstance(state, dict) or not {"pos", "next_raw", "n_units", "stats", "digest"} <= set(state):
        raise ValueError(
            f"{name}: not a reader state of this seqpack (keys pos, next_raw, n_units, digest, stats): "
            f"{state!r:.200}"
        )
    if state["n_units"] != n_units:
        raise ValueError(
            f"{name}: saved state has {state['n_units']} units, the files now have {n_units}; "
            "the data changed since the checkpoint"
        )
    if int(state.get("epoch", reader.epoch)) != reader.epoch:
        raise ValueError(
            f"{name}: saved state is of epoch {state['epoch']}, this reader reads epoch {reader.epoch}"
        )
    if state.get("plan") is not None:
        plan, explicit = check_items(state["plan"], set(reader.units()), name), True
    else:
        k, n = (int(v) for v in state.get("consumer", reader.consumer))
        if not 0 <= k < n:
            raise ValueError(f"{name}: saved state names consumer {k} of {n}")
        plan, explicit = canonical((k, n)), False
    if plan_digest(plan) != state["digest"]:
        raise ValueError(
            f"{name}: the partition differs from the checkpoint's (unit sizes changed: the data "
            "changed since the checkpoint)"
        )
    return plan, explicit


def no_data(reader, n_units: int) -> bool:
    """A source without data: SourceError naming it, or (``allow_empty``) a warning and True."""
    what = f"{len(reader.paths)} file(s), {n_units} unit(s), no records"
    if not reader.allow_empty:
        raise SourceError(
            spec_text(reader.spec),
            None,
            None,
            f"source {reader.name!r} resolves to no data ({what}); set allow_empty: true to allow it",
        )
    warnings.warn(f"source {reader.name!r} ({spec_text(reader.spec)}) has no data ({what})", stacklevel=4)
    return True


def warn_few_units(reader, n_units: int) -> None:
    """Warn when a source has fewer units than consumers (units are then split by records)."""
    n = reader.consumer[1]
    if 0 < n_units < n:
        warnings.warn(
            f"source {reader.name!r}: {n_units} unit(s) in {len(reader.paths)} file(s) for {n} "
            "consumers; units are split into record ranges (a compressed file is decompressed "
            "from its start by each consumer with a range of it: more files read faster)",
            stacklevel=4,
        )
