"""The loader: config -> one chain per (rank, worker) -> torch DataLoader -> batches of one rank.

The chain of each consumer is :mod:`seqpack.pipeline`'s; this module adds the ranks, the
DataLoader workers, equal step counts over ranks and the loader state.

Workers: each batch crosses the worker boundary as ONE flat buffer (:mod:`seqpack.wire`), copied
into the worker's shared-memory ring (:mod:`seqpack.ring`), with the worker's chain state every few
batches (:data:`seqpack.pipeline.SNAPSHOT_RATIO`) and how many batches it made since; a DataLoader
item is a list of about 1 MB of one worker's batches. The main process takes each batch out of its
ring, rebuilds it as views and keeps every worker's latest state, so a checkpoint costs no round
trip to the workers.

Exact resume: ``loader.state_dict()`` holds each logical worker's chain state (reader positions,
tokenizer batch cursor, mixture counters, shuffle buffer and RNG, stage buffer; buffered documents
by reference, see :mod:`seqpack.arena`), whose batch is next, the epoch and the step inside it;
``load_state_dict`` continues token for token. It also takes the list of every old rank's state
for another world size / ``num_workers`` (elastic, :mod:`seqpack.loader_state`).

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
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from seqpack.batch import VarlenBatch, accelerator_available, padding_batch
from seqpack.config import load_config
from seqpack.loader_state import check_state, merge_states
from seqpack.ops import segments
from seqpack.pipeline import PipelineDataset
from seqpack.ring import RING_BYTES, make_rings, pinned_bytes, receive
from seqpack.stages import lookup_stage
from seqpack.wire import WireItem, decode_batch, load_state_bytes, state_bytes, widen_worker_pipe

# numba initializes its runtime on the first compiled call of a process (~0.3 s with warm caches): pay it
# when the loader is imported, not inside the first batch (workers forked later inherit it)
segments.warmup()


def _as_is(item: Any) -> Any:
    return item


class _WorkerInit:
    """Worker init (a class so it pickles under ``spawn``): the worker's tokenizer threads, then the
    user's ``worker_init_fn``. Threads: ``cpus // (workers * LOCAL_WORLD_SIZE)`` when
    ``TOKENIZERS_PARALLELISM`` is unset, else (or when that is 1) one; why and why it is fork-safe:
    :mod:`seqpack.sources.tokenize`."""

    def __init__(self, user_fn: Callable[[int], None] | None):
        self.user_fn = user_fn

    @staticmethod
    def tokenizer_env(num_workers: int, cpus: int, environ: Mapping[str, str]) -> dict[str, str]:
        """The variables to set in one of ``num_workers`` workers on ``cpus`` cores (env ``environ``)."""
        ranks = environ.get("LOCAL_WORLD_SIZE", "1")
        threads = cpus // (max(1, num_workers) * (max(1, int(ranks)) if ranks.isdigit() else 1))
        if "TOKENIZERS_PARALLELISM" in environ or threads <= 1:
            return {"TOKENIZERS_PARALLELISM": "false"}
        return {} if "RAYON_NUM_THREADS" in environ else {"RAYON_NUM_THREADS": str(threads)}

    def __call__(self, worker_id: int) -> None:
        info = torch.utils.data.get_worker_info()
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        # os.environ writes through to the C environment, which tokenizers' Rust code reads
        os.environ.update(self.tokenizer_env(info.num_workers if info is not None else 1, cpus, os.environ))
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
        # with workers, each batch comes as one flat buffer with its worker's state and counters
        self.dataset = PipelineDataset(
            cfg,
            rank,
            world_size,
            num_workers,
            wire=num_workers > 0,
            collate=dataloader_kwargs.pop("collate_fn", None),
        )
        dataloader_kwargs["worker_init_fn"] = _WorkerInit(dataloader_kwargs.get("worker_init_fn"))
        if dataloader_kwargs.pop("persistent_workers", False):
            raise ValueError("persistent_workers is not supported: workers read the epoch when they start")
        if dataloader_kwargs.pop("snapshot_every_n_steps", None) is not None:
            warnings.warn(
                "snapshot_every_n_steps is ignored: every batch carries its worker's state (by reference, "
                "a few bytes per buffered document), so there is nothing to snapshot",
                DeprecationWarning,
                stacklevel=3,
            )
        # with workers the batch is rebuilt here from its buffer, so pinning happens here too
        self._pin = bool(num_workers > 0 and dataloader_kwargs.pop("pin_memory", False))
        # in process without pinning the DataLoader adds only per-batch overhead (a profiler
        # record_function per batch): iterate the dataset itself
        self._direct = num_workers == 0 and not dataloader_kwargs.get("pin_memory", False)
        # items are finished batches: the identity collate skips default_convert's type probing
        self._dl = torch.utils.data.DataLoader(
            self.dataset, batch_size=None, num_workers=num_workers, collate_fn=_as_is, **dataloader_kwargs
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
        # logical worker id -> that worker's chain counters as of its latest batch (num_workers > 0)
        self._worker_stats: dict[int, dict[str, Any]] = {}
        # logical worker id -> pickled chain state after its latest batch; the worker whose turn is next
        self._worker_bytes: dict[int, bytes] = {}
        self._worker_skips: dict[int, int] = {}  # batches made after that state
        self._next_worker = 0
        self._ring_bytes = RING_BYTES  # 0 once shared memory was refused (warned once, then the pipe)
        # the rest of the list of batches the DataLoader handed over last (seqpack.wire.grouped)
        self._pending: deque[WireItem] = deque()
        self._alloc: Callable[[int], Any] | None = None

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
        if self._pending:
            item = self._pending.popleft()
        else:
            item = next(it)
            if self.num_workers > 0:  # a list of one worker's batches (seqpack.wire.grouped)
                self._pending.extend(item[1:])
                item = item[0]
        if isinstance(item, WireItem):
            item = receive(item, self.dataset.rings, self._alloc)
            w = item.worker_id
            if item.stats is not None:  # sent with states and with a worker's last batch
                self._worker_stats[w] = item.stats
            raw = state_bytes(item)
            if raw is not None:
                self._worker_bytes[w] = raw
            self._worker_skips[w] = item.skip
            # the DataLoader moves to the next worker once this worker's list is used up
            self._next_worker = w if self._pending else (w + 1) % self.num_workers
            batch = decode_batch(item)
            if self._alloc is not None and item.layout[0] != "object":
                return batch  # its tensors are views of one pinned buffer already
            return batch.pin_memory() if self._pin and hasattr(batch, "pin_memory") else batch
        return item

    def __iter__(self) -> Iterator[Any]:
        self.dataset.epoch = self.epoch
        if self._between_epochs:
            self._worker_stats, self._worker_bytes, self._worker_skips, self._next_worker = {}, {}, {}, 0
            self.dataset.worker_states = [None] * self.dataset.num_workers
            self.dataset.worker_skips = [0] * self.dataset.num_workers
            self.dataset.rotation = 0
            self.dataset.first_group = [0] * self.dataset.num_workers
        self._between_epochs = False
        if self.num_workers > 0 and not self._real_done:
            # fresh rings for this iterator's workers (an older iterator's may still be running)
            self.dataset.rings = make_rings(self.num_workers, self._ring_bytes)
            if self.dataset.rings is None:
                self._ring_bytes = 0  # refused (warned once): the pipe from now on
        self._pending.clear()
        # pinning with workers: each batch is taken out of its ring straight into one pinned buffer
        self._alloc = pinned_bytes if self._pin and accelerator_available() else None
        it = None if self._real_done else iter(self.dataset if self._direct else self._dl)
        if it is not None and self.num_workers > 0:
            widen_worker_pipe(it)  # whole batches per pipe write (seqpack.wire)
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
        self.dataset.worker_states = [None] * self.dataset.num_workers
        self.dataset.worker_skips = [0] * self.dataset.num_workers
        self.dataset.rotation = 0
        self.dataset.first_group = [0] * self.dataset.num_workers

    # ---------------------------------------------------------------- state
    def _chain_states(self) -> list[dict | None]:
        """Each logical worker's chain state now (None: it has not yielded yet this epoch)."""
        if self.num_workers == 0:
            live = self.dataset.live_state()
            return [live if live is not None else self.dataset.worker_states[0]]
        states = list(self.dataset.worker_states)
        for w, raw in self._worker_bytes.items():
            states[w] = load_state_bytes(raw)
        return states

    def _skips(self) -> list[int]:
        """Per logical worker, the batches it made after its state in ``workers`` (remade on resume)."""
        skips = list(self.dataset.worker_skips)
        for w, k in self._worker_skips.items():
            skips[w] = k
        return skips

    def state_dict(self) -> dict:
        """Everything needed to continue exactly here (plain Python types and tensors).

        ``workers``: each logical worker's chain state (buffered documents by reference, see
        :mod:`seqpack.arena`), None between epochs; ``skip``: per worker, the batches it made after
        that state (workers send their state only every few batches, see
        :data:`seqpack.pipeline.SNAPSHOT_RATIO`; a resume remakes them unsent); ``next_worker``:
        whose batch comes next; ``epoch_steps``: this epoch's ``steps_per_epoch()`` when known (an
        elastic resume's epoch has its own count, which a later resume must keep).
        ``rank``/``world_size``/``num_workers`` name the topology, so a list of every rank's state
        can be re-partitioned over another one (:meth:`load_state_dict`).
        """
        between = self._between_epochs
        return {
            "version": 2,
            "epoch": self.epoch,
            "step": self._step,
            "real_done": self._real_done,
            "padded": self._padded,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "workers": None if between else self._chain_states(),
            "skip": None if between else self._skips(),
            "next_worker": 0 if between else self._next_worker,
            "epoch_steps": None if between else self._steps_cache.get(self.epoch),
            # batches of next_worker's current list not delivered yet: its first list on resume
            "group_left": 0 if between else len(self._pending),
            "worker_stats": {w: dict(st) for w, st in self._worker_stats.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
        """Continue from ``state``: this rank's ``state_dict()`` (same world size and num_workers:
        token-identical), or the list of EVERY old rank's state (any old world size and
        num_workers: elastic, each not-yet-delivered document delivered exactly once over the new
        ranks, see :mod:`seqpack.loader_state`). ValueError says why a state cannot be loaded."""
        if not isinstance(state, Mapping):
            state = merge_states(list(state), self)
        state = check_state(state, self)
        self.epoch, self._step = int(state["epoch"]), int(state["step"])
        if state.get("epoch_steps") is not None:  # this epoch's own count (elastic resume: seqpack.elastic)
            self._steps_cache[self.epoch] = int(state["epoch_steps"])
        self._real_done, self._padded = bool(state["real_done"]), int(state["padded"])
        self.dataset.epoch = self.epoch
        self._between_epochs = state["workers"] is None
        self._worker_stats = {int(w): dict(st) for w, st in state.get("worker_stats", {}).items()}
        self._worker_bytes, self._worker_skips = {}, {}
        skips = state.get("skip")
        self.dataset.worker_skips = (
            [0] * self.dataset.num_workers if skips is None else [int(k) for k in skips]
        )
        workers = [None] * self.dataset.num_workers if self._between_epochs else list(state["workers"])
        self._next_worker = int(state.get("next_worker", 0))
        self.dataset.worker_states = workers
        self.dataset.rotation = 0 if self._between_epochs else self._next_worker
        left = state.get("group_left", 0)
        if not isinstance(left, int) or left < 0:
            raise ValueError(f"loader state: group_left={left!r} must be an int >= 0")
        self.dataset.first_group = [0] * self.dataset.num_workers
        if left and not self._between_epochs:
            self.dataset.first_group[self._next_worker] = left

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
        **dataloader_kwargs: passed to ``torch.utils.data.DataLoader`` (``pin_memory``,
            ``prefetch_factor``: lists of batches, ~1 MB each, per worker in flight,
            ``multiprocessing_context``, ``worker_init_fn``, ...).
    """
    cfg = load_config(config)
    dist_on = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if dist_on else 1
    if rank is None:
        rank = dist.get_rank() if dist_on else 0
    return SeqpackLoader(cfg, rank=rank, world_size=world_size, num_workers=num_workers, **dataloader_kwargs)
