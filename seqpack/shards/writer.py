"""Writing shards and JSON files atomically: rows in flat (CSR) form in, a manifest entry out.

Every write goes to a hidden temporary file in the same directory, is fsynced and then renamed,
so a shard either exists whole or not at all; ``manifest.json`` is written the same way, last.
The same rows always give the same bytes (no timestamps or run-dependent metadata).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from seqpack.shards.format import (
    ARROW_TYPES,
    COLUMNS,
    SCHEMA,
    SHARD_FORMATS,
    ShardInfo,
    table_columns,
)
from seqpack.shards.verify import file_sha256, footer_sha256


# ---------------------------------------------------------------------------------------- atomic files
def fsync_dir(path: str) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(path: str) -> str:
    """Hidden temporary name next to ``path``: never matched by ``*`` globs or listed as a shard."""
    d, name = os.path.split(path)
    return os.path.join(d, f".{name}.tmp-{os.getpid()}")


@contextmanager
def atomic_write(path: str) -> Iterator[str]:
    """Yield a temporary path to write; on success fsync it and rename it to ``path``.

    On any exception (including KeyboardInterrupt) the temporary file is removed and ``path`` is
    left as it was, so readers see the old file or the new one, never a partial one.
    """
    tmp = temp_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path) or ".")
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str, obj: Any) -> None:
    """Write ``obj`` as canonical JSON (sorted keys, so equal content gives equal bytes)."""
    data = (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def save_npz_atomic(path: str, **arrays: np.ndarray) -> None:
    """``np.savez`` through :func:`atomic_write`."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


# ---------------------------------------------------------------------------------------- rows in memory
def arrow_array(values: np.ndarray, dtype) -> pa.Array:
    """A numpy array as an Arrow array without a copy (``pa.array`` would import pandas: ~1 s a process)."""
    a = np.ascontiguousarray(values, dtype=dtype)
    return pa.Array.from_buffers(ARROW_TYPES[a.dtype], len(a), [None, pa.py_buffer(a)])


@dataclass
class PackedRows:
    """Rows in flat (CSR) form, the unit a writer takes.

    Attributes:
        input_ids: int32 ``[T]``, tokens of all rows back to back.
        loss_mask: uint8 ``[T]``.
        row_offsets: int64 ``[R + 1]``, token range of each row.
        seg_offsets: int64 ``[R + 1]``, segment range of each row in the ``seg_*`` arrays.
        seg_len: int64 ``[S]``, tokens per segment (> 0).
        seg_doc_id: int64 ``[S]``, global document id per segment.
        seg_start: int64 ``[S]``, offset of the segment inside its document.
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    row_offsets: np.ndarray
    seg_offsets: np.ndarray
    seg_len: np.ndarray
    seg_doc_id: np.ndarray
    seg_start: np.ndarray

    @property
    def n_rows(self) -> int:
        return len(self.row_offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.row_offsets[-1] - self.row_offsets[0])

    @property
    def n_segments(self) -> int:
        return int(self.seg_offsets[-1] - self.seg_offsets[0])

    def row_lengths(self) -> np.ndarray:
        return np.diff(self.row_offsets)

    def slice(self, r0: int, r1: int) -> PackedRows:
        """Rows ``[r0, r1)`` (views, offsets rebased to 0)."""
        t0, t1 = int(self.row_offsets[r0]), int(self.row_offsets[r1])
        s0, s1 = int(self.seg_offsets[r0]), int(self.seg_offsets[r1])
        return PackedRows(
            self.input_ids[t0:t1],
            self.loss_mask[t0:t1],
            self.row_offsets[r0 : r1 + 1] - t0,
            self.seg_offsets[r0 : r1 + 1] - s0,
            self.seg_len[s0:s1],
            self.seg_doc_id[s0:s1],
            self.seg_start[s0:s1],
        )

    def validate(self) -> None:
        """Raise ``ValueError`` unless segments tile the rows exactly."""
        if len(self.input_ids) != len(self.loss_mask):
            raise ValueError("input_ids and loss_mask differ in length")
        if (self.seg_len <= 0).any():
            raise ValueError(f"segment {int(np.flatnonzero(self.seg_len <= 0)[0])} is empty")
        per_row = np.add.reduceat(self.seg_len, self.seg_offsets[:-1]) if self.n_segments else np.zeros(0)
        if self.n_rows and (np.diff(self.seg_offsets) == 0).any():
            raise ValueError(f"row {int(np.flatnonzero(np.diff(self.seg_offsets) == 0)[0])} has no segment")
        if not np.array_equal(per_row, self.row_lengths()):
            raise ValueError("segment lengths do not add up to row lengths")

    def table(self) -> pa.Table:
        """The rows as an Arrow table with the shard schema (no per-row Python objects)."""
        cu_offsets = (self.seg_offsets + np.arange(self.n_rows + 1)).astype(np.int32)
        cu = np.zeros(self.n_segments + self.n_rows, np.int32)
        # segments tile their rows in order: a segment's end inside its row is the running token
        # count minus the row's first token offset
        seg_row = np.repeat(np.arange(self.n_rows), np.diff(self.seg_offsets))
        within = np.cumsum(self.seg_len) + self.row_offsets[0] - self.row_offsets[seg_row]
        cu[np.arange(self.n_segments) + seg_row + 1] = within
        row_off = self.row_offsets.astype(np.int32)
        seg_off = self.seg_offsets.astype(np.int32)

        def lists(offsets: np.ndarray, values: np.ndarray, dtype) -> pa.ListArray:
            return pa.ListArray.from_arrays(arrow_array(offsets, np.int32), arrow_array(values, dtype))

        arrays = [
            lists(row_off, self.input_ids, np.int32),
            lists(row_off, self.loss_mask, np.uint8),
            lists(cu_offsets, cu, np.int32),
            lists(seg_off, self.seg_doc_id, np.int64),
            lists(seg_off, self.seg_start, np.int64),
        ]
        return pa.Table.from_arrays(arrays, schema=SCHEMA)


# ---------------------------------------------------------------------------------------- shard files
def _write_parquet(tmp: str, rows: PackedRows, row_group_rows: int, compression_level: int) -> None:
    pq.write_table(
        rows.table(),
        tmp,
        row_group_size=max(1, row_group_rows),
        compression="zstd",
        compression_level=compression_level,
        # token ids are near-random over a large vocabulary: dictionary pages only cost time
        use_dictionary=["loss_mask"],
        write_statistics=False,
        store_schema=True,
        # CRC32 of every page: a flipped bit in a page fails its row group on read instead of
        # decoding to different tokens (ShardFile reads with page_checksum_verification)
        write_page_checksum=True,
    )


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _write_wds(tmp: str, rows: PackedRows) -> None:
    cols = table_columns(rows.table())
    with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for r in range(rows.n_rows):
            for c in COLUMNS:
                off, values = cols[c]
                data = _npy_bytes(values[off[r] : off[r + 1]])
                # fixed metadata (no mtime/owner) so the same rows always give the same bytes
                info = tarfile.TarInfo(f"{r:08d}.{c}.npy")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))


def write_shard(
    path: str,
    rows: PackedRows,
    *,
    fmt: str = "parquet",
    row_group_rows: int = 256,
    compression_level: int = 3,
) -> ShardInfo:
    """Write ``rows`` to ``path`` atomically and return its manifest entry.

    Args:
        fmt: ``parquet`` (zstd, ``row_group_rows`` rows per row group) or ``wds`` (tar of ``.npy``).
    """
    if fmt not in SHARD_FORMATS:
        raise ValueError(f"format must be one of {SHARD_FORMATS}, got {fmt!r}")
    with atomic_write(path) as tmp:
        if fmt == "parquet":
            _write_parquet(tmp, rows, row_group_rows, compression_level)
        else:
            _write_wds(tmp, rows)
    return ShardInfo(
        name=os.path.basename(path),
        rows=rows.n_rows,
        tokens=rows.n_tokens,
        segments=rows.n_segments,
        bytes=os.path.getsize(path),
        sha256=file_sha256(path),
        footer_sha256=footer_sha256(path) if fmt == "parquet" else None,
    )
