"""ChunkFlow plans (Yuan et al., ICML 2025): which tokens go into which chunk, and in which order the
chunks run forward and backward. Pure integers: numpy only, no torch, no tokens.

Chunk construction (paper Algorithm 1): a global batch of documents and a
``capacity`` C. Documents longer than C become *chains* of consecutive dependent chunks of C tokens
(the tail piece is the chain's last chunk); documents of at most C tokens are bin-packed
(:func:`seqpack.plan.pack`, best-fit decreasing) into the fewest *standalone* chunks of capacity C.

State-aware schedule (paper Algorithm 2): for a chain of N chunks and K chunks of live activations,
if N <= K forward all (activations kept) then backward in reverse; else forward the first N - K
chunks keeping only their per-layer K/V, forward the last K with activations, backward those in
reverse, then recompute + backward each of the first N - K chunks in descending order (a chunk's
dK/dV must have accumulated from every later chunk before its own backward). Peak live
activations never exceed K chunks; the state store holds the chain's K/V.

The schedule functions read only a chunk's chain metadata (:class:`ChainMember`), so they work on
:class:`seqpack.stages.chunkflow.Chunk` lists without importing torch here.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from seqpack.checks import check_int, rename_kwargs
from seqpack.plan import PackPlan, pack

ACTION_KINDS = ("forward_kv", "forward", "recompute", "backward")
# the ChunkFlow paper's name for the chunk capacity; accepted one release (DeprecationWarning)
OLD_CAPACITY = {"chunk_size": "capacity"}


def check_k(k: Any) -> int:
    """``k``, chunks with live activations, as an int >= 1 (ConfigError naming it otherwise)."""
    return check_int(k, "k (chunks with live activations)", minimum=1)


# ============================================================================ planning
@dataclass
class ChunkPlan:
    """Which tokens go into which chunk.

    Attributes:
        capacity: C, tokens per chunk.
        chain_doc: int64 ``[n_chains]``, index of each long (> C tokens) document.
        chain_len: int64 ``[n_chains]``, chunks in each chain, ``ceil(len / C)``.
        standalone: PackPlan of capacity C over the short documents; its ``seg_doc`` holds indices
            into the original document list.
        lengths: int64 ``[n_docs]``, the input lengths.
        max_doc_len: the configured hard maximum (None: unbounded).
    """

    capacity: int
    chain_doc: np.ndarray
    chain_len: np.ndarray
    standalone: PackPlan
    lengths: np.ndarray
    max_doc_len: int | None = None
    stats: dict = field(default_factory=dict)

    @property
    def chunk_size(self) -> int:
        """Deprecated name of :attr:`capacity`."""
        warnings.warn("ChunkPlan.chunk_size is deprecated; use ChunkPlan.capacity", DeprecationWarning, 2)
        return self.capacity

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
        return self.input_tokens / (self.n_chunks * self.capacity) if self.n_chunks else 1.0

    @property
    def max_chain_len(self) -> int:
        return int(self.chain_len.max()) if self.n_chains else 0

    def summary(self) -> dict:
        """Plain-dict stats for logs and JSON."""
        return {
            "capacity": self.capacity,
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
        C = self.capacity
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
    capacity: int | None = None,
    *,
    max_doc_len: int | None = None,
    seed: int | None = 0,
    **deprecated: Any,
) -> ChunkPlan:
    """Plan ChunkFlow chunks for documents of the given token ``lengths``.

    Args:
        lengths: tokens per document ``[n_docs]`` (zero-length documents hold nothing and get no chunk).
        capacity: C > 0, tokens per chunk (``chunk_size=`` is its deprecated name).
        max_doc_len: hard maximum document length; a longer document raises ``ValueError`` naming
            its index and length (ChunkFlow keeps every token, so there is no silent truncation).
        seed: order of the standalone chunks (as ``seqpack.pack``); None keeps the planner's order.
    """
    capacity = rename_kwargs(deprecated, OLD_CAPACITY, "plan_chunks", capacity=capacity)["capacity"]
    C = check_int(capacity, "capacity", minimum=1)
    max_doc_len = check_int(max_doc_len, "max_doc_len", minimum=1, allow_none=True)
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
                f"document {i} has {int(arr[i])} tokens > max_doc_len={max_doc_len} "
                f"({len(over)} document(s) over the limit)"
            )
    chain_doc = np.flatnonzero(arr > C).astype(np.int64)
    short = np.flatnonzero((arr > 0) & (arr <= C)).astype(np.int64)
    sub = pack(arr[short], C, algorithm="bfd", overflow="error", seed=seed)
    standalone = replace(sub, seg_doc=short[sub.seg_doc], input_tokens=int(arr[short].sum()))
    return ChunkPlan(
        capacity=C,
        chain_doc=chain_doc,
        chain_len=-(-arr[chain_doc] // C),
        standalone=standalone,
        lengths=arr,
        max_doc_len=max_doc_len,
    )


# ============================================================================ schedule
class ChainMember(Protocol):
    """What the schedule reads of a chunk (:class:`seqpack.stages.chunkflow.Chunk` has it)."""

    chain_id: int  # index of the chain, -1 for a standalone chunk
    chain_pos: int  # position in the chain (0 for standalone chunks)
    chain_len: int  # chunks in the chain (1 for standalone chunks)


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
    k = check_k(k)
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


def build_schedule(chunks: Sequence[ChainMember], k: int) -> list[ChunkAction]:
    """Schedule every chunk of a global batch: each chain by Algorithm 2, then each standalone
    chunk as forward + backward. Chains must be complete and in order in ``chunks``."""
    k = check_k(k)
    chains: dict[int, list[int]] = {}
    acts: list[ChunkAction] = []
    for i, c in enumerate(chunks):
        if c.chain_id >= 0:
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
        if c.chain_id < 0:
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


def check_schedule(actions: Sequence[ChunkAction], chunks: Sequence[ChainMember], k: int) -> None:
    """Raise ``AssertionError`` unless the schedule is executable and gradient-exact.

    Invariants: every chunk is forwarded once (``forward`` or ``forward_kv``) and backwarded once;
    a chunk's forward comes after the forwards of all earlier chunks of its chain (their K/V exist);
    ``recompute`` only for ``forward_kv`` chunks, before their backward; a backward follows the
    chunk's live forward/recompute; inside a chain, backwards run in descending chain position
    (dK/dV of later chunks accumulate first); at most ``k`` chunks hold activations at once.
    """
    k = check_k(k)
    forwarded: dict[int, str] = {}
    live: set[int] = set()
    done: set[int] = set()
    last_backward: dict[int, int] = {}
    for step, a in enumerate(actions):
        c = chunks[a.chunk]
        dependent = c.chain_id >= 0
        assert a.kind in ACTION_KINDS, f"step {step}: unknown kind {a.kind}"
        assert (a.chain_id, a.chain_pos) == (c.chain_id, c.chain_pos), f"step {step}: chain metadata mismatch"
        if a.kind in ("forward", "forward_kv"):
            assert a.chunk not in forwarded, f"step {step}: chunk {a.chunk} forwarded twice"
            if dependent:
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
            if dependent:
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
