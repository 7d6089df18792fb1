"""What flows between pipeline stages: raw records before tokenization, documents after.

Every item carries a global ``doc_id`` derived from its position (source, shard, record), so the
same record gets the same id on every rank, worker count and epoch. That id is what resume and
sharding tests account by, and what ``VarlenBatch.doc_ids`` reports.
"""

from __future__ import annotations

import hashlib
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
    """Bad input: the message names the file, the record number (0-based) and the field."""

    def __init__(self, path: str, record: int | None, field_name: str | None, problem: str):
        self.path, self.record, self.field, self.problem = path, record, field_name, problem
        where = str(path)
        if record is not None:
            where += f": record {record}"
        if field_name is not None:
            where += f": field {field_name!r}"
        super().__init__(f"{where}: {problem}")


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
    the first words of each problem to a count; ``last_error`` keeps the latest message.
    """

    records: int = 0
    skipped: int = 0
    skipped_files: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    last_error: str = ""

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
        }

    @classmethod
    def from_dict(cls, d: dict) -> ReadStats:
        return cls(d["records"], d["skipped"], d["skipped_files"], dict(d["reasons"]), d["last_error"])


def documents_to_state(docs: list[Document]) -> dict:
    """Buffered documents as a state dict of flat tensors (loads with ``torch.load(weights_only=True)``)."""
    import torch

    lens = np.fromiter((len(d.tokens) for d in docs), np.int64, len(docs))
    has_mask = np.fromiter((d.loss_mask is not None for d in docs), bool, len(docs))
    tokens = np.concatenate([d.tokens for d in docs]) if docs else np.zeros(0, np.int64)
    masks = [d.loss_mask if d.loss_mask is not None else np.ones(len(d.tokens), bool) for d in docs]
    mask = np.concatenate(masks) if docs and has_mask.any() else np.zeros(0, bool)
    out = {
        "doc_ids": torch.from_numpy(np.fromiter((d.doc_id for d in docs), np.int64, len(docs))),
        "lens": torch.from_numpy(lens),
        "tokens": torch.from_numpy(tokens.astype(np.int64, copy=False)),
        "has_mask": torch.from_numpy(has_mask),
        "mask": torch.from_numpy(mask),
        "sources": [d.source for d in docs],
    }
    if any(d.start for d in docs):
        out["starts"] = torch.from_numpy(np.fromiter((d.start for d in docs), np.int64, len(docs)))
    if any(d.turn_starts is not None for d in docs):
        # -1 count: the document has no turn starts (None), not an empty list
        counts = [-1 if d.turn_starts is None else len(d.turn_starts) for d in docs]
        flat = [np.asarray(d.turn_starts, np.int64) for d in docs if d.turn_starts is not None]
        out["turn_counts"] = torch.tensor(counts, dtype=torch.int64)
        out["turn_starts"] = torch.from_numpy(np.concatenate(flat))
    if any(d.group is not None for d in docs):
        groups = [NO_GROUP if d.group is None else d.group for d in docs]
        out["groups"] = torch.tensor(groups, dtype=torch.int64)
    return out


def documents_from_state(state: dict) -> list[Document]:
    """Inverse of :func:`documents_to_state`."""
    ids = np.asarray(state["doc_ids"], np.int64)
    lens = np.asarray(state["lens"], np.int64)
    tokens = np.asarray(state["tokens"], np.int64)
    has_mask = np.asarray(state["has_mask"], bool)
    mask = np.asarray(state["mask"], bool)
    bounds = np.concatenate([[0], np.cumsum(lens)])
    turns: list = [None] * len(ids)
    if "turn_counts" in state:
        counts = np.asarray(state["turn_counts"], np.int64)
        flat = np.asarray(state["turn_starts"], np.int64)
        at = 0
        for i, c in enumerate(counts):
            if c >= 0:
                turns[i], at = flat[at : at + c], at + c
    groups = np.asarray(state["groups"], np.int64) if "groups" in state else None
    starts = np.asarray(state["starts"], np.int64) if "starts" in state else np.zeros(len(ids), np.int64)
    out = []
    for i in range(len(ids)):
        a, b = bounds[i], bounds[i + 1]
        m = mask[a:b] if has_mask[i] else None
        g = None if groups is None or groups[i] == NO_GROUP else int(groups[i])
        out.append(Document(int(ids[i]), tokens[a:b], m, state["sources"][i], turns[i], g, int(starts[i])))
    return out
