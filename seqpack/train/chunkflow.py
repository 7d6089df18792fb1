"""The ChunkFlow executor: runs a state-aware schedule (:mod:`seqpack.plan.chunks`) on a model and
accumulates parameter gradients equal to full-sequence training (tests/test_chunkflow_grad.py).

The model follows the ``TinyChunkedLM`` calling convention (see ``seqpack.ops.chunked``): chunks come
from :func:`seqpack.stages.chunkflow.build_chunks` or the ``chunkflow`` loader stage.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from seqpack.batch import IGNORE_INDEX
from seqpack.plan.chunks import ChunkAction, build_schedule
from seqpack.stages.chunkflow import Chunk, build_chunks


@dataclass
class ChunkFlowStepResult:
    """Outcome of one global batch: ``loss`` = summed token losses / ``loss_denominator``."""

    loss: float
    num_loss_tokens: int
    loss_denominator: float
    chunk_losses: list[float]
    peak_live_chunks: int
    recomputed_chunks: int


class ChunkFlowExecutor:
    """Runs a ChunkFlow schedule on a model, accumulating exact parameter gradients.

    The model is called as ``model(input_ids, position_ids, cu_seqlens, max_seqlen, prefix)`` and
    returns ``(logits [T, V], kv)`` with ``kv[layer] = (k, v)`` of this chunk (``TinyChunkedLM``'s
    convention); ``prefix[layer] = (key_blocks, value_blocks)`` of the earlier chunks of the chain.

    State store: for each chunk that later chunks of its chain attend to, its per-layer K/V
    (detached) and a dK/dV accumulator of the same shape; the attention backward of every later
    chunk adds its gradient w.r.t. those K/V into the accumulators. A chunk's backward seeds its own
    graph with its loss and, through its K/V outputs, with the accumulated dK/dV (complete, because
    later chunks ran backward first); then its state is released. Live graphs (activations) exist
    only between a ``forward``/``recompute`` and its ``backward``.

    Iterate: ``for action in build_schedule(chunks, k): executor.run(action)``, or call ``step``.
    """

    def __init__(
        self, model: torch.nn.Module, chunks: Sequence[Chunk], *, loss_denominator: float | None = None
    ):
        self.model = model
        self.chunks = list(chunks)
        self.num_loss_tokens = sum(c.num_loss_tokens for c in self.chunks)
        denom = self.num_loss_tokens if loss_denominator is None else loss_denominator
        self.loss_denominator = float(max(denom, 1))
        self._store: dict[int, list[tuple[torch.Tensor, ...]]] = {}
        self._state_nbytes = 0
        self._live: dict[int, tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]] = {}
        self._chain: dict[int, list[int]] = {}
        for i, c in enumerate(self.chunks):
            if c.is_dependent:
                self._chain.setdefault(c.chain_id, []).append(i)
        self.chunk_losses: dict[int, float] = {}
        self.peak_live = 0
        self.recomputed = 0

    # -- the state store
    @property
    def state_bytes(self) -> int:
        """Bytes held by the state store now (K/V and their gradient accumulators)."""
        return self._state_nbytes

    def _put_state(self, i: int, kv) -> None:
        c = self.chunks[i]
        if not c.is_dependent or c.chain_pos == c.chain_len - 1:
            return  # no later chunk attends to it
        entry = []
        for k, v in kv:
            k, v = k.detach(), v.detach()
            entry.append((k, v, torch.zeros_like(k), torch.zeros_like(v)))
        self._store[i] = entry
        self._state_nbytes += sum(t.numel() * t.element_size() for layer in entry for t in layer)

    def _pop_state(self, i: int):
        entry = self._store.pop(i, None)
        if entry is not None:
            self._state_nbytes -= sum(t.numel() * t.element_size() for layer in entry for t in layer)
        return entry

    @property
    def live_chunks(self) -> int:
        return len(self._live)

    def _prefix(self, i: int):
        c = self.chunks[i]
        if not c.is_dependent or c.chain_pos == 0:
            return None
        earlier = [self._store[j] for j in self._chain[c.chain_id][: c.chain_pos]]
        # per layer: (key blocks, value blocks, dK accumulators, dV accumulators)
        return [tuple([e[layer][f] for e in earlier] for f in range(4)) for layer in range(len(earlier[0]))]

    def _forward(self, i: int):
        c = self.chunks[i]
        b = c.batch
        logits, kv = self.model(b.input_ids, b.position_ids, b.cu_seqlens, b.max_seqlen, self._prefix(i))
        loss = F.cross_entropy(
            logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits,
            c.shift_labels.to(logits.device),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return loss / self.loss_denominator, kv

    def run(self, action: ChunkAction) -> None:
        """Execute one action."""
        i = action.chunk
        if action.kind == "forward_kv":
            with torch.no_grad():
                loss, kv = self._forward(i)
            self._put_state(i, kv)
            self.chunk_losses[i] = _scalar(loss)
        elif action.kind in ("forward", "recompute"):
            loss, kv = self._forward(i)
            if action.kind == "forward":
                self._put_state(i, kv)
                self.chunk_losses[i] = _scalar(loss)
            else:
                self.recomputed += 1
            self._live[i] = (loss, kv)
            self.peak_live = max(self.peak_live, len(self._live))
        elif action.kind == "backward":
            loss, kv = self._live.pop(i)
            roots, seeds = [loss], [torch.ones_like(loss)]
            state = self._pop_state(i)
            for (k, v), (_, _, grad_k, grad_v) in zip(kv, state or ()):
                roots += [k, v]
                seeds += [grad_k, grad_v]
            torch.autograd.backward(roots, seeds)
        else:
            raise ValueError(f"unknown action kind {action.kind!r}")

    def step(self, k: int) -> ChunkFlowStepResult:
        """Run the whole schedule for these chunks with ``k`` live chunks; gradients accumulate
        into the model's ``.grad`` (call ``optimizer.step()`` afterwards)."""
        for action in build_schedule(self.chunks, k):
            self.run(action)
        assert not self._live and not self._store, "schedule left state behind"
        losses = [self.chunk_losses[i] for i in range(len(self.chunks))]
        return ChunkFlowStepResult(
            loss=float(sum(losses)),
            num_loss_tokens=self.num_loss_tokens,
            loss_denominator=self.loss_denominator,
            chunk_losses=losses,
            peak_live_chunks=self.peak_live,
            recomputed_chunks=self.recomputed,
        )


def _scalar(loss: torch.Tensor) -> float:
    # a model on the meta device (memory planning) has no values
    return float("nan") if loss.device.type == "meta" else float(loss.detach())


def chunkflow_step(
    model: torch.nn.Module, chunks: Sequence[Chunk], k: int, *, loss_denominator: float | None = None
) -> ChunkFlowStepResult:
    """Forward + backward of one global batch of chunks with the state-aware schedule."""
    return ChunkFlowExecutor(model, chunks, loss_denominator=loss_denominator).step(k)


def iter_chunk_batches(
    global_batches: Iterator[Sequence[np.ndarray]], capacity: int | None = None, **kwargs: Any
) -> Iterator[list[Chunk]]:
    """Turn a stream of global batches (lists of token arrays) into lists of chunks of ``capacity``
    tokens; ``kwargs`` go to :func:`~seqpack.stages.chunkflow.build_chunks` (which also takes the
    deprecated ``chunk_size=``)."""
    for docs in global_batches:
        yield build_chunks(docs, capacity, **kwargs)
