"""The bounded-buffer online packer shared by ``pack(algorithm="online")`` and the streaming pack stage,
so a streamed run and an offline plan agree bin for bin. Plain integers in, bins of keys out.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from seqpack.ops import packing as kernels


class OnlinePacker:
    """Bounded-buffer best-fit packer over ``(key, length)`` items.

    Items wait in a buffer of at most ``buffer_docs``. When it is full, the buffer is packed
    best-fit-decreasing; bins at least ``min_fill`` full (or holding an item that has waited
    ``max_age`` windows) are emitted, the rest are carried to the next window. If nothing qualifies,
    the bin of the oldest item is emitted so the stream always moves. Bins come out as int64 arrays
    of keys, items in arrival order.

    ``warmup``: until the buffer first fills, a window also runs each time ``warmup`` more items
    arrived, emitting only the bins already ``min_fill`` full (no ageing, no forced bin): the first
    bins of a stream come after ``warmup`` items, not ``buffer_docs`` (0: off, the default).

    ``max_segments``: at most that many items per bin (``None``: no cap). ``grouped``: every item
    comes with a group id (:meth:`add_many` ``groups=``) and items of different groups never share
    a bin (each group is packed on its own inside a window). Both off by default, which leaves the
    packing exactly as without them.

    The buffer (keys, lengths, ages, groups) is the whole state: ``state_dict`` /
    ``load_state_dict`` give exact resume. :meth:`pending_keys` tells a caller which of its items
    are still waiting (e.g. whose tokens it must keep).
    """

    def __init__(
        self,
        capacity: int,
        *,
        buffer_docs: int = 10_000,
        min_fill: float = 0.99,
        max_age: int = 4,
        max_segments: int | None = None,
        grouped: bool = False,
        warmup: int = 0,
    ):
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        if buffer_docs < 1:
            raise ValueError(f"buffer_docs must be >= 1, got {buffer_docs}")
        if not 0.0 <= min_fill <= 1.0:
            raise ValueError(f"min_fill must be in [0, 1], got {min_fill}")
        if max_segments is not None and (isinstance(max_segments, bool) or int(max_segments) < 1):
            raise ValueError(f"max_segments must be a positive integer or None, got {max_segments!r}")
        self.max_segments = None if max_segments is None else int(max_segments)
        self.grouped = bool(grouped)
        self.capacity = int(capacity)
        self.buffer_docs = int(buffer_docs)
        self.min_tokens = int(np.ceil(min_fill * capacity))
        self.max_age = int(max_age)
        self._keys = np.zeros(0, np.int64)
        self._lens = np.zeros(0, np.int64)
        self._ages = np.zeros(0, np.int64)
        self._groups = np.zeros(0, np.int64)
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        self.warmup = int(warmup)
        self._warm = warmup == 0 or warmup >= buffer_docs  # the buffer has filled once
        self._since = 0  # items since the last warm-up window

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def warming(self) -> bool:
        """True until the buffer has filled once (warm-up windows still run)."""
        return not self._warm

    def pending_keys(self) -> np.ndarray:
        """int64 ``[len(self)]`` keys of the buffered items, in arrival order (a copy)."""
        return self._keys.copy()

    def pending_lengths(self) -> np.ndarray:
        """int64 ``[len(self)]`` lengths of the buffered items, aligned with :meth:`pending_keys`."""
        return self._lens.copy()

    def add(self, key: int, length: int, group: int | None = None) -> list[np.ndarray]:
        """Buffer one item (``0 < length <= capacity``); returns the bins that became ready."""
        groups = None if group is None else np.array([group], np.int64)
        return self.add_many(np.array([key], np.int64), np.array([length], np.int64), groups)

    def add_many(
        self, keys: np.ndarray, lengths: np.ndarray, groups: np.ndarray | None = None
    ) -> list[np.ndarray]:
        """Buffer items in arrival order; returns the bins that became ready (maybe none).

        ``groups``: int64 group id per item, required when the packer is ``grouped``.
        """
        lengths = np.asarray(lengths, np.int64)
        if len(lengths) and (lengths.min() <= 0 or lengths.max() > self.capacity):
            raise ValueError(f"item lengths must be in [1, {self.capacity}]")
        keys = np.asarray(keys, np.int64)
        if self.grouped:
            if groups is None or len(groups) != len(keys):
                raise ValueError("a grouped OnlinePacker needs one group id per item (groups=)")
            groups = np.asarray(groups, np.int64)
        out: list[np.ndarray] = []
        pos = 0
        while pos < len(keys):
            take = min(self.buffer_docs - len(self._keys), len(keys) - pos)
            if not self._warm:  # a warm-up window every `warmup` items
                take = min(take, self.warmup - self._since)
            self._keys = np.concatenate([self._keys, keys[pos : pos + take]])
            self._lens = np.concatenate([self._lens, lengths[pos : pos + take]])
            self._ages = np.concatenate([self._ages, np.zeros(take, np.int64)])
            if self.grouped:
                self._groups = np.concatenate([self._groups, groups[pos : pos + take]])
            pos += take
            if len(self._keys) >= self.buffer_docs:
                self._warm = True
                out.extend(self._window(final=False))
            elif not self._warm:
                self._since += take
                if self._since >= self.warmup:
                    self._since = 0
                    out.extend(self._window(final=False, early=True))
        return out

    def pack_lengths(self, lengths: np.ndarray) -> Iterator[np.ndarray]:
        """Offline driver (``pack(algorithm="online")``): every bin of items ``0..n-1`` of ``lengths``,
        end of stream included."""
        yield from self.add_many(np.arange(len(lengths), dtype=np.int64), lengths)
        yield from self.flush()

    def pack_items(self, item_doc, item_start, item_len) -> Iterator[np.ndarray]:
        """:meth:`add_many` over keys ``0..n-1`` of ``item_len``, no flush (the earlier offline driver)."""
        yield from self.add_many(np.arange(len(item_len), dtype=np.int64), item_len)

    def flush(self) -> list[np.ndarray]:
        """Emit every buffered item (end of stream)."""
        return self._window(final=True) if len(self._keys) else []

    def _assign(self) -> tuple[np.ndarray, int]:
        """Best-fit-decreasing bin of every buffered item (per group when grouped)."""
        parts = [np.arange(len(self._lens))]
        if self.grouped:
            _, inv = np.unique(self._groups, return_inverse=True)
            by_group = np.argsort(inv.reshape(-1), kind="stable")
            parts = np.split(by_group, np.flatnonzero(np.diff(inv.reshape(-1)[by_group])) + 1)
        bin_of = np.empty(len(self._lens), np.int64)
        n_bins = 0
        for part in parts:
            lens = self._lens[part]
            order = np.argsort(-lens, kind="stable")
            sorted_len = np.ascontiguousarray(lens[order])
            if self.max_segments is None:
                assign_sorted, nb = kernels.bfd_assign(sorted_len, self.capacity)
            else:
                assign_sorted, nb = kernels.bfd_assign_capped(sorted_len, self.capacity, self.max_segments)
            bin_of[part[order]] = assign_sorted + n_bins
            n_bins += int(nb)
        return bin_of, n_bins

    def _window(self, final: bool, early: bool = False) -> list[np.ndarray]:
        bin_of, n_bins = self._assign()
        loads = kernels.bin_loads(bin_of, self._lens, n_bins)
        if final:
            ready = np.ones(n_bins, bool)
        elif early:
            ready = loads >= self.min_tokens
            if not ready.any():
                return []
        else:
            ready = loads >= self.min_tokens
            ready[bin_of[self._ages >= self.max_age]] = True
            if not ready.any():
                ready[bin_of[0]] = True
        emit = ready[bin_of]
        # bins in order of their earliest item; items inside a bin in arrival order
        idx = np.flatnonzero(emit)
        first_item = np.full(n_bins, len(self._keys), np.int64)
        np.minimum.at(first_item, bin_of[idx], idx)
        idx = idx[np.lexsort((idx, first_item[bin_of[idx]]))]
        cuts = np.flatnonzero(np.diff(bin_of[idx])) + 1
        bins = np.split(self._keys[idx], cuts)
        keep = ~emit
        # a warm-up window does not age what it keeps: max_age counts full windows
        self._keys, self._lens = self._keys[keep], self._lens[keep]
        self._ages = self._ages[keep] + (not early)
        if self.grouped:
            self._groups = self._groups[keep]
        return bins

    def state_dict(self, keys: np.ndarray | None = None) -> dict:
        """The buffer as plain lists. ``keys``: int64 ``[len(self)]`` to store instead of the
        buffered keys (a caller that renumbers its items on save passes the new numbers)."""
        keys = self._keys if keys is None else np.asarray(keys, np.int64)
        if len(keys) != len(self._keys):
            raise ValueError(f"keys must have one entry per buffered item ({len(self)}), got {len(keys)}")
        state = {"keys": keys.tolist(), "lens": self._lens.tolist(), "ages": self._ages.tolist()}
        if not self._warm:
            state["warmup_since"] = self._since
        if self.grouped:
            state["groups"] = self._groups.tolist()
        return state

    def load_state_dict(self, state: dict) -> None:
        self._keys = np.asarray(state["keys"], np.int64)
        self._lens = np.asarray(state["lens"], np.int64)
        self._ages = np.asarray(state["ages"], np.int64)
        # a state without it was taken once the buffer had filled (or before warm-up existed)
        self._warm = self.warmup == 0 or self.warmup >= self.buffer_docs or "warmup_since" not in state
        self._since = int(state.get("warmup_since", 0))
        if self.grouped:
            if "groups" not in state:
                raise ValueError("state has no group ids but the packer is grouped (group_key changed?)")
            self._groups = np.asarray(state["groups"], np.int64)
