"""Seeded bounded-buffer shuffling of a document stream (shard order is shuffled by the readers)."""

from __future__ import annotations

import warnings

import numpy as np
from torchdata.nodes import BaseNode

from seqpack.arena import documents_from_state, documents_to_state, refetcher
from seqpack.checks import check_int
from seqpack.node import Node
from seqpack.refs import GROUP, MASK, TURNS, refs_state
from seqpack.sources.records import Document


class ShuffleBuffer(Node[Document]):
    """Keep ``buffer_docs`` documents; emit a uniformly drawn one and replace it with the next arrival.

    State: the upstream's under ``"upstream"``, the buffered documents (``documents_to_state``:
    by reference when the chain can re-read them), whether the upstream ran out, and the RNG
    state; a resumed stream is identical to the uninterrupted one. ``seed`` should already mix in
    epoch and consumer.
    ``buffer`` is the deprecated name of ``buffer_docs``.
    """

    def __init__(
        self, upstream: BaseNode, buffer_docs: int = 1000, seed: int | tuple = 0, *, buffer: int | None = None
    ):
        super().__init__()
        if buffer is not None:
            warnings.warn(
                "ShuffleBuffer(buffer=...) is deprecated; use buffer_docs", DeprecationWarning, stacklevel=2
            )
            buffer_docs = buffer
        self.upstream, self.seed = upstream, seed
        self.buffer_docs = check_int(buffer_docs, "buffer_docs", minimum=1)

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        seed = list(self.seed) if isinstance(self.seed, (tuple, list)) else [int(self.seed)]
        self._rng = np.random.default_rng(seed)
        self._refetch = refetcher(self.upstream)
        if initial_state is None:
            self.upstream.reset(None)
            self._buf: list[Document] = []
            self._exhausted = False
        else:
            self.upstream.reset(initial_state["upstream"])
            self._buf = documents_from_state(initial_state["buffer"], self._refetch)
            self._exhausted = bool(initial_state["exhausted"])
            self._rng.bit_generator.state = initial_state["rng"]

        # by reference: (doc_id, start, len, flags) per slot, kept in step with _buf, so a state
        # costs an array copy, not a pass over the buffered documents (it is taken every batch)
        self._refs = np.zeros((self.buffer_docs, 4), np.int64) if self._refetch is not None else None
        if self._refs is not None:
            for i, d in enumerate(self._buf):
                self._refs[i] = _ref_row(d)

    def get_state(self) -> dict:
        if self._refs is not None:
            r = self._refs[: len(self._buf)]
            buffer = refs_state(r[:, 0], r[:, 1], r[:, 2], r[:, 3])
        else:
            buffer = documents_to_state(self._buf)
        return {
            "upstream": self.upstream.state_dict(),
            "buffer": buffer,
            "exhausted": self._exhausted,
            "rng": self._rng.bit_generator.state,
        }

    def next(self) -> Document:
        buf, refs = self._buf, self._refs
        while not self._exhausted and len(buf) < self.buffer_docs:
            try:
                doc = next(self.upstream)
            except StopIteration:
                self._exhausted = True
                break
            if refs is not None:
                refs[len(buf)] = _ref_row(doc)
            buf.append(doc)
        if not buf:
            raise StopIteration
        j = int(self._rng.integers(len(buf)))
        doc = buf[j]
        last = len(buf) - 1
        buf[j] = buf[last]
        if refs is not None:
            refs[j] = refs[last]
        buf.pop()
        return doc


def _ref_row(d: Document) -> tuple[int, int, int, int]:
    flags = (
        (d.loss_mask is not None) * MASK + (d.turn_starts is not None) * TURNS + (d.group is not None) * GROUP
    )
    return (d.doc_id, d.start, len(d.tokens), flags)
