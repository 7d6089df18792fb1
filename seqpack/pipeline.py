"""One consumer's chain: read -> tokenize -> mix -> shuffle -> stage -> transforms.

A *consumer* is one (rank, DataLoader worker) pair: ``consumer = rank * W + worker`` of
``n = world_size * W`` with ``W = max(num_workers, 1)``. Each consumer builds its own chain from
the validated config::

    read (one reader per source; records partitioned over the n consumers, see sources/reader.py)
      -> Tokenize -> Mixture (weights) -> ShuffleBuffer (optional) -> stage (registry) -> transforms

Every step is a :class:`seqpack.node.Node` whose state nests its upstream's, so the chain's state
is one nested dict and ``chain.reset(state)`` resumes exactly. Stages are looked up in
``seqpack.stages.STAGES`` by ``config["stage"]["type"]``; top-level sections named in
``seqpack.stages.TRANSFORMS`` (e.g. ``balance:``) wrap the stage's batch node.

:class:`PipelineDataset` is the torch ``IterableDataset`` that builds the chain inside each
DataLoader worker; :mod:`seqpack.loader` adds ranks, workers, equal steps and the loader state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torchdata.nodes import BaseNode

from seqpack.counting import count_batches
from seqpack.sources.mixture import Mixture
from seqpack.sources.read import reader_class, with_source_files
from seqpack.sources.reader import Reader
from seqpack.sources.shuffle import ShuffleBuffer
from seqpack.sources.tokenize import Tokenize, TokenizerSpec, load_tokenizer, special_ids
from seqpack.stages import StageContext, active_transforms, lookup_stage

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
        if documents_of is not None:
            nodes.append(documents_of(reader))
        else:
            nodes.append(Tokenize(reader, cfg["tokenizer"], batch_size=cfg["tokenize_batch"]))
    names = [s["name"] for s in cfg["sources"]]
    docs: BaseNode = Mixture(nodes, [s["weight"] for s in cfg["sources"]], names, by=cfg["mix_by"])
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


class WorkerItem(NamedTuple):
    """What a DataLoader worker sends: the batch, the worker's id and its chain's counters after it.

    The counters travel with the batches because the main process has no other public view of a
    worker's chain (a NamedTuple, so ``pin_memory=True`` pins the batch and leaves the rest).
    """

    batch: Any
    worker_id: int
    stats: dict[str, Any]


class PipelineDataset(torch.utils.data.IterableDataset):
    """IterableDataset over one rank's share; each worker builds its own chain in ``__iter__``.

    ``state_dict``/``load_state_dict`` (called by StatefulDataLoader inside each worker) carry the
    chain state and the epoch; ``epoch`` is set by the loader before each epoch. With
    ``with_stats`` (the loader sets it when there are workers) items are :class:`WorkerItem`.
    """

    def __init__(self, cfg: dict, rank: int, world_size: int, num_workers: int, *, with_stats: bool = False):
        super().__init__()
        # files resolved now (epoch 0): a later epoch's reader raises if one is gone
        self.cfg = with_source_files(cfg)
        self.rank, self.world_size, self.num_workers = rank, world_size, max(num_workers, 1)
        self.with_stats = with_stats
        self.epoch = 0
        self._pending: dict | None = None
        self._node: BaseNode | None = None
        self._running_epoch = 0
        self._ids: tuple | None = None

    @property
    def n_consumers(self) -> int:
        return self.world_size * self.num_workers

    def context(self, rank: int, worker_id: int, epoch: int) -> StageContext:
        """The :class:`StageContext` of (``rank``, ``worker_id``) in ``epoch``."""
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

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        worker_id = info.id if info is not None else 0
        if info is not None and info.num_workers != self.num_workers:
            raise RuntimeError(f"dataset built for {self.num_workers} workers runs with {info.num_workers}")
        state, self._pending = self._pending, None
        epoch = int(state["epoch"]) if state else self.epoch
        if state and state.get("n_consumers") != self.n_consumers:
            raise ValueError(
                f"checkpoint was taken with {state.get('n_consumers')} rank x worker consumers, this loader "
                f"has {self.n_consumers}; resume with the same world size and num_workers"
            )
        node = build_chain(self.cfg, self.context(self.rank, worker_id, epoch))
        node.reset(state["chain"] if state and state.get("chain") is not None else None)
        self._node, self._running_epoch = node, epoch
        while True:
            try:
                item = next(node)
            except StopIteration:
                return
            yield WorkerItem(item, worker_id, self.stats()) if self.with_stats else item

    def stats(self) -> dict[str, Any]:
        """Counters of the chain running in this process (empty before the first ``__iter__``)."""
        node = self._node
        return node.stats() if node is not None and hasattr(node, "stats") else {}

    def state_dict(self) -> dict:
        node = self._node
        return {
            "epoch": self._running_epoch if node is not None else self.epoch,
            "n_consumers": self.n_consumers,
            "chain": node.state_dict() if node is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self._pending = state

    def __getstate__(self) -> dict:
        # workers get the config and the pending state, never this process's live chain
        d = dict(self.__dict__)
        d["_node"] = None
        return d

    def count_batches(self, rank: int, epoch: int) -> int:
        """Batches rank ``rank`` yields in ``epoch`` (all its workers), exactly, from length indexes
        where the chain allows it (:func:`seqpack.counting.count_batches`)."""
        return sum(count_batches(self.cfg, self.context(rank, w, epoch)) for w in range(self.num_workers))
