"""Columnar readers: Parquet (row-group units), Arrow IPC (record-batch units); HF ``datasets``
in :mod:`seqpack.sources.hf`.

Only the columns the :class:`FieldSpec` needs are read (column projection). Pre-tokenized
``input_ids`` columns (``list<int>``) take a fast path: a unit whose records are all valid is
served by :meth:`ColumnarReader.unit_block` as one :class:`~seqpack.sources.blocks.DocBlock` of
zero-copy numpy views over the Arrow buffers (offsets and values as stored, int32 or int64), so
no per-row Python object exists until a consumer asks for one. Units with a bad record go through
the per-record path, which names the record.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from seqpack.ops.segments import gather_segments
from seqpack.sources.arrow import arrow_numpy
from seqpack.sources.blocks import DocBlock
from seqpack.sources.reader import Reader
from seqpack.sources.records import Record, SourceError
from seqpack.sources.rowgroups import arrow_source, column_ranges, open_parquet, prefetch_footers
from seqpack.sources.urls import is_url


def _list_column(
    col: pa.ChunkedArray | pa.Array, path: str, key: str, as_int64: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(offsets int64 [rows+1] into values, values, null mask or None) of a list column.

    ``values`` is int64 when ``as_int64``, else the stored integer dtype (a zero-copy view when
    the column has one chunk).
    """
    if isinstance(col, pa.ChunkedArray):
        arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    else:
        arr = col
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
        raise SourceError(path, None, key, f"expected a list<int> column, got {arr.type}")
    if not (pa.types.is_integer(arr.type.value_type) or pa.types.is_boolean(arr.type.value_type)):
        raise SourceError(path, None, key, f"expected integer list items, got {arr.type.value_type}")
    offsets = arrow_numpy(arr.offsets).astype(np.int64, copy=False)
    values = arrow_numpy(arr.values)
    if as_int64:
        values = values.astype(np.int64, copy=False)
    nulls = arrow_numpy(arr.is_null()) if arr.null_count else None
    return offsets, values, nulls


class ColumnarReader(Reader):
    """Shared record extraction for readers whose units are Arrow tables."""

    def table_records(
        self,
        table: pa.Table,
        shard: int,
        path: str,
        row0: int,
        first: int = 0,
        stop: int = -1,
        recs: np.ndarray | None = None,
    ) -> Iterator[tuple[int, Any]]:
        """Records of rows ``first <= r < stop`` (-1: to the end) of ``table``; row ``r`` is record
        ``row0 + r`` of the shard (record numbers and doc ids are per shard), or ``recs[r]``."""
        names = set(table.column_names)
        for key in self.fields.columns():
            if key not in names:
                raise SourceError(path, None, key, f"column missing (file has {sorted(names)[:8]})")
        rows = range(first, table.num_rows if stop < 0 else min(stop, table.num_rows))
        if recs is None:
            recs = np.arange(row0, row0 + table.num_rows, dtype=np.int64)
        if self.fields.kind == "tokens" and not self.fields.group_key:
            yield from self._token_records(table, shard, path, recs, rows)
            return
        cols = {key: self._pylist(table.column(key), rows, path, recs, key) for key in self.fields.columns()}
        for j, r in enumerate(rows):
            rec = int(recs[r])
            row = {key: vals[j] for key, vals in cols.items()}
            bad = next((v for v in row.values() if isinstance(v, SourceError)), None)
            if bad is not None:
                yield r, bad
                continue
            try:
                yield r, self.fields.extract(row, self.doc_id(shard, rec), self.name, path, rec)
            except SourceError as e:
                yield r, e

    def fetch_from_units(
        self, shard: int, path: str, records: list[int], rows0: np.ndarray, table_of
    ) -> dict:
        """Records by number from the units holding them (unit ``u`` has records ``rows0[u]`` to
        ``rows0[u + 1] - 1``; ``table_of(shard, path, u) -> (table, row0)``), taking only their rows."""
        recs = np.asarray(records, np.int64)
        recs = recs[recs < rows0[-1]]
        units = np.searchsorted(rows0, recs, side="right") - 1
        out: dict[int, Any] = {}
        for u in np.unique(units):
            table, row0 = table_of(shard, path, int(u))
            mine = recs[units == u]
            taken = table.take(pa.array(mine - row0))
            out.update((int(mine[r]), it) for r, it in self.table_records(taken, shard, path, 0, recs=mine))
        return out

    def table_block(self, table: pa.Table, shard: int, path: str, row0: int) -> DocBlock | None:
        """Every row of ``table`` as a block of pre-tokenized documents, or None if a row is bad."""
        if self.fields.kind != "tokens" or self.fields.group_key:
            return None  # group ids come per record through extract
        ids_key, mask_key = self.fields.input_ids_key, self.fields.loss_mask_key
        if ids_key not in table.column_names or (mask_key and mask_key not in table.column_names):
            return None
        offsets, values, nulls = _list_column(table.column(ids_key), path, ids_key, as_int64=False)
        if nulls is not None:
            return None
        starts = offsets[:-1]
        lengths = np.diff(offsets)
        mask = None
        if mask_key:
            m_off, m_val, m_nulls = _list_column(table.column(mask_key), path, mask_key, as_int64=False)
            if m_nulls is not None or not np.array_equal(np.diff(m_off), lengths):
                return None
            m_val = m_val.astype(bool, copy=False)
            if np.array_equal(m_off, offsets):
                mask = m_val
            else:  # same row lengths, different buffer layout: align the mask with the values
                mask = np.ones(len(values), bool)
                gather_segments(m_val, m_off[:-1], lengths, starts, mask)
        first_id = self.doc_id(shard, 0) + row0  # record bits are the low bits of a doc id
        doc_ids = np.arange(first_id, first_id + len(lengths), dtype=np.int64)
        return DocBlock(doc_ids, starts, lengths, values, mask, self.name)

    def _pylist(self, col: pa.ChunkedArray, rows: range, path: str, recs: np.ndarray, key: str) -> list:
        sub = col.slice(rows.start, len(rows))
        if pa.types.is_binary(sub.type) or pa.types.is_large_binary(sub.type):
            out = []
            for j, v in enumerate(sub.to_pylist()):
                try:
                    out.append(None if v is None else v.decode("utf-8"))
                except UnicodeDecodeError as e:
                    out.append(
                        SourceError(path, int(recs[rows[j]]), key, f"not valid UTF-8 (byte offset {e.start})")
                    )
            return out
        try:
            return sub.to_pylist()
        except UnicodeDecodeError:
            return self._pylist(
                sub.cast(pa.large_binary()), range(0, len(sub)), path, recs[rows.start :], key
            )

    def _token_records(self, table: pa.Table, shard: int, path: str, recs: np.ndarray, rows: range):
        ids_key, mask_key = self.fields.input_ids_key, self.fields.loss_mask_key
        offsets, values, nulls = _list_column(table.column(ids_key), path, ids_key)
        m_off = m_val = m_nulls = None
        if mask_key:
            m_off, m_val, m_nulls = _list_column(table.column(mask_key), path, mask_key)
            m_val = m_val.astype(bool)
        name, source_bits = self.name, self.doc_id(shard, 0)
        for r in rows:
            rec = int(recs[r])
            if nulls is not None and nulls[r]:
                yield r, SourceError(path, rec, ids_key, "is null")
                continue
            a, b = offsets[r], offsets[r + 1]
            mask = None
            if mask_key:
                if m_nulls is not None and m_nulls[r]:
                    yield r, SourceError(path, rec, mask_key, "is null")
                    continue
                ma, mb = m_off[r], m_off[r + 1]
                if mb - ma != b - a:
                    yield r, SourceError(path, rec, mask_key, f"length {mb - ma} != {b - a} input ids")
                    continue
                mask = m_val[ma:mb]
            # doc_id(shard, rec) == doc_id(shard, 0) + rec: the record bits are the low bits
            yield r, Record(source_bits + rec, name, tokens=values[a:b], loss_mask=mask)


class ParquetReader(ColumnarReader):
    """Parquet files, one unit per row group, reading only the needed columns."""

    format = "parquet"

    def shard_units(self, shard: int, path: str) -> int:
        if shard == 0 and is_url(path):  # the partition opens every footer: fetch them in parallel
            prefetch_footers(self.paths)
        pf = self._open(shard, path)
        names = set(pf.schema_arrow.names)
        for key in self.fields.columns():
            if key not in names:
                raise SourceError(path, None, key, f"column missing (file has {sorted(names)[:8]})")
        return pf.metadata.num_row_groups

    def _open(self, shard: int, path: str) -> pq.ParquetFile:
        cache = self.__dict__.setdefault("_pf_cache", {})
        if shard not in cache:
            try:
                # plain reads, not a memory map: mapped pages would count in the process RSS;
                # a URL is read by ranges (footer, then the projected column chunks of each row group)
                pf = open_parquet(path) if is_url(path) else pq.ParquetFile(path)
            except (pa.ArrowException, OSError) as e:
                raise SourceError(path, None, None, f"corrupt or unreadable Parquet file: {e}") from None
            # one open file at a time keeps descriptors bounded on thousands of shards
            cache.clear()
            cache[shard] = (
                pf,
                np.concatenate(
                    [
                        [0],
                        np.cumsum(
                            [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
                        ),
                    ]
                ),
            )
        return cache[shard][0]

    def unit_ranges(self, shard: int, path: str, unit: int) -> list[tuple[int, int]] | None:
        # runs on a prefetch thread: its own footer handle, not the reader's one-file cache
        return column_ranges(open_parquet(path).metadata, unit, self.fields.columns())

    def _row_group(self, shard: int, path: str, unit: int) -> tuple[pa.Table, int]:
        pf = self._open(shard, path)
        row0 = int(self._pf_cache[shard][1][unit])
        try:
            # one thread: parallelism comes from DataLoader workers, and threads only add CPU here
            return pf.read_row_group(unit, columns=self.fields.columns(), use_threads=False), row0
        except (pa.ArrowException, OSError) as e:
            raise SourceError(path, row0, None, f"unreadable row group {unit}: {e}") from None

    def detached_unit_block(self, shard: int, unit: int) -> DocBlock | None:
        """:meth:`unit_block` for the decode-ahead thread (:mod:`seqpack.sources.ahead`): the same
        block, read through a file handle of the thread's own."""
        if self.fields.kind != "tokens":
            return None
        path, files = self.paths[shard], self.__dict__.setdefault("_ahead_files", {})
        if shard not in files:
            files.clear()
            pf = open_parquet(path) if is_url(path) else pq.ParquetFile(path)
            rows = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
            files[shard] = (pf, np.cumsum([0] + rows))
        pf, rows0 = files[shard]
        table = pf.read_row_group(unit, columns=self.fields.columns(), use_threads=False)
        return self.table_block(table, shard, path, int(rows0[unit]))

    def unit_sizes(self, shard: int, path: str, n_units: int) -> list[tuple[float, int | None]]:
        """Size of the needed columns of each row group (rows as the extent): a list column
        (pre-tokenized ids) counts its values (tokens; encodings would blur it), others their
        uncompressed bytes."""
        meta, cols = self._open(shard, path).metadata, set(self.fields.columns())
        out = []
        for g in range(n_units):
            rg, size = meta.row_group(g), 0
            for c in range(rg.num_columns):
                col = rg.column(c)
                parts = col.path_in_schema.split(".")
                if parts[0] in cols:
                    size += 4 * col.num_values if len(parts) > 1 else col.total_uncompressed_size
            out.append((float(size or rg.total_byte_size) if rg.num_rows else 0.0, rg.num_rows))
        return out

    def read_unit(
        self, shard: int, path: str, unit: int, first: int, step: int = 1, stop: int = -1
    ) -> Iterator[tuple[int, Any]]:
        table, row0 = self._row_group(shard, path, unit)
        yield from self.table_records(table, shard, path, row0, first, stop)

    def fetch_records(self, shard: int, path: str, records: list[int]) -> dict[int, Any]:
        """Reads only the row groups holding ``records``, and takes only their rows."""
        self._open(shard, path)
        return self.fetch_from_units(shard, path, records, self._pf_cache[shard][1], self._row_group)

    def unit_block(self, shard: int, path: str, unit: int) -> DocBlock | None:
        if self.fields.kind != "tokens":
            return None
        table, row0 = self._row_group(shard, path, unit)
        return self.table_block(table, shard, path, row0)


class ArrowReader(ColumnarReader):
    """Arrow IPC files (random-access format: one unit per record batch) or streams (one unit)."""

    format = "arrow"

    def _open(self, path: str):
        try:
            return pa.ipc.open_file(arrow_source(path)), True
        except pa.ArrowInvalid:
            try:
                return pa.ipc.open_stream(arrow_source(path)), False
            except (pa.ArrowException, OSError) as e:
                raise SourceError(path, None, None, f"not an Arrow IPC file or stream: {e}") from None

    def _batch_rows0(self, shard: int, path: str) -> np.ndarray:
        """First row of every record batch of a random-access file (int64 ``[batches + 1]``), cached."""
        cache = self.__dict__.setdefault("_rows0", {})
        if shard not in cache:
            reader, _ = self._open(path)
            counts = [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]
            cache[shard] = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
        return cache[shard]

    def shard_units(self, shard: int, path: str) -> int:
        reader, random_access = self._open(path)
        names = set(reader.schema.names)
        for key in self.fields.columns():
            if key not in names:
                raise SourceError(path, None, key, f"column missing (file has {sorted(names)[:8]})")
        if not random_access:
            return 1
        try:
            return len(self._batch_rows0(shard, path)) - 1
        except (pa.ArrowException, OSError) as e:
            raise SourceError(path, None, None, f"unreadable Arrow data: {e}") from None

    def _random_access_table(self, shard: int, path: str, unit: int) -> tuple[pa.Table, int]:
        reader, _ = self._open(path)
        row0 = int(self._batch_rows0(shard, path)[unit])
        return pa.Table.from_batches([reader.get_batch(unit)]).select(self.fields.columns()), row0

    def fetch_records(self, shard: int, path: str, records: list[int]) -> dict[int, Any]:
        _, random_access = self._open(path)
        if not random_access:  # a stream: read once from its start
            return super().fetch_records(shard, path, records)
        rows0 = self._batch_rows0(shard, path)
        return self.fetch_from_units(shard, path, records, rows0, self._random_access_table)

    def unit_block(self, shard: int, path: str, unit: int) -> DocBlock | None:
        if self.fields.kind != "tokens":
            return None
        reader, random_access = self._open(path)
        if not random_access:
            return None
        try:
            table, row0 = self._random_access_table(shard, path, unit)
        except (pa.ArrowException, OSError) as e:
            raise SourceError(path, None, None, f"unreadable Arrow data: {e}") from None
        return self.table_block(table, shard, path, row0)

    def unit_sizes(self, shard: int, path: str, n_units: int) -> list[tuple[float, int | None]]:
        reader, random_access = self._open(path)
        if not random_access:  # a stream: one unit of unknown length
            return [(float(os.path.getsize(path)) if os.path.isfile(path) else 1.0, None)]
        cols = self.fields.columns()
        return [
            (float(b.select(cols).nbytes), b.num_rows) for b in (reader.get_batch(i) for i in range(n_units))
        ]

    def read_unit(
        self, shard: int, path: str, unit: int, first: int, step: int = 1, stop: int = -1
    ) -> Iterator[tuple[int, Any]]:
        reader, random_access = self._open(path)
        try:
            if random_access:
                table, row0 = self._random_access_table(shard, path, unit)
                yield from self.table_records(table, shard, path, row0, first, stop)
                return
            for row0, batch in _stream_batches(reader):
                if stop >= 0 and row0 >= stop:
                    return
                if row0 + batch.num_rows <= first:
                    continue
                table = pa.Table.from_batches([batch]).select(self.fields.columns())
                # a stream is one unit: re-base the raw indices on this batch
                lo, hi = max(first - row0, 0), -1 if stop < 0 else stop - row0
                for r, item in self.table_records(table, shard, path, row0, lo, hi):
                    yield row0 + r, item
        except (pa.ArrowException, OSError) as e:
            raise SourceError(path, None, None, f"unreadable Arrow data: {e}") from None


def _stream_batches(reader) -> Iterator[tuple[int, pa.RecordBatch]]:
    row0 = 0
    for batch in reader:
        yield row0, batch
        row0 += batch.num_rows
