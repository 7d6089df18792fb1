"""Columnar files over URLs: Parquet footers read once per process, the byte ranges of a row group's
column chunks (what a projected read of it fetches, and what prefetch asks for), Arrow IPC sources."""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from seqpack.sources.cache import store
from seqpack.sources.remote import RemoteFile
from seqpack.sources.remote import forget as remote_forget
from seqpack.sources.urls import is_url

_FOOTERS: OrderedDict[str, pq.FileMetaData] = OrderedDict()
_LOCK = threading.Lock()
_MAX_FOOTERS = 256


def open_parquet(url: str, **options) -> pq.ParquetFile:
    """A ParquetFile reading ``url`` by ranges through the block cache (footer cached per process);
    ``options``: more ``pq.ParquetFile`` arguments (e.g. ``page_checksum_verification``)."""
    with _LOCK:
        meta = _FOOTERS.get(url)
    pf = pq.ParquetFile(RemoteFile(url), metadata=meta, **options)
    if meta is None:
        with _LOCK:
            _FOOTERS[url] = pf.metadata
            while len(_FOOTERS) > _MAX_FOOTERS:
                _FOOTERS.popitem(last=False)
    return pf


def forget() -> None:
    """Drop the process's cached footers and object sizes (a cold start, as in a new process)."""
    with _LOCK:
        _FOOTERS.clear()
    remote_forget()


def prefetch_footers(urls: list[str]) -> None:
    """Read the footers of the URL files among ``urls`` in parallel (``SEQPACK_PREFETCH_THREADS``),
    so opening each file after this is a cache hit; errors are left for that open to report."""
    todo = [u for u in urls if is_url(u) and u not in _FOOTERS]
    if len(todo) < 2 or store().config.prefetch <= 0:
        return
    with ThreadPoolExecutor(store().config.threads) as pool:
        list(pool.map(_footer_quietly, todo))


def _footer_quietly(url: str) -> None:
    try:
        open_parquet(url)
    except Exception:  # reported by the reader's own open, with its on_error policy
        pass


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
