"""On-disk shard format of preprocessed data: writer, reader, manifest.

A shard holds *rows*; a row is one training sequence made of one or more document segments
(``cu_seqlens`` marks their boundaries). Packed shards have many segments per row, unpacked and
decomposed shards one. Columns (Parquet, zstd; or the same arrays as ``.npy`` members of a
webdataset tar, one sample per row):

====================  ================  =================================================
``input_ids``         ``list<int32>``   token ids of the row, ``[T_row]``
``loss_mask``         ``list<uint8>``   1 = the token is a target, ``[T_row]``
``cu_seqlens``        ``list<int32>``   segment boundaries ``[n_seg + 1]``, ``0 .. T_row``
``doc_ids``           ``list<int64>``   global document id of each segment ``[n_seg]``
``seg_start``         ``list<int64>``   offset of each segment inside its document ``[n_seg]``
====================  ================  =================================================

Labels are not stored: they are ``input_ids`` where ``loss_mask`` is 1 and ``-100`` elsewhere, with
the first token of every segment masked (:meth:`PackedRow.to_batch` builds them through
:meth:`seqpack.VarlenBatch.from_segments`). The loss mask is ``uint8`` rather than ``bool`` because
Arrow bit-packs booleans, which would force a copy on every read.

Every write goes to a hidden temporary file in the same directory, is fsynced and then renamed,
so a shard either exists whole or not at all; ``manifest.json`` is written the same way, last.
"""

from __future__ import annotations

import hashlib
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

from seqpack.node import Node
from seqpack.sources.reader import Reader
from seqpack.sources.records import Record, SourceError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "seqpack-shards"
MANIFEST_VERSION = 1
SHARD_FORMATS = ("parquet", "wds")
SHARD_SUFFIX = {"parquet": ".parquet", "wds": ".tar"}
COLUMNS = ("input_ids", "loss_mask", "cu_seqlens", "doc_ids", "seg_start")
SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("loss_mask", pa.list_(pa.uint8())),
        ("cu_seqlens", pa.list_(pa.int32())),
        ("doc_ids", pa.list_(pa.int64())),
        ("seg_start", pa.list_(pa.int64())),
    ]
)


class ShardError(ValueError):
    """A shard or manifest that is missing, corrupt or does not match its manifest entry."""


# ---------------------------------------------------------------------------------------- rows in memory
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
        """The rows as an Arrow table with :data:`SCHEMA` (no per-row Python objects)."""
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
            return pa.ListArray.from_arrays(_arrow(offsets, np.int32), _arrow(values, dtype))

        arrays = [
            lists(row_off, self.input_ids, np.int32),
            lists(row_off, self.loss_mask, np.uint8),
            lists(cu_offsets, cu, np.int32),
            lists(seg_off, self.seg_doc_id, np.int64),
            lists(seg_off, self.seg_start, np.int64),
        ]
        return pa.Table.from_arrays(arrays, schema=SCHEMA)


_ARROW_TYPES = {np.dtype(t): pa.from_numpy_dtype(np.dtype(t)) for t in (np.int32, np.int64, np.uint8)}
_NUMPY_TYPES = {v: k for k, v in _ARROW_TYPES.items()}


def _arrow(values: np.ndarray, dtype) -> pa.Array:
    """A numpy array as an Arrow array without a copy (``pa.array`` would import pandas: ~1 s a process)."""
    a = np.ascontiguousarray(values, dtype=dtype)
    return pa.Array.from_buffers(_ARROW_TYPES[a.dtype], len(a), [None, pa.py_buffer(a)])


def _numpy(arr: pa.Array) -> np.ndarray:
    """Zero-copy numpy view of a null-free primitive Arrow array (``to_numpy`` would import pandas)."""
    if arr.null_count:
        raise ShardError(f"unexpected nulls in a {arr.type} column")
    dt = _NUMPY_TYPES[arr.type]
    return np.frombuffer(arr.buffers()[1], dt, count=len(arr), offset=arr.offset * dt.itemsize)


@dataclass
class PackedRow:
    """One row read back from a shard; every array is a view over the shard's decoded buffers.

    Attributes:
        input_ids: int32 ``[T]``; loss_mask: uint8 ``[T]``; cu_seqlens: int32 ``[n_seg + 1]``;
        doc_ids: int64 ``[n_seg]``; seg_start: int64 ``[n_seg]``.
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    cu_seqlens: np.ndarray
    doc_ids: np.ndarray
    seg_start: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_segments(self) -> int:
        return len(self.doc_ids)

    def segments(self) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """``(doc_id, seg_start, tokens, loss_mask)`` per segment (views)."""
        cu = self.cu_seqlens
        for i in range(self.n_segments):
            a, b = int(cu[i]), int(cu[i + 1])
            yield int(self.doc_ids[i]), int(self.seg_start[i]), self.input_ids[a:b], self.loss_mask[a:b]

    def to_batch(self, *, pad_to: int | None = None, pad_id: int = 0, continue_positions: bool = False):
        """This row as a :class:`seqpack.VarlenBatch` (labels from the loss mask, boundaries masked)."""
        from seqpack.batch import VarlenBatch

        segs = list(self.segments())
        return VarlenBatch.from_segments(
            [s[2] for s in segs],
            self.doc_ids,
            seg_start=self.seg_start,
            loss_masks=[s[3].view(bool) for s in segs],
            pad_to=pad_to,
            pad_id=pad_id,
            continue_positions=continue_positions,
        )


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


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- writing
@dataclass
class ShardInfo:
    """A written shard as the manifest lists it."""

    name: str
    rows: int
    tokens: int
    segments: int
    bytes: int
    sha256: str

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> ShardInfo:
        return cls(**{k: d[k] for k in ("name", "rows", "tokens", "segments", "bytes", "sha256")})


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
    )


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _write_wds(tmp: str, rows: PackedRows) -> None:
    cols = _columns(rows.table())
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
    )


def verify_shard(directory: str, info: ShardInfo | dict) -> bool:
    """True when the shard file exists with the size and sha256 its manifest entry records."""
    info = ShardInfo.from_dict(info) if isinstance(info, dict) else info
    path = os.path.join(directory, info.name)
    return os.path.isfile(path) and os.path.getsize(path) == info.bytes and file_sha256(path) == info.sha256


# ---------------------------------------------------------------------------------------- manifest
def read_manifest(directory: str) -> dict:
    """Load and check ``DIR/manifest.json``; :class:`ShardError` names what is wrong."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise ShardError(f"{directory}: no {MANIFEST} (not a seqpack preprocess output, or unfinished)")
    try:
        with open(path, encoding="utf-8") as f:
            man = json.load(f)
    except (OSError, ValueError) as e:
        raise ShardError(f"{path}: unreadable manifest: {e}") from None
    if not isinstance(man, dict) or man.get("format") != MANIFEST_FORMAT:
        fmt = man.get("format") if isinstance(man, dict) else None
        raise ShardError(f"{path}: not a seqpack manifest (format is {fmt!r})")
    if man.get("version") != MANIFEST_VERSION:
        raise ShardError(f"{path}: manifest version {man.get('version')} unsupported")
    return man


def shard_paths(directory: str, manifest: dict | None = None) -> list[str]:
    man = read_manifest(directory) if manifest is None else manifest
    return [os.path.join(directory, s["name"]) for s in man["shards"]]


# ---------------------------------------------------------------------------------------- reading
def _columns(table: pa.Table) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per column ``(offsets, values)`` numpy views over the table's Arrow buffers."""
    out = {}
    for c in COLUMNS:
        col = table.column(c)
        arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
        out[c] = (_numpy(arr.offsets), _numpy(arr.values))
    return out


def _rows_of_columns(cols: dict, first: int = 0, step: int = 1) -> Iterator[tuple[int, PackedRow]]:
    off, _ = cols["input_ids"]
    for r in range(first, len(off) - 1, step):
        parts = []
        for c in COLUMNS:
            o, v = cols[c]
            parts.append(v[o[r] : o[r + 1]])
        yield r, PackedRow(*parts)


class ShardFile:
    """Random access to the row groups of one shard (Parquet memory-mapped, or a webdataset tar).

    A Parquet row group is decoded once (zstd pages -> Arrow buffers); rows are then numpy views
    of those buffers with no further copy. A tar is one group.
    """

    def __init__(self, path: str):
        self.path = path
        self.fmt = "wds" if path.endswith(".tar") else "parquet"
        if self.fmt == "parquet":
            try:
                self._pf = pq.ParquetFile(path, memory_map=True)
            except (pa.ArrowException, OSError) as e:
                raise ShardError(f"{path}: unreadable shard: {e}") from None
            missing = set(COLUMNS) - set(self._pf.schema_arrow.names)
            if missing:
                raise ShardError(f"{path}: not a seqpack shard, columns {sorted(missing)} missing")

    @property
    def num_groups(self) -> int:
        return self._pf.metadata.num_row_groups if self.fmt == "parquet" else 1

    def group_rows(self, g: int) -> int:
        if self.fmt == "parquet":
            return self._pf.metadata.row_group(g).num_rows
        return len(self._read_wds()["input_ids"][0]) - 1

    def _read_wds(self) -> dict:
        if getattr(self, "_wds", None) is None:
            self._wds = self._load_wds()
        return self._wds

    def _load_wds(self) -> dict:
        per: dict[str, list[np.ndarray]] = {c: [] for c in COLUMNS}
        try:
            with tarfile.open(self.path, "r") as tar:
                for m in tar:
                    key, col, _ = m.name.split(".", 2)
                    per[col].append(np.load(io.BytesIO(tar.extractfile(m).read()), allow_pickle=False))
        except (tarfile.TarError, OSError, ValueError, KeyError) as e:
            raise ShardError(f"{self.path}: corrupt webdataset shard: {e}") from None
        out = {}
        for c, arrs in per.items():
            lens = np.array([len(a) for a in arrs], np.int64)
            out[c] = (np.concatenate([[0], np.cumsum(lens)]), np.concatenate(arrs) if arrs else np.zeros(0))
        return out

    def group_columns(self, g: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{column: (offsets, values)}`` of row group ``g`` (values are views, not copies)."""
        if self.fmt == "wds":
            return self._read_wds()
        try:
            table = self._pf.read_row_group(g, columns=list(COLUMNS))
        except (pa.ArrowException, OSError) as e:
            raise ShardError(f"{self.path}: unreadable row group {g}: {e}") from None
        return _columns(table)

    def rows(self) -> Iterator[PackedRow]:
        for g in range(self.num_groups):
            for _, row in _rows_of_columns(self.group_columns(g)):
                yield row


def iter_rows(directory: str) -> Iterator[PackedRow]:
    """Every row of a preprocess output directory, shard by shard in manifest order."""
    for path in shard_paths(directory):
        yield from ShardFile(path).rows()


def _list_dirs(paths) -> list[str]:
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    return [os.fspath(p) for p in items]


class SeqpackShardReader(Reader):
    """Documents back out of preprocessed shards, as a source of the loader (``format: "seqpack"``).

    ``paths``: one or more preprocess output directories (each with its ``manifest.json``). Units are
    Parquet row groups; a unit's raw records are its segments in row order, so the reader's
    rank x worker partition and ``(unit, record)`` resume work unchanged. Each record is
    pre-tokenized: ``tokens`` is an int32 view over the decoded shard (no copy), ``loss_mask`` a
    bool view, ``doc_id`` the id stored at preprocessing (not a new positional id; two outputs
    preprocessed from different inputs can therefore share ids). A document split over several
    rows comes back as several records (one per stored segment) with the same id.
    """

    format = "seqpack"

    def __init__(self, paths, **kwargs):
        kwargs.setdefault("input_ids_key", "input_ids")
        super().__init__(paths, **kwargs)
        self._files: dict[int, ShardFile] = {}

    def resolve(self, paths) -> list[str]:
        out = []
        for d in _list_dirs(paths):
            out.extend(shard_paths(d))
        return out

    def _file(self, shard: int, path: str) -> ShardFile:
        f = self._files.get(shard)
        if f is None:
            try:
                f = ShardFile(path)
            except ShardError as e:
                raise SourceError(path, None, None, str(e)) from None
            self._files = {shard: f}  # one open file at a time
        return f

    def shard_units(self, shard: int, path: str) -> int:
        return self._file(shard, path).num_groups

    def read_unit(self, shard: int, path: str, unit: int, first: int, step: int) -> Iterator[tuple[int, Any]]:
        try:
            cols = self._file(shard, path).group_columns(unit)
        except ShardError as e:
            raise SourceError(path, None, None, str(e)) from None
        ids_off, ids = cols["input_ids"]
        mask = cols["loss_mask"][1].view(bool)
        cu_off, cu = cols["cu_seqlens"]
        _, doc_ids = cols["doc_ids"]
        n_rows = len(ids_off) - 1
        # segment s of the group lives in row seg_row[s]; its tokens start at ids_off[row] + cu[...]
        n_seg_per_row = np.diff(cu_off) - 1
        seg_row = np.repeat(np.arange(n_rows), n_seg_per_row)
        seg_cu = np.delete(np.arange(len(cu)), cu_off[1:] - 1)  # index of each segment's start in cu
        for s in range(first, len(seg_row), step):
            r = seg_row[s]
            a = int(ids_off[r] + cu[seg_cu[s]])
            b = int(ids_off[r] + cu[seg_cu[s] + 1])
            m = mask[a:b]
            yield s, Record(int(doc_ids[s]), self.name, tokens=ids[a:b], loss_mask=None if m.all() else m)


class PackedRowReader(Node):
    """Packed rows of preprocessed shards as :class:`~seqpack.batch.VarlenBatch` es, resumable.

    Consumer ``k`` of ``n`` takes rows ``k, k+n, ...`` of the canonical order (shards in manifest
    order, rows in file order), so every consumer gets the same number of rows within one. State:
    ``{"shard": i, "row": j}``, the next row to read.

    Args:
        paths: preprocess output directory or directories.
        consumer: ``(k, n)``.
        pad_to: pad every batch to this many tokens (e.g. the manifest's ``seq_len``).
        as_batch: yield VarlenBatch (default) or :class:`PackedRow` views.
    """

    def __init__(self, paths, *, consumer: tuple[int, int] = (0, 1), pad_to: int | None = None,
                 as_batch: bool = True):
        super().__init__()
        self.paths, self.rows_per_shard = [], []
        for d in _list_dirs(paths):
            man = read_manifest(d)
            self.paths += shard_paths(d, man)
            self.rows_per_shard += [int(s["rows"]) for s in man["shards"]]
        self.consumer, self.pad_to, self.as_batch = consumer, pad_to, as_batch
        self.row0 = np.concatenate([[0], np.cumsum(self.rows_per_shard)]).astype(np.int64)

    def __len__(self) -> int:
        k, n = self.consumer
        total = int(self.row0[-1])
        return max(0, -(-(total - k) // n))

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        k, n = self.consumer
        self._shard = 0 if initial_state is None else int(initial_state["shard"])
        self._row = k if initial_state is None else int(initial_state["row"])
        self._it: Iterator | None = None

    def get_state(self) -> dict:
        return {"shard": self._shard, "row": self._row}

    def next(self):
        k, n = self.consumer
        while True:
            if self._shard >= len(self.paths):
                raise StopIteration
            if self._it is None:
                self._it = self._shard_rows(self._shard, self._row)
            try:
                row_idx, row = next(self._it)
            except StopIteration:
                # first row of the next shard owned by k in the global order
                nxt = self._shard + 1
                if nxt < len(self.paths):
                    g = int(self.row0[nxt])
                    self._row = (k - g) % n
                self._shard, self._it = nxt, None
                continue
            self._row = row_idx + n
            return row.to_batch(pad_to=self.pad_to) if self.as_batch else row

    def _shard_rows(self, shard: int, first: int) -> Iterator[tuple[int, PackedRow]]:
        f = ShardFile(self.paths[shard])
        g0 = 0
        for g in range(f.num_groups):
            nrows = f.group_rows(g)
            if first < g0 + nrows:
                cols = f.group_columns(g)
                lo = first - g0
                for r, row in _rows_of_columns(cols, lo, self.consumer[1]):
                    yield g0 + r, row
                    first = g0 + r + self.consumer[1]
            g0 += nrows
