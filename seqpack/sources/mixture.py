"""Weighted mixtures of document streams with deterministic interleaving and token counters."""

from __future__ import annotations

from collections.abc import Sequence

from torchdata.nodes import BaseNode

from seqpack.checks import ConfigError, check_choice, check_float
from seqpack.node import Node
from seqpack.sources.blocks import DocBlock, collect_block, pull_block
from seqpack.sources.records import Document, split_doc_id

MIX_BY = ("tokens", "documents")  # what a source's share counts


def check_weight(value, where: str) -> float:
    """A mixture weight: a number > 0 (ConfigError naming ``where`` otherwise)."""
    w = check_float(value, where)
    if not w > 0:
        raise ConfigError(f"{where}: must be > 0, got {w}")
    return w


class Mixture(Node[Document]):
    """Interleave several document streams so each gets a share proportional to its weight.

    Deterministic (no RNG): the next document comes from the active source with the smallest
    ``emitted_i / weight_i`` (ties: lowest index), where ``emitted`` counts tokens
    (``by="tokens"``, default: weights are token fractions) or documents (``by="documents"``). A
    source that runs out leaves the mix and the others continue, so nothing is lost; the epoch ends
    when every source is exhausted. Per-source token and document counts are in :meth:`stats`.
    """

    def __init__(
        self,
        sources: Sequence[BaseNode],
        weights: Sequence[float] | None = None,
        names: Sequence[str] | None = None,
        *,
        by: str = "tokens",
    ):
        super().__init__()
        if not sources:
            raise ConfigError("sources: a mixture needs at least one source")
        weights = [1.0] * len(sources) if weights is None else list(weights)
        if len(weights) != len(sources):
            raise ConfigError(f"weights: {len(weights)} weights for {len(sources)} sources")
        self.sources = list(sources)
        self.weights = [check_weight(w, f"weights[{i}]") for i, w in enumerate(weights)]
        self.names = list(names) if names is not None else [f"source{i}" for i in range(len(sources))]
        self.by = check_choice(by, "by", MIX_BY)

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        n = len(self.sources)
        if initial_state is None:
            for s in self.sources:
                s.reset(None)
            self._tokens, self._docs, self._done = [0] * n, [0] * n, [False] * n
        else:
            for s, st in zip(self.sources, initial_state["sources"]):
                s.reset(st)
            self._tokens = list(initial_state["tokens"])
            self._docs = list(initial_state["docs"])
            self._done = list(initial_state["done"])

    def get_state(self) -> dict:
        return {
            "sources": [s.state_dict() for s in self.sources],
            "tokens": list(self._tokens),
            "docs": list(self._docs),
            "done": list(self._done),
        }

    def stats(self) -> dict:
        out: dict = {}
        for s in self.sources:
            if isinstance(s, Node):
                for k, v in s.stats().items():
                    # a counter every source keeps under one name (tokenize/documents, ...) is summed
                    # over the sources; per-source keys (read/<name>/..., mix/<name>/...) never collide
                    old = out.get(k)
                    counts = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (v, old))
                    out[k] = old + v if counts else v
        out.update(self.own_stats())
        return out

    def own_stats(self) -> dict:
        out = {}
        for i, name in enumerate(self.names):
            out[f"mix/{name}/tokens"] = self._tokens[i]
            out[f"mix/{name}/documents"] = self._docs[i]
        return out

    @property
    def can_refetch(self) -> bool:
        return all(isinstance(s, Node) and s.can_refetch for s in self.sources)

    def refetch(self, doc_ids: Sequence[int]) -> list[Document]:
        """Each source re-reads its own documents (the doc id's source bits pick it); input order."""
        index = {_source_index(s, i): i for i, s in enumerate(self.sources)}
        wanted: dict[int, list[int]] = {}
        for d in doc_ids:
            src = split_doc_id(d)[0]
            if src not in index:
                raise ValueError(f"document {d} is of source {src}, which this mixture does not hold")
            wanted.setdefault(index[src], []).append(int(d))
        got = {}
        for i, ids in wanted.items():
            got.update((doc.doc_id, doc) for doc in self.sources[i].refetch(ids))
        return [got[int(d)] for d in doc_ids]

    def next_block(self, max_docs: int) -> DocBlock:
        """One source: its blocks pass through. Several: interleaved document by document."""
        if len(self.sources) > 1 or self._done[0]:
            return collect_block(self, max_docs)
        try:
            block = pull_block(self.sources[0], max_docs)
        except StopIteration:
            self._done[0] = True
            raise
        self._tokens[0] += block.num_tokens
        self._docs[0] += len(block)
        return block

    def next(self) -> Document:
        count = self._tokens if self.by == "tokens" else self._docs
        while True:
            best, best_key = -1, 0.0
            for i, w in enumerate(self.weights):
                if not self._done[i]:
                    key = count[i] / w
                    if best < 0 or key < best_key:
                        best, best_key = i, key
            if best < 0:
                raise StopIteration
            try:
                doc = next(self.sources[best])
            except StopIteration:
                self._done[best] = True
                continue
            self._tokens[best] += len(doc.tokens)
            self._docs[best] += 1
            return doc


def _source_index(node: BaseNode, default: int) -> int:
    """The ``source_index`` of the reader behind ``node`` (its doc ids' top bits), else ``default``."""
    while node is not None:
        if hasattr(node, "source_index"):
            return int(node.source_index)
        node = getattr(node, "upstream", None)
    return default
