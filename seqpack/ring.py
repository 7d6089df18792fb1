"""A shared-memory ring per DataLoader worker: batch bytes cross the worker boundary without a pipe.

Sent through the DataLoader's result pipe, a 230 KB batch (8192 tokens) costs a pickle copy and a
pipe write in the worker, and a pipe read, a buffer copy and an unpickle copy in the main process:
about 250 us of main-process CPU per batch, the ceiling of a worker (measured: a trivial worker
peaks at ~30 Mtok/s that way). Here the main process maps one ring per worker before the workers
start; a worker copies a batch's buffer (:mod:`seqpack.wire`) into its ring and sends only where it
lies, ``(ring, start, nbytes)``; the main process copies it out (one ``memcpy``) and frees the space.

Flow control needs no lock: a ring is written by one worker and read by the main process, in order.
The worker keeps its write position (``head``, bytes ever written, skips at the wrap included) and
the main process publishes, in the ring's first 8 bytes, the end of the last item it has taken
(``tail``); ``head - tail`` bytes are in use. An item that does not fit in the free space (a ring
full of batches the main process has not taken yet, or an item larger than the ring) travels
through the pipe as before, so nothing ever waits on the ring. The worker's copy reaches the main
process before the message that names it (the message goes through a pipe: a system call after the
copy), and the main process publishes ``tail`` only after its copy is done.

Rings are made fresh for every epoch's workers (:func:`make_rings`), so a worker of an abandoned
iterator never writes into the ring of a newer one.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import numpy as np
import torch

# bytes of each worker's ring: 36 batches of 8192 tokens, several times what a DataLoader keeps in
# flight per worker (prefetch_factor, 2 by default); 8 MB per worker keeps 4 workers well inside a
# container's default 64 MB /dev/shm
RING_BYTES = int(os.environ.get("SEQPACK_RING_BYTES", 8 << 20))
_HEADER = 64  # the tail (int64) on a cache line of its own


class Ring:
    """One worker's ring: ``nbytes`` of shared memory (a torch shared tensor: inherited over fork,
    passed as a file descriptor under spawn) plus the main process's ``tail``."""

    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)
        self.memory = torch.zeros(_HEADER + self.nbytes, dtype=torch.uint8).share_memory_()
        self.head = 0  # worker side: bytes written so far (the main process never reads it)

    def __getstate__(self) -> dict:
        return {"nbytes": self.nbytes, "memory": self.memory, "head": self.head}

    def _views(self) -> tuple[np.ndarray, np.ndarray]:
        views = self.__dict__.get("_v")
        if views is None:
            raw = self.memory.numpy()
            views = self._v = (raw[:8].view(np.int64), raw[_HEADER:])
        return views

    def put(self, buffer: np.ndarray) -> tuple[int, int] | None:
        """Worker side: copy ``buffer`` (uint8) into the ring; ``(start, nbytes)`` to send instead of
        it, or None when it does not fit now (send the buffer itself)."""
        n = len(buffer)
        if n == 0 or n > self.nbytes:
            return None
        tail, data = self._views()
        start = self.head
        at = start % self.nbytes
        if at + n > self.nbytes:  # an item never wraps: skip the ring's end
            start += self.nbytes - at
            at = 0
        taken = int(tail[0])
        if taken != self.head and start + n - taken > self.nbytes:
            return None  # it would overwrite bytes the main process has not taken yet
        data[at : at + n] = buffer
        self.head = start + n
        return start, n

    def take(self, start: int, n: int, alloc: Callable[[int], np.ndarray] | None = None) -> np.ndarray:
        """Main side: the ``n`` bytes written at ``start`` (a private copy, in ``alloc(n)`` when
        given: e.g. pinned memory), their space freed."""
        tail, data = self._views()
        at = start % self.nbytes
        out = np.empty(n, np.uint8) if alloc is None else alloc(n)
        out[:] = data[at : at + n]
        tail[0] = start + n
        return out


def make_rings(n: int, nbytes: int = RING_BYTES) -> list[Ring] | None:
    """Fresh rings for ``n`` workers, or None (batches go through the pipe) when ``nbytes`` is 0 or
    the shared memory cannot be had (e.g. a small ``/dev/shm``; warned once per loader)."""
    if nbytes <= 0 or n <= 0:
        return None
    try:
        return [Ring(nbytes) for _ in range(n)]
    except (RuntimeError, OSError) as exc:
        warnings.warn(
            f"seqpack: no shared memory for the worker rings ({exc}); batches go through the "
            "DataLoader's pipe (slower). Set SEQPACK_RING_BYTES smaller, or 0 to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def ship(item, ring: Ring | None, index: int):
    """Worker side: ``item`` (a :class:`~seqpack.wire.WireItem`) with its buffer moved into
    ``ring`` (worker ``index``'s), its ``buffer`` then ``(index, start, nbytes)``; as it is when
    there is no ring or no room."""
    if ring is None:
        return item
    where = ring.put(item.buffer)
    return item if where is None else item._replace(buffer=(index, *where))


def receive(item, rings: list[Ring] | None, alloc: Callable[[int], np.ndarray] | None = None):
    """Main side: ``item`` with its buffer taken out of its worker's ring (when it was shipped there).

    ``alloc(n)``: where the buffer's ``n`` bytes go (uint8 ``[n]``), e.g. one pinned allocation
    for every tensor of the batch; a buffer that came through the pipe is copied into it too.
    """
    buf = item.buffer
    if type(buf) is tuple:
        index, start, n = buf
        return item._replace(buffer=rings[index].take(start, n, alloc))
    if alloc is not None and len(buf):
        out = alloc(len(buf))
        out[:] = buf
        return item._replace(buffer=out)
    return item


def pinned_bytes(n: int) -> np.ndarray:
    """uint8 ``[n]`` of page-locked memory (one allocation per batch: every tensor of a batch rebuilt
    as a view of it is pinned, where ``batch.pin_memory()`` would pin each tensor apart)."""
    return torch.empty(n, dtype=torch.uint8, pin_memory=True).numpy()
