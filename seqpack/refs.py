"""Buffered documents by reference: the state of a buffer is ``(doc_id, start, len)`` per piece.

A stage that buffers documents whose chain can re-read them (a reader with ``fetch`` behind the
tokenizer: :attr:`seqpack.node.Node.can_refetch`) saves them as references instead of tokens, so
its state is O(buffered documents) whatever the documents' lengths (about 25 bytes per piece):

================  =================================================================================
``refs``          True (marks this format; the token format of :mod:`seqpack.arena` has ``tokens``)
``doc_ids``       int64 ``[n]`` global document id of each piece
``starts``        int64 ``[n]`` token offset of the piece inside its (tokenized) document
``lens``          int64 ``[n]`` tokens per piece (-1: the whole document, as re-read)
``flags``         uint8 ``[n]``: bit 0 the piece had a loss mask, bit 1 turn starts, bit 2 a group
================  =================================================================================

Resume calls the chain's ``refetch(doc_ids)`` (reader.fetch -> tokenize: the same tokens, mask,
turn starts, group and source as the first time) once for all pieces and slices
``[start : start + len]``. A document that changed length since the checkpoint is a ValueError.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from seqpack.sources.records import Document

Refetch = Callable[[Sequence[int]], list[Document]]

MASK, TURNS, GROUP = 1, 2, 4


def is_refs(state: dict) -> bool:
    """Whether a buffered-documents state is the by-reference format."""
    return bool(state.get("refs", False))


def refs_state(doc_ids: np.ndarray, starts: np.ndarray, lens: np.ndarray, flags: np.ndarray) -> dict:
    """The by-reference state of ``n`` pieces (flat tensors: ``torch.load(weights_only=True)`` reads it)."""
    return {
        "refs": True,
        "doc_ids": torch.from_numpy(np.array(doc_ids, np.int64)),
        "starts": torch.from_numpy(np.array(starts, np.int64)),
        "lens": torch.from_numpy(np.array(lens, np.int64)),
        "flags": torch.from_numpy(np.array(flags, np.uint8)),
    }


def _flags(d: Document) -> int:
    return (
        (d.loss_mask is not None) * MASK + (d.turn_starts is not None) * TURNS + (d.group is not None) * GROUP
    )


def documents_refs(docs: Sequence[Document]) -> dict:
    """:func:`refs_state` of documents (pieces: ``Document.start`` is their offset)."""
    n = len(docs)
    flags = np.fromiter(
        (
            (d.loss_mask is not None) * MASK
            + (d.turn_starts is not None) * TURNS
            + (d.group is not None) * GROUP
            for d in docs
        ),
        np.uint8,
        n,
    )
    return refs_state(
        np.fromiter((d.doc_id for d in docs), np.int64, n),
        np.fromiter((d.start for d in docs), np.int64, n),
        np.fromiter((len(d.tokens) for d in docs), np.int64, n),
        flags,
    )


def fetch_pieces(state: dict, refetch: Refetch | None) -> list[Document]:
    """The pieces of a by-reference state, re-read through ``refetch`` (one call for all of them)."""
    ids = np.asarray(state["doc_ids"], np.int64)
    if not len(ids):
        return []
    if refetch is None:
        raise ValueError(
            f"this state holds {len(ids)} buffered documents by reference, and the chain it is loaded "
            "into cannot re-read documents (no reader with fetch() behind its tokenizer)"
        )
    starts = np.asarray(state["starts"], np.int64)
    lens = np.asarray(state["lens"], np.int64)
    flags = np.asarray(state["flags"], np.uint8)
    unique = list(dict.fromkeys(ids.tolist()))
    fetched = refetch(unique)
    by_id = {d.doc_id: d for d in fetched}
    out = []
    for i, doc_id in enumerate(ids.tolist()):
        d = by_id.get(doc_id)
        s = int(starts[i])
        n = len(d.tokens) - s if d is not None and lens[i] < 0 else int(lens[i])
        if d is None or s + n > len(d.tokens) or n <= 0:
            have = "no longer exists" if d is None else f"has {len(d.tokens)} tokens"
            raise ValueError(
                f"buffered document {doc_id} (piece [{s}, {s + n})) {have}: the data or the tokenizer "
                "changed since the checkpoint"
            )
        if lens[i] < 0 and s == 0:  # a whole document (an elastic resume's tokenizer leftovers)
            out.append(d)
            continue
        f = int(flags[i])
        if s == 0 and n == len(d.tokens) and f == _flags(d):  # the whole document as re-read
            out.append(d)
            continue
        mask = None
        if f & MASK:
            mask = d.loss_mask[s : s + n] if d.loss_mask is not None else np.ones(n, bool)
        turns = None
        if f & TURNS and d.turn_starts is not None:
            t = np.asarray(d.turn_starts, np.int64)
            turns = t[(t >= s) & (t < s + n)] - s
        group = d.group if f & GROUP else None
        out.append(Document(doc_id, d.tokens[s : s + n], mask, d.source, turns, group, d.start + s))
    return out
