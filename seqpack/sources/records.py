"""What flows between pipeline stages: raw records before tokenization, documents after.

Every item carries a global ``doc_id`` derived from its position (source, shard, record), so the
same record gets the same id on every rank, worker count and epoch. That id is what resume and
sharding tests account by, and what ``VarlenBatch.doc_ids`` reports.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import numpy as np

# doc_id layout (63 bits, always >= 0): source 7 bits | shard 20 bits | record 36 bits.
SOURCE_BITS, SHARD_BITS, RECORD_BITS = 7, 20, 36
MAX_SOURCES, MAX_SHARDS, MAX_RECORDS = 1 << SOURCE_BITS, 1 << SHARD_BITS, 1 << RECORD_BITS


def make_doc_id(source: int, shard: int, record: int) -> int:
    """Global int64 id of record ``record`` of shard ``shard`` of source ``source`` (all 0-based)."""
    if not (0 <= source < MAX_SOURCES and 0 <= shard < MAX_SHARDS and 0 <= record < MAX_RECORDS):
        raise ValueError(
            f"doc id out of range: source {source} (< {MAX_SOURCES}), shard {shard} (< {MAX_SHARDS}), "
            f"record {record} (< {MAX_RECORDS})"
        )
    return (source << (SHARD_BITS + RECORD_BITS)) | (shard << RECORD_BITS) | record


def split_doc_id(doc_id: int) -> tuple[int, int, int]:
    """Inverse of :func:`make_doc_id`: ``(source, shard, record)``."""
    doc_id = int(doc_id)
    return (
        doc_id >> (SHARD_BITS + RECORD_BITS),
        (doc_id >> RECORD_BITS) & (MAX_SHARDS - 1),
        doc_id & (MAX_RECORDS - 1),
    )


@dataclass
class Record:
    """One input record before tokenization; exactly one of ``text``/``turns``/``tokens`` is set.

    Attributes:
        doc_id: global id (see :func:`make_doc_id`).
        source: name of the source it came from.
        text: plain text (pretraining).
        turns: SFT text pieces in order, each ``(text, trainable)``; trainable pieces get loss.
        tokens: pre-tokenized ids (int64 ``[L]``), passed through tokenization untouched.
        loss_mask: bool ``[L]`` for pre-tokenized records (True = token is a target), or None.
        turn_flags: per entry of ``turns``, True where an exchange starts (a place where
            ``overflow="split_turns"`` may cut), or None.
        group: int64 group id (hash of the ``group_key`` field, see :func:`group_hash`), or None.
    """

    doc_id: int
    source: str
    text: str | None = None
    turns: list[tuple[str, bool]] | None = None
    tokens: np.ndarray | None = None
    loss_mask: np.ndarray | None = None
    turn_flags: list[bool] | None = None
    group: int | None = None


@dataclass
class Document:
    """A tokenized document.

    Attributes:
        doc_id: global id (see :func:`make_doc_id`).
        tokens: int64 ``[L]`` token ids.
        loss_mask: bool ``[L]`` (True = token is a target) or None (every token is a target).
        source: name of the source it came from.
        turn_starts: int64 ``[k]`` token offsets where an exchange starts (chat documents; the only
            places ``overflow="split_turns"`` cuts), or None.
        group: int64 group id (documents of different groups never share a batch when the pack
            stage has a ``group_key``), or None.
        start: token offset of ``tokens[0]`` in the original document (0 unless this is a later
            piece of a split document; positions continue from it when a stage asks).
    """

    doc_id: int
    tokens: np.ndarray
    loss_mask: np.ndarray | None = None
    source: str = ""
    turn_starts: np.ndarray | None = None
    group: int | None = None
    start: int = 0

    def __len__(self) -> int:
        return len(self.tokens)


class SourceError(ValueError):
    """Bad input: the message names the file, the record number (0-based) and the field.

    ``SourceError(message)`` (one argument) rebuilds an error from its message, as torch's DataLoader
    does when it re-raises a worker's exception in the training loop (``exc_type(msg)``), so
    ``except SourceError`` still catches it there; the fields are parsed back from the message's
    last ``...SourceError: <path>[: record N][: field 'f']: problem`` line where it has one.
    Pickling keeps the fields (``__reduce__``).
    """

    def __init__(
        self, path: str, record: int | None = None, field_name: str | None = None, problem: str | None = None
    ):
        if problem is None and record is None and field_name is None:
            message = str(path)
            fields = _fields_of_message(message, type(self).__name__)
            self.path, self.record, self.field, self.problem = fields
            self._message_only = True
            ValueError.__init__(self, message)
            return
        self._message_only = False
        self.path, self.record, self.field, self.problem = path, record, field_name, problem
        where = str(path)
        if record is not None:
            where += f": record {record}"
        if field_name is not None:
            where += f": field {field_name!r}"
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):
        if getattr(self, "_message_only", True):
            return type(self), (str(self),)
        return type(self), (self.path, self.record, self.field, self.problem)


_MESSAGE = re.compile(
    r"^(?P<path>.+?)(?:: record (?P<record>\d+))?(?:: field '(?P<field>[^']*)')?: (?P<problem>.*)$"
)


def _fields_of_message(message: str, cls_name: str) -> tuple[str | None, int | None, str | None, str]:
    """``(path, record, field, problem)`` from the last ``<module>.<cls_name>: ...`` line of a
    message (a re-raised worker traceback), or ``(None, None, None, message)``."""
    lines = [ln for ln in message.splitlines() if f"{cls_name}: " in ln and not ln.startswith(" ")]
    m = _MESSAGE.match(lines[-1].split(f"{cls_name}: ", 1)[1]) if lines else None
    if m is None:
        return None, None, None, message
    record = int(m["record"]) if m["record"] is not None else None
    return m["path"], record, m["field"], m["problem"]


ON_ERROR = ("raise", "skip")
NO_GROUP = -1  # group id of documents without one (group hashes are >= 0)


def group_hash(value) -> int:
    """Stable int64 id (>= 0) of a ``group_key`` field value: the same on every rank, worker and
    run (Python's ``hash`` of a str is salted per process), so it needs no state."""
    digest = hashlib.blake2b(repr(value).encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class ReadStats:
    """Counters a reader keeps (part of its state, so they survive resume).

    ``skipped`` counts records dropped under ``on_error="skip"``; ``skipped_files`` whole files
    (or the unread rest of a truncated stream) that could not be opened or read; ``reasons`` maps
    the first words of each problem to a count; ``last_error`` keeps the latest message;
    ``empty_sources`` counts sources allowed to have no data (``allow_empty``) that had none.
    """

    records: int = 0
    skipped: int = 0
    skipped_files: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    last_error: str = ""
    empty_sources: int = 0

    def note(self, err: SourceError, whole_file: bool = False) -> None:
        if whole_file:
            self.skipped_files += 1
        else:
            self.skipped += 1
        key = err.problem.split(":")[0][:60]
        self.reasons[key] = self.reasons.get(key, 0) + 1
        self.last_error = str(err)

    def as_dict(self) -> dict:
        return {
            "records": self.records,
            "skipped": self.skipped,
            "skipped_files": self.skipped_files,
            "reasons": dict(self.reasons),
            "last_error": self.last_error,
            "empty_sources": self.empty_sources,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ReadStats:
        return cls(
            d["records"],
            d["skipped"],
            d["skipped_files"],
            dict(d["reasons"]),
            d["last_error"],
            d.get("empty_sources", 0),
        )


def fetch_by_id(reader, doc_ids) -> list[Record]:
    """``reader.fetch(doc_ids)``: group the ids by shard, ask ``reader.fetch_records`` once per
    shard, and return the records in the order of ``doc_ids``; a missing or bad record raises
    SourceError naming it, an id of another source (or shard past the end) ValueError."""
    wanted: dict[int, set[int]] = {}
    for d in doc_ids:
        src, shard, rec = split_doc_id(d)
        if src != reader.source_index or shard >= len(reader.paths):
            raise ValueError(
                f"{reader.name}: doc id {int(d)} is record {rec} of shard {shard} of source {src}; "
                f"this is source {reader.source_index} with {len(reader.paths)} shards"
            )
        wanted.setdefault(shard, set()).add(rec)
    got: dict[tuple[int, int], Record] = {}
    for shard in sorted(wanted):
        path, recs = reader.paths[shard], sorted(wanted[shard])
        found = reader.fetch_records(shard, path, recs)
        for r in recs:
            item = found.get(r)
            if item is None:
                raise SourceError(path, r, None, "no such record (the file changed since it was referenced?)")
            if isinstance(item, SourceError):
                raise item
            got[shard, r] = item
    return [got[split_doc_id(d)[1:]] for d in doc_ids]
