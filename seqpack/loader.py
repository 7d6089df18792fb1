"""The loader: config -> per-(rank, worker) node chain -> StatefulDataLoader -> batches.

Chain per consumer (``consumer = rank * W + worker``, ``n = world_size * W``, ``W = max(num_workers, 1)``)::

    read (one reader per source; records partitioned over the n consumers, see sources/reader.py)
      -> Tokenize -> Mixture (weights) -> ShuffleBuffer (optional) -> stage (registry) -> batches

Stages are looked up in :data:`STAGES` by ``config["stage"]["type"]``; other modules add their own
with :func:`register_stage` (no change to this file needed). Top-level config sections named in
:data:`TRANSFORMS` (e.g. ``balance:``) wrap the stage's batch node.

Exact resume: ``loader.state_dict()`` holds the StatefulDataLoader state (each worker's chain
state: reader positions, tokenizer batch cursor, mixture counters, shuffle buffer and RNG, packer
buffer) plus the epoch and the step inside it; ``load_state_dict`` continues token for token.

Equal steps per rank (DDP never hangs): ranks read disjoint records, so their batch counts can
differ by a few. Policy ``even_batches``:

- ``"allreduce"`` (default when ``torch.distributed`` is initialized): each step the ranks
  all-reduce (MAX) a "have data" flag; a rank that ran out yields zero-loss padding batches
  (``num_loss_tokens == 0``, ``n_real_segments == 0``) until every rank is done. No data dropped.
- ``"precount"`` (default for ``world_size > 1`` without a process group): the count is
  :meth:`SeqpackLoader.steps_per_epoch` (max over ranks, from a dry run of every rank's chain),
  and a rank pads up to it. Same result, no communication.
- ``"none"``: no padding (single process).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torchdata.nodes import BaseNode
from torchdata.stateful_dataloader import StatefulDataLoader

from seqpack.batch import VarlenBatch, padding_batch
from seqpack.config import load_config
from seqpack.sources.mixture import Mixture
from seqpack.sources.read import reader_class
from seqpack.sources.shuffle import ShuffleBuffer
from seqpack.sources.tokenize import Tokenize, TokenizerSpec, load_tokenizer, special_ids
from seqpack.stages import StageContext, active_transforms, lookup_stage


# ------------------------------------------------------------------------------------------ chain
def build_documents(cfg: dict, ctx: StageContext) -> BaseNode:
    """The document node of one consumer: readers -> tokenize -> mixture -> shuffle."""
    shuffle = cfg["shuffle"]
    nodes = []
    for i, s in enumerate(cfg["sources"]):
        fmt = s["format"]
        opts = {k: v for k, v in s.items() if k not in ("path", "format", "weight")}
        reader = reader_class(fmt)(
            s["path"],
            source_index=i,
            consumer=(ctx.consumer, ctx.n_consumers),
            shuffle_seed=shuffle["seed"] if shuffle and shuffle["shards"] else None,
            epoch=ctx.epoch,
            **opts,
        )
        nodes.append(Tokenize(reader, cfg["tokenizer"], batch_size=cfg["tokenize_batch"]))
    docs: BaseNode = Mixture(
        nodes, [s["weight"] for s in cfg["sources"]], [s["name"] for s in cfg["sources"]], by=cfg["mix_by"]
    )
    if shuffle and shuffle["buffer"] > 1:
        docs = ShuffleBuffer(
            docs, shuffle["buffer"], seed=(shuffle["seed"], ctx.epoch, ctx.consumer, ctx.n_consumers)
        )
    return docs


def build_chain(cfg: dict, ctx: StageContext) -> BaseNode:
    """Documents -> registered stage -> registered transforms, for one consumer."""
    stage_cfg = cfg["stage"]
    entry = lookup_stage(stage_cfg["type"])
    node = entry.factory(build_documents(cfg, ctx) if entry.documents else None, stage_cfg, ctx)
    for name, factory in active_transforms(cfg):
        node = factory(node, cfg[name], ctx)
    return node


def _tokenizer_ids(cfg: dict) -> tuple[int | None, int | None, int, int]:
    spec = TokenizerSpec.parse(cfg["tokenizer"])
    tok = load_tokenizer(spec.name)
    bos, eos, pad = special_ids(tok, spec)
    return bos, eos, pad, int(tok.vocab_size)


class PipelineDataset(torch.utils.data.IterableDataset):
    """IterableDataset over one rank's share; each worker builds its own chain in ``__iter__``.

    ``state_dict``/``load_state_dict`` (called by StatefulDataLoader inside each worker) carry the
    chain state and the epoch; ``epoch`` is set by :class:`SeqpackLoader` before each epoch.
    """

    def __init__(self, cfg: dict, rank: int, world_size: int, num_workers: int):
        super().__init__()
        self.cfg, self.rank, self.world_size, self.num_workers = cfg, rank, world_size, max(num_workers, 1)
        self.epoch = 0
        self._pending: dict | None = None
        self._node: BaseNode | None = None
        self._running_epoch = 0
        self._ids: tuple | None = None

    def context(self, rank: int, worker_id: int, epoch: int) -> StageContext:
        if self._ids is None:
            self._ids = _tokenizer_ids(self.cfg)
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
        if state and state.get("n_consumers") != self.world_size * self.num_workers:
            raise ValueError(
                f"checkpoint was taken with {state.get('n_consumers')} rank x worker consumers, this loader "
                f"has {self.world_size * self.num_workers}; resume with the same world size and num_workers"
            )
        node = build_chain(self.cfg, self.context(self.rank, worker_id, epoch))
        node.reset(state["chain"] if state and state.get("chain") is not None else None)
        self._node, self._running_epoch = node, epoch
        while True:
            try:
                item = next(node)
            except StopIteration:
                return
            yield item

    def state_dict(self) -> dict:
        node = self._node
        return {
            "epoch": self._running_epoch if node is not None else self.epoch,
            "n_consumers": self.world_size * self.num_workers,
            "chain": node.state_dict() if node is not None else None,
            "stats": node.stats() if node is not None and hasattr(node, "stats") else {},
        }

    def load_state_dict(self, state: dict) -> None:
        self._pending = state

    def __getstate__(self) -> dict:
        # workers get the config and the pending state, never this process's live chain
        d = dict(self.__dict__)
        d["_node"] = None
        return d

    def count_batches(self, rank: int, epoch: int) -> int:
        """Batches rank ``rank`` yields in ``epoch`` (all its workers), by running its chains."""
        total = 0
        for w in range(self.num_workers):
            node = build_chain(self.cfg, self.context(rank, w, epoch))
            node.reset(None)
            for _ in node:
                total += 1
        return total


def _as_is(item: Any) -> Any:
    return item


class _WorkerInit:
    """Worker init (a class so it pickles under the ``spawn`` start method)."""

    def __init__(self, user_fn: Callable[[int], None] | None):
        self.user_fn = user_fn

    def __call__(self, worker_id: int) -> None:
        # one tokenizer per worker, single-threaded: parallelism comes from the workers, and the
        # Rust pool inherited over fork would deadlock or disable itself
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        if self.user_fn is not None:
            self.user_fn(worker_id)


class SeqpackLoader:
    """Iterable of batches for one rank, with exact ``state_dict``/``load_state_dict``.

    Each ``iter(loader)`` is one epoch (the epoch number advances after it ends). See the module
    docstring for the equal-steps policy.
    """

    def __init__(self, cfg: dict, *, rank: int, world_size: int, num_workers: int = 0, **dataloader_kwargs):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.cfg, self.rank, self.world_size, self.num_workers = cfg, rank, world_size, num_workers
        self.dataset = PipelineDataset(cfg, rank, world_size, num_workers)
        dataloader_kwargs["worker_init_fn"] = _WorkerInit(dataloader_kwargs.get("worker_init_fn"))
        # items are finished batches: skip default_convert's type probing (~10 us per batch)
        dataloader_kwargs.setdefault("collate_fn", _as_is)
        if dataloader_kwargs.pop("persistent_workers", False):
            raise ValueError("persistent_workers is not supported: workers read the epoch when they start")
        self._dl = StatefulDataLoader(
            self.dataset, batch_size=None, num_workers=num_workers, **dataloader_kwargs
        )
        mode = cfg.get("even_batches", "auto")
        if mode == "auto":
            dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
            mode = "none" if world_size == 1 else ("allreduce" if dist_on else "precount")
        self.even_batches = mode
        self.epoch = 0
        self._step = 0
        self._real_done = False
        self._padded = 0
        # True from the end of one epoch until the next one starts: a checkpoint taken there must
        # start the next epoch fresh, not restore the finished epoch's exhausted iterator
        self._between_epochs = True
        self._steps_cache: dict[int, int] = {}
        self._last: Any = None

    # ---------------------------------------------------------------- counts
    def steps_per_epoch(self, epoch: int | None = None) -> int:
        """Batches every rank yields in ``epoch`` (default: the current one), padding included.

        Exact: it runs every rank's chains once without training (cost: one pass over the data,
        in this process; cached per epoch). With ``even_batches="none"`` it is this rank's count.
        """
        epoch = self.epoch if epoch is None else epoch
        if epoch not in self._steps_cache:
            ranks = [self.rank] if self.even_batches == "none" else range(self.world_size)
            self._steps_cache[epoch] = max(self.dataset.count_batches(r, epoch) for r in ranks)
        return self._steps_cache[epoch]

    def __len__(self) -> int:
        return self.steps_per_epoch()

    # ---------------------------------------------------------------- iteration
    def _any_rank_has_data(self, has: bool) -> bool:
        if self.even_batches == "allreduce":
            import torch.distributed as dist

            device = "cpu"
            if dist.get_backend() == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            flag = torch.tensor([1 if has else 0], dtype=torch.int32, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item())
        if self.even_batches == "precount":
            return self._step < self.steps_per_epoch()
        return has

    def _padding(self) -> Any:
        entry = lookup_stage(self.cfg["stage"]["type"])
        ctx = self.dataset.context(self.rank, 0, self.epoch)
        if entry.padding is not None:
            return entry.padding(self.cfg["stage"], ctx, self._last)
        if isinstance(self._last, VarlenBatch):
            return padding_batch(self._last.num_tokens, ctx.pad_id)
        raise RuntimeError(
            f"rank {self.rank} ran out of batches but stage {self.cfg['stage']['type']!r} registered "
            "no padding batch; register one (register_stage(..., padding=...)) or set even_batches='none'"
        )

    def __iter__(self) -> Iterator[Any]:
        self.dataset.epoch = self.epoch
        self._between_epochs = False
        it = None if self._real_done else iter(self._dl)
        while True:
            batch, has = None, False
            if it is not None:
                try:
                    batch, has = next(it), True
                except StopIteration:
                    it, self._real_done = None, True
            more = self._any_rank_has_data(has)
            if has and not more:
                raise RuntimeError(
                    f"rank {self.rank} has more than steps_per_epoch()={self.steps_per_epoch()} batches; "
                    "the data changed since the count"
                )
            if not more:
                break
            if not has:
                batch = self._padding()
                self._padded += 1
            else:
                self._last = batch
            self._step += 1
            yield batch
        self.epoch += 1
        self._step, self._real_done, self._padded = 0, False, 0
        self._between_epochs = True

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Everything needed to continue exactly here (plain Python types and tensors)."""
        return {
            "epoch": self.epoch,
            "step": self._step,
            "real_done": self._real_done,
            "padded": self._padded,
            "dataloader": None if self._between_epochs else self._dl.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch, self._step = int(state["epoch"]), int(state["step"])
        self._real_done, self._padded = bool(state["real_done"]), int(state["padded"])
        self.dataset.epoch = self.epoch
        self._between_epochs = state["dataloader"] is None
        if not self._between_epochs:
            self._dl.load_state_dict(state["dataloader"])

    def stats(self) -> dict[str, Any]:
        """Counters of this rank (reads, skips, tokens per source, packing), summed over workers.

        With workers the counts come from the last worker snapshots (every
        ``snapshot_every_n_steps`` batches).
        """
        out: dict[str, Any] = {"loader/padding_batches": self._padded}
        if self.num_workers == 0:
            node = self.dataset._node
            if node is not None and hasattr(node, "stats"):
                out.update(node.stats())
            return out
        snaps = self._dl.state_dict().get("_snapshot", {}).get("_worker_snapshots", {})
        for snap in snaps.values():
            stats = (snap.get("dataset_state") or {}).get("stats", {})
            for k, v in stats.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[k] = out.get(k, 0) + v
                elif isinstance(v, dict) and k not in out:
                    out[k] = dict(v)
        return out


def build_loader(
    config: str | os.PathLike | Mapping[str, Any],
    *,
    rank: int | None = None,
    world_size: int | None = None,
    num_workers: int = 0,
    **dataloader_kwargs,
) -> SeqpackLoader:
    """A resumable, rank-sharded loader of batches (``VarlenBatch`` for ``stage.type == "pack"``).

    Args:
        config: mapping or YAML/TOML/JSON file (see :mod:`seqpack.config`).
        rank, world_size: data-parallel position; default from ``torch.distributed`` when it is
            initialized, else 0 and 1.
        num_workers: DataLoader worker processes (0 = in this process).
        **dataloader_kwargs: passed to ``torchdata.stateful_dataloader.StatefulDataLoader``
            (``pin_memory``, ``prefetch_factor``, ``snapshot_every_n_steps``, ...).
    """
    cfg = load_config(config)
    dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world_size is None:
        world_size = torch.distributed.get_world_size() if dist_on else 1
    if rank is None:
        rank = torch.distributed.get_rank() if dist_on else 0
    return SeqpackLoader(cfg, rank=rank, world_size=world_size, num_workers=num_workers, **dataloader_kwargs)
