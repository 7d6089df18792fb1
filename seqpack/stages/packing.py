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
from seqpack.sources.node import Node
from seqpack.sources.records import Document, documents_from_state, documents_to_state


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


# ---------------------------------------------------------------------------------------------
# Streaming stage: documents in, VarlenBatches out (the loader's ``stage: {type: "pack"}``).

STREAM_ALGORITHMS = ("online", "bfd", "ffd", "greedy")


def padding_batch(num_tokens: int, pad_id: int = 0) -> VarlenBatch:
    """A batch of ``num_tokens`` padding tokens and no targets (``num_loss_tokens == 0``).

    Ranks that run out of data yield these so every rank takes the same number of steps.
    """
    return VarlenBatch._from_arrays(
        np.full(num_tokens, pad_id, np.int64),
        np.zeros(num_tokens, bool),
        np.array([num_tokens], np.int64),
        np.array([-1], np.int64),
        np.zeros(1, np.int64),
        0,
        False,
    )


class PackStage(Node[VarlenBatch]):
    """Streaming packer stage over a document node (torchdata ``BaseNode`` protocol).

    Pulls :class:`~seqpack.sources.records.Document` items from ``upstream`` and yields
    :class:`VarlenBatch` of at most ``capacity`` tokens (padded to ``pad_to`` when set).

    Args:
        upstream: node yielding Documents.
        capacity: tokens per batch.
        algorithm: ``"online"`` (default: :class:`OnlinePacker`, bounded buffer of ``buffer_docs``
            pieces, bins emitted once ``min_fill`` full or ``max_age`` windows old, the rest carried),
            or ``"bfd"``/``"ffd"``/``"greedy"``: windows of ``buffer_docs`` documents planned with
            :func:`seqpack.pack` and emitted whole (no carry between windows).
        overflow: documents longer than ``capacity``: ``split`` (default, nothing lost),
            ``truncate``, ``drop`` (both counted in :meth:`own_stats`) or ``error``.
        pad_to: pad every batch to this many tokens (``None``: no padding).
        continue_positions: positions of a split document's later pieces continue from the offset.

    State: the upstream state, the packer's buffer, the ready bins not yet yielded, and the tokens
    of every buffered document (flat tensors), so resume is exact.
    """

    def __init__(
        self,
        upstream,
        capacity: int,
        *,
        algorithm: str = "online",
        buffer_docs: int = 1000,
        min_fill: float = 0.99,
        max_age: int = 4,
        overflow: str = "split",
        pad_to: int | None = None,
        pad_id: int = 0,
        continue_positions: bool = False,
        seed: int | None = 0,
    ):
        super().__init__()
        if algorithm not in STREAM_ALGORITHMS:
            raise ValueError(f"algorithm must be one of {STREAM_ALGORITHMS}, got {algorithm!r}")
        if overflow not in ("split", "truncate", "drop", "error"):
            raise ValueError(f"overflow must be split/truncate/drop/error, got {overflow!r}")
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        if pad_to is not None and pad_to < capacity:
            raise ValueError(f"pad_to={pad_to} is smaller than capacity={capacity}")
        self.upstream = upstream
        self.capacity, self.algorithm, self.buffer_docs = int(capacity), algorithm, int(buffer_docs)
        self.min_fill, self.max_age, self.overflow = float(min_fill), int(max_age), overflow
        self.pad_to, self.pad_id, self.continue_positions = pad_to, int(pad_id), bool(continue_positions)
        self.seed = seed

    # ---------------------------------------------------------------- state
    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self._packer = OnlinePacker(
            self.capacity, buffer_docs=self.buffer_docs, min_fill=self.min_fill, max_age=self.max_age
        )
        self._docs: dict[int, Document] = {}  # serial -> document
        self._refs: dict[int, int] = {}  # serial -> pieces still buffered
        self._pieces: dict[int, tuple[int, int, int]] = {}  # key -> (serial, start, length)
        self._ready: list[list[int]] = []  # bins (piece keys) waiting to be yielded
        if initial_state is None:
            self.upstream.reset(None)
            self._serial = self._key = 0
            self._exhausted = False
            self._counts = {
                "tokens_in": 0,
                "packed_tokens": 0,
                "truncated_tokens": 0,
                "dropped_tokens": 0,
                "documents": 0,
                "batches": 0,
            }
            return
        s = initial_state
        self.upstream.reset(s["upstream"])
        self._serial, self._key, self._exhausted = int(s["serial"]), int(s["key"]), bool(s["exhausted"])
        self._counts = dict(s["counts"])
        self._packer.load_state_dict(s["packer"])
        for serial, doc in zip(s["serials"], documents_from_state(s["docs"])):
            self._docs[int(serial)] = doc
        for key, serial, start, length in s["pieces"]:
            self._add_piece(int(serial), int(start), int(length), key=int(key))
        self._ready = [list(b) for b in s["ready"]]

    def get_state(self) -> dict:
        serials = sorted(self._docs)
        return {
            "upstream": self.upstream.state_dict(),
            "serial": self._serial,
            "key": self._key,
            "exhausted": self._exhausted,
            "counts": dict(self._counts),
            "packer": self._packer.state_dict(),
            "serials": serials,
            "docs": documents_to_state([self._docs[i] for i in serials]),
            "pieces": [[k, *v] for k, v in self._pieces.items()],
            "ready": [list(b) for b in self._ready],
        }

    def own_stats(self) -> dict:
        return {f"pack/{k}": v for k, v in self._counts.items()}

    # ---------------------------------------------------------------- pieces
    def _add_piece(self, serial: int, start: int, length: int, key: int | None = None) -> int:
        if key is None:
            key, self._key = self._key, self._key + 1
        self._pieces[key] = (serial, start, length)
        self._refs[serial] = self._refs.get(serial, 0) + 1
        return key

    def _take_doc(self, doc: Document) -> int:
        serial, self._serial = self._serial, self._serial + 1
        self._docs[serial] = doc
        self._counts["documents"] += 1
        self._counts["tokens_in"] += len(doc.tokens)
        return serial

    def _pieces_of(self, doc: Document) -> list[tuple[int, int]]:
        """(start, length) pieces of a document under the overflow policy (online mode)."""
        n, cap = len(doc.tokens), self.capacity
        if n <= cap:
            return [(0, n)] if n else []
        if self.overflow == "split":
            return [(s, min(cap, n - s)) for s in range(0, n, cap)]
        if self.overflow == "truncate":
            self._counts["truncated_tokens"] += n - cap
            return [(0, cap)]
        if self.overflow == "drop":
            self._counts["dropped_tokens"] += n
            return []
        raise ValueError(f"document {doc.doc_id} has {n} tokens > capacity {cap} (overflow='error')")

    # ---------------------------------------------------------------- filling
    def _pull(self, limit: int) -> list[Document]:
        docs = []
        while len(docs) < limit and not self._exhausted:
            try:
                docs.append(next(self.upstream))
            except StopIteration:
                self._exhausted = True
        return docs

    def _fill_online(self) -> None:
        docs = self._pull(max(1, self.buffer_docs - len(self._packer)))
        keys, lens = [], []
        for doc in docs:
            pieces = self._pieces_of(doc)
            if not pieces:
                continue
            serial = self._take_doc(doc)
            for start, length in pieces:
                keys.append(self._add_piece(serial, start, length))
                lens.append(length)
        bins = self._packer.add_many(np.array(keys, np.int64), np.array(lens, np.int64)) if keys else []
        if self._exhausted:
            bins += self._packer.flush()
        self._ready.extend(b.tolist() for b in bins)

    def _fill_window(self) -> None:
        docs = [d for d in self._pull(self.buffer_docs) if len(d.tokens)]
        if not docs:
            return
        lengths = np.array([len(d.tokens) for d in docs], np.int64)
        plan = pack(lengths, self.capacity, algorithm=self.algorithm, overflow=self.overflow, seed=self.seed)
        self._counts["truncated_tokens"] += int(plan.truncated_tokens)
        self._counts["dropped_tokens"] += int(plan.dropped_tokens)
        serials = [self._take_doc(d) for d in docs]
        for b in range(plan.n_bins):
            seg_doc, seg_start, seg_len = plan.bin(b)
            self._ready.append(
                [self._add_piece(serials[d], int(s), int(n)) for d, s, n in zip(seg_doc, seg_start, seg_len)]
            )
        # documents whose every token was dropped have no pieces: forget them now
        for s in serials:
            if s not in self._refs:
                del self._docs[s]

    # ---------------------------------------------------------------- output
    def next(self) -> VarlenBatch:
        while not self._ready:
            if self._exhausted and not len(self._packer):
                raise StopIteration
            if self.algorithm == "online":
                self._fill_online()
            else:
                self._fill_window()
        return self._batch(self._ready.pop(0))

    def _batch(self, keys: list[int]) -> VarlenBatch:
        toks, ids, starts, masks = [], [], [], []
        any_mask = False
        for key in keys:
            serial, start, length = self._pieces.pop(key)
            doc = self._docs[serial]
            toks.append(doc.tokens[start : start + length])
            ids.append(doc.doc_id)
            starts.append(start)
            m = None if doc.loss_mask is None else doc.loss_mask[start : start + length]
            any_mask |= m is not None
            masks.append(m)
            self._refs[serial] -= 1
            if not self._refs[serial]:
                del self._refs[serial], self._docs[serial]
        batch = VarlenBatch.from_segments(
            toks,
            ids,
            seg_start=starts,
            loss_masks=masks if any_mask else None,
            pad_to=self.pad_to,
            pad_id=self.pad_id,
            continue_positions=self.continue_positions,
        )
        self._counts["packed_tokens"] += sum(len(t) for t in toks)
        self._counts["batches"] += 1
        return batch
