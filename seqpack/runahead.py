"""A DataLoader worker's chain runs ahead of the DataLoader on a thread of its own.

The DataLoader takes one item from each worker in turn and lets a worker hold only
``prefetch_factor`` items it has not taken yet. A chain that works in bursts (a tokenizer batch of
256 documents is ~75 packed batches made at once) then stalls the others: while one worker is in a
burst, the DataLoader waits for it, and the other worker, its two items sent, waits too; the
workers end up taking turns instead of working at once (measured: 2 workers on raw text at 0.7x of
one process). Here the chain runs on a thread and keeps up to ``RUN_AHEAD_BYTES`` of batches made
ahead, so a worker's bursts overlap the other's. The chain's order, states and counters are the
same: only when its batches are handed over changes. Tokenizers, Parquet decoding and numba
kernels release the GIL, so the thread runs beside the DataLoader's own loop in the worker. Used
for chains that tokenize (:attr:`seqpack.pipeline.PipelineDataset.tokenizes`): a pre-tokenized
chain is smooth and Python-bound, and a second thread there only contends for the GIL.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

# bytes of batches a worker's chain may make ahead of the DataLoader (~140 batches of 8192 tokens)
RUN_AHEAD_BYTES = int(os.environ.get("SEQPACK_RUN_AHEAD_BYTES", 32 << 20))


def run_ahead(items: Iterator[T], size: Callable[[T], int], max_bytes: int = RUN_AHEAD_BYTES) -> Iterator[T]:
    """``items``, made on a daemon thread up to ``max_bytes`` (by ``size``) ahead of the caller.

    An exception of ``items`` is raised here, after the items made before it. At least one item is
    always allowed ahead (whatever its size). ``max_bytes <= 0``: ``items`` as they are, no thread.
    """
    if max_bytes <= 0:
        yield from items
        return
    ready: deque[tuple[Any, int]] = deque()
    cond = threading.Condition()
    box: dict[str, Any] = {"bytes": 0, "done": False, "error": None, "stop": False}

    def produce() -> None:
        try:
            for item in items:
                n = size(item)
                with cond:
                    while box["bytes"] and box["bytes"] + n > max_bytes and not box["stop"]:
                        cond.wait()
                    if box["stop"]:
                        return
                    ready.append((item, n))
                    box["bytes"] += n
                    cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            box["error"] = exc
        finally:
            with cond:
                box["done"] = True
                cond.notify_all()

    threading.Thread(target=produce, name="seqpack-chain", daemon=True).start()
    try:
        while True:
            with cond:
                while not ready and not box["done"]:
                    cond.wait()
                if not ready:
                    if box["error"] is not None:
                        raise box["error"]
                    return
                item, n = ready.popleft()
                box["bytes"] -= n
                cond.notify_all()
            yield item
    finally:  # the consumer stopped early: let the thread end after its current item
        with cond:
            box["stop"] = True
            cond.notify_all()
