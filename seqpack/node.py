"""The stage protocol: torchdata ``BaseNode`` (``reset(initial_state)``, ``next()``, ``get_state()``).

Every seqpack stage (readers, tokenizer, mixture, shuffle, packing, and stages other modules
register with the loader) is a :class:`Node`. Stages compose by wrapping: a stage holds its
upstream node, asks it for items in ``next()``, and nests the upstream state inside its own in
``get_state()``. Exact resume is then a property of the chain: ``chain.reset(chain.state_dict())``
continues with the same item the uninterrupted chain would have produced next.

``Node`` adds three things on top of ``BaseNode``: ``load_state_dict`` (= ``reset(state)``,
the name readers of the issue expect), a ``stats()`` hook collecting counters down the chain, and
``next_block(max_docs)``, the same stream many documents at a time (see ``sources/blocks.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from torchdata.nodes import BaseNode

from seqpack.sources.blocks import DocBlock, collect_block

T = TypeVar("T")


class Node(BaseNode[T]):
    """A resumable pipeline stage.

    Subclasses implement ``reset(initial_state)`` (calling ``super().reset(initial_state)``),
    ``next()`` (return the next item or raise ``StopIteration``) and ``get_state()`` (a picklable
    dict that ``reset`` accepts). ``upstream`` is the wrapped node, if any.
    """

    upstream: BaseNode | None = None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state`` (a previous ``state_dict()``)."""
        self.reset(state)

    def stats(self) -> dict[str, Any]:
        """Counters of this stage merged over its upstream chain (later stages win on clashes)."""
        up = self.upstream
        out = dict(up.stats()) if isinstance(up, Node) else {}
        out.update(self.own_stats())
        return out

    def own_stats(self) -> dict[str, Any]:
        return {}

    @property
    def can_refetch(self) -> bool:
        """Whether :meth:`refetch` works: a reader with ``fetch`` is behind this node's tokenizer."""
        up = self.upstream
        return isinstance(up, Node) and up.can_refetch

    def refetch(self, doc_ids: Sequence[int]) -> list:
        """The documents ``doc_ids`` again, as this chain made them the first time (whole, in
        order): how buffers saved by reference (:mod:`seqpack.refs`) are restored. Default:
        the upstream's; the tokenizer implements it over its reader's ``fetch``."""
        up = self.upstream
        if isinstance(up, Node):
            return up.refetch(doc_ids)
        raise ValueError(
            f"{type(self).__name__}: cannot re-read documents (no reader with fetch() behind it)"
        )

    def next_block(self, max_docs: int) -> DocBlock:
        """Up to ``max_docs`` next items as one :class:`~seqpack.sources.blocks.DocBlock` of documents.

        Raises StopIteration when the stream is done. The default collects ``next()``; stages that
        hold documents in columnar form override it (same stream, fewer Python calls).
        """
        return collect_block(self, max_docs)


class SequenceNode(Node[T]):
    """Serve the items of an in-memory sequence, resumable by index (tests, small pipelines)."""

    def __init__(self, items: Sequence[T] | Iterable[T]):
        super().__init__()
        self.items = list(items)
        self._i = 0

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self._i = 0 if initial_state is None else int(initial_state["i"])

    def next(self) -> T:
        if self._i >= len(self.items):
            raise StopIteration
        self._i += 1
        return self.items[self._i - 1]

    def get_state(self) -> dict:
        return {"i": self._i}
