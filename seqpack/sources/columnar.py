"""Columnar readers: Parquet (row-group units), Arrow IPC (record-batch units), HF ``datasets``.

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

from seqpack.checks import check_bool, check_int, check_mapping
from seqpack.ops.segments import gather_segments
from seqpack.sources.arrow import arrow_numpy
from seqpack.sources.blocks import DocBlock
from seqpack.sources.reader import Reader, resolve_paths
from seqpack.sources.records import Record, SourceError
from seqpack.sources.rowgroups import arrow_source, column_ranges, open_parquet
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
        self, table: pa.Table, shard: int, path: str, row0: int, first: int, step: int
    ) -> Iterator[tuple[int, Any]]:
        """Records of rows ``first, first+step, ...`` of ``table``; ``row0`` is its first row's index
        in the shard (record numbers and doc ids are per shard)."""
        names = set(table.column_names)
        for key in self.fields.columns():
            if key not in names:
                raise SourceError(path, None, key, f"column missing (file has {sorted(names)[:8]})")
        rows = range(first, table.num_rows, step)
        if self.fields.kind == "tokens" and not self.fields.group_key:
            yield from self._token_records(table, shard, path, row0, rows)
            return
        cols = {key: self._pylist(table.column(key), rows, path, row0, key) for key in self.fields.columns()}
        for j, r in enumerate(rows):
            rec = row0 + r
            row = {key: vals[j] for key, vals in cols.items()}
            bad = next((v for v in row.values() if isinstance(v, SourceError)), None)
            if bad is not None:
                yield r, bad
                continue
            try:
                yield r, self.fields.extract(row, self.doc_id(shard, rec), self.name, path, rec)
            except SourceError as e:
                yield r, e

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

    def _pylist(self, col: pa.ChunkedArray, rows: range, path: str, row0: int, key: str) -> list:
        sub = col.take(pa.array(np.arange(rows.start, rows.stop, rows.step, dtype=np.int64)))
        if pa.types.is_binary(sub.type) or pa.types.is_large_binary(sub.type):
            out = []
            for j, v in enumerate(sub.to_pylist()):
                try:
                    out.append(None if v is None else v.decode("utf-8"))
                except UnicodeDecodeError as e:
                    out.append(
                        SourceError(path, row0 + rows[j], key, f"not valid UTF-8 (byte offset {e.start})")
                    )
            return out
        try:
            return sub.to_pylist()
        except UnicodeDecodeError:
            return self._pylist(sub.cast(pa.large_binary()), range(0, len(sub)), path, row0, key)

    def _token_records(self, table: pa.Table, shard: int, path: str, row0: int, rows: range):
        ids_key, mask_key = self.fields.input_ids_key, self.fields.loss_mask_key
        offsets, values, nulls = _list_column(table.column(ids_key), path, ids_key)
        m_off = m_val = m_nulls = None
        if mask_key:
            m_off, m_val, m_nulls = _list_column(table.column(mask_key), path, mask_key)
            m_val = m_val.astype(bool)
        name, source_bits = self.name, self.doc_id(shard, 0)
        for r in rows:
            rec = row0 + r
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

    def read_unit(self, shard: int, path: str, unit: int, first: int, step: int) -> Iterator[tuple[int, Any]]:
        table, row0 = self._row_group(shard, path, unit)
        yield from self.table_records(table, shard, path, row0, first, step)

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

    def read_unit(self, shard: int, path: str, unit: int, first: int, step: int) -> Iterator[tuple[int, Any]]:
        reader, random_access = self._open(path)
        try:
            if random_access:
                table, row0 = self._random_access_table(shard, path, unit)
                yield from self.table_records(table, shard, path, row0, first, step)
                return
            for row0, batch in _stream_batches(reader):
                table = pa.Table.from_batches([batch]).select(self.fields.columns())
                # a stream is one unit: re-base the strided raw indices on this batch
                lo = max(first - row0, 0)
                lo += (first - row0 - lo) % step
                for r, item in self.table_records(table, shard, path, row0, lo, step):
                    yield row0 + r, item
        except (pa.ArrowException, OSError) as e:
            raise SourceError(path, None, None, f"unreadable Arrow data: {e}") from None


def _stream_batches(reader) -> Iterator[tuple[int, pa.RecordBatch]]:
    row0 = 0
    for batch in reader:
        yield row0, batch
        row0 += batch.num_rows


class HFDatasetReader(ColumnarReader):
    """Hugging Face ``datasets``.

    - A local directory written by ``Dataset.save_to_disk`` (or a ``DatasetDict`` directory with
      ``split``): Arrow-backed, read by units of ``chunk_rows`` rows with the columnar fast path.
    - ``streaming=True`` (hub names, or local data files via ``hf_kwargs``): ``load_dataset(...,
      streaming=True)``; one unit walked in order, records split across consumers by index, resume
      skips to the saved index (``IterableDataset.skip``). Needs a reachable hub for hub names.

    Args:
        paths: dataset directory (or list of them), or a hub name / builder (``"json"``) when streaming.
        split: split to read (default ``"train"``).
        chunk_rows: rows per unit for local datasets.
        streaming: use ``load_dataset(..., streaming=True)``.
        hf_kwargs: extra ``load_dataset`` kwargs (``name``, ``data_files``, ...).
    """

    format = "hf"

    def __init__(
        self,
        paths,
        *,
        split: str = "train",
        chunk_rows: int = 4096,
        streaming: bool = False,
        hf_kwargs: dict | None = None,
        **kwargs,
    ):
        self.split = split
        self.chunk_rows = check_int(chunk_rows, "chunk_rows", minimum=1)
        self.streaming = check_bool(streaming, "streaming")
        self.hf_kwargs = dict(check_mapping(hf_kwargs or {}, "hf_kwargs"))
        self._ds_cache: dict[int, Any] = {}
        super().__init__(paths, **kwargs)

    def resolve(self, paths) -> list[str]:
        items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if self.streaming:
            return [os.fspath(p) for p in items]
        out = []
        for p in items:
            p = os.fspath(p)
            out.extend(resolve_paths(p) if any(ch in p for ch in "*?[") and not os.path.isdir(p) else [p])
        for p in out:
            if not os.path.isdir(p):
                raise FileNotFoundError(
                    f"not a saved datasets directory: {p!r} (use streaming=True for hub names)"
                )
        return out

    def _dataset(self, shard: int, path: str):
        if shard not in self._ds_cache:
            import datasets

            if self.streaming:
                ds = datasets.load_dataset(path, split=self.split, streaming=True, **self.hf_kwargs)
            else:
                try:
                    ds = datasets.load_from_disk(path)
                except Exception as e:  # datasets raises several unrelated types for bad dirs
                    raise SourceError(path, None, None, f"cannot load dataset: {e}") from None
                if isinstance(ds, datasets.DatasetDict):
                    ds = ds[self.split]
                if len(ds) != ds.data.num_rows:
                    # units slice the Arrow table (ds.data) directly: rows must be those of the dataset
                    ds = ds.flatten_indices()
            self._ds_cache[shard] = ds
        return self._ds_cache[shard]

    def shard_units(self, shard: int, path: str) -> int:
        ds = self._dataset(shard, path)
        if self.streaming:
            return 1
        names = set(ds.column_names)
        for key in self.fields.columns():
            if key not in names:
                raise SourceError(path, None, key, f"column missing (dataset has {sorted(names)[:8]})")
        return max(1, -(-len(ds) // self.chunk_rows))

    def read_unit(self, shard: int, path: str, unit: int, first: int, step: int) -> Iterator[tuple[int, Any]]:
        ds = self._dataset(shard, path)
        if self.streaming:
            for j, row in enumerate(ds.skip(first) if first else ds):
                if j % step:
                    continue
                raw = first + j
                try:
                    yield raw, self.fields.extract(row, self.doc_id(shard, raw), self.name, path, raw)
                except SourceError as e:
                    yield raw, e
            return
        row0 = unit * self.chunk_rows
        table = ds.data.table.slice(row0, self.chunk_rows).select(self.fields.columns())
        yield from self.table_records(table, shard, path, row0, first, step)

    def unit_block(self, shard: int, path: str, unit: int) -> DocBlock | None:
        if self.streaming or self.fields.kind != "tokens":
            return None
        ds = self._dataset(shard, path)
        row0 = unit * self.chunk_rows
        table = ds.data.table.slice(row0, self.chunk_rows).select(self.fields.columns())
        return self.table_block(table, shard, path, row0)
