"""Blocks of documents: the columnar form in which stages may pass many documents per call.

A :class:`DocBlock` holds ``n`` documents as index arrays into one flat token array (typically a
zero-copy numpy view over an Arrow buffer of a Parquet row group), so a pre-tokenized source can
hand a thousand documents to the packer with a few numpy operations instead of a thousand Python
objects. It is the same stream as ``next()`` yields one :class:`Document` at a time: every node
answers :meth:`seqpack.node.Node.next_block`, natively (readers of pre-tokenized columns,
the tokenizer, a one-source mixture) or by collecting its own ``next()`` (the default), and the
two calls can be mixed on one node without changing what comes out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torchdata.nodes import BaseNode

from seqpack.sources.records import NO_GROUP, Document


@dataclass
class DocBlock:
    """``n`` documents over one flat token array.

    Attributes:
        doc_ids: int64 ``[n]`` global document ids.
        starts: int64 ``[n]`` offset of each document's first token in ``values``.
        lengths: int64 ``[n]`` tokens per document.
        values: integer ``[*]`` token ids (any integer dtype; documents may sit anywhere in it).
        mask: bool ``[*]`` aligned with ``values`` (True = token is a target), or None (all are).
        source: source name of every document (str), or one name per document.
        turn_starts: per document, int64 token offsets where an exchange starts (or None for that
            document); None when no document has them (chat documents only).
        groups: int64 ``[n]`` group ids (``NO_GROUP`` for none), or None when no document has one.
        offsets: int64 ``[n]`` token offset of each entry inside its original document
            (``Document.start``: later pieces of a split document, e.g. an elastic resume's carried
            pieces), or None when every entry is a whole document (all 0).
    """

    doc_ids: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    values: np.ndarray
    mask: np.ndarray | None = None
    source: str | Sequence[str] = ""
    turn_starts: Sequence[np.ndarray | None] | None = None
    groups: np.ndarray | None = None
    offsets: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.doc_ids)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def source_of(self, i: int) -> str:
        return self.source if isinstance(self.source, str) else self.source[i]

    def document(self, i: int) -> Document:
        """Document ``i`` (int64 tokens: a copy when ``values`` is another dtype)."""
        a = int(self.starts[i])
        b = a + int(self.lengths[i])
        mask = None if self.mask is None else self.mask[a:b]
        tokens = self.values[a:b].astype(np.int64, copy=False)
        turns = None if self.turn_starts is None else self.turn_starts[i]
        group = None if self.groups is None or self.groups[i] == NO_GROUP else int(self.groups[i])
        start = 0 if self.offsets is None else int(self.offsets[i])
        return Document(int(self.doc_ids[i]), tokens, mask, self.source_of(i), turns, group, start)

    def documents(self) -> list[Document]:
        return [self.document(i) for i in range(len(self))]

    def take(self, idx: np.ndarray | slice) -> DocBlock:
        """The documents at ``idx`` (a slice or an index array), sharing ``values``."""
        src = self.source
        if not isinstance(src, str):
            src = list(np.asarray(src, dtype=object)[idx])
        turns = None
        if self.turn_starts is not None:
            turns = [self.turn_starts[i] for i in np.arange(len(self.doc_ids))[idx]]
        groups = None if self.groups is None else self.groups[idx]
        offsets = None if self.offsets is None else self.offsets[idx]
        return DocBlock(
            self.doc_ids[idx], self.starts[idx], self.lengths[idx], self.values, self.mask, src, turns,
            groups, offsets,
        )  # fmt: skip

    @classmethod
    def from_documents(cls, docs: Sequence[Document]) -> DocBlock:
        """Concatenate documents into one block (copies their tokens)."""
        n = len(docs)
        lengths = np.fromiter((len(d.tokens) for d in docs), np.int64, n)
        starts = np.zeros(n, np.int64)
        if n > 1:
            np.cumsum(lengths[:-1], out=starts[1:])
        values = np.concatenate([d.tokens for d in docs]).astype(np.int64, copy=False) if n else _EMPTY
        mask = None
        if any(d.loss_mask is not None for d in docs):
            mask = np.concatenate(
                [
                    np.ones(len(d.tokens), bool) if d.loss_mask is None else np.asarray(d.loss_mask, bool)
                    for d in docs
                ]
            )
        names = [d.source for d in docs]
        source: str | list[str] = names[0] if names and all(s == names[0] for s in names) else names
        if not names:
            source = ""
        ids = np.fromiter((d.doc_id for d in docs), np.int64, n)
        # Records (pre-tokenized, collected by a reader) come through here too: getattr
        turns = [getattr(d, "turn_starts", None) for d in docs]
        groups = [getattr(d, "group", None) for d in docs]
        offsets = np.fromiter((getattr(d, "start", 0) for d in docs), np.int64, n)
        return cls(
            ids,
            starts,
            lengths,
            values,
            mask,
            source,
            turns if any(t is not None for t in turns) else None,
            np.array([NO_GROUP if g is None else g for g in groups], np.int64)
            if any(g is not None for g in groups)
            else None,
            offsets if offsets.any() else None,
        )


_EMPTY = np.zeros(0, np.int64)


def pull_block(node: BaseNode, max_docs: int) -> DocBlock:
    """Up to ``max_docs`` (>= 1) documents from ``node`` as one block; StopIteration when it is done.

    Uses the node's own ``next_block`` when it has one, else collects ``next(node)``.
    """
    fn = getattr(node, "next_block", None)
    if fn is not None:
        return fn(max_docs)
    return collect_block(node, max_docs)


def collect_block(node: BaseNode, max_docs: int) -> DocBlock:
    """The document-at-a-time fallback: ``next(node)`` up to ``max_docs`` times."""
    docs: list[Document] = []
    while len(docs) < max_docs:
        try:
            docs.append(next(node))
        except StopIteration:
            break
    if not docs:
        raise StopIteration
    return DocBlock.from_documents(docs)
