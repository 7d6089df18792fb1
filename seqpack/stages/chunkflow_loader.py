"""ChunkFlow chunks as a loader stage: ``stage: {type: chunkflow, chunk_size: C, ...}``.

Each step, the stage takes one global batch of documents from the consumer's document stream
(``docs_per_step`` documents, or as many whole documents as fit ``tokens_per_step`` tokens; a
document over the budget opens the next step, and one alone over it makes a step of its own) and
yields the :func:`~seqpack.stages.chunkflow.build_chunks` of that batch: a list of
:class:`~seqpack.stages.chunkflow.Chunk` (chains of long documents first, then standalone packed
chunks), the input of :func:`~seqpack.stages.chunkflow.chunkflow_step`. Every token of every
document is in exactly one chunk (``chunkflow/input_tokens == chunkflow/chunk_tokens``).

State: the upstream state plus the document carried over to the next step, so resume is exact.
Ranks that run out yield one zero-loss padding chunk per step (``num_loss_tokens == 0``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from seqpack.arena import documents_from_state, documents_to_state
from seqpack.batch import IGNORE_INDEX, padding_batch
from seqpack.node import Node
from seqpack.sources.records import Document
from seqpack.stages.chunkflow import Chunk, build_chunks

STAGE_KEYS = ("type", "chunk_size", "docs_per_step", "tokens_per_step", "max_doc_len", "pad_to_chunk", "seed")


class ChunkFlowStage(Node[list]):
    """Documents in, one list of :class:`Chunk` per global batch out.

    Args:
        upstream: node yielding :class:`~seqpack.sources.records.Document`.
        chunk_size: C, tokens per chunk.
        docs_per_step / tokens_per_step: size of a global batch (exactly one of them).
        max_doc_len: hard maximum document length (a longer one raises, naming its doc_id).
        pad_to_chunk: pad every chunk to C tokens.
    """

    def __init__(
        self,
        upstream,
        chunk_size: int,
        *,
        docs_per_step: int | None = None,
        tokens_per_step: int | None = None,
        max_doc_len: int | None = None,
        pad_to_chunk: bool = False,
        pad_id: int = 0,
        seed: int | None = 0,
    ):
        super().__init__()
        if (docs_per_step is None) == (tokens_per_step is None):
            raise ValueError("give exactly one of docs_per_step and tokens_per_step")
        self.upstream, self.chunk_size = upstream, int(chunk_size)
        self.docs_per_step, self.tokens_per_step = docs_per_step, tokens_per_step
        self.max_doc_len, self.pad_to_chunk, self.pad_id, self.seed = max_doc_len, pad_to_chunk, pad_id, seed

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        if initial_state is None:
            self.upstream.reset(None)
            self._carry: Document | None = None
            self._exhausted = False
            self._counts = dict.fromkeys(
                ("documents", "input_tokens", "chunk_tokens", "chunks", "chains", "steps", "loss_tokens"), 0
            )
            return
        self.upstream.reset(initial_state["upstream"])
        carried = documents_from_state(initial_state["carry"])
        self._carry = carried[0] if carried else None
        self._exhausted = bool(initial_state["exhausted"])
        self._counts = dict(initial_state["counts"])

    def get_state(self) -> dict:
        return {
            "upstream": self.upstream.state_dict(),
            "carry": documents_to_state([self._carry] if self._carry is not None else []),
            "exhausted": self._exhausted,
            "counts": dict(self._counts),
        }

    def own_stats(self) -> dict[str, Any]:
        return {f"chunkflow/{k}": v for k, v in self._counts.items()}

    def _take(self) -> Document | None:
        if self._carry is not None:
            doc, self._carry = self._carry, None
            return doc
        while not self._exhausted:
            try:
                doc = next(self.upstream)
            except StopIteration:
                self._exhausted = True
                return None
            if len(doc.tokens) == 0:
                continue
            if self.max_doc_len is not None and len(doc.tokens) > self.max_doc_len:
                raise ValueError(
                    f"document {doc.doc_id} ({doc.source}) has {len(doc.tokens)} tokens > "
                    f"stage.max_doc_len={self.max_doc_len}"
                )
            return doc
        return None

    def next(self) -> list[Chunk]:
        docs: list[Document] = []
        n_tok = 0
        while self.docs_per_step is None or len(docs) < self.docs_per_step:
            doc = self._take()
            if doc is None:
                break
            if self.tokens_per_step is not None and docs and n_tok + len(doc.tokens) > self.tokens_per_step:
                self._carry = doc
                break
            docs.append(doc)
            n_tok += len(doc.tokens)
        if not docs:
            raise StopIteration
        has_mask = any(d.loss_mask is not None for d in docs)
        chunks = build_chunks(
            [d.tokens for d in docs],
            self.chunk_size,
            loss_masks=[d.loss_mask for d in docs] if has_mask else None,
            doc_ids=np.array([d.doc_id for d in docs], np.int64),
            seed=self.seed,
            pad_to_chunk=self.pad_to_chunk,
            pad_id=self.pad_id,
        )
        c = self._counts
        c["documents"] += len(docs)
        c["input_tokens"] += n_tok
        c["chunk_tokens"] += sum(ch.num_real_tokens for ch in chunks)
        c["chunks"] += len(chunks)
        c["chains"] += len({ch.chain_id for ch in chunks if ch.chain_id >= 0})
        c["loss_tokens"] += sum(ch.num_loss_tokens for ch in chunks)
        c["steps"] += 1
        return chunks


def padding_chunks(chunk_size: int, pad_id: int = 0) -> list[Chunk]:
    """One standalone chunk of ``chunk_size`` padding tokens with no targets."""
    batch = padding_batch(chunk_size, pad_id)
    shift = torch.full((chunk_size,), IGNORE_INDEX, dtype=torch.int64)
    return [Chunk(batch, shift, 0, -1, 0, 1, 0)]


def _check_int(stage: dict, key: str, allow_none: bool = True) -> None:
    v = stage.get(key)
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"stage.{key}: expected a positive integer, got {v!r}")


def validate_chunkflow_stage(cfg: dict, base_dir: str | None = None) -> dict:
    """Check ``stage: {type: chunkflow, ...}``; errors name the key and the allowed keys/values."""
    stage = dict(cfg["stage"])
    unknown = sorted(set(stage) - set(STAGE_KEYS))
    if unknown:
        raise ValueError(f"stage: unknown keys {unknown} for type 'chunkflow' (allowed: {list(STAGE_KEYS)})")
    _check_int(stage, "chunk_size", allow_none=False)
    for key in ("docs_per_step", "tokens_per_step", "max_doc_len"):
        _check_int(stage, key)
    if (stage.get("docs_per_step") is None) == (stage.get("tokens_per_step") is None):
        raise ValueError(
            "stage: give exactly one of 'docs_per_step' and 'tokens_per_step' for type 'chunkflow'"
        )
    if not isinstance(stage.setdefault("pad_to_chunk", False), bool):
        raise ValueError(f"stage.pad_to_chunk: expected true or false, got {stage['pad_to_chunk']!r}")
    stage.setdefault("seed", cfg.get("seed", 0))
    return {**cfg, "stage": stage}


def chunkflow_factory(docs, stage: dict, ctx) -> ChunkFlowStage:
    kw = {k: stage.get(k) for k in ("docs_per_step", "tokens_per_step", "max_doc_len")}
    return ChunkFlowStage(
        docs,
        stage["chunk_size"],
        pad_to_chunk=stage["pad_to_chunk"],
        pad_id=ctx.pad_id,
        seed=stage["seed"],
        **kw,
    )


def chunkflow_padding(stage: dict, ctx, last: Any) -> list[Chunk]:
    return padding_chunks(int(stage["chunk_size"]), ctx.pad_id)
