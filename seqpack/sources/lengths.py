"""Length index of a source: the token length of every record, built once and cached on disk.

Counting a consumer's batches (``SeqpackLoader.steps_per_epoch``, ``even_batches="precount"``,
the ``balance:`` transform's step count) needs the lengths of the documents a consumer reads, in
its order, not their tokens. :class:`LengthIndex` holds, for every record of one source, where it
sits (``shard``, ``unit``, raw record index in the unit), its ``doc_id``, its token length after
tokenization (BOS/EOS included; 0 for a record that encodes to nothing, which tokenization drops)
and its group. It is built by reading and tokenizing the source once (one consumer, every unit),
and cached under :func:`cache_dir` keyed by the files' identity (path, size, mtime), the source
options (fields, ``on_error``, source index) and the tokenizer spec (and its file's identity), so
a changed file or tokenizer builds a new index. Written atomically (temporary file + rename): a
crashed build never leaves a half-written index behind; processes asking at once (ranks, workers)
take turns on a lock file beside it, so the index is built once and the others load it.

:class:`IndexedDocuments` then plays a consumer's reader + tokenizer from the index alone: the
same documents in the same order with the right lengths, tokens all zero. Records a reader skips
under ``on_error="skip"`` are absent from the index, as they are absent from the stream.

Which records a consumer reads comes from :func:`consumer_ranges`: the reader's own work items
(:meth:`~seqpack.sources.reader.Reader.work_plan`), applied to the indexed raw coordinates.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from seqpack.node import Node
from seqpack.sources.blocks import DocBlock
from seqpack.sources.reader import Reader
from seqpack.sources.records import NO_GROUP, Document, Record, SourceError
from seqpack.sources.remote import info as remote_info
from seqpack.sources.tokenize import Tokenize, TokenizerSpec, tokenizer_file
from seqpack.sources.urls import is_url

INDEX_VERSION = 1
# indexes loaded in this process, by file (counting builds every rank's chain: load each once)
_LOADED: dict[str, LengthIndex] = {}
_MAX_LOADED = 16
# records encoded per encode_batch call while building an index
BUILD_BATCH = 512


def cache_dir() -> str:
    """Where length indexes live: ``$SEQPACK_CACHE_DIR/lengths``, else ``~/.cache/seqpack/lengths``."""
    root = os.environ.get("SEQPACK_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "seqpack")
    return os.path.join(root, "lengths")


def _identity(path: str) -> list[Any]:
    if is_url(path):  # an object: its URL, size and ETag (or modification time)
        meta = remote_info(path, fresh=True)
        return [path, meta["size"], meta["version"]]
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


# reader attributes that say which consumer reads, not what a record holds
_NOT_CONTENT = ("consumer", "epoch", "shuffle_seed", "name", "paths", "fields", "source_index", "on_error")


def _reader_options(reader: Reader) -> dict[str, str]:
    """A reader's plain options (e.g. a text reader's ``split``), which can change its records."""
    return {
        k: repr(v)
        for k, v in sorted(vars(reader).items())
        if not k.startswith("_") and k not in _NOT_CONTENT and isinstance(v, (str, int, float, bool, tuple))
    }


def index_key(reader: Reader, tokenizer: TokenizerSpec) -> str:
    """Hex digest naming the index of ``reader``'s source tokenized with ``tokenizer``."""
    tok_file = tokenizer_file(tokenizer.name) if tokenizer.name != "byte" else None
    ident = {
        "version": INDEX_VERSION,
        "format": reader.format,
        "reader": type(reader).__qualname__,
        "files": [_identity(p) for p in reader.paths],
        "fields": repr(reader.fields),
        "source_index": reader.source_index,
        "on_error": reader.on_error,
        "options": _reader_options(reader),
        "tokenizer": repr(tokenizer),
        "tokenizer_file": _identity(tok_file) if tok_file and os.path.exists(tok_file) else tok_file,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class LengthIndex:
    """Per record of one source (all int64 ``[n]``, in reading order: shard, unit, raw index).

    Attributes:
        shard, unit, raw: where the record sits (``raw`` is its index inside the unit).
        doc_id: its global id.
        length: tokens after tokenization (0: dropped as empty).
        group: group id (``NO_GROUP`` for none).
    """

    shard: np.ndarray
    unit: np.ndarray
    raw: np.ndarray
    doc_id: np.ndarray
    length: np.ndarray
    group: np.ndarray

    def __len__(self) -> int:
        return len(self.doc_id)

    def unit_slice(self, shard: int, unit: int) -> slice:
        """The rows of unit ``(shard, unit)`` (contiguous: rows are sorted by shard, unit, raw)."""
        key = self.shard * (1 << 32) + self.unit
        want = int(shard) * (1 << 32) + int(unit)
        return slice(int(np.searchsorted(key, want, "left")), int(np.searchsorted(key, want, "right")))

    def save(self, path: str) -> None:
        """Write atomically: a temporary file in the same folder, then ``os.replace``."""
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".lengths-", suffix=".npz", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **{k: getattr(self, k) for k in _FIELDS})
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str) -> LengthIndex:
        with np.load(path) as z:
            return cls(**{k: np.asarray(z[k], np.int64) for k in _FIELDS})


_FIELDS = ("shard", "unit", "raw", "doc_id", "length", "group")


class _Rows:
    """Columns of an index under construction."""

    def __init__(self) -> None:
        self.cols: dict[str, list[int]] = {k: [] for k in _FIELDS}

    def add(self, shard: int, unit: int, raw: int, doc_id: int, length: int, group: int | None) -> None:
        for k, v in zip(_FIELDS, (shard, unit, raw, doc_id, length, NO_GROUP if group is None else group)):
            self.cols[k].append(int(v))

    def index(self) -> LengthIndex:
        return LengthIndex(**{k: np.asarray(v, np.int64) for k, v in self.cols.items()})


def _unit_records(reader: Reader, shard: int, unit: int) -> Iterator[tuple[int, Record]]:
    """Every record of one unit as the reader would yield it, under its ``on_error`` policy."""
    try:
        for raw, item in reader.read_unit(shard, reader.paths[shard], unit, 0):  # every record
            if isinstance(item, SourceError):
                if reader.on_error == "raise":
                    raise item
                continue
            yield raw, item
    except SourceError:
        # a stream that ends early: the reader skips the rest of the unit (or raises, as here)
        if reader.on_error == "raise":
            raise


def build_index(reader: Reader, tokenizer: TokenizerSpec) -> LengthIndex:
    """Read and tokenize every record of ``reader``'s source once (units in file order)."""
    encoder = Tokenize(reader, tokenizer, batch_size=BUILD_BATCH)
    encoder.reset(None)  # loads the tokenizer; the reader itself is driven unit by unit below
    rows = _Rows()
    pending: list[tuple[int, int, int, Record]] = []

    def flush() -> None:
        docs = {d.doc_id: d for d in encoder.encode([r for *_, r in pending])}
        for shard, unit, raw, rec in pending:
            doc = docs.get(rec.doc_id)
            rows.add(shard, unit, raw, rec.doc_id, 0 if doc is None else len(doc.tokens), rec.group)
        pending.clear()

    for s, path in enumerate(reader.paths):
        try:
            n_units = reader.shard_units(s, path)
        except SourceError:
            if reader.on_error == "raise":
                raise
            continue
        for u in range(n_units):
            for raw, rec in _unit_records(reader, s, u):
                pending.append((s, u, raw, rec))
                if len(pending) >= BUILD_BATCH:
                    flush()
    flush()
    return rows.index()


def length_index(
    reader: Reader, tokenizer: str | Mapping | TokenizerSpec, folder: str | None = None
) -> LengthIndex:
    """The cached index of ``reader``'s source (built and saved on the first call).

    Args:
        reader: any reader of the source (its consumer and epoch do not matter).
        tokenizer: the loader's ``tokenizer:`` value.
        folder: cache folder (default :func:`cache_dir`).
    """
    spec = TokenizerSpec.parse(tokenizer)
    path = os.path.join(folder or cache_dir(), f"{index_key(reader, spec)}.npz")
    if path in _LOADED and os.path.exists(path):
        return _LOADED[path]
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # one builder at a time: every rank and worker may ask at once; the others wait, then load
        with open(path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if not os.path.exists(path):
                    build_index(reader, spec).save(path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    index = LengthIndex.load(path)
    if len(_LOADED) >= _MAX_LOADED:
        _LOADED.pop(next(iter(_LOADED)))
    _LOADED[path] = index
    return index


def consumer_ranges(reader: Reader) -> list[tuple[int, int, int, int]]:
    """``(shard, unit, first, stop)`` work items ``reader``'s consumer reads, in order: the raw
    records (raw coordinates as ``read_unit`` yields them: record numbers, or byte offsets of line
    files) ``first <= raw < stop`` of each unit (``stop`` -1: to the end), the reader's own plan."""
    return [tuple(int(x) for x in item) for item in reader.work_plan()]


class IndexedDocuments(Node[Document]):
    """The documents one consumer's reader + tokenizer yield, from a :class:`LengthIndex`.

    Same ``doc_id``, length, source name and group, in the same order; every token is 0 (a view
    of one shared zero buffer). For counting only: the state is just the position.
    """

    def __init__(
        self, reader: Reader, index: LengthIndex, items: list[tuple[int, int, int, int]] | None = None
    ):
        super().__init__()
        self.reader, self.index = reader, index
        # the work items to play (default: the reader's own plan, consumer_ranges)
        self.items = None if items is None else list(items)

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        parts = []
        items = consumer_ranges(self.reader) if self.items is None else self.items
        for shard, unit, first, stop in items:
            where = self.index.unit_slice(shard, unit)
            rows = np.arange(where.start, where.stop)
            raw = self.index.raw[rows]
            rows = rows[(raw >= first) & ((raw < stop) | (stop < 0))]
            parts.append(rows[self.index.length[rows] > 0])
        self._rows = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        longest = int(self.index.length[self._rows].max()) if len(self._rows) else 0
        self._zeros = np.zeros(longest, np.int64)
        self._pos = int((initial_state or {}).get("pos", 0))

    def get_state(self) -> dict:
        return {"pos": self._pos}

    @property
    def n_documents(self) -> int:
        """Documents this consumer reads in the epoch."""
        return len(self._rows)

    def _doc(self, row: int) -> Document:
        group = int(self.index.group[row])
        return Document(
            int(self.index.doc_id[row]),
            self._zeros[: int(self.index.length[row])],
            None,
            self.reader.name,
            group=None if group == NO_GROUP else group,
        )

    def next(self) -> Document:
        if self._pos >= len(self._rows):
            raise StopIteration
        self._pos += 1
        return self._doc(int(self._rows[self._pos - 1]))

    def next_block(self, max_docs: int) -> DocBlock:
        """Up to ``max_docs`` documents as one block (all starting at offset 0 of the zero buffer)."""
        if self._pos >= len(self._rows):
            raise StopIteration
        rows = self._rows[self._pos : self._pos + max_docs]
        self._pos += len(rows)
        groups = self.index.group[rows]
        return DocBlock(
            doc_ids=self.index.doc_id[rows].copy(),
            starts=np.zeros(len(rows), np.int64),
            lengths=self.index.length[rows].copy(),
            values=self._zeros,
            source=self.reader.name,
            groups=None if (groups == NO_GROUP).all() else groups.copy(),
        )


__all__ = ["IndexedDocuments", "LengthIndex", "build_index", "cache_dir", "consumer_ranges"]
__all__ += ["index_key", "length_index"]
