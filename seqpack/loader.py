"""The loader: config -> one chain per (rank, worker) -> StatefulDataLoader -> batches of one rank.

The chain of each consumer is :mod:`seqpack.pipeline`'s; this module adds the ranks, the
DataLoader workers, equal step counts over ranks and the loader state.

Exact resume: ``loader.state_dict()`` holds the StatefulDataLoader state (each worker's chain
state: reader positions, tokenizer batch cursor, mixture counters, shuffle buffer and RNG, stage
buffer) plus the epoch and the step inside it; ``load_state_dict`` continues token for token.

Equal steps per rank (DDP never hangs): ranks read disjoint records, so their batch counts can
differ by a few. Policy ``even_batches``:

- ``"allreduce"`` (default when ``torch.distributed`` is initialized): each step the ranks
  all-reduce (MAX) a "have data" flag; a rank that ran out yields zero-loss padding batches
  (``num_loss_tokens == 0``, ``n_real_segments == 0``) until every rank is done. No data dropped.
- ``"precount"`` (default for ``world_size > 1`` without a process group): the count is
  :meth:`SeqpackLoader.steps_per_epoch` (max over ranks, from length indexes: seqpack.counting),
  and a rank pads up to it. Same result, no communication.
- ``"none"``: no padding (single process).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torchdata.stateful_dataloader import StatefulDataLoader

from seqpack.batch import VarlenBatch, padding_batch
from seqpack.config import load_config
from seqpack.ops import segments
from seqpack.pipeline import PipelineDataset, WorkerItem
from seqpack.stages import lookup_stage

# numba initializes its runtime on the first compiled call of a process (~0.3 s with warm caches): pay it
# when the loader is imported, not inside the first batch (workers forked later inherit it)
segments.warmup()


def _as_is(item: Any) -> Any:
    return item


class _CollateBatch:
    """The user's ``collate_fn`` applied to the batch inside a :class:`WorkerItem` (a class, so it
    pickles under the ``spawn`` start method)."""

    def __init__(self, fn: Callable[[Any], Any]):
        self.fn = fn

    def __call__(self, item: WorkerItem) -> WorkerItem:
        return item._replace(batch=self.fn(item.batch))


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
        # with workers, each batch comes with its worker's counters (see stats())
        self.dataset = PipelineDataset(cfg, rank, world_size, num_workers, with_stats=num_workers > 0)
        dataloader_kwargs["worker_init_fn"] = _WorkerInit(dataloader_kwargs.get("worker_init_fn"))
        # items are finished batches: skip default_convert's type probing (~10 us per batch)
        collate = dataloader_kwargs.get("collate_fn")
        dataloader_kwargs["collate_fn"] = _as_is if collate is None else collate
        if collate is not None and num_workers > 0:
            dataloader_kwargs["collate_fn"] = _CollateBatch(collate)
        if dataloader_kwargs.pop("persistent_workers", False):
            raise ValueError("persistent_workers is not supported: workers read the epoch when they start")
        with warnings.catch_warnings():
            # torchdata's constructor calls torch's deprecated set_vital: harmless, and printed per loader
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
            self._dl = StatefulDataLoader(
                self.dataset, batch_size=None, num_workers=num_workers, **dataloader_kwargs
            )
        mode = cfg.get("even_batches", "auto")
        if mode == "auto":
            dist_on = dist.is_available() and dist.is_initialized()
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
        # worker id -> that worker's chain counters as of its latest batch (num_workers > 0)
        self._worker_stats: dict[int, dict[str, Any]] = {}

    # ---------------------------------------------------------------- counts
    def steps_per_epoch(self, epoch: int | None = None) -> int:
        """Batches every rank yields in ``epoch`` (default: the current one), padding included.

        Exact: every rank's chains run on document lengths from cached length indexes
        (:mod:`seqpack.counting`; one tokenizing pass per source when an index is first built;
        cached per epoch). With ``even_batches="none"`` it is this rank's count.
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

    def _next_real(self, it: Iterator[Any]) -> Any:
        """The next batch of this rank's DataLoader (StopIteration at the end), its counters noted."""
        item = next(it)
        if isinstance(item, WorkerItem):
            self._worker_stats[item.worker_id] = item.stats
            return item.batch
        return item

    def __iter__(self) -> Iterator[Any]:
        self.dataset.epoch = self.epoch
        if self._between_epochs:
            self._worker_stats = {}
        self._between_epochs = False
        it = None if self._real_done else iter(self._dl)
        while True:
            batch, has = None, False
            if it is not None:
                try:
                    batch, has = self._next_real(it), True
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
            "worker_stats": {w: dict(st) for w, st in self._worker_stats.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch, self._step = int(state["epoch"]), int(state["step"])
        self._real_done, self._padded = bool(state["real_done"]), int(state["padded"])
        self.dataset.epoch = self.epoch
        self._between_epochs = state["dataloader"] is None
        # absent in checkpoints of seqpack <= 0.x: counters then restart from the next batches
        self._worker_stats = {int(w): dict(st) for w, st in state.get("worker_stats", {}).items()}
        if not self._between_epochs:
            self._dl.load_state_dict(state["dataloader"])

    def stats(self) -> dict[str, Any]:
        """Counters of this rank (reads, skips, tokens per source, stage counters), summed over workers.

        With workers the counts are those each worker reported with its latest batch.
        """
        out: dict[str, Any] = {"loader/padding_batches": self._padded}
        if self.num_workers == 0:
            out.update(self.dataset.stats())
            return out
        for stats in self._worker_stats.values():
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
    dist_on = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if dist_on else 1
    if rank is None:
        rank = dist.get_rank() if dist_on else 0
    return SeqpackLoader(cfg, rank=rank, world_size=world_size, num_workers=num_workers, **dataloader_kwargs)
