"""Base of every file reader: shard listing, size-balanced partition, position, fetch, errors.

A source is a list of shards (files, in sorted glob order). Each shard has one or more *units*
(a Parquet row group, an Arrow record batch, a chunk of an HF dataset, a whole JSON-lines or
text file). The canonical order of units is shard by shard, optionally permuted per epoch with a
seed (shard-order shuffling); it is the same on every rank and worker.

Partition over ``n`` consumers (``world_size * max(num_workers, 1)``): each consumer reads a list
of *work items* ``(shard, unit, first, stop)`` (contiguous ranges of raw records; byte ranges of
the decompressed stream for line files, see :mod:`seqpack.sources.lines`), cut from the canonical
order by unit sizes read from metadata (:mod:`seqpack.sources.partition`), so consumers get
near-equal data and each record belongs to exactly one consumer. A source with fewer units than
consumers is split inside units, with a warning.

State: ``(pos, next_raw)`` = index of the current work item and the next raw coordinate in its
unit, plus the consumer, epoch and a digest of the plan; a state whose unit count, consumer or
plan does not match the files gives ValueError. Elastic resume re-partitions work items:
:meth:`Reader.remaining_work` ``(state)`` lists the items a consumer's state has not read yet,
:meth:`Reader.state_for_work` ``(items)`` makes a state that reads exactly those (the state then
carries them as an explicit ``plan``). :meth:`Reader.fetch` ``(doc_ids)`` re-reads records by
global doc id (each shard opened once; Parquet reads only the row groups and rows it needs).

Readers whose units can be served as columns (pre-tokenized Parquet/Arrow/HF) implement
:meth:`Reader.unit_block`; :meth:`Reader.next_block` then hands out many records per call as a
:class:`~seqpack.sources.blocks.DocBlock` (same records, same positions as ``next()``).

Bad input: a per-record problem is counted (``on_error="skip"``) by the record's consumer; a
whole-file problem by exactly one consumer: the shard's owner (``shard % n``) when it fails to
open, else the owner of the position where reading failed. A source that resolves to no data is
an error naming it unless ``allow_empty`` (then a warning, counted as ``empty_sources``);
``expect_files`` (the files resolved at epoch 0) makes a lost file an error naming it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from seqpack.checks import check_bool, check_choice, check_int
from seqpack.node import Node
from seqpack.sources.ahead import read_unit_block
from seqpack.sources.blocks import DocBlock, collect_block
from seqpack.sources.fields import FieldSpec
from seqpack.sources.partition import (
    UnitSize,
    WorkItem,
    check_items,
    no_data,
    reader_state,
    remaining_items,
    split_by_lengths,
    split_work,
    state_plan,
    warn_few_units,
)
from seqpack.sources.paths import resolve_paths, spec_text
from seqpack.sources.prefetch import schedule as schedule_prefetch
from seqpack.sources.records import (
    ON_ERROR,
    ReadStats,
    Record,
    SourceError,
    fetch_by_id,
    make_doc_id,
    split_doc_id,
)
from seqpack.sources.remote import set_storage_options
from seqpack.sources.urls import is_url


class Reader(Node[Record]):
    """Stateful reader over the shards of one source (see the module docstring for the partition).

    Subclasses implement :meth:`shard_units` and :meth:`read_unit`, and may refine
    :meth:`unit_sizes` (sizes and splittability), :meth:`unit_block` and :meth:`fetch_records`.

    Args:
        paths: file, glob, directory or a list of them.
        fields: which fields hold the data (:class:`FieldSpec`); or pass its keys as kwargs.
        source_index: this source's index in the config (the top bits of every ``doc_id``).
        name: source name (defaults to ``source<index>``).
        consumer: ``(k, n)``: this consumer's index and the number of consumers.
        shuffle_seed: permute the unit order with this seed (mixed with ``epoch``); None keeps order.
        epoch: epoch number for the shard permutation.
        on_error: ``"raise"`` (default) or ``"skip"`` (skip and count in :meth:`stats`).
        allow_empty: a source with no data is a warning (counted as ``empty_sources``), not an error.
        expect_files: files that must still be there (those resolved at epoch 0); a lost one
            raises SourceError naming it.
        storage_options: backend options for URL paths (``endpoint_url``, ``anon``, ...; see
            :mod:`seqpack.sources.remote`); credentials come from the backend's environment.
    """

    format = "base"

    def __init__(
        self,
        paths,
        *,
        fields: FieldSpec | None = None,
        source_index: int = 0,
        name: str | None = None,
        consumer: tuple[int, int] = (0, 1),
        shuffle_seed: int | None = None,
        epoch: int = 0,
        on_error: str = "raise",
        allow_empty: bool = False,
        expect_files: Sequence[str] | None = None,
        storage_options: dict | None = None,
        **field_keys: Any,
    ):
        super().__init__()
        for p in [paths] if isinstance(paths, (str, os.PathLike)) else list(paths):
            if is_url(p):
                set_storage_options(p.split("*")[0], storage_options)
        check_choice(on_error, "on_error", ON_ERROR)
        n = check_int(consumer[1], "consumer[1] (consumers)", minimum=1)
        k = check_int(consumer[0], "consumer[0] (this consumer's index)", minimum=0, maximum=n - 1)
        self.name = name if name is not None else f"source{source_index}"
        self.allow_empty = check_bool(allow_empty, "allow_empty")
        self.spec = paths
        self.paths = self.resolve(paths)
        self._remote = any(is_url(p) for p in self.paths)
        if expect_files is not None:
            now = set(self.paths)
            lost = [p for p in expect_files if p not in now]
            if lost:
                raise SourceError(
                    spec_text(paths),
                    None,
                    None,
                    f"source {self.name!r} lost {len(lost)} file(s) since epoch 0: {lost[:10]}",
                )
        self.fields = fields if fields is not None else FieldSpec.from_config(field_keys)
        self.fields.kind  # noqa: B018 - validate key combinations early
        self.source_index = int(source_index)
        self.consumer = (k, n)
        self.shuffle_seed = shuffle_seed
        self.epoch = int(epoch)
        self.on_error = on_error
        self._units: list[tuple[int, int]] | None = None
        self._sizes: list[UnitSize] = []
        self._file_errors: list[SourceError] = []
        self._empty = False

    # ------------------------------------------------------------------ subclass hooks
    def resolve(self, paths) -> list[str]:
        return resolve_paths(paths, allow_empty=self.allow_empty)

    def shard_units(self, shard: int, path: str) -> int:
        """Number of units in shard ``shard`` (open metadata only). Default: one."""
        return 1

    def unit_sizes(self, shard: int, path: str, n_units: int) -> list[tuple[float, int | None]]:
        """``(size, extent)`` of each unit of a shard from metadata (see
        :class:`~seqpack.sources.partition.UnitSize`). Default: the file size shared equally,
        units not splittable."""
        size = os.path.getsize(path) if os.path.isfile(path) else 1.0
        return [(size / max(n_units, 1), None)] * n_units

    def read_unit(
        self, shard: int, path: str, unit: int, first: int, step: int = 1, stop: int = -1
    ) -> Iterator[tuple[int, Any]]:
        """Yield ``(raw, Record | SourceError)`` for the raw records ``first <= raw < stop`` of a
        unit, in order (``stop`` -1: to the end; the base stops at ``stop`` if a subclass does not).
        ``step`` is always 1 (records are no longer strided over consumers; it stays in the
        signature for callers written against it).

        A per-record problem is *yielded* as SourceError (the reader continues); a problem that
        ends the stream (truncation, unreadable file) is *raised* as SourceError, with attribute
        ``raw`` set to the raw position it hit when that is not the unit's start.
        """
        raise NotImplementedError

    def unit_block(self, shard: int, path: str, unit: int) -> DocBlock | None:
        """All raw records ``0..R-1`` of a unit as one block (record ``r`` is document ``r``), or None.

        Return a block only when every record of the unit is a valid pre-tokenized document (no
        record-level errors to report); None sends the unit through :meth:`read_unit`. Default: None.
        """
        return None

    def unit_ranges(self, shard: int, path: str, unit: int) -> list[tuple[int, int]] | None:
        """Byte ranges of ``path`` that reading the unit fetches (prefetch hints), or None for the
        head of the file (streams). Default: None."""
        return None

    def upcoming_units(self, depth: int) -> list[tuple[int, int]]:
        """``(shard, unit)`` of up to ``depth`` units this consumer reads after the current one."""
        return [(item[0], item[1]) for item in self._plan[self._pos + 1 : self._pos + 1 + depth]]

    def fetch_records(self, shard: int, path: str, records: list[int]) -> dict[int, Record | SourceError]:
        """Records numbered ``records`` (sorted, per shard as in doc ids) of one shard, read once.

        Default: walk the shard's units in order until every record was seen.
        """
        want, out = set(records), {}
        for unit in range(self.shard_units(shard, path)):
            items = self.read_unit(shard, path, unit, 0)
            for _, item in items:
                rec = item.record if isinstance(item, SourceError) else split_doc_id(item.doc_id)[2]
                if rec in want:
                    out[rec] = item
                    if len(out) == len(want):
                        items.close()  # stop reading: everything asked for was found
                        return out
        return out

    def doc_id(self, shard: int, record: int) -> int:
        return make_doc_id(self.source_index, shard, record)

    def units(self) -> list[tuple[int, int]]:
        """Canonical (shuffled) list of ``(shard, unit)`` of this epoch, same on every consumer."""
        if self._units is None:
            sizes: list[UnitSize] = []
            self._file_errors = []
            for s, path in enumerate(self.paths):
                try:
                    n_units = self.shard_units(s, path)
                    per_unit = self.unit_sizes(s, path, n_units)
                except SourceError as e:
                    if self.on_error == "raise":
                        raise
                    # counted by one consumer only, so summed stats count each bad file once
                    if s % self.consumer[1] == self.consumer[0]:
                        self._file_errors.append(e)
                    continue
                sizes.extend(UnitSize(s, u, sz, ext) for u, (sz, ext) in enumerate(per_unit))
            if not self._file_errors and sum(u.size for u in sizes) <= 0:
                self._empty = no_data(self, len(sizes))
                sizes = []  # allowed to be empty: nothing to read (not even empty records)
            if self.shuffle_seed is not None and sizes:
                rng = np.random.default_rng([int(self.shuffle_seed), self.epoch, self.source_index])
                sizes = [sizes[i] for i in rng.permutation(len(sizes))]
            warn_few_units(self, len(sizes))
            self._sizes = sizes
            self._units = [(u.shard, u.unit) for u in sizes]
        return self._units

    def work_plan(self, consumer: tuple[int, int] | None = None) -> list[WorkItem]:
        """The canonical work items of ``consumer`` (default: this one) in this epoch."""
        k, n = self.consumer if consumer is None else consumer
        self.units()
        lengths = self.__dict__.get("partition_lengths")  # a LengthIndex: cut by exact tokens
        plans = split_work(self._sizes, n) if lengths is None else split_by_lengths(self._sizes, lengths, n)
        return plans[k]

    def remaining_work(self, state: dict) -> list[WorkItem]:
        """The work items a reader state (of any consumer of this epoch) has not read yet."""
        plan, _ = self._plan_of(state)
        return remaining_items(plan, int(state["pos"]), int(state["next_raw"]))

    def state_for_work(self, items: Sequence[WorkItem], stats: dict | None = None) -> dict:
        """A reader state that reads exactly ``items`` (in order) and nothing else; ``stats``: the
        read counters it starts from (default zero)."""
        plan = check_items(items, set(self.units()), self.name)
        pos = {"pos": 0, "next_raw": plan[0][2] if plan else 0}
        return reader_state(pos, plan, True, self, stats if stats is not None else ReadStats().as_dict())

    def _plan_of(self, state: dict) -> tuple[list[WorkItem], bool]:
        """(plan, explicit) of a saved state, checked against the files; ValueError says why not."""
        return state_plan(state, self, len(self.units()), self.work_plan)

    # ------------------------------------------------------------------ node protocol
    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self._it: Iterator | None = None
        self._ublock: DocBlock | None = None  # the current unit as a block (next_block path)
        self._ublock_pos = -1
        if initial_state is None:
            self._plan, self._explicit = self.work_plan(), False
            self._pos = 0
            self._next_raw = self._plan[0][2] if self._plan else 0
            self._stats = ReadStats()
            for e in self._file_errors:
                self._stats.note(e, whole_file=True)
            if self._empty and self.consumer[0] == 0:
                self._stats.empty_sources += 1
        else:
            self._plan, self._explicit = self._plan_of(initial_state)
            if not self._explicit and tuple(int(v) for v in initial_state["consumer"]) != self.consumer:
                k, n = initial_state["consumer"]
                raise ValueError(
                    f"{self.name}: saved state is consumer {k} of {n}, this reader is consumer "
                    f"{self.consumer[0]} of {self.consumer[1]}; re-partition it (remaining_work, "
                    "state_for_work)"
                )
            self._pos, self._next_raw = int(initial_state["pos"]), int(initial_state["next_raw"])
            self._stats = ReadStats.from_dict(initial_state["stats"])

    def get_state(self) -> dict:
        pos = {"pos": self._pos, "next_raw": self._next_raw}
        return reader_state(pos, self._plan, self._explicit, self, self._stats.as_dict())

    def own_stats(self) -> dict:
        return {f"read/{self.name}/{k}": v for k, v in self._stats.as_dict().items()}

    def _advance(self) -> None:
        self._it, self._pos = None, self._pos + 1
        self._next_raw = self._plan[self._pos][2] if self._pos < len(self._plan) else 0
        self._ublock, self._ublock_pos = None, -1

    def _stream_failed(self, e: SourceError) -> None:
        """A unit's stream ended in error at raw ``e.raw`` (0 = the unit itself): raise, or count it
        when this consumer owns that position, and move on."""
        _, _, first, stop = self._plan[self._pos]
        at = int(getattr(e, "raw", 0) or 0)
        if stop >= 0 and at >= stop:  # every record of this item was read: the failure is a later one's
            self._advance()
            return
        if self.on_error == "raise":
            raise e
        if at >= first:
            self._stats.note(e, whole_file=True)
        self._advance()

    def next(self) -> Record:
        while True:
            if self._it is None:
                if self._pos >= len(self._plan):
                    raise StopIteration
                shard, unit, first, stop = self._plan[self._pos]
                self._next_raw = max(self._next_raw, first)
                if self._remote:
                    schedule_prefetch(self)  # the next units' ranges, while this one is read
                self._it = self.read_unit(shard, self.paths[shard], unit, self._next_raw, 1, stop)
                self._ublock, self._ublock_pos = None, -1
            try:
                raw, item = next(self._it)
            except StopIteration:
                self._advance()
                continue
            except SourceError as e:
                self._it = None
                self._stream_failed(e)
                continue
            stop = self._plan[self._pos][3]
            if stop >= 0 and raw >= stop:
                self._it.close()
                self._advance()
                continue
            self._next_raw = raw + 1
            if isinstance(item, SourceError):
                if self.on_error == "raise":
                    raise item
                self._stats.note(item)
                continue
            self._stats.records += 1
            return item

    @property
    def yields_tokens(self) -> bool:
        """True when records are pre-tokenized, so :meth:`next_block` holds documents."""
        return self.fields.kind == "tokens"

    def next_block(self, max_docs: int) -> DocBlock:
        """Up to ``max_docs`` pre-tokenized records as a block (never spans two units).

        Only for readers that :attr:`yields_tokens`; units without :meth:`unit_block` are collected
        record by record.
        """
        if self._it is not None or type(self).unit_block is Reader.unit_block:
            return collect_block(self, max_docs)
        while True:
            if self._pos >= len(self._plan):
                raise StopIteration
            shard, unit, first, stop = self._plan[self._pos]
            if self._ublock_pos != self._pos:
                if self._remote:
                    schedule_prefetch(self)
                try:
                    blk = read_unit_block(self, shard, unit)  # decoded ahead on a thread when it can be
                except SourceError:
                    blk = None  # read_unit raises or skips it under the on_error policy
                if blk is None:
                    return collect_block(self, max_docs)
                self._ublock, self._ublock_pos = blk, self._pos
            blk = self._ublock
            lo = max(self._next_raw, first)
            end = len(blk) if stop < 0 else min(stop, len(blk))
            if lo >= end:
                self._advance()
                continue
            hi = min(end, lo + max_docs)
            out = blk.take(slice(lo, hi))
            self._next_raw = hi
            self._stats.records += len(out)
            return out

    # ------------------------------------------------------------------ fetch by reference
    def fetch(self, doc_ids: Sequence[int]) -> list[Record]:
        """The records of ``doc_ids`` (global ids of this source), in the order given.

        Each needed shard is opened once. A record that no longer exists, or fails to parse,
        raises SourceError naming it (whatever ``on_error``: a reference must resolve).
        """
        return fetch_by_id(self, doc_ids)
