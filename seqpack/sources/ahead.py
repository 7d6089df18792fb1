"""Decode a reader's next unit on a background thread while the chain packs the current one.

Decoding a Parquet row group (decompression, list offsets) is ~40% of a pre-tokenized chain's time
and releases the GIL, so a thread can do it for unit ``u + 1`` while the packing of unit ``u`` runs:
measured in a DataLoader worker, the chain's wall time per batch drops by about the decode time when
a core has room (the main process of a training job leaves most of one idle). The thread only
produces blocks the reader would have produced itself, from its own file handle: positions, the
partition, state and resume are the reader's as without it, and a unit whose read fails on the
thread is read again in the reader's thread, which reports the error as always.

``SEQPACK_DECODE_AHEAD`` (default 1): units decoded ahead per reader; 0 turns it off.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

DEPTH = int(os.environ.get("SEQPACK_DECODE_AHEAD", 1))


class DecodeAhead:
    """One reader's background decoder.

    ``decode(shard, unit)`` builds a unit's block; it runs on the thread, so it must not share
    mutable state (an open file handle) with the reader's own reads.
    """

    def __init__(self, decode: Callable[[int, int], Any], depth: int = DEPTH):
        self.decode, self.depth = decode, depth
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[tuple[int, int], Future] = {}

    def block(self, shard: int, unit: int, upcoming: list[tuple[int, int]], read: Callable[[], Any]) -> Any:
        """The block of ``(shard, unit)``: decoded ahead when it was, else ``read()`` (in this thread).
        Schedules ``upcoming`` (the units after it, in order) first, so they decode meanwhile."""
        fut = self._pending.pop((shard, unit), None)
        wanted = upcoming[: self.depth]
        for key in list(self._pending):  # the plan moved on (a reset): drop what it no longer needs
            if key not in wanted:
                self._pending.pop(key).cancel()
        for key in wanted:
            if key not in self._pending:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="seqpack-decode")
                self._pending[key] = self._pool.submit(self.decode, *key)
        if fut is not None:
            try:
                return fut.result()
            except Exception:  # noqa: BLE001 - read again here, where errors are reported by policy
                pass
        return read()

    def __getstate__(self) -> dict:
        # a reader copied into a DataLoader worker starts with no thread and nothing pending
        return {"decode": self.decode, "depth": self.depth, "_pool": None, "_pending": {}}


def read_unit_block(reader: Any, shard: int, unit: int) -> Any:
    """``reader.unit_block`` of ``(shard, unit)``, decoded ahead when the reader can do that on a
    thread (it has ``detached_unit_block(shard, unit)``, working from its own file handle)."""
    path = reader.paths[shard]
    detached = getattr(reader, "detached_unit_block", None)
    if DEPTH <= 0 or detached is None:
        return reader.unit_block(shard, path, unit)
    ahead = reader.__dict__.get("_ahead")
    if ahead is None:
        ahead = reader._ahead = DecodeAhead(detached)
    return ahead.block(
        shard, unit, reader.upcoming_units(ahead.depth), lambda: reader.unit_block(shard, path, unit)
    )
