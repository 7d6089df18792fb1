"""Base of every file reader: shard listing, rank x worker partition, position, errors.

A source is a list of shards (files, in sorted glob order). Each shard has one or more *units*
(a Parquet row group, an Arrow record batch, a chunk of an HF dataset; one unit for a stream
like JSON lines). The canonical order of units is shard by shard, optionally permuted per epoch
with a seed (shard-order shuffling); it is the same on every rank and worker.

Partition over ``n`` consumers (``world_size * max(num_workers, 1)``), consumer ``k``:

- ``units >= n``: consumer ``k`` reads units ``k, k+n, k+2n, ...`` of the canonical order;
- otherwise every consumer walks every unit but keeps only record ``r`` of the ``u``-th unit when
  ``(r + u) % n == k`` (records are split inside shards, so extra workers never starve). Readers
  skip unowned records without parsing them.

Either way each record belongs to exactly one consumer. The position is ``(unit index, next raw
record index inside the unit)``; resuming re-opens that unit and skips to that record.

Readers whose units can be served as columns (pre-tokenized Parquet/Arrow/HF) implement
:meth:`Reader.unit_block`; :meth:`Reader.next_block` then hands out many records per call as a
:class:`~seqpack.sources.blocks.DocBlock` (same records, same positions as ``next()``).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from seqpack.checks import check_choice, check_int
from seqpack.node import Node
from seqpack.sources.blocks import DocBlock, collect_block
from seqpack.sources.fields import FieldSpec
from seqpack.sources.prefetch import schedule as schedule_prefetch
from seqpack.sources.records import ON_ERROR, ReadStats, Record, SourceError, make_doc_id
from seqpack.sources.remote import expand as expand_url
from seqpack.sources.remote import set_storage_options
from seqpack.sources.urls import is_url


def resolve_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand a path, a glob or a list of them into a list of files (each glob sorted).

    Directories expand to the files directly inside them (sorted). A pattern that matches nothing
    is an error (a typo must not silently yield an empty epoch). URLs (``s3://``, ``hf://``, ...)
    expand the same way on their filesystem (:func:`seqpack.sources.remote.expand`).
    """
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    out: list[str] = []
    for p in items:
        p = os.fspath(p)
        if is_url(p):
            out.extend(expand_url(p))
        elif any(ch in p for ch in "*?["):
            hits = sorted(glob.glob(p, recursive=True))
            if not hits:
                raise FileNotFoundError(f"glob {p!r} matched no files")
            out.extend(h for h in hits if os.path.isfile(h))
        elif os.path.isdir(p):
            out.extend(
                sorted(os.path.join(p, f) for f in os.listdir(p) if os.path.isfile(os.path.join(p, f)))
            )
        elif os.path.exists(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"no such file: {p!r}")
    return out


class Reader(Node[Record]):
    """Stateful reader over the shards of one source (see the module docstring for the partition).

    Subclasses implement :meth:`shard_units` and :meth:`read_unit`.

    Args:
        paths: file, glob, directory or a list of them.
        fields: which fields hold the data (:class:`FieldSpec`); or pass its keys as kwargs.
        source_index: this source's index in the config (the top bits of every ``doc_id``).
        name: source name (defaults to ``source<index>``).
        consumer: ``(k, n)``: this consumer's index and the number of consumers.
        shuffle_seed: permute the unit order with this seed (mixed with ``epoch``); None keeps order.
        epoch: epoch number for the shard permutation.
        on_error: ``"raise"`` (default) or ``"skip"`` (skip and count in :meth:`stats`).
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
        self.paths = self.resolve(paths)
        self._remote = any(is_url(p) for p in self.paths)
        self.fields = fields if fields is not None else FieldSpec.from_config(field_keys)
        self.fields.kind  # noqa: B018 - validate key combinations early
        self.source_index = int(source_index)
        self.name = name if name is not None else f"source{source_index}"
        self.consumer = (k, n)
        self.shuffle_seed = shuffle_seed
        self.epoch = int(epoch)
        self.on_error = on_error
        self._units: list[tuple[int, int]] | None = None
        self._file_errors: list[SourceError] = []

    # ------------------------------------------------------------------ subclass hooks
    def resolve(self, paths) -> list[str]:
        return resolve_paths(paths)

    def shard_units(self, shard: int, path: str) -> int:
        """Number of units in shard ``shard`` (open metadata only). Default: one."""
        return 1

    def read_unit(self, shard: int, path: str, unit: int, first: int, step: int) -> Iterator[tuple[int, Any]]:
        """Yield ``(raw_index, Record | SourceError)`` for raw records ``first, first+step, ...``.

        A per-record problem is *yielded* as SourceError (the reader continues); a problem that
        ends the stream (truncation, unreadable file) is *raised* as SourceError.
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
        units = self.units()
        return [units[u] for u in self._plan[self._pos + 1 : self._pos + 1 + depth]]

    # ------------------------------------------------------------------ helpers for subclasses
    def doc_id(self, shard: int, record: int) -> int:
        return make_doc_id(self.source_index, shard, record)

    # ------------------------------------------------------------------ partition
    def units(self) -> list[tuple[int, int]]:
        """Canonical (shuffled) list of ``(shard, unit)`` of this epoch, same on every consumer."""
        if self._units is None:
            units: list[tuple[int, int]] = []
            self._file_errors = []
            for s, path in enumerate(self.paths):
                try:
                    n_units = self.shard_units(s, path)
                except SourceError as e:
                    if self.on_error == "raise":
                        raise
                    # counted by one consumer only, so summed stats count each bad file once
                    if s % self.consumer[1] == self.consumer[0]:
                        self._file_errors.append(e)
                    continue
                units.extend((s, u) for u in range(n_units))
            if self.shuffle_seed is not None and units:
                rng = np.random.default_rng([int(self.shuffle_seed), self.epoch, self.source_index])
                units = [units[i] for i in rng.permutation(len(units))]
            self._units = units
        return self._units

    def _my_plan(self) -> tuple[list[int], bool]:
        k, n = self.consumer
        units = self.units()
        if len(units) >= n:
            return list(range(k, len(units), n)), False
        return list(range(len(units))), True

    # ------------------------------------------------------------------ node protocol
    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self._plan, self._stride = self._my_plan()
        self._it: Iterator | None = None
        self._ublock: DocBlock | None = None  # the current unit as a block (next_block path)
        self._ublock_pos = -1
        if initial_state is None:
            self._pos, self._next_raw = 0, 0
            self._stats = ReadStats()
            for e in self._file_errors:
                self._stats.note(e, whole_file=True)
        else:
            if initial_state.get("n_units") != len(self.units()):
                raise ValueError(
                    f"{self.name}: saved state has {initial_state.get('n_units')} units, the files now have "
                    f"{len(self.units())}; the data changed since the checkpoint"
                )
            self._pos, self._next_raw = int(initial_state["pos"]), int(initial_state["next_raw"])
            self._stats = ReadStats.from_dict(initial_state["stats"])

    def get_state(self) -> dict:
        return {
            "pos": self._pos,
            "next_raw": self._next_raw,
            "n_units": len(self.units()),
            "stats": self._stats.as_dict(),
        }

    def own_stats(self) -> dict:
        return {f"read/{self.name}/{k}": v for k, v in self._stats.as_dict().items()}

    def next(self) -> Record:
        k, n = self.consumer
        units = self.units()
        while True:
            if self._it is None:
                if self._pos >= len(self._plan):
                    raise StopIteration
                u = self._plan[self._pos]
                shard, unit = units[u]
                step, first = 1, self._next_raw
                if self._stride:
                    step = n
                    first += (k - (first + u)) % n  # first raw index >= next_raw owned by k
                if self._remote:
                    schedule_prefetch(self)  # the next units' ranges, while this one is read
                self._it = self.read_unit(shard, self.paths[shard], unit, first, step)
                self._cur_shard = shard
                self._ublock, self._ublock_pos = None, -1
            try:
                raw, item = next(self._it)
            except StopIteration:
                self._it, self._pos, self._next_raw = None, self._pos + 1, 0
                continue
            except SourceError as e:
                if self.on_error == "raise":
                    raise
                self._stats.note(e, whole_file=True)
                self._it, self._pos, self._next_raw = None, self._pos + 1, 0
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
        k, n = self.consumer
        units = self.units()
        while True:
            if self._pos >= len(self._plan):
                raise StopIteration
            u = self._plan[self._pos]
            if self._ublock_pos != self._pos:
                shard, unit = units[u]
                if self._remote:
                    schedule_prefetch(self)
                try:
                    blk = self.unit_block(shard, self.paths[shard], unit)
                except SourceError:
                    blk = None  # read_unit raises or skips it under the on_error policy
                if blk is None:
                    return collect_block(self, max_docs)
                self._ublock, self._ublock_pos = blk, self._pos
            blk = self._ublock
            step, first = 1, self._next_raw
            if self._stride:
                step = n
                first += (k - (first + u)) % n
            if first >= len(blk):
                self._pos, self._next_raw, self._ublock, self._ublock_pos = self._pos + 1, 0, None, -1
                continue
            stop = min(len(blk), first + step * max_docs)
            out = blk.take(slice(first, stop, step))
            self._next_raw = first + step * (len(out) - 1) + 1
            self._stats.records += len(out)
            return out
