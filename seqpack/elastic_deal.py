"""How an elastic resume deals the old consumers' leftovers over the new consumers, by size.

:mod:`seqpack.elastic` collects what every old consumer left (:class:`Leftovers`); :func:`deal`
gives each of the ``n`` new consumers a share of near-equal size:

- Work items, per source: the leftover items (in the old consumers' order) are laid out as
  pseudo-units, each sized by its share of its unit's metadata size (``UnitSize.size`` times the
  fraction of the unit's raw extent it covers), and cut into ``n`` contiguous pieces of equal size
  with the reader's own partition (:func:`seqpack.sources.partition.split_work`): an item is split
  where a cut falls when its raw extent is known, else it goes whole to the consumer holding its
  middle. So a few large leftover items (e.g. 2 old consumers' rest, 8 new consumers) still feed
  every new consumer, and each gets the same number of bytes within one unsplittable item.
- Buffered pieces and documents (by reference or with tokens): each goes to the consumer with the
  fewest carried tokens so far (a whole-document reference, length -1, counts as the mean known
  piece length); each consumer keeps them in their collected order.

The deal is a pure function of the collected leftovers, so every new rank computes the same one.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Sequence
from typing import Any

import numpy as np

from seqpack.sources.partition import UnitSize, WorkItem, split_work


@dataclasses.dataclass
class Leftovers:
    """What the old consumers left: work items per source, pieces by reference, token documents,
    and a reader per source (its unit sizes size the items)."""

    work: dict[int, list[tuple]] = dataclasses.field(default_factory=dict)
    refs: list[np.ndarray] = dataclasses.field(default_factory=list)  # rows (doc_id, start, len, flags)
    token_docs: list = dataclasses.field(default_factory=list)
    readers: dict[int, Any] = dataclasses.field(default_factory=dict)


def _unit_sizes(reader: Any) -> dict[tuple[int, int], UnitSize] | None:
    """``(shard, unit) -> UnitSize`` of the reader's canonical units (None: sizes unknown)."""
    if reader is None or not hasattr(reader, "units"):
        return None
    reader.units()  # the canonical units and their metadata sizes, computed once per reader
    sizes = getattr(reader, "_sizes", None)
    return {(u.shard, u.unit): u for u in sizes} if sizes else None


def split_items(items: Sequence[WorkItem], n: int, sizes: dict | None) -> list[list[WorkItem]]:
    """``items`` cut into ``n`` contiguous shares of equal size (see the module docstring);
    round robin when ``sizes`` is None."""
    items = [tuple(int(x) for x in it) for it in items]
    if sizes is None or any((s, u) not in sizes for s, u, _, _ in items):
        return [items[c::n] for c in range(n)]
    pseudo = []
    for i, (shard, unit, first, stop) in enumerate(items):
        u = sizes[(shard, unit)]
        if u.extent is None or u.extent <= 0:  # raw extent unknown: cannot be split, sized whole
            pseudo.append(UnitSize(i, 0, u.size, None))
            continue
        end = u.extent if stop < 0 else min(stop, u.extent)
        span = max(end - first, 0)
        pseudo.append(UnitSize(i, 0, u.size * span / u.extent, span if span > 0 else None))
    out: list[list[WorkItem]] = []
    for share in split_work(pseudo, n):
        mine = []
        for i, _, f, s in share:
            shard, unit, first, stop = items[i]
            if pseudo[i].extent is None:
                mine.append(items[i])  # whole, as it was
            else:
                mine.append((shard, unit, first + f, stop if s < 0 else first + s))
        out.append(mine)
    return out


def _least_loaded(lengths: np.ndarray, n: int, load: np.ndarray) -> list[np.ndarray]:
    """Indices of ``lengths`` per consumer: each to the consumer with the least ``load`` (updated)."""
    heap = [(float(load[c]), c) for c in range(n)]
    heapq.heapify(heap)
    owner = np.empty(len(lengths), np.int64)
    for i, ln in enumerate(lengths.tolist()):
        tokens, c = heapq.heappop(heap)
        owner[i] = c
        load[c] = tokens + ln
        heapq.heappush(heap, (load[c], c))
    return [np.flatnonzero(owner == c) for c in range(n)]


def deal(left: Leftovers, n: int) -> list[tuple[dict, np.ndarray, list]]:
    """Per new consumer ``c`` of ``n``: ``(work items per source, carried piece rows, carried
    token documents)``."""
    work = {
        src: split_items(items, n, _unit_sizes(left.readers.get(src))) for src, items in left.work.items()
    }
    refs = np.concatenate(left.refs) if left.refs else np.zeros((0, 4), np.int64)
    lens = refs[:, 2].astype(np.float64)
    known = lens[lens >= 0]
    lens[lens < 0] = known.mean() if len(known) else 1.0
    load = np.zeros(n)
    by_ref = _least_loaded(lens, n, load)
    tok_lens = np.array([len(d.tokens) for d in left.token_docs], np.float64)
    by_tok = _least_loaded(tok_lens, n, load)
    return [
        ({src: w[c] for src, w in work.items()}, refs[by_ref[c]], [left.token_docs[i] for i in by_tok[c]])
        for c in range(n)
    ]
