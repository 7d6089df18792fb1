"""Bin-packing with document masks: where a document's tokens become a VarlenBatch.

``pack_documents`` packs in-memory token arrays offline (global plan, then one batch per bin).
``OnlinePacker`` is the bounded-buffer best-fit packer that the streaming loader stage and
``pack(algorithm="online")`` share, so a streamed run and an offline plan agree bin for bin.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from seqpack.batch import VarlenBatch
from seqpack.ops import packing as kernels
from seqpack.plan import PackPlan, pack


class OnlinePacker:
    """Bounded-buffer best-fit packer over ``(key, length)`` items.

    Items wait in a buffer of at most ``buffer_docs``. When it is full, the buffer is packed
    best-fit-decreasing; bins at least ``min_fill`` full (or holding an item that has waited
    ``max_age`` windows) are emitted, the rest are carried to the next window. If nothing qualifies,
    the bin of the oldest item is emitted so the stream always moves. Bins come out as int64 arrays
    of keys, items in arrival order.

    The buffer (keys, lengths, ages) is the whole state: ``state_dict`` / ``load_state_dict``
    give exact resume.
    """

    def __init__(self, capacity: int, *, buffer_docs: int = 10_000, min_fill: float = 0.99, max_age: int = 4):
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        if buffer_docs < 1:
            raise ValueError(f"buffer_docs must be >= 1, got {buffer_docs}")
        if not 0.0 <= min_fill <= 1.0:
            raise ValueError(f"min_fill must be in [0, 1], got {min_fill}")
        self.capacity = int(capacity)
        self.buffer_docs = int(buffer_docs)
        self.min_tokens = int(np.ceil(min_fill * capacity))
        self.max_age = int(max_age)
        self._keys = np.zeros(0, np.int64)
        self._lens = np.zeros(0, np.int64)
        self._ages = np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: int, length: int) -> list[np.ndarray]:
        """Buffer one item (``0 < length <= capacity``); returns the bins that became ready."""
        return self.add_many(np.array([key], np.int64), np.array([length], np.int64))

    def add_many(self, keys: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
        """Buffer items in arrival order; returns the bins that became ready (maybe none)."""
        lengths = np.asarray(lengths, np.int64)
        if len(lengths) and (lengths.min() <= 0 or lengths.max() > self.capacity):
            raise ValueError(f"item lengths must be in [1, {self.capacity}]")
        keys = np.asarray(keys, np.int64)
        out: list[np.ndarray] = []
        pos = 0
        while pos < len(keys):
            take = min(self.buffer_docs - len(self._keys), len(keys) - pos)
            self._keys = np.concatenate([self._keys, keys[pos : pos + take]])
            self._lens = np.concatenate([self._lens, lengths[pos : pos + take]])
            self._ages = np.concatenate([self._ages, np.zeros(take, np.int64)])
            pos += take
            if len(self._keys) >= self.buffer_docs:
                out.extend(self._window(final=False))
        return out

    def pack_items(self, item_doc, item_start, item_len) -> Iterator[np.ndarray]:
        """Offline driver used by ``pack``: keys are item indices."""
        yield from self.add_many(np.arange(len(item_len), dtype=np.int64), item_len)

    def flush(self) -> list[np.ndarray]:
        """Emit every buffered item (end of stream)."""
        return self._window(final=True) if len(self._keys) else []

    def _window(self, final: bool) -> list[np.ndarray]:
        order = np.argsort(-self._lens, kind="stable")
        assign_sorted, n_bins = kernels.bfd_assign(np.ascontiguousarray(self._lens[order]), self.capacity)
        bin_of = np.empty(len(order), np.int64)
        bin_of[order] = assign_sorted
        loads = kernels.bin_loads(bin_of, self._lens, n_bins)
        if final:
            ready = np.ones(n_bins, bool)
        else:
            ready = loads >= self.min_tokens
            ready[bin_of[self._ages >= self.max_age]] = True
            if not ready.any():
                ready[bin_of[0]] = True
        emit = ready[bin_of]
        # bins in order of their earliest item; items inside a bin in arrival order
        idx = np.flatnonzero(emit)
        first_item = np.full(n_bins, len(order), np.int64)
        np.minimum.at(first_item, bin_of[idx], idx)
        idx = idx[np.lexsort((idx, first_item[bin_of[idx]]))]
        cuts = np.flatnonzero(np.diff(bin_of[idx])) + 1
        bins = np.split(self._keys[idx], cuts)
        keep = ~emit
        self._keys, self._lens, self._ages = self._keys[keep], self._lens[keep], self._ages[keep] + 1
        return bins

    def state_dict(self) -> dict:
        return {"keys": self._keys.tolist(), "lens": self._lens.tolist(), "ages": self._ages.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self._keys = np.asarray(state["keys"], np.int64)
        self._lens = np.asarray(state["lens"], np.int64)
        self._ages = np.asarray(state["ages"], np.int64)


def check_token_arrays(docs: Sequence[np.ndarray], name: str = "docs") -> list[np.ndarray]:
    """Validate a ragged list of 1-D integer token arrays; errors name the first bad index."""
    out = []
    for i, d in enumerate(docs):
        a = np.asarray(d)
        if a.ndim != 1:
            raise ValueError(f"{name}[{i}] must be 1-D, got shape {a.shape}")
        if a.size and a.dtype.kind not in "iu":
            raise ValueError(f"{name}[{i}] must hold integer token ids, got dtype {a.dtype}")
        out.append(a.astype(np.int64, copy=False))
    return out


def batches_from_plan(
    plan: PackPlan,
    docs: Sequence[np.ndarray],
    *,
    doc_ids: Sequence[int] | np.ndarray | None = None,
    loss_masks: Sequence[np.ndarray | None] | None = None,
    pad_to: int | None = None,
    pad_id: int = 0,
    continue_positions: bool = False,
) -> Iterator[VarlenBatch]:
    """Materialize one VarlenBatch per bin of ``plan`` (tokens are sliced, not copied, until here)."""
    for b in range(plan.n_bins):
        seg_doc, seg_start, seg_len = plan.bin(b)
        toks = [docs[d][s : s + n] for d, s, n in zip(seg_doc, seg_start, seg_len)]
        masks = None
        if loss_masks is not None:
            masks = [
                None if loss_masks[d] is None else np.asarray(loss_masks[d], bool)[s : s + n]
                for d, s, n in zip(seg_doc, seg_start, seg_len)
            ]
        ids = seg_doc if doc_ids is None else np.asarray(doc_ids, np.int64)[seg_doc]
        yield VarlenBatch.from_segments(
            toks,
            ids,
            seg_start=seg_start,
            loss_masks=masks,
            pad_to=pad_to,
            pad_id=pad_id,
            continue_positions=continue_positions,
        )


def pack_documents(
    docs: Iterable[np.ndarray],
    capacity: int,
    *,
    algorithm: str = "bfd",
    overflow: str = "split",
    loss_masks: Sequence[np.ndarray | None] | None = None,
    pad_to: int | None = None,
    pad_id: int = 0,
    seed: int | None = 0,
    continue_positions: bool = False,
) -> Iterator[VarlenBatch]:
    """Pack in-memory token arrays into VarlenBatches of at most ``capacity`` tokens.

    Args:
        docs: 1-D integer token arrays, one per document; document ``i`` gets ``doc_ids == i``.
        capacity: tokens per batch.
        algorithm, overflow, seed: as in :func:`seqpack.pack`.
        loss_masks: optional per-document bool arrays (True = token contributes to the loss); they
            survive splitting.
        pad_to: pad every batch to this many tokens (a final padding segment), e.g. ``capacity``.
    """
    docs = check_token_arrays(list(docs))
    if loss_masks is not None:
        if len(loss_masks) != len(docs):
            raise ValueError(f"loss_masks has {len(loss_masks)} entries for {len(docs)} docs")
        for i, (m, d) in enumerate(zip(loss_masks, docs)):
            if m is not None and len(m) != len(d):
                raise ValueError(f"loss_masks[{i}] has length {len(m)}, docs[{i}] has {len(d)}")
    plan = pack([len(d) for d in docs], capacity, algorithm=algorithm, overflow=overflow, seed=seed)
    yield from batches_from_plan(
        plan, docs, loss_masks=loss_masks, pad_to=pad_to, pad_id=pad_id, continue_positions=continue_positions
    )
