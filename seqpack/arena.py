"""The token arena: buffered document pieces, and the one state format of buffered documents.

A stage that holds documents between calls (the pack stage's carried pieces, the shuffle buffer,
ChunkFlow's carried document) saves them in ONE format, written by :meth:`Pieces.state_dict`:
flat tensors (so ``torch.load(weights_only=True)`` reads a checkpoint) of

================  =================================================================================
``doc_ids``       int64 ``[n]`` global document id of each piece
``lens``          int64 ``[n]`` tokens per piece
``tokens``        int64 ``[sum(lens)]`` the pieces' tokens back to back
``has_mask``      bool ``[n]`` whether a piece has a loss mask
``mask``          bool ``[sum(lens)]`` loss mask of every token when any piece has one, else ``[0]``
``starts``        optional int64 ``[n]``: token offset of each piece inside its document (omitted: 0)
``sources``       optional list of ``n`` source names (omitted: all ``""``)
``turn_counts``   optional int64 ``[n]`` turn starts per piece (-1: None) and ``turn_starts`` (flat)
``groups``        optional int64 ``[n]`` group ids (``NO_GROUP``: none)
================  =================================================================================

A piece is a :class:`~seqpack.sources.records.Document` (``Document.start`` is its offset), so
:func:`documents_to_state` / :func:`documents_from_state` are this format for document lists.

When the chain can re-read documents (``Node.can_refetch``: a reader with ``fetch``), stages save
their buffers by reference instead (:mod:`seqpack.refs`: ``(doc_id, start, len)`` per piece, never
tokens) and pass the chain's ``refetch`` on resume; the token format above is the other branch of
``from_state`` (synthetic documents, and checkpoints written before references).

:class:`Arena` is the pack stage's token buffer: pieces addressed by integer keys (the keys the
:class:`~seqpack.plan.online.OnlinePacker` holds), whose tokens are read in place from the newest
block of documents or copied once into a carried array; its :meth:`Arena.state_dict` writes the
same format.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from seqpack.ops.segments import gather_segments, gather_two
from seqpack.refs import MASK, Refetch, documents_refs, fetch_pieces, is_refs, refs_state
from seqpack.sources.blocks import DocBlock
from seqpack.sources.records import NO_GROUP, Document

_EMPTY = np.zeros(0, np.int64)
_NO_MASK = np.zeros(0, bool)


def _offsets(lens: np.ndarray) -> np.ndarray:
    """int64 ``[n]`` start of each of ``lens`` laid back to back."""
    out = np.zeros(len(lens), np.int64)
    if len(lens):
        np.cumsum(lens[:-1], out=out[1:])
    return out


@dataclass
class Pieces:
    """``n`` buffered document pieces over one flat token array (the state format, as numpy).

    Attributes:
        doc_ids, starts, lens: int64 ``[n]`` document id, offset inside the document, tokens.
        tokens: int64 ``[sum(lens)]`` back to back.
        has_mask: bool ``[n]``; mask: bool ``[sum(lens)]`` when any piece has a loss mask, else None.
        sources: ``n`` source names, or None (all ``""``).
        turn_starts: per piece, int64 turn offsets or None; None when no piece has them.
        groups: int64 ``[n]`` (``NO_GROUP`` for none), or None when no piece has one.
    """

    doc_ids: np.ndarray
    starts: np.ndarray
    lens: np.ndarray
    tokens: np.ndarray
    has_mask: np.ndarray
    mask: np.ndarray | None = None
    sources: list[str] | None = None
    turn_starts: list[np.ndarray | None] | None = None
    groups: np.ndarray | None = None

    def state_dict(self) -> dict:
        """The state format (flat tensors; see the module docstring)."""
        out = {
            "doc_ids": torch.from_numpy(np.asarray(self.doc_ids, np.int64)),
            "lens": torch.from_numpy(np.asarray(self.lens, np.int64)),
            "tokens": torch.from_numpy(np.asarray(self.tokens, np.int64)),
            "has_mask": torch.from_numpy(np.asarray(self.has_mask, bool)),
            "mask": torch.from_numpy(np.asarray(self.mask, bool) if self.mask is not None else _NO_MASK),
        }
        if self.starts.any():
            out["starts"] = torch.from_numpy(np.asarray(self.starts, np.int64))
        if self.sources is not None and any(self.sources):
            out["sources"] = list(self.sources)
        if self.turn_starts is not None and any(t is not None for t in self.turn_starts):
            # -1 count: the piece has no turn starts (None), not an empty list
            counts = [-1 if t is None else len(t) for t in self.turn_starts]
            flat = [np.asarray(t, np.int64) for t in self.turn_starts if t is not None]
            out["turn_counts"] = torch.tensor(counts, dtype=torch.int64)
            out["turn_starts"] = torch.from_numpy(np.concatenate(flat))
        if self.groups is not None and (self.groups != NO_GROUP).any():
            out["groups"] = torch.from_numpy(np.asarray(self.groups, np.int64))
        return out

    @classmethod
    def from_state(cls, state: dict) -> Pieces:
        """Inverse of :meth:`state_dict` (tensors or lists)."""
        ids = np.asarray(state["doc_ids"], np.int64)
        n = len(ids)
        has_mask = np.broadcast_to(np.asarray(state["has_mask"], bool), (n,)).copy()
        turns = None
        if "turn_counts" in state:
            flat = np.asarray(state["turn_starts"], np.int64)
            turns, at = [], 0
            for c in np.asarray(state["turn_counts"], np.int64):
                turns.append(flat[at : at + c] if c >= 0 else None)
                at += max(int(c), 0)
        return cls(
            doc_ids=ids,
            starts=np.asarray(state["starts"], np.int64) if "starts" in state else np.zeros(n, np.int64),
            lens=np.asarray(state["lens"], np.int64),
            tokens=np.asarray(state["tokens"], np.int64),
            has_mask=has_mask,
            mask=np.asarray(state["mask"], bool) if has_mask.any() else None,
            sources=list(state["sources"]) if "sources" in state else None,
            turn_starts=turns,
            groups=np.asarray(state["groups"], np.int64) if "groups" in state else None,
        )

    @classmethod
    def from_documents(cls, docs: Sequence[Document]) -> Pieces:
        """Copy the documents' tokens into one flat array."""
        n = len(docs)
        has_mask = np.fromiter((d.loss_mask is not None for d in docs), bool, n)
        mask = None
        if has_mask.any():
            mask = np.concatenate(
                [
                    np.ones(len(d.tokens), bool) if d.loss_mask is None else np.asarray(d.loss_mask, bool)
                    for d in docs
                ]
            )
        turns = [d.turn_starts for d in docs]
        groups = [NO_GROUP if d.group is None else d.group for d in docs]
        return cls(
            doc_ids=np.fromiter((d.doc_id for d in docs), np.int64, n),
            starts=np.fromiter((d.start for d in docs), np.int64, n),
            lens=np.fromiter((len(d.tokens) for d in docs), np.int64, n),
            tokens=np.concatenate([np.asarray(d.tokens, np.int64) for d in docs]) if n else _EMPTY,
            has_mask=has_mask,
            mask=mask,
            sources=[d.source for d in docs],
            turn_starts=turns if any(t is not None for t in turns) else None,
            groups=np.array(groups, np.int64) if any(g != NO_GROUP for g in groups) else None,
        )

    def documents(self) -> list[Document]:
        """One :class:`Document` per piece (tokens and masks are views of the flat arrays)."""
        bounds = np.concatenate([[0], np.cumsum(self.lens)])
        out = []
        for i in range(len(self.doc_ids)):
            a, b = bounds[i], bounds[i + 1]
            group = None if self.groups is None or self.groups[i] == NO_GROUP else int(self.groups[i])
            out.append(
                Document(
                    int(self.doc_ids[i]),
                    self.tokens[a:b],
                    self.mask[a:b] if self.has_mask[i] else None,
                    self.sources[i] if self.sources is not None else "",
                    self.turn_starts[i] if self.turn_starts is not None else None,
                    group,
                    int(self.starts[i]),
                )
            )
        return out


def documents_to_state(docs: Sequence[Document], by_ref: bool = False) -> dict:
    """Buffered documents as state (flat tensors, ``torch.load(weights_only=True)``): references
    (:mod:`seqpack.refs`) with ``by_ref``, else their tokens (the format of this module)."""
    return documents_refs(docs) if by_ref else Pieces.from_documents(docs).state_dict()


def documents_from_state(state: dict, refetch: Refetch | None = None) -> list[Document]:
    """Inverse of :func:`documents_to_state`; ``refetch`` (the chain's) re-reads references."""
    if is_refs(state):
        return fetch_pieces(state, refetch)
    return Pieces.from_state(state).documents()


def refetcher(node) -> Refetch | None:
    """``node.refetch`` when the chain behind ``node`` can re-read documents, else None."""
    return node.refetch if getattr(node, "can_refetch", False) else None


class Arena:
    """The pack stage's token buffer: pieces addressed by integer keys.

    Piece ``k`` (``base <= k < base + len(src)``) is the tokens
    ``(first ++ second)[src[k - base] : src[k - base] + length[k - base]]`` of document
    ``doc[k - base]`` from offset ``start[k - base]`` (masks aligned when ``has_mask``). ``second``
    is the newest block's values read in place (e.g. an int32 Arrow buffer, never copied before the
    batch); ``first`` an int64 copy of the pieces carried over from earlier fills, so a waiting
    piece pins no old row group. New pieces get keys ``next_key, next_key + 1, ...``.
    """

    def __init__(self) -> None:
        self.first, self.second = _EMPTY, _EMPTY
        self.first_mask, self.second_mask, self.has_mask = _NO_MASK, _NO_MASK, False
        self.base = 0
        self.src, self.length, self.doc, self.start = _EMPTY, _EMPTY, _EMPTY, _EMPTY
        self.next_key = 0
        # the buffer ``first`` is the head of (spare room after it, see _keep)
        self._room: np.ndarray | None = None
        self._room_mask = _NO_MASK
        self._spare: np.ndarray | None = None

    def rows(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(src, length, doc, start)`` of the pieces ``keys`` (int64 arrays aligned with ``keys``)."""
        i = np.asarray(keys, np.int64) - self.base
        return self.src[i], self.length[i], self.doc[i], self.start[i]

    def gather(self, src: np.ndarray, length: np.ndarray, tokens: np.ndarray) -> np.ndarray | None:
        """Copy pieces ``(src, length)`` back to back into ``tokens`` (int64); returns their loss
        mask (bool, aligned with ``tokens``), or None when no piece has one."""
        gather_two(self.first, self.second, src, length, tokens)
        if not self.has_mask:
            return None
        target = np.empty(len(tokens), bool)
        gather_two(self.first_mask, self.second_mask, src, length, target)
        return target

    def _keep(
        self, c_src: np.ndarray, c_len: np.ndarray, has_mask: bool, same_second: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(first, first_mask, src)`` holding the carried pieces ``(c_src, c_len)``.

        Pieces already in ``first`` stay where they are. Pieces read in place from ``second``
        stay there too when the next block reads the same values (``same_second``: consecutive
        pulls from one row group), else they are appended to ``first``'s spare room. Only when
        the room is short, or when pieces no longer carried (emitted) fill over half of
        ``first``, is every carried piece copied into a fresh buffer with room to grow: each token
        is copied O(1) times amortized, not at every fill (the packer carries most of its buffer
        from fill to fill). ``src`` of a piece left in ``second`` is relative to ``second``'s start
        (the caller adds the new ``len(first)``).
        """
        n0 = len(self.first)
        in_second = c_src >= n0
        stay = in_second if same_second and has_mask == self.has_mask else np.zeros(len(c_src), bool)
        move = in_second & ~stay
        add = int(c_len[move].sum())
        live = int(c_len[~in_second].sum())
        room = self._room
        c_src = c_src.copy()
        if room is not None and has_mask == self.has_mask and n0 + add <= len(room) and 2 * live >= n0:
            if add:
                gather_two(self.first, self.second, c_src[move], c_len[move], room[n0 : n0 + add])
                if has_mask:
                    gather_two(
                        self.first_mask, self.second_mask, c_src[move], c_len[move],
                        self._room_mask[n0 : n0 + add],
                    )  # fmt: skip
                c_src[move] = n0 + _offsets(c_len[move])
            c_src[stay] -= n0
            return room[: n0 + add], (self._room_mask[: n0 + add] if has_mask else _NO_MASK), c_src
        copy = ~stay
        total = int(c_len[copy].sum())
        # into the room before this one when it is large enough (nothing reads it any more, and its
        # pages are mapped already: a fresh buffer costs a page fault per 4 KB on first touch)
        room = self._spare
        if room is None or len(room) < total or has_mask:
            room = np.empty(max(2 * total, 1 << 16), np.int64)
        gather_two(self.first, self.second, c_src[copy], c_len[copy], room[:total])
        room_mask = _NO_MASK
        if has_mask:
            room_mask = np.ones(len(room), bool)
            if self.has_mask:
                gather_two(self.first_mask, self.second_mask, c_src[copy], c_len[copy], room_mask[:total])
        self._spare = None if has_mask else self._room
        self._room, self._room_mask = room, room_mask
        c_src[copy] = _offsets(c_len[copy])
        c_src[stay] -= n0
        return room[:total], room_mask[:total] if has_mask else _NO_MASK, c_src

    def refill(
        self, carried: np.ndarray, blocks: list[DocBlock], pieces: list[tuple[np.ndarray, ...]]
    ) -> np.ndarray:
        """Keep the pieces ``carried`` (keys; in ``first``, see :meth:`_keep`) and add ``pieces`` of
        ``blocks`` (per block, int64 ``(document index in block, offset, length)``): read in place
        from one block's values, or copied into ``second`` from several. Returns the new keys."""
        j = np.asarray(carried, np.int64) - self.base
        has_mask = self.has_mask or any(b.mask is not None for b in blocks)
        # the next block reads the same values (and mask) as the last: carried pieces stay there
        same = (
            len(blocks) == 1
            and len(self.second) > 0
            and blocks[0].values is self.second
            and (blocks[0].mask is self.second_mask if blocks[0].mask is not None else not has_mask)
        )
        c_src, c_len = self.src[j], self.length[j]
        stayed = c_src >= len(self.first) if same else None
        first, first_mask, c_src = self._keep(c_src, c_len, has_mask, same)
        n0 = len(first)
        if stayed is not None and self.has_mask == has_mask:
            c_src[stayed] += n0  # still read in place from the same block values
        srcs, lens, docs, starts = [c_src], [c_len], [self.doc[j]], [self.start[j]]
        if len(blocks) == 1:
            block = blocks[0]
            doc, start, length = pieces[0]
            second = block.values
            second_mask = _NO_MASK
            if has_mask:
                second_mask = block.mask if block.mask is not None else np.ones(len(second), bool)
            srcs.append(n0 + block.starts[doc] + start)
            lens.append(length)
            docs.append(block.doc_ids[doc])
            starts.append(start if block.offsets is None else start + block.offsets[doc])
        else:
            n_new = sum(int(p[2].sum()) for p in pieces)
            second = np.empty(n_new, np.int64)
            second_mask = np.ones(n_new, bool) if has_mask else _NO_MASK
            at = 0
            for block, (doc, start, length) in zip(blocks, pieces):
                dest = _offsets(length) + at
                src = block.starts[doc] + start
                gather_segments(block.values, src, length, dest, second)
                if block.mask is not None:
                    gather_segments(block.mask, src, length, dest, second_mask)
                srcs.append(n0 + dest)
                lens.append(length)
                docs.append(block.doc_ids[doc])
                # offset inside the original document (a block entry may be a later piece of it)
                starts.append(start if block.offsets is None else start + block.offsets[doc])
                at += int(length.sum())
        # keys: carried ones keep theirs (the packer holds them), new ones continue the count
        m = sum(len(x) for x in lens) - len(j)
        base = int(carried.min()) if len(carried) else self.next_key
        size = self.next_key + m - base
        src_t, len_t = np.zeros(size, np.int64), np.ones(size, np.int64)
        doc_t, start_t = np.zeros(size, np.int64), np.zeros(size, np.int64)
        new_keys = np.arange(self.next_key, self.next_key + m, dtype=np.int64)
        idx = np.concatenate([carried, new_keys]) - base
        src_t[idx], len_t[idx] = np.concatenate(srcs), np.concatenate(lens)
        doc_t[idx], start_t[idx] = np.concatenate(docs), np.concatenate(starts)
        self.first, self.second, self.first_mask, self.second_mask = first, second, first_mask, second_mask
        self.has_mask, self.base = bool(has_mask), base
        self.src, self.length, self.doc, self.start = src_t, len_t, doc_t, start_t
        self.next_key += m
        return new_keys

    def pieces(self, keys: np.ndarray) -> Pieces:
        """The pieces ``keys`` with copies of their tokens (in the order of ``keys``)."""
        src, length, doc, start = self.rows(keys)
        tokens = np.empty(int(length.sum()), np.int64)
        mask = np.empty(len(tokens), bool) if self.has_mask else None
        gather_two(self.first, self.second, src, length, tokens)
        if mask is not None:
            gather_two(self.first_mask, self.second_mask, src, length, mask)
        return Pieces(doc, start, length, tokens, np.full(len(length), self.has_mask), mask)

    def state_dict(self, keys: np.ndarray, by_ref: bool = False) -> dict:
        """The pieces ``keys`` in the one state format (references with ``by_ref``: no token is
        copied); :meth:`from_state` gives them keys ``0..m-1``."""
        if by_ref:
            src, length, doc, start = self.rows(keys)
            return refs_state(doc, start, length, np.full(len(keys), MASK if self.has_mask else 0, np.uint8))
        return self.pieces(keys).state_dict()

    @classmethod
    def from_state(cls, state: dict, refetch: Refetch | None = None) -> Arena:
        """An arena of the saved pieces, keys ``0..m-1`` in saved order (``next_key == m``).

        References are re-read through ``refetch``. Also reads the pack stage's earlier format
        (``seg_start`` for ``starts``, one ``has_mask`` for all pieces)."""
        if "seg_start" in state:  # pack-stage checkpoints written before the one format
            state = {**state, "starts": state["seg_start"]}
        if is_refs(state):
            p = Pieces.from_documents(fetch_pieces(state, refetch))
        else:
            p = Pieces.from_state(state)
        arena = cls()
        arena.first = p.tokens
        arena.has_mask = bool(p.has_mask.any())
        arena.first_mask = p.mask if arena.has_mask else _NO_MASK
        arena.src, arena.length, arena.doc, arena.start = _offsets(p.lens), p.lens, p.doc_ids, p.starts
        arena.next_key = len(p.lens)
        return arena
