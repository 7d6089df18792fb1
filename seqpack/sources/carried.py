"""Documents handed to a consumer by an elastic resume, served before its own stream.

:func:`seqpack.elastic.repartition` collects the documents the old consumers held in their
buffers (shuffle buffer, tokenizer batch, stage buffers) and gives each new consumer a share; this
node, placed after the mixture, serves that share first (pieces keep ``Document.start``), then
passes its upstream through. Outside an elastic resume it holds nothing and only forwards.

State: the upstream's under ``"upstream"``; while documents wait, ``"carried"`` (references when
the chain can re-read them, see :mod:`seqpack.refs`) and ``"carried_tokens"`` (documents saved
with their tokens: synthetic ones, or a chain without ``fetch``).
"""

from __future__ import annotations

from torchdata.nodes import BaseNode

from seqpack.arena import documents_from_state, documents_to_state, refetcher
from seqpack.node import Node
from seqpack.sources.blocks import DocBlock, pull_block
from seqpack.sources.records import Document


class CarriedDocuments(Node[Document]):
    """Serve the carried documents (set by an elastic resume's state), then the upstream's."""

    def __init__(self, upstream: BaseNode):
        super().__init__()
        self.upstream = upstream

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self._refetch = refetcher(self.upstream)
        s = initial_state or {}
        if s and "upstream" not in s:
            s = {"upstream": s}  # a chain state written before this node existed
        self.upstream.reset(s.get("upstream"))
        queue: list[Document] = []
        for key in ("carried", "carried_tokens"):
            if s.get(key) is not None:
                queue.extend(documents_from_state(s[key], self._refetch))
        queue.reverse()  # served from the end
        self._queue = queue

    def get_state(self) -> dict:
        out = {"upstream": self.upstream.state_dict()}
        if self._queue:
            waiting = self._queue[::-1]
            out["carried"] = documents_to_state(waiting, self._refetch is not None)
        return out

    def next(self) -> Document:
        if self._queue:
            return self._queue.pop()
        return next(self.upstream)

    def next_block(self, max_docs: int) -> DocBlock:
        if self._queue:
            docs = [self._queue.pop() for _ in range(min(max_docs, len(self._queue)))]
            return DocBlock.from_documents(docs)
        return pull_block(self.upstream, max_docs)
