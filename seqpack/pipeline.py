"""One consumer's chain: read -> tokenize -> mix -> shuffle -> stage -> transforms.

A *consumer* is one (rank, DataLoader worker) pair: ``consumer = rank * W + worker`` of
``n = world_size * W`` with ``W = max(num_workers, 1)``. Each consumer builds its own chain from
the validated config::

    read (one reader per source; records partitioned over the n consumers, see sources/reader.py)
      -> Tokenize -> Mixture (weights) -> CarriedDocuments (elastic resume) -> ShuffleBuffer
      (optional) -> stage (registry) -> transforms

Every step is a :class:`seqpack.node.Node` whose state nests its upstream's, so the chain's state
is one nested dict and ``chain.reset(state)`` resumes exactly. Stages are looked up in
``seqpack.stages.STAGES`` by ``config["stage"]["type"]``; top-level sections named in
``seqpack.stages.TRANSFORMS`` (e.g. ``balance:``) wrap the stage's batch node.

:class:`PipelineDataset` is the torch ``IterableDataset`` that builds the chain inside each
DataLoader worker; :mod:`seqpack.loader` adds ranks, workers, equal steps and the loader state.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torchdata.nodes import BaseNode

from seqpack.counting import count_batches
from seqpack.ring import ship
from seqpack.runahead import run_ahead
from seqpack.sources.carried import CarriedDocuments
from seqpack.sources.lengths import length_index
from seqpack.sources.mixture import Mixture
from seqpack.sources.read import reader_class, with_source_files
from seqpack.sources.reader import Reader
from seqpack.sources.shuffle import ShuffleBuffer
from seqpack.sources.tokenize import Tokenize, TokenizerSpec, load_tokenizer, special_ids
from seqpack.stages import StageContext, active_transforms, lookup_stage
from seqpack.wire import WireItem, dumps_state, encode_batch, grouped, item_bytes

# a worker sends its chain state when the batches made since the last one took this many times
# as long as taking a state does (state overhead <= 1/SNAPSHOT_RATIO of a worker's time)
SNAPSHOT_RATIO = 20

# options of a source entry that are not reader keyword arguments
_NOT_READER_OPTIONS = ("path", "format", "weight")


def build_documents(
    cfg: dict, ctx: StageContext, documents_of: Callable[[Reader], BaseNode] | None = None
) -> BaseNode:
    """The document node of one consumer: readers -> tokenize -> mixture -> shuffle.

    Args:
        cfg: a validated config (:func:`seqpack.config.load_config`).
        ctx: where the chain runs (its consumer index picks the records, its epoch the shuffle).
        documents_of: replaces ``Tokenize(reader)`` per source (counting feeds documents from a
            length index, :mod:`seqpack.counting`); None tokenizes.
    """
    shuffle = cfg["shuffle"]
    nodes = []
    for i, s in enumerate(cfg["sources"]):
        reader = reader_class(s["format"])(
            s["path"],
            source_index=i,
            consumer=(ctx.consumer, ctx.n_consumers),
            shuffle_seed=shuffle["seed"] if shuffle and shuffle["shards"] else None,
            epoch=ctx.epoch,
            **{k: v for k, v in s.items() if k not in _NOT_READER_OPTIONS},
        )
        if cfg["partition"] == "tokens":  # cut by exact token counts (the cached length index)
            reader.partition_lengths = length_index(reader, cfg["tokenizer"])
        if documents_of is not None:
            nodes.append(documents_of(reader))
        else:
            nodes.append(Tokenize(reader, cfg["tokenizer"], batch_size=cfg["tokenize_batch"]))
    names = [s["name"] for s in cfg["sources"]]
    docs: BaseNode = Mixture(nodes, [s["weight"] for s in cfg["sources"]], names, by=cfg["mix_by"])
    # documents an elastic resume moved here from other consumers' buffers come first
    docs = CarriedDocuments(docs)
    if shuffle and shuffle["buffer_docs"] > 1:
        seed = (shuffle["seed"], ctx.epoch, ctx.consumer, ctx.n_consumers)
        docs = ShuffleBuffer(docs, shuffle["buffer_docs"], seed=seed)
    return docs


def build_chain(
    cfg: dict, ctx: StageContext, documents_of: Callable[[Reader], BaseNode] | None = None
) -> BaseNode:
    """Documents -> registered stage -> registered transforms, for one consumer (``documents_of``:
    see :func:`build_documents`)."""
    stage_cfg = cfg["stage"]
    entry = lookup_stage(stage_cfg["type"])
    docs = build_documents(cfg, ctx, documents_of) if entry.documents else None
    node = entry.factory(docs, stage_cfg, ctx)
    for name, factory in active_transforms(cfg):
        node = factory(node, cfg[name], ctx)
    return node


def tokenizer_ids(cfg: dict) -> tuple[int | None, int | None, int, int]:
    """``(bos_id, eos_id, pad_id, vocab_size)`` of the config's tokenizer (loaded once per process)."""
    spec = TokenizerSpec.parse(cfg["tokenizer"])
    tok = load_tokenizer(spec.name)
    bos, eos, pad = special_ids(tok, spec)
    return bos, eos, pad, int(tok.vocab_size)


_END = object()


def _next_or_end(node: BaseNode, collate: Callable[[Any], Any] | None) -> Any:
    """The chain's next item (collated), or ``_END`` when it is exhausted."""
    try:
        item = next(node)
    except StopIteration:
        return _END
    return item if collate is None else collate(item)


def _list_bytes(group: list[WireItem]) -> int:
    return sum(item_bytes(item) for item in group)


class PipelineDataset(torch.utils.data.IterableDataset):
    """IterableDataset over one rank's share; each worker builds its own chain in ``__iter__``.

    *Logical* workers: the rank's consumers are ``0..W-1``; DataLoader worker ``p`` runs logical
    worker ``(rotation + p) % W``. A fresh epoch has ``rotation == 0``; a resumed one starts the
    DataLoader's round robin at the logical worker whose turn was next, so the batch order is the
    uninterrupted one (the DataLoader polls workers in a fixed cycle and drops a worker from it
    when it runs out; both hold in the resumed run too).

    With workers (``wire``) every item is a list of :class:`~seqpack.wire.WireItem` (several
    batches per DataLoader item, :func:`seqpack.wire.grouped`), each the batch in one flat buffer
    (in the worker's shared-memory ring when it fits, :mod:`seqpack.ring`), now and then with the
    worker's chain state after it, plus its counters. ``collate`` (the user's
    ``collate_fn``) is applied to each batch where it is made.
    """

    def __init__(
        self,
        cfg: dict,
        rank: int,
        world_size: int,
        num_workers: int,
        *,
        wire: bool = False,
        collate: Callable[[Any], Any] | None = None,
    ):
        super().__init__()
        # files resolved now (epoch 0): a later epoch's reader raises if one is gone
        self.cfg = with_source_files(cfg)
        self.rank, self.world_size, self.num_workers = rank, world_size, max(num_workers, 1)
        self.wire, self.collate = wire, collate
        self.epoch = 0
        # chain state per logical worker (None: start fresh), batches made after it (remade unsent on
        # resume), and the logical worker of DataLoader worker 0
        self.worker_states: list[dict | None] = [None] * self.num_workers
        self.worker_skips: list[int] = [0] * self.num_workers
        # per logical worker, the size of its first list of batches (the rest of the list a checkpoint
        # interrupted, seqpack.wire.grouped; 0: cut by the rule)
        self.first_group: list[int] = [0] * self.num_workers
        self.rotation = 0
        # one shared-memory ring per DataLoader worker (seqpack.ring), made by the loader per epoch
        self.rings: list | None = None
        self._node: BaseNode | None = None
        self._ids: tuple | None = None

    @property
    def tokenizes(self) -> bool:
        """Whether the chain tokenizes text (a source without ``input_ids_key``)."""
        return lookup_stage(self.cfg["stage"]["type"]).documents and any(
            not s.get("input_ids_key") for s in self.cfg["sources"]
        )

    @property
    def n_consumers(self) -> int:
        return self.world_size * self.num_workers

    def context(self, rank: int, worker_id: int, epoch: int) -> StageContext:
        """The :class:`StageContext` of (``rank``, logical ``worker_id``) in ``epoch``."""
        if self._ids is None:
            self._ids = tokenizer_ids(self.cfg)
        bos, eos, pad, vocab = self._ids
        return StageContext(
            rank,
            self.world_size,
            worker_id,
            self.num_workers,
            epoch,
            int(self.cfg["seed"]),
            pad,
            bos,
            eos,
            vocab,
            self.cfg,
            build_chain,
        )

    def chain(self, worker: int) -> BaseNode:
        """Logical worker ``worker``'s chain for :attr:`epoch`, reset to its saved state (if any)."""
        node = build_chain(self.cfg, self.context(self.rank, worker, self.epoch))
        node.reset(self.worker_states[worker])
        return node

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers != self.num_workers:
            raise RuntimeError(f"dataset built for {self.num_workers} workers runs with {info.num_workers}")
        worker = (self.rotation + (info.id if info is not None else 0)) % self.num_workers
        node = self.chain(worker)
        self._node = node
        # the saved state may be `skip` batches behind the checkpoint: make them again, unsent
        skip = self.worker_skips[worker]
        for _ in range(skip):
            next(node)
        if not self.wire:
            while (item := _next_or_end(node, self.collate)) is not _END:
                yield item
            return
        slot = info.id if info is not None else 0
        ring = self.rings[slot] if self.rings is not None else None
        # a worker starting its share sends its first batch alone (the first batch of the epoch is
        # not held back for a whole list); one resumed mid-list sends the rest of that list first
        first = self.first_group[worker] or (1 if self.worker_states[worker] is None else 0)
        groups = grouped(self._wire_items(node, worker, skip), first)
        # a tokenizing chain makes whole lists ahead on a thread (seqpack.runahead), so workers in a
        # tokenizer burst do not stall each other; a pre-tokenized chain is smooth (row groups are
        # decoded ahead) and Python-bound, where a second thread only contends for the GIL with the
        # DataLoader's loop (measured: -25% at 1 worker), so it runs in that loop
        if self.tokenizes:
            groups = run_ahead(groups, _list_bytes)
        for group in groups:  # a list's batches go into the ring when the DataLoader takes it
            yield [ship(item, ring, slot) for item in group]

    def _wire_items(self, node: BaseNode, worker: int, skip: int) -> Iterator[WireItem]:
        """Worker side: each batch of ``node`` as a :class:`~seqpack.wire.WireItem`, the chain
        state riding along every few batches."""
        collate = self.collate
        made, state_cost = 0.0, 0.0
        t0 = time.perf_counter()
        item = _next_or_end(node, collate)
        made += time.perf_counter() - t0
        while item is not _END:
            skip += 1
            state = None
            if made >= SNAPSHOT_RATIO * state_cost:
                # the chain state rides with this batch (no round trip to ask for it); taken when the
                # batches made since the last one cost SNAPSHOT_RATIO times what a state costs, so
                # states take <= 1/SNAPSHOT_RATIO of the worker's time, and a resume remakes the
                # batches since (about SNAPSHOT_RATIO state-takings' worth of time)
                t1 = time.perf_counter()
                state = dumps_state(node.state_dict())
                state_cost, made, skip = time.perf_counter() - t1, 0.0, 0
            # one batch of look-ahead (made after the state above, which stays the one right after
            # `item`) tells whether `item` is the worker's last: the counters (a walk of the whole
            # chain, ~40 us) then ride only with states and with the last batch, exact at the end
            t0 = time.perf_counter()
            nxt = _next_or_end(node, collate)
            made += time.perf_counter() - t0
            stats = self.stats() if state is not None or nxt is _END else None
            yield encode_batch(item, state, worker, stats, skip)
            item = nxt

    def stats(self) -> dict[str, Any]:
        """Counters of the chain running in this process (empty before the first ``__iter__``)."""
        node = self._node
        return node.stats() if node is not None and hasattr(node, "stats") else {}

    def live_state(self) -> dict | None:
        """The in-process chain's state (``num_workers == 0``), or None before it started."""
        return self._node.state_dict() if self._node is not None else None

    def __getstate__(self) -> dict:
        # workers get the config and the pending states, never this process's live chain
        d = dict(self.__dict__)
        d["_node"] = None
        return d

    def count_batches(self, rank: int, epoch: int) -> int:
        """Batches rank ``rank`` yields in ``epoch`` (all its workers), exactly, from length indexes
        where the chain allows it (:func:`seqpack.counting.count_batches`)."""
        return sum(count_batches(self.cfg, self.context(rank, w, epoch)) for w in range(self.num_workers))
