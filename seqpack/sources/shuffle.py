"""Seeded bounded-buffer shuffling of a document stream (shard order is shuffled by the readers)."""

from __future__ import annotations

import numpy as np
from torchdata.nodes import BaseNode

from seqpack.arena import documents_from_state, documents_to_state
from seqpack.node import Node
from seqpack.sources.records import Document


class ShuffleBuffer(Node[Document]):
    """Keep ``buffer`` documents; emit a uniformly drawn one and replace it with the next arrival.

    The buffer contents and the RNG state are part of the state (as flat tensors), so a resumed
    stream is identical to the uninterrupted one. ``seed`` should already mix in epoch and consumer.
    """

    def __init__(self, upstream: BaseNode, buffer: int = 1000, seed: int | tuple = 0):
        super().__init__()
        if buffer < 1:
            raise ValueError(f"shuffle buffer must be >= 1, got {buffer}")
        self.upstream, self.buffer, self.seed = upstream, int(buffer), seed

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        seed = list(self.seed) if isinstance(self.seed, (tuple, list)) else [int(self.seed)]
        self._rng = np.random.default_rng(seed)
        if initial_state is None:
            self.upstream.reset(None)
            self._buf: list[Document] = []
            self._exhausted = False
        else:
            self.upstream.reset(initial_state["upstream"])
            self._buf = documents_from_state(initial_state["buffer"])
            self._exhausted = bool(initial_state["exhausted"])
            self._rng.bit_generator.state = initial_state["rng"]

    def get_state(self) -> dict:
        return {
            "upstream": self.upstream.state_dict(),
            "buffer": documents_to_state(self._buf),
            "exhausted": self._exhausted,
            "rng": self._rng.bit_generator.state,
        }

    def next(self) -> Document:
        while not self._exhausted and len(self._buf) < self.buffer:
            try:
                self._buf.append(next(self.upstream))
            except StopIteration:
                self._exhausted = True
        if not self._buf:
            raise StopIteration
        j = int(self._rng.integers(len(self._buf)))
        doc = self._buf[j]
        self._buf[j] = self._buf[-1]
        self._buf.pop()
        return doc
