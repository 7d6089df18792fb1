"""The on-disk format of preprocessed data: shard columns, the manifest, and checking both.

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

An output directory holds the shards and ``manifest.json``: the shard list (name, rows, tokens,
segments, bytes, sha256), the full preprocess config (``capacity``: tokens per row), the tokenizer
and length histograms. Manifest version 1 (written before the rename) called ``capacity``
``seq_len``; :func:`read_manifest` reads both and always returns ``capacity``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from seqpack.batch import VarlenBatch
from seqpack.sources.records import SourceError
from seqpack.sources.remote import open_input
from seqpack.sources.rowgroups import open_parquet
from seqpack.sources.urls import is_url, join

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "seqpack-shards"
# 2: the config's row size is ``capacity`` (version 1 said ``seq_len``); both are read
MANIFEST_VERSION = 2
READABLE_VERSIONS = (1, 2)
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
ARROW_TYPES = {np.dtype(t): pa.from_numpy_dtype(np.dtype(t)) for t in (np.int32, np.int64, np.uint8)}
_NUMPY_TYPES = {v: k for k, v in ARROW_TYPES.items()}


class ShardError(ValueError):
    """A shard or manifest that is missing, corrupt or does not match its manifest entry."""


# ---------------------------------------------------------------------------------------- manifest
@dataclass
class ShardInfo:
    """A written shard as the manifest lists it (``bytes``: file size; ``sha256``: hex digest)."""

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


def file_sha256(path: str) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify_shard(directory: str, info: ShardInfo | dict) -> bool:
    """True when the shard file exists with the size and sha256 its manifest entry records."""
    info = ShardInfo.from_dict(info) if isinstance(info, dict) else info
    path = os.path.join(directory, info.name)
    return os.path.isfile(path) and os.path.getsize(path) == info.bytes and file_sha256(path) == info.sha256


def read_manifest(directory: str) -> dict:
    """Load and check ``DIR/manifest.json``; :class:`ShardError` names what is wrong.

    A version-1 manifest's ``config.seq_len`` comes back as ``config.capacity``.
    """
    path = join(directory, MANIFEST)
    if not is_url(path) and not os.path.isfile(path):
        raise ShardError(f"{directory}: no {MANIFEST} (not a seqpack preprocess output, or unfinished)")
    try:
        with open_input(path) as f:  # a URL: through the retrying remote reader
            man = json.loads(f.read().decode("utf-8"))
    except SourceError as e:
        if "(404)" in e.problem:
            raise ShardError(
                f"{directory}: no {MANIFEST} (not a seqpack preprocess output, or unfinished)"
            ) from None
        raise ShardError(str(e)) from None
    except (OSError, ValueError) as e:
        raise ShardError(f"{path}: unreadable manifest: {e}") from None
    if not isinstance(man, dict) or man.get("format") != MANIFEST_FORMAT:
        fmt = man.get("format") if isinstance(man, dict) else None
        raise ShardError(f"{path}: not a seqpack manifest (format is {fmt!r})")
    if man.get("version") not in READABLE_VERSIONS:
        raise ShardError(f"{path}: manifest version {man.get('version')} unsupported")
    cfg = man.get("config")
    if isinstance(cfg, dict) and "seq_len" in cfg and "capacity" not in cfg:
        cfg["capacity"] = cfg.pop("seq_len")
    return man


def max_row_tokens(manifest: dict) -> int:
    """The longest row a preprocess output can hold: ``capacity``, or for ``decompose`` its largest
    bucket ``2^floor(log2(capacity)) + 1`` (a piece carries one extra token for its shifted target)."""
    cfg = manifest["config"]
    capacity = int(cfg["capacity"])
    if cfg.get("strategy") == "decompose":
        return (1 << int(math.floor(math.log2(capacity)))) + 1
    return capacity


def shard_paths(directory: str, manifest: dict | None = None) -> list[str]:
    """The shard files of an output directory, in manifest order."""
    man = read_manifest(directory) if manifest is None else manifest
    return [join(directory, s["name"]) for s in man["shards"]]


# ---------------------------------------------------------------------------------------- rows
def numpy_view(arr: pa.Array) -> np.ndarray:
    """Zero-copy numpy view of a null-free primitive Arrow array (``to_numpy`` would import pandas)."""
    if arr.null_count:
        raise ShardError(f"unexpected nulls in a {arr.type} column")
    dt = _NUMPY_TYPES[arr.type]
    return np.frombuffer(arr.buffers()[1], dt, count=len(arr), offset=arr.offset * dt.itemsize)


def table_columns(table: pa.Table) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per column ``(offsets, values)`` numpy views over the table's Arrow buffers."""
    out = {}
    for c in COLUMNS:
        col = table.column(c)
        arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
        out[c] = (numpy_view(arr.offsets), numpy_view(arr.values))
    return out


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

    def to_batch(
        self, *, pad_to: int | None = None, pad_id: int = 0, continue_positions: bool = False
    ) -> VarlenBatch:
        """This row as a :class:`seqpack.VarlenBatch` (labels from the loss mask, boundaries masked)."""
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


def rows_of_columns(cols: dict, first: int = 0, step: int = 1) -> Iterator[tuple[int, PackedRow]]:
    """``(row index, row)`` for rows ``first, first + step, ...`` of :func:`table_columns` output."""
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
        self._wds: dict | None = None
        if self.fmt == "parquet":
            try:
                self._pf = open_parquet(path) if is_url(path) else pq.ParquetFile(path, memory_map=True)
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
        if self._wds is None:
            self._wds = self._load_wds()
        return self._wds

    def _load_wds(self) -> dict:
        per: dict[str, list[np.ndarray]] = {c: [] for c in COLUMNS}
        try:
            with open_input(self.path) as f, tarfile.open(fileobj=f, mode="r") as tar:
                for m in tar:
                    _, col, _ = m.name.split(".", 2)
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
        return table_columns(table)

    def rows(self) -> Iterator[PackedRow]:
        for g in range(self.num_groups):
            for _, row in rows_of_columns(self.group_columns(g)):
                yield row
