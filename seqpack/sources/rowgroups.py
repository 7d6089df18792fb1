"""Columnar files over URLs: Parquet footers read once per process, the byte ranges of a row group's
column chunks (what a projected read of it fetches, and what prefetch asks for), Arrow IPC sources."""

from __future__ import annotations

import threading
from collections import OrderedDict

import pyarrow as pa
import pyarrow.parquet as pq

from seqpack.sources.remote import RemoteFile
from seqpack.sources.urls import is_url

_FOOTERS: OrderedDict[str, pq.FileMetaData] = OrderedDict()
_LOCK = threading.Lock()
_MAX_FOOTERS = 256


def open_parquet(url: str) -> pq.ParquetFile:
    """A ParquetFile reading ``url`` by ranges through the block cache (footer cached per process)."""
    with _LOCK:
        meta = _FOOTERS.get(url)
    pf = pq.ParquetFile(RemoteFile(url), metadata=meta)
    if meta is None:
        with _LOCK:
            _FOOTERS[url] = pf.metadata
            while len(_FOOTERS) > _MAX_FOOTERS:
                _FOOTERS.popitem(last=False)
    return pf


def column_ranges(meta: pq.FileMetaData, row_group: int, columns=None) -> list[tuple[int, int]]:
    """``[(start, end)]`` byte ranges of row group ``row_group``'s column chunks (only those of the
    top-level ``columns`` when given): the bytes a projected read of it needs."""
    rg = meta.row_group(row_group)
    out = []
    for i in range(rg.num_columns):
        c = rg.column(i)
        if columns is not None and c.path_in_schema.split(".")[0] not in columns:
            continue
        start = c.data_page_offset
        if c.has_dictionary_page and c.dictionary_page_offset is not None:
            start = min(start, c.dictionary_page_offset)
        out.append((start, start + c.total_compressed_size))
    return out


def unit_ranges(url: str, row_group: int, columns=None) -> list[tuple[int, int]]:
    """:func:`column_ranges` of a remote file (its footer fetched once)."""
    return column_ranges(open_parquet(url).metadata, row_group, columns)


def arrow_source(path: str):
    """An Arrow IPC input: a memory map of a local file, or a URL read by ranges through the cache."""
    return pa.PythonFile(RemoteFile(path), mode="r") if is_url(path) else pa.memory_map(path, "r")
