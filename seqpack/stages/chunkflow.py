"""ChunkFlow (Yuan et al., ICML 2025): chunk construction, state-aware chunk schedule, executor.

Chunk construction (paper Algorithm 1, design.md section 4): a global batch of documents and a
``chunk_size`` C. Documents longer than C become *chains* of consecutive dependent chunks of C
tokens (the tail piece is the chain's last chunk); documents of at most C tokens are bin-packed
(``seqpack.pack``, best-fit decreasing) into the fewest *standalone* chunks of capacity C, with
document masks. Every chunk is a :class:`VarlenBatch` plus chain metadata.

Targets cross chunk boundaries: the last token of a chain's chunk ``j`` predicts the first token of
chunk ``j + 1``. A chunk's VarlenBatch follows the batch contract (its first label is ``-100``), so
the targets a training loop must use are :attr:`Chunk.shift_labels` (pre-shifted, computed on the
whole document), and :attr:`Chunk.num_loss_tokens` counts them. Summed over the chunks of a global
batch they equal full-sequence training's targets exactly.

State-aware schedule (paper Algorithm 2): for a chain of N chunks and K chunks of live activations,
if N <= K forward all (activations kept) then backward in reverse; else forward the first N - K
chunks keeping only their per-layer K/V, forward the last K with activations, backward those in
reverse, then recompute + backward each of the first N - K chunks in descending order (a chunk's
dK/dV must have accumulated from every later chunk before its own backward). Peak live
activations never exceed K chunks; the state store holds the chain's K/V.

``ChunkFlowExecutor`` runs a schedule on a model with the ``TinyChunkedLM`` calling convention
(see ``seqpack.ops.chunked``) and gives loss and parameter gradients equal to full-sequence
training (tests/test_chunkflow_grad.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from seqpack.batch import IGNORE_INDEX, VarlenBatch
from seqpack.plan import PackPlan, pack
from seqpack.stages.pack_offline import check_token_arrays

ACTION_KINDS = ("forward_kv", "forward", "recompute", "backward")


def _check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return int(chunk_size)


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (chunks with live activations) must be an integer >= 1, got {k!r}")
    return int(k)


# ============================================================================ planning (pure data)
@dataclass
class ChunkPlan:
    """Which tokens go into which chunk (integers only; no tokens, no torch).

    Attributes:
        chunk_size: C, tokens per chunk.
        chain_doc: int64 ``[n_chains]``, index of each long (> C tokens) document.
        chain_len: int64 ``[n_chains]``, chunks in each chain, ``ceil(len / C)``.
        standalone: PackPlan of capacity C over the short documents; its ``seg_doc`` holds indices
            into the original document list.
        lengths: int64 ``[n_docs]``, the input lengths.
        max_doc_len: the configured hard maximum (None: unbounded).
    """

    chunk_size: int
    chain_doc: np.ndarray
    chain_len: np.ndarray
    standalone: PackPlan
    lengths: np.ndarray
    max_doc_len: int | None = None
    stats: dict = field(default_factory=dict)

    @property
    def n_chains(self) -> int:
        return len(self.chain_doc)

    @property
    def n_dependent_chunks(self) -> int:
        return int(self.chain_len.sum())

    @property
    def n_standalone_chunks(self) -> int:
        return self.standalone.n_bins

    @property
    def n_chunks(self) -> int:
        return self.n_dependent_chunks + self.n_standalone_chunks

    @property
    def input_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def fill(self) -> float:
        """Real tokens / (n_chunks * C); 1.0 for an empty plan."""
        return self.input_tokens / (self.n_chunks * self.chunk_size) if self.n_chunks else 1.0

    @property
    def max_chain_len(self) -> int:
        return int(self.chain_len.max()) if self.n_chains else 0

    def summary(self) -> dict:
        """Plain-dict stats for logs and JSON."""
        return {
            "chunk_size": self.chunk_size,
            "documents": len(self.lengths),
            "input_tokens": self.input_tokens,
            "chains": self.n_chains,
            "dependent_chunks": self.n_dependent_chunks,
            "standalone_chunks": self.n_standalone_chunks,
            "chunks": self.n_chunks,
            "max_chain_len": self.max_chain_len,
            "fill": self.fill,
            "standalone_fill": self.standalone.fill,
            **self.stats,
        }

    def validate(self) -> None:
        """Raise ``AssertionError`` unless every token of every document is in exactly one chunk."""
        self.standalone.validate()
        C = self.chunk_size
        lengths = self.lengths
        assert np.all(lengths[self.chain_doc] > C), "a chain holds a document that fits one chunk"
        assert np.array_equal(self.chain_len, -(-lengths[self.chain_doc] // C)), "chain length mismatch"
        covered = np.zeros(len(lengths), np.int64)
        np.add.at(covered, self.chain_doc, lengths[self.chain_doc])
        np.add.at(covered, self.standalone.seg_doc, self.standalone.seg_len)
        assert np.array_equal(covered, lengths), "a document's tokens are missing or duplicated"
        assert np.all(self.standalone.seg_start == 0), "a short document was split"


def plan_chunks(
    lengths: Sequence[int] | np.ndarray,
    chunk_size: int,
    *,
    max_doc_len: int | None = None,
    seed: int | None = 0,
) -> ChunkPlan:
    """Plan ChunkFlow chunks for documents of the given token ``lengths``.

    Args:
        lengths: tokens per document ``[n_docs]`` (zero-length documents hold nothing and get no chunk).
        chunk_size: C > 0.
        max_doc_len: hard maximum document length; a longer document raises ``ValueError`` naming
            its index and length (ChunkFlow keeps every token, so there is no silent truncation).
        seed: order of the standalone chunks (as ``seqpack.pack``); None keeps the planner's order.
    """
    C = _check_chunk_size(chunk_size)
    if max_doc_len is not None and (isinstance(max_doc_len, bool) or int(max_doc_len) <= 0):
        raise ValueError(f"max_doc_len must be a positive integer or None, got {max_doc_len!r}")
    arr = np.asarray(lengths)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError(f"lengths must be a 1-D integer array, got shape {arr.shape} dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    neg = np.flatnonzero(arr < 0)
    if len(neg):
        raise ValueError(f"lengths must be >= 0: lengths[{neg[0]}] = {arr[neg[0]]}")
    if max_doc_len is not None:
        over = np.flatnonzero(arr > max_doc_len)
        if len(over):
            i = int(over[0])
            raise ValueError(
                f"document {i} has {int(arr[i])} tokens > max_doc_len={int(max_doc_len)} "
                f"({len(over)} document(s) over the limit)"
            )
    chain_doc = np.flatnonzero(arr > C).astype(np.int64)
    short = np.flatnonzero((arr > 0) & (arr <= C)).astype(np.int64)
    sub = pack(arr[short], C, algorithm="bfd", overflow="error", seed=seed)
    standalone = replace(sub, seg_doc=short[sub.seg_doc], input_tokens=int(arr[short].sum()))
    return ChunkPlan(
        chunk_size=C,
        chain_doc=chain_doc,
        chain_len=-(-arr[chain_doc] // C),
        standalone=standalone,
        lengths=arr,
        max_doc_len=None if max_doc_len is None else int(max_doc_len),
    )


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
    chunk_size: int,
    *,
    loss_masks: Sequence[np.ndarray | None] | None = None,
    doc_ids: Sequence[int] | np.ndarray | None = None,
    max_doc_len: int | None = None,
    seed: int | None = 0,
    pad_to_chunk: bool = False,
    pad_id: int = 0,
    plan: ChunkPlan | None = None,
) -> list[Chunk]:
    """Materialize the chunks of a global batch: chains (document order) then standalone chunks.

    Args:
        docs: 1-D integer token arrays, one per document.
        chunk_size: C.
        loss_masks: optional per-document bool arrays (True = token is a target).
        doc_ids: global id per document (default: its index).
        max_doc_len, seed: as in :func:`plan_chunks`.
        pad_to_chunk: pad every chunk to C tokens (a final padding segment, no targets) for fixed shapes.
        plan: a precomputed :func:`plan_chunks` result for these documents.
    """
    docs = check_token_arrays(list(docs))
    if loss_masks is not None:
        if len(loss_masks) != len(docs):
            raise ValueError(f"loss_masks has {len(loss_masks)} entries for {len(docs)} docs")
        for i, (m, d) in enumerate(zip(loss_masks, docs)):
            if m is not None and len(m) != len(d):
                raise ValueError(f"loss_masks[{i}] has length {len(m)}, docs[{i}] has {len(d)}")
    lengths = np.array([len(d) for d in docs], np.int64)
    if plan is None:
        plan = plan_chunks(lengths, chunk_size, max_doc_len=max_doc_len, seed=seed)
    elif not np.array_equal(plan.lengths, lengths):
        raise ValueError("plan was made for different document lengths")
    C = plan.chunk_size
    ids = np.arange(len(docs), dtype=np.int64) if doc_ids is None else np.asarray(doc_ids, np.int64)
    if len(ids) != len(docs):
        raise ValueError(f"doc_ids has {len(ids)} entries for {len(docs)} docs")
    pad_to = C if pad_to_chunk else None

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
            pad_to=pad_to,
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
        seg_doc, seg_start, seg_len = sp.bin(b)
        toks = [docs[d] for d in seg_doc]
        chunks.append(make(toks, seg_doc, seg_start, [targets_of(d) for d in seg_doc], -1, 0, 1, 0))
    return chunks


# ============================================================================ schedule
@dataclass(frozen=True)
class ChunkAction:
    """One step of a ChunkFlow schedule.

    ``kind``: ``forward_kv`` (forward without keeping activations; the chunk's per-layer K/V go to
    the state store), ``forward`` (forward keeping activations; K/V stored too), ``recompute``
    (forward again, with activations, a chunk that ran ``forward_kv``), ``backward``.
    ``chunk`` indexes the chunk list the schedule was built from.
    """

    kind: str
    chunk: int
    chain_id: int
    chain_pos: int


def schedule_chain(chunk_indices: Sequence[int], k: int, chain_id: int = 0) -> list[ChunkAction]:
    """Algorithm 2 for one chain whose chunks (in chain order) are ``chunk_indices``."""
    k = _check_k(k)
    idx = list(chunk_indices)
    n = len(idx)
    acts: list[ChunkAction] = []

    def act(kind: str, pos: int) -> None:
        acts.append(ChunkAction(kind, idx[pos], chain_id, pos))

    n_dropped = max(0, n - k)
    for pos in range(n):
        act("forward_kv" if pos < n_dropped else "forward", pos)
    for pos in range(n - 1, n_dropped - 1, -1):
        act("backward", pos)
    for pos in range(n_dropped - 1, -1, -1):
        act("recompute", pos)
        act("backward", pos)
    return acts


def build_schedule(chunks: Sequence[Chunk], k: int) -> list[ChunkAction]:
    """Schedule every chunk of a global batch: each chain by Algorithm 2, then each standalone
    chunk as forward + backward. Chains must be complete and in order in ``chunks``."""
    k = _check_k(k)
    chains: dict[int, list[int]] = {}
    acts: list[ChunkAction] = []
    for i, c in enumerate(chunks):
        if c.is_dependent:
            members = chains.setdefault(c.chain_id, [])
            if c.chain_pos != len(members):
                raise ValueError(
                    f"chunk {i}: chain {c.chain_id} position {c.chain_pos}, expected {len(members)}"
                )
            members.append(i)
    for cid, members in chains.items():
        if len(members) != chunks[members[0]].chain_len:
            raise ValueError(f"chain {cid} has {len(members)} of its {chunks[members[0]].chain_len} chunks")
        acts.extend(schedule_chain(members, k, cid))
    for i, c in enumerate(chunks):
        if not c.is_dependent:
            acts.extend(schedule_chain([i], k, -1))
    return acts


def peak_live_chunks(actions: Sequence[ChunkAction]) -> int:
    """Most chunks holding activations at once (after a forward/recompute, before its backward)."""
    live = peak = 0
    for a in actions:
        if a.kind in ("forward", "recompute"):
            live += 1
            peak = max(peak, live)
        elif a.kind == "backward":
            live -= 1
    return peak


def check_schedule(actions: Sequence[ChunkAction], chunks: Sequence[Chunk], k: int) -> None:
    """Raise ``AssertionError`` unless the schedule is executable and gradient-exact.

    Invariants: every chunk is forwarded once (``forward`` or ``forward_kv``) and backwarded once;
    a chunk's forward comes after the forwards of all earlier chunks of its chain (their K/V exist);
    ``recompute`` only for ``forward_kv`` chunks, before their backward; a backward follows the
    chunk's live forward/recompute; inside a chain, backwards run in descending chain position
    (dK/dV of later chunks accumulate first); at most ``k`` chunks hold activations at once.
    """
    k = _check_k(k)
    forwarded: dict[int, str] = {}
    live: set[int] = set()
    done: set[int] = set()
    last_backward: dict[int, int] = {}
    for step, a in enumerate(actions):
        c = chunks[a.chunk]
        assert a.kind in ACTION_KINDS, f"step {step}: unknown kind {a.kind}"
        assert (a.chain_id, a.chain_pos) == (c.chain_id, c.chain_pos), f"step {step}: chain metadata mismatch"
        if a.kind in ("forward", "forward_kv"):
            assert a.chunk not in forwarded, f"step {step}: chunk {a.chunk} forwarded twice"
            if c.is_dependent:
                for i, o in enumerate(chunks):
                    if o.chain_id == c.chain_id and o.chain_pos < c.chain_pos:
                        assert i in forwarded, (
                            f"step {step}: chunk {a.chunk} before its chain predecessor {i}"
                        )
            forwarded[a.chunk] = a.kind
            if a.kind == "forward":
                live.add(a.chunk)
        elif a.kind == "recompute":
            assert forwarded.get(a.chunk) == "forward_kv", (
                f"step {step}: recompute of a chunk that kept activations"
            )
            assert a.chunk not in done and a.chunk not in live, f"step {step}: recompute at the wrong time"
            live.add(a.chunk)
        else:
            assert a.chunk in live, f"step {step}: backward of chunk {a.chunk} without live activations"
            if c.is_dependent:
                prev = last_backward.get(c.chain_id)
                assert prev is None or c.chain_pos < prev, f"step {step}: chain backward not descending"
                for i, o in enumerate(chunks):
                    if o.chain_id == c.chain_id and o.chain_pos > c.chain_pos:
                        assert i in done, f"step {step}: backward of {a.chunk} before later chunk {i}"
                last_backward[c.chain_id] = c.chain_pos
            live.remove(a.chunk)
            done.add(a.chunk)
        assert len(live) <= k, f"step {step}: {len(live)} chunks with live activations > k={k}"
    assert set(forwarded) == set(range(len(chunks))), "some chunk never forwarded"
    assert done == set(range(len(chunks))), "some chunk never backwarded"
    assert not live


# ============================================================================ executor
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
    global_batches: Iterator[Sequence[np.ndarray]], chunk_size: int, **kwargs
) -> Iterator[list[Chunk]]:
    """Turn a stream of global batches (lists of token arrays) into lists of chunks."""
    for docs in global_batches:
        yield build_chunks(docs, chunk_size, **kwargs)
