"""Overflow policies: what happens to a document longer than the bin ``capacity`` (the one implementation).

Every planner and stage that meets an over-long document turns documents into placeable pieces
``(document, offset, length)`` with :func:`expand_overflow`, so ``split``/``truncate``/``drop``/
``error``/``split_turns`` mean the same everywhere and lost tokens are always counted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# every policy; the first is the default (nothing is lost)
OVERFLOW_POLICIES = ("split", "truncate", "drop", "error", "split_turns")
# policies that need a chat document's turn starts besides its length
TURN_OVERFLOW = ("split_turns",)
# policies that need only lengths: what a stage without turn starts (e.g. streaming bucketing) allows
LENGTH_OVERFLOW = tuple(p for p in OVERFLOW_POLICIES if p not in TURN_OVERFLOW)
# what the pack stage allows (streamed or windowed): all of them
PACK_OVERFLOW = OVERFLOW_POLICIES


def split_at_turns(
    length: int, turn_starts: Sequence[int] | np.ndarray, capacity: int
) -> tuple[list[int], list[int], int]:
    """Cut a conversation of ``length`` tokens into pieces of at most ``capacity`` tokens, only at
    ``turn_starts`` (token offsets where a turn begins; offsets outside ``(0, length)`` are ignored).

    Greedy from the front: each piece ends at the farthest turn start that fits. When the next turn
    alone is longer than ``capacity``, the piece is cut at ``capacity`` and the rest of the
    conversation is truncated (a later turn without its context would teach the wrong thing).

    Returns ``(starts, lengths, truncated_tokens)``.
    """
    cuts = np.unique(np.asarray(turn_starts, np.int64))
    cuts = np.append(cuts[(cuts > 0) & (cuts < length)], length)
    starts: list[int] = []
    lens: list[int] = []
    s = 0
    while s < length:
        fits = cuts[(cuts > s) & (cuts <= s + capacity)]
        if len(fits) == 0:
            starts.append(s)
            lens.append(capacity)
            return starts, lens, int(length - s - capacity)
        e = int(fits[-1])
        starts.append(s)
        lens.append(e - s)
        s = e
    return starts, lens, 0


def expand_overflow(
    lengths: np.ndarray,
    capacity: int,
    overflow: str,
    turn_starts: Sequence[Sequence[int] | np.ndarray | None] | None = None,
    doc_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Turn documents into placeable pieces ``(doc, start, len)`` under an overflow policy.

    Args:
        lengths: int64 ``[n_docs]`` tokens per document.
        capacity: tokens per bin; no piece is longer.
        overflow: one of :data:`OVERFLOW_POLICIES`: ``split`` into pieces of ``capacity`` (nothing
            lost), ``truncate`` to ``capacity``, ``drop`` the document, ``error``, or
            ``split_turns``: cut only at ``turn_starts`` (see :func:`split_at_turns`; a document
            whose entry is None keeps its first ``capacity`` tokens).
        turn_starts: per document, the token offsets where its turns begin (``split_turns`` only).
        doc_ids: names of the documents in the ``error`` message (default: their index).

    Returns three int64 ``[n_pieces]`` arrays (document index, token offset inside the document,
    length) in document order, pieces of a document in order, and the counters
    ``{truncated_tokens, truncated_docs, dropped_tokens, dropped_docs}``. Zero-length documents
    give no piece (there is nothing to emit or lose).
    """
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
    counts = {"truncated_tokens": 0, "truncated_docs": 0, "dropped_tokens": 0, "dropped_docs": 0}
    if overflow == "split_turns" and (turn_starts is None or len(turn_starts) != len(lengths)):
        got = None if turn_starts is None else len(turn_starts)
        raise ValueError(
            f"overflow='split_turns' needs turn_starts with one entry per document "
            f"({len(lengths)}), got {got}"
        )
    over = lengths > capacity
    if not over.any():  # the common case: every document is one piece
        doc = np.flatnonzero(lengths > 0)
        return doc, np.zeros(len(doc), np.int64), lengths[doc], counts
    if overflow == "error":
        i = int(np.flatnonzero(over)[0])
        name = i if doc_ids is None else int(doc_ids[i])
        raise ValueError(
            f"document {name} has {int(lengths[i])} tokens > capacity {capacity} (overflow='error'; "
            "use 'split' to keep every token)"
        )
    if overflow == "split":
        pieces = -(-lengths // capacity)
        doc = np.repeat(np.arange(len(lengths), dtype=np.int64), pieces)
        first_piece = np.cumsum(pieces) - pieces
        start = (np.arange(len(doc), dtype=np.int64) - np.repeat(first_piece, pieces)) * capacity
        return doc, start, np.minimum(capacity, lengths[doc] - start), counts
    if overflow == "split_turns":
        return _split_turns(lengths, capacity, over, turn_starts, counts)
    kept = lengths.copy()
    if overflow == "truncate":
        counts["truncated_tokens"] = int((lengths[over] - capacity).sum())
        counts["truncated_docs"] = int(over.sum())
        kept[over] = capacity
    else:  # drop
        counts["dropped_tokens"] = int(lengths[over].sum())
        counts["dropped_docs"] = int(over.sum())
        kept[over] = 0
    doc = np.flatnonzero(kept > 0)
    return doc, np.zeros(len(doc), np.int64), kept[doc], counts


def _split_turns(
    lengths: np.ndarray, capacity: int, over: np.ndarray, turn_starts: Sequence, counts: dict
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """``split_turns``: short documents whole (vectorized), long ones cut by :func:`split_at_turns`."""
    doc = [np.flatnonzero((lengths > 0) & ~over)]
    start, length = [np.zeros(len(doc[0]), np.int64)], [lengths[doc[0]]]
    for i in np.flatnonzero(over):
        bounds = turn_starts[i] if turn_starts[i] is not None else _EMPTY
        st, ln, cut = split_at_turns(int(lengths[i]), bounds, capacity)
        doc.append(np.full(len(st), i, np.int64))
        start.append(np.asarray(st, np.int64))
        length.append(np.asarray(ln, np.int64))
        if cut:
            counts["truncated_tokens"] += cut
            counts["truncated_docs"] += 1
    doc_a = np.concatenate(doc)
    order = np.argsort(doc_a, kind="stable")  # documents in order, a document's pieces in order
    return doc_a[order], np.concatenate(start)[order], np.concatenate(length)[order], counts


_EMPTY = np.zeros(0, np.int64)
