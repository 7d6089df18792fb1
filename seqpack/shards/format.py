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
segments, bytes, sha256, ``footer_sha256`` of a Parquet shard's footer), the full preprocess
config (``capacity``: tokens per row), the tokenizer and length histograms. Manifest version 1
(written before the rename) called ``capacity`` ``seq_len``; :func:`read_manifest` reads both and
always returns ``capacity``.
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
from seqpack.shards.remote import check_remote
from seqpack.shards.verify import (
    ShardError,
    check_digest,
    check_entries,
    check_file,
    check_footer,
    shard_location,
)
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


# ---------------------------------------------------------------------------------------- manifest
@dataclass
class ShardInfo:
    """A written shard as the manifest lists it (``bytes``: file size; ``sha256``: hex digest;
    ``footer_sha256``: digest of a Parquet shard's footer, checked on every open, or None)."""

    name: str
    rows: int
    tokens: int
    segments: int
    bytes: int
    sha256: str
    footer_sha256: str | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> ShardInfo:
        keys = ("name", "rows", "tokens", "segments", "bytes", "sha256")
        return cls(**{k: d[k] for k in keys}, footer_sha256=d.get("footer_sha256"))


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
    except SourceError as e:  # a URL: 404 is "no manifest", like a missing local file
        missing = f"{directory}: no {MANIFEST} (not a seqpack preprocess output, or unfinished)"
        raise ShardError(missing if "(404)" in e.problem else str(e)) from None
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
    check_entries(directory, man, path)  # confined names, counts: before any shard is opened
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
    """The shard files of an output directory, in manifest order (names confined to ``directory``)."""
    return [path for path, _ in shard_entries(directory, manifest)]


def shard_entries(directory: str, manifest: dict | None = None) -> list[tuple[str, dict]]:
    """``(path, manifest entry)`` of every shard of an output directory, in manifest order."""
    man = read_manifest(directory) if manifest is None else manifest
    where = os.path.join(directory, MANIFEST)
    return [
        (shard_location(directory, s["name"], f"{where}: shards[{i}].name"), s)
        for i, s in enumerate(man["shards"])
    ]


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


def check_columns(cols: dict[str, tuple[np.ndarray, np.ndarray]], rows: int, where: str) -> None:
    """:class:`ShardError` unless decoded columns form ``rows`` well-formed rows: offsets that start
    at 0, never decrease and end at the values; segments that tile each row; a 0/1 loss mask.

    The last line of defence behind the page checksums: damage outside the data pages (page
    headers, the footer) that still decodes must not become different tokens. O(rows + segments),
    plus one pass over the mask.
    """
    problem = _columns_problem(cols, rows)
    if problem is not None:
        raise ShardError(f"{where}: corrupt ({problem})")


def _columns_problem(cols: dict[str, tuple[np.ndarray, np.ndarray]], rows: int) -> str | None:
    for c in COLUMNS:
        off, values = cols[c]
        if len(off) != rows + 1 or off[0] != 0 or off[-1] != len(values) or (np.diff(off) < 0).any():
            return f"column {c}: offsets do not describe {rows} rows"
    ids_off = cols["input_ids"][0]
    cu_off, cu = cols["cu_seqlens"]
    seg_off = cols["doc_ids"][0]
    if not np.array_equal(cols["loss_mask"][0], ids_off):
        return "loss_mask and input_ids differ in row lengths"
    if not np.array_equal(cols["seg_start"][0], seg_off) or not np.array_equal(
        cu_off, seg_off + np.arange(rows + 1)
    ):
        return "segment columns disagree on segments per row"
    if (np.diff(cu_off) < 2).any():
        return "a row without segments"
    if (cu[cu_off[:-1]] != 0).any() or not np.array_equal(cu[cu_off[1:] - 1], np.diff(ids_off)):
        return "cu_seqlens do not span their rows"
    steps = np.diff(cu.astype(np.int64))
    inner = np.ones(len(steps), bool)
    inner[cu_off[1:-1] - 1] = False  # a row's last boundary -> the next row's 0 is not a step
    if (steps[inner] <= 0).any():
        return "cu_seqlens not increasing (an empty segment)"
    mask = cols["loss_mask"][1]
    if len(mask) and mask.max() > 1:
        return "loss_mask values other than 0/1"
    return None


class ShardFile:
    """Random access to the row groups of one shard (Parquet memory-mapped, or a webdataset tar).

    A Parquet row group is decoded once (zstd pages -> Arrow buffers, every page's CRC32 verified);
    rows are then numpy views of those buffers with no further copy. A tar is one group.

    Args:
        path: the shard file.
        entry: its manifest entry; when given, the file's size (and row count) must match it, so a
            truncated or swapped shard fails on open. A webdataset shard is read whole, so its
            sha256 is checked too.
        verify: also check the sha256 of a Parquet shard on open (reads the whole file once).

    Damage raises :class:`ShardError` naming the file and, for a row group, its index.
    """

    def __init__(self, path: str, entry: dict | None = None, *, verify: bool = False):
        self.path, self.entry = path, entry
        self.fmt = "wds" if path.endswith(".tar") else "parquet"
        self._wds: dict | None = None
        if entry is not None and is_url(path):
            check_remote(path, entry, verify and self.fmt == "parquet")
        elif entry is not None:
            check_file(path, entry, sha256=verify and self.fmt == "parquet")
            if self.fmt == "parquet" and entry.get("footer_sha256"):
                # the footer has no checksum of its own, and some damage to it crashes the Parquet
                # reader (an uncatchable C++ abort in column metadata): check it before parsing it
                check_footer(path, entry)
        if self.fmt == "parquet":
            try:
                if is_url(path):  # read by ranges through the remote cache
                    self._pf = open_parquet(path, page_checksum_verification=True)
                else:
                    self._pf = pq.ParquetFile(path, memory_map=True, page_checksum_verification=True)
            except (pa.ArrowException, OSError) as e:
                raise ShardError(f"{path}: unreadable shard: {e}") from None
            schema = self._pf.schema_arrow
            missing = set(COLUMNS) - set(schema.names)
            if missing:
                raise ShardError(f"{path}: not a seqpack shard, columns {sorted(missing)} missing")
            wrong = [c for c in COLUMNS if schema.field(c).type != SCHEMA.field(c).type]
            if wrong:
                raise ShardError(
                    f"{path}: columns {wrong} have other types than a seqpack shard's (corrupt footer?)"
                )
            rows = self._pf.metadata.num_rows
            if entry is not None and rows != int(entry["rows"]):
                raise ShardError(f"{path}: {rows} rows, the manifest says {entry['rows']} (corrupt footer)")

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
            with open_input(self.path) as f:
                data = f.read()
            if self.entry is not None:  # tar members carry no checksum of their data: hash the bytes
                check_digest(self.path, hashlib.sha256(data).hexdigest(), self.entry)
            with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
                for m in tar:
                    _, col, _ = m.name.split(".", 2)
                    per[col].append(np.load(io.BytesIO(tar.extractfile(m).read()), allow_pickle=False))
        except (tarfile.TarError, OSError, ValueError, KeyError, AttributeError, EOFError) as e:
            if isinstance(e, ShardError):
                raise
            raise ShardError(f"{self.path}: corrupt webdataset shard: {e}") from None
        out = {}
        for c, arrs in per.items():
            lens = np.array([len(a) for a in arrs], np.int64)
            out[c] = (np.concatenate([[0], np.cumsum(lens)]), np.concatenate(arrs) if arrs else np.zeros(0))
        rows = len(per["input_ids"])
        check_columns(out, rows, f"{self.path}")
        if self.entry is not None and rows != int(self.entry["rows"]):
            raise ShardError(f"{self.path}: {rows} rows, the manifest says {self.entry['rows']}")
        return out

    def group_columns(self, g: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{column: (offsets, values)}`` of row group ``g`` (values are views, not copies).

        Raises :class:`ShardError` naming the file and row group when a page fails its checksum,
        does not decode, or the decoded rows are malformed.
        """
        if self.fmt == "wds":
            return self._read_wds()
        where = f"{self.path}: row group {g}"
        try:
            table = self._pf.read_row_group(g, columns=list(COLUMNS))
            cols = table_columns(table)
        except (pa.ArrowException, OSError, ShardError, KeyError, AttributeError) as e:  # a type changed
            raise ShardError(f"{where}: unreadable ({e})") from None
        check_columns(cols, self._pf.metadata.row_group(g).num_rows, where)
        # readers partition a group by the footer's value counts (SeqpackShardReader.unit_sizes):
        # they must be the decoded ones, or a damaged footer would lose or repeat segments
        for c, n in self.group_value_counts(g).items():
            if n != len(cols[c][1]):
                raise ShardError(f"{where}: corrupt (column {c}: {len(cols[c][1])} values, footer: {n})")
        return cols

    def group_value_counts(self, g: int) -> dict[str, int]:
        """``{column: values}`` of Parquet row group ``g`` from the footer alone (no decoding):
        tokens for ``input_ids``, segments for ``doc_ids``. :class:`ShardError` when the footer's
        column list is not the shard schema's (a damaged footer)."""
        try:
            rg = self._pf.metadata.row_group(g)
            names = [rg.column(i).path_in_schema.split(".")[0] for i in range(rg.num_columns)]
            if names != list(COLUMNS):
                raise ShardError(f"columns {names}, not {list(COLUMNS)}")
            return {c: int(rg.column(i).num_values) for i, c in enumerate(COLUMNS)}
        except (ShardError, pa.ArrowException, ValueError, IndexError) as e:  # UnicodeDecodeError too
            raise ShardError(f"{self.path}: row group {g}: corrupt footer ({e})") from None

    def rows(self) -> Iterator[PackedRow]:
        for g in range(self.num_groups):
            for _, row in rows_of_columns(self.group_columns(g)):
                yield row
