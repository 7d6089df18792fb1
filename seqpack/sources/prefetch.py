"""Background prefetch of a reader's next units when its shards are remote.

When a reader starts a unit it calls :func:`schedule`: the byte ranges of the next
``SEQPACK_PREFETCH`` units of its plan (a Parquet row group's projected column chunks, the head of
a stream) are fetched on the block store's thread pool, so the range requests of unit ``u + 1``
overlap with decoding, tokenizing and packing unit ``u``. Prefetch only fills the cache: positions,
partition and resume are the reader's as for local files, and a failed prefetch is left for the
real read (which retries and reports).
"""

from __future__ import annotations

import logging

from seqpack.sources.cache import store
from seqpack.sources.remote import RemoteFile
from seqpack.sources.urls import is_url

log = logging.getLogger(__name__)

STREAM_HEAD_BLOCKS = 4  # blocks of a stream's file fetched ahead; reading it then reads further ahead
_MAX_SEEN = 4096


def schedule(reader) -> None:
    """Prefetch the units after ``reader``'s current one (each unit at most once per reader).

    ``reader`` provides ``upcoming_units(depth) -> [(shard, unit)]``, ``paths`` and
    ``unit_ranges(shard, path, unit) -> [(start, end)] | None`` (None: the file's head).
    """
    depth = store().config.prefetch
    if depth <= 0:
        return
    seen = reader.__dict__.setdefault("_prefetched", set())
    if len(seen) > _MAX_SEEN:
        seen.clear()
    for shard, unit in reader.upcoming_units(depth):
        path = reader.paths[shard]
        if (shard, unit) in seen or not is_url(path):
            continue
        seen.add((shard, unit))
        store().submit(_fetch_unit, reader, shard, path, unit)


def _fetch_unit(reader, shard: int, path: str, unit: int) -> None:
    try:
        ranges = reader.unit_ranges(shard, path, unit)
        if ranges is None:  # a stream: its first blocks (reading it then reads further ahead)
            RemoteFile(path, sequential=True).pread(0, STREAM_HEAD_BLOCKS * store().config.block_bytes)
            return
        f = RemoteFile(path)
        for start, end in ranges:
            f.pread(start, end)
    except Exception as e:  # the reader's own read of the unit retries and reports
        log.debug("prefetch of %s unit %d failed: %s", path, unit, e)
