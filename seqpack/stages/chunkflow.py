"""ChunkFlow chunks (Yuan et al., ICML 2025) and the loader stage that yields them.

``stage: {type: chunkflow, capacity: C, tokens_per_step: N}`` (or ``docs_per_step``): each step the
stage takes one global batch of documents from the consumer's document stream (``docs_per_step``
documents, or as many whole documents as fit ``tokens_per_step`` tokens; a document over the budget
opens the next step, and one alone over it makes a step of its own) and yields
:func:`build_chunks` of that batch: a list of :class:`Chunk` (chains of long documents first, then
standalone packed chunks, planned by :func:`seqpack.plan.chunks.plan_chunks`), the input of
:func:`seqpack.train.chunkflow.chunkflow_step`. Every token of every document is in exactly one
chunk (``chunkflow/input_tokens == chunkflow/chunk_tokens``).

Targets cross chunk boundaries: the last token of a chain's chunk ``j`` predicts the first token of
chunk ``j + 1``. A chunk's VarlenBatch follows the batch contract (its first label is ``-100``), so
the targets a training loop must use are :attr:`Chunk.shift_labels` (pre-shifted, computed on the
whole document), and :attr:`Chunk.num_loss_tokens` counts them. Summed over the chunks of a global
batch they equal full-sequence training's targets exactly.

Stage state: the upstream's state under ``"upstream"``, the document carried over to the next step
in the buffered-documents state format (``documents_to_state``), the exhaustion flag and counters,
so resume is exact. Ranks that run out yield one zero-loss padding chunk per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from seqpack.arena import documents_from_state, documents_to_state, refetcher
from seqpack.batch import IGNORE_INDEX, VarlenBatch, padding_batch
from seqpack.checks import (
    ConfigError,
    check_int,
    check_keys,
    check_pad_to,
    old_pad_flag,
    rename_keys,
    rename_kwargs,
)
from seqpack.node import Node
from seqpack.plan.chunks import OLD_CAPACITY, ChunkPlan, plan_chunks
from seqpack.sources.records import Document
from seqpack.stages.context import StageContext
from seqpack.stages.pack_offline import check_loss_masks, check_token_arrays

STAGE_KEYS = ("type", "capacity", "docs_per_step", "tokens_per_step", "max_doc_len", "pad_to", "seed")
# old config keys and keyword arguments, accepted one release with a DeprecationWarning
RENAMED = {**OLD_CAPACITY, "pad_to_chunk": "pad_to"}


# ============================================================================ chunks
@dataclass
class Chunk:
    """One ChunkFlow chunk: a VarlenBatch plus its place in a chain.

    Attributes:
        batch: the chunk's tokens (a dependent chunk holds one segment of its document, positions
            continuing from ``kv_prefix_len``; a standalone chunk holds whole short documents).
        shift_labels: int64 ``[T]`` targets to use with this chunk's logits (``-100`` = none); the
            last token of a non-final dependent chunk targets the next chunk's first token.
        num_loss_tokens: targets in ``shift_labels``.
        chain_id: index of the chain (0..n_chains-1), or -1 for a standalone chunk.
        chain_pos: position of the chunk in its chain (0 for standalone chunks).
        chain_len: chunks in the chain (1 for standalone chunks).
        kv_prefix_len: tokens of segment 0's document in earlier chunks, whose K/V this chunk attends to.
    """

    batch: VarlenBatch
    shift_labels: torch.Tensor
    num_loss_tokens: int
    chain_id: int
    chain_pos: int
    chain_len: int
    kv_prefix_len: int

    @property
    def is_dependent(self) -> bool:
        return self.chain_id >= 0

    @property
    def num_real_tokens(self) -> int:
        return self.batch.num_real_tokens


def _doc_targets(doc: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Pre-shifted targets of a whole document: ``t[i] = doc[i+1]`` if it is a target, else -100."""
    t = np.full(len(doc), IGNORE_INDEX, np.int64)
    t[:-1] = doc[1:]
    if mask is not None:
        t[:-1][~np.asarray(mask, bool)[1:]] = IGNORE_INDEX
    return t


def build_chunks(
    docs: Sequence[np.ndarray],
    capacity: int | None = None,
    *,
    loss_masks: Sequence[np.ndarray | None] | None = None,
    doc_ids: Sequence[int] | np.ndarray | None = None,
    max_doc_len: int | None = None,
    seed: int | None = 0,
    pad_to: int | str | None = None,
    pad_id: int = 0,
    plan: ChunkPlan | None = None,
    **deprecated: Any,
) -> list[Chunk]:
    """Materialize the chunks of a global batch: chains (document order) then standalone chunks.

    Args:
        docs: 1-D integer token arrays, one per document.
        capacity: C, tokens per chunk (``chunk_size=`` is its deprecated name); may be omitted with ``plan``.
        loss_masks: optional per-document bool arrays (True = token is a target).
        doc_ids: global id per document (default: its index).
        max_doc_len, seed: as in :func:`seqpack.plan.chunks.plan_chunks`.
        pad_to: pad every chunk to a fixed number of tokens (a final padding segment, no targets):
            ``"max"`` = C, or an int >= C (``pad_to_chunk=True`` is the deprecated ``"max"``).
        plan: a precomputed :func:`~seqpack.plan.chunks.plan_chunks` result for these documents.
    """
    kw = rename_kwargs(deprecated, RENAMED, "build_chunks", capacity=capacity, pad_to=pad_to)
    old_pad_flag(kw, deprecated, "pad_to_chunk", "build_chunks")
    docs = check_token_arrays(list(docs))
    check_loss_masks(loss_masks, docs)
    lengths = np.array([len(d) for d in docs], np.int64)
    if plan is None:
        plan = plan_chunks(lengths, kw["capacity"], max_doc_len=max_doc_len, seed=seed)
    elif not np.array_equal(plan.lengths, lengths):
        raise ValueError("plan was made for different document lengths")
    C = plan.capacity
    ids = np.arange(len(docs), dtype=np.int64) if doc_ids is None else np.asarray(doc_ids, np.int64)
    if len(ids) != len(docs):
        raise ValueError(f"doc_ids has {len(ids)} entries for {len(docs)} docs")
    pad_tokens = check_pad_to(kw["pad_to"], "pad_to", C)

    def targets_of(d: int) -> np.ndarray:
        return _doc_targets(docs[d], None if loss_masks is None else loss_masks[d])

    def make(toks, seg_doc, seg_start, tgts, chain_id, chain_pos, chain_len, prefix) -> Chunk:
        masks = None
        if loss_masks is not None:
            masks = [
                None if loss_masks[d] is None else np.asarray(loss_masks[d], bool)[s : s + len(t)]
                for t, d, s in zip(toks, seg_doc, seg_start)
            ]
        batch = VarlenBatch.from_segments(
            toks,
            ids[seg_doc],
            seg_start=seg_start,
            loss_masks=masks,
            pad_to=pad_tokens,
            pad_id=pad_id,
            continue_positions=True,
        )
        shift = np.concatenate(tgts)
        if batch.num_tokens > len(shift):
            shift = np.concatenate([shift, np.full(batch.num_tokens - len(shift), IGNORE_INDEX, np.int64)])
        return Chunk(
            batch=batch,
            shift_labels=torch.from_numpy(shift),
            num_loss_tokens=int((shift != IGNORE_INDEX).sum()),
            chain_id=chain_id,
            chain_pos=chain_pos,
            chain_len=chain_len,
            kv_prefix_len=prefix,
        )

    chunks: list[Chunk] = []
    for c, (d, n) in enumerate(zip(plan.chain_doc.tolist(), plan.chain_len.tolist())):
        tgt = targets_of(d)
        for j in range(n):
            lo, hi = j * C, min((j + 1) * C, len(docs[d]))
            chunks.append(make([docs[d][lo:hi]], np.array([d]), np.array([lo]), [tgt[lo:hi]], c, j, n, lo))
    sp = plan.standalone
    for b in range(sp.n_bins):
        seg_doc, seg_start, _ = sp.bin(b)
        toks = [docs[d] for d in seg_doc]
        chunks.append(make(toks, seg_doc, seg_start, [targets_of(d) for d in seg_doc], -1, 0, 1, 0))
    return chunks


def padding_chunks(num_tokens: int, pad_id: int = 0) -> list[Chunk]:
    """One standalone chunk of ``num_tokens`` padding tokens with no targets (a rank that ran out)."""
    batch = padding_batch(num_tokens, pad_id)
    shift = torch.full((num_tokens,), IGNORE_INDEX, dtype=torch.int64)
    return [Chunk(batch, shift, 0, -1, 0, 1, 0)]


# ============================================================================ stage
class ChunkFlowStage(Node[list]):
    """Documents in, one list of :class:`Chunk` per global batch out.

    Args:
        upstream: node yielding :class:`~seqpack.sources.records.Document`.
        capacity: C, tokens per chunk (``chunk_size=`` is its deprecated name).
        docs_per_step / tokens_per_step: size of a global batch (exactly one of them).
        max_doc_len: hard maximum document length (a longer one raises, naming its doc_id).
        pad_to: None, ``"max"`` (pad every chunk to C tokens) or an int >= C.
    """

    def __init__(
        self,
        upstream,
        capacity: int | None = None,
        *,
        docs_per_step: int | None = None,
        tokens_per_step: int | None = None,
        max_doc_len: int | None = None,
        pad_to: int | str | None = None,
        pad_id: int = 0,
        seed: int | None = 0,
        **deprecated: Any,
    ):
        super().__init__()
        kw = rename_kwargs(deprecated, RENAMED, "ChunkFlowStage", capacity=capacity, pad_to=pad_to)
        old_pad_flag(kw, deprecated, "pad_to_chunk", "ChunkFlowStage")
        if (docs_per_step is None) == (tokens_per_step is None):
            raise ValueError("give exactly one of docs_per_step and tokens_per_step")
        self.upstream, self.capacity = upstream, check_int(kw["capacity"], "capacity", minimum=1)
        self.docs_per_step, self.tokens_per_step = docs_per_step, tokens_per_step
        self.pad_to = check_pad_to(kw["pad_to"], "pad_to", self.capacity)
        self.max_doc_len, self.pad_id, self.seed = max_doc_len, pad_id, seed

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self._refetch = refetcher(self.upstream)
        if initial_state is None:
            self.upstream.reset(None)
            self._carry: Document | None = None
            self._exhausted = False
            self._counts = dict.fromkeys(
                ("documents", "input_tokens", "chunk_tokens", "chunks", "chains", "steps", "loss_tokens"), 0
            )
            return
        self.upstream.reset(initial_state["upstream"])
        carried = documents_from_state(initial_state["carry"], self._refetch)
        self._carry = carried[0] if carried else None
        self._exhausted = bool(initial_state["exhausted"])
        self._counts = dict(initial_state["counts"])

    def get_state(self) -> dict:
        return {
            "upstream": self.upstream.state_dict(),
            "carry": documents_to_state(
                [self._carry] if self._carry is not None else [], self._refetch is not None
            ),
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
            self.capacity,
            loss_masks=[d.loss_mask for d in docs] if has_mask else None,
            doc_ids=np.array([d.doc_id for d in docs], np.int64),
            seed=self.seed,
            pad_to=self.pad_to,
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


# ============================================================================ registry functions
def validate(cfg: dict, base_dir: str | None = None) -> dict:
    """Check ``stage: {type: chunkflow, ...}``; errors name the key. Old keys ``chunk_size`` and
    ``pad_to_chunk: true/false`` become ``capacity`` and ``pad_to: max/null`` (DeprecationWarning)."""
    stage = dict(cfg["stage"])
    old = dict(stage)
    rename_keys(stage, RENAMED, "stage")
    old_pad_flag(stage, old, "pad_to_chunk", "stage")
    check_keys(stage, STAGE_KEYS, "stage")
    capacity = check_int(stage.get("capacity"), "stage.capacity", minimum=1)
    for key in ("docs_per_step", "tokens_per_step", "max_doc_len"):
        check_int(stage.get(key), f"stage.{key}", minimum=1, allow_none=True)
    if (stage.get("docs_per_step") is None) == (stage.get("tokens_per_step") is None):
        raise ConfigError(
            "stage: give exactly one of 'docs_per_step' and 'tokens_per_step' for type 'chunkflow'"
        )
    check_pad_to(stage.setdefault("pad_to", None), "stage.pad_to", capacity)
    stage.setdefault("seed", cfg.get("seed", 0))
    return {**cfg, "stage": stage}


def factory(docs, stage: dict, ctx: StageContext) -> ChunkFlowStage:
    """The stage for one consumer's document stream ``docs`` (``stage`` validated by :func:`validate`)."""
    kw = {k: stage.get(k) for k in ("docs_per_step", "tokens_per_step", "max_doc_len")}
    return ChunkFlowStage(
        docs, stage["capacity"], pad_to=stage["pad_to"], pad_id=ctx.pad_id, seed=stage["seed"], **kw
    )


def padding(stage: dict, ctx: StageContext, last: Any) -> list[Chunk]:
    """A zero-loss step for a rank that ran out: one chunk of padding, as long as a padded chunk."""
    capacity = int(stage["capacity"])
    return padding_chunks(check_pad_to(stage.get("pad_to"), "stage.pad_to", capacity) or capacity, ctx.pad_id)
