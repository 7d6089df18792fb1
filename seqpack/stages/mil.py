"""PackMIL as a loader stage: ``stage: {type: mil, ...}`` in a :func:`seqpack.build_loader` config.

::

    sources: [{path: feats/, key: features}]     # feature bags: dirs, .tar shards, .safetensors, files
    labels: {path: labels.csv, id_column: slide_id}
    stage: {type: mil, capacity: 600, packs_per_batch: 8, main_fraction: 0.4}
    shuffle: {seed: 0}
    dtype: float32

The keys are those of :class:`seqpack.mil.PackMIL` (see :mod:`seqpack.mil.config`; old ``pack_len``
and ``pad`` keep working one release as ``capacity`` and ``pad_to``). The stage reads its own
sources (feature bags, not text), so the loader builds no readers for it (``documents=False``).
Rank sharding and resume follow the text loader: each of the ``world_size * num_workers`` consumers
takes every ``n``-th main batch of the epoch's global plan (:meth:`PackMIL.plan_epoch`, the same on
every rank), starting at its own index; the last round's missing batches are fillers
(``loss_scale == 0``, counted in ``mil/padding_batches``), so every consumer yields the same count
and DDP never hangs. The node state is the round reached (plus the stage's counters), so
``SeqpackLoader.load_state_dict`` continues batch for batch.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from seqpack.checks import ConfigError, check_choice
from seqpack.mil.batch import MILBatch
from seqpack.mil.config import DTYPES, check_labels, check_sources, check_stage
from seqpack.mil.packmil import PackMIL, mil_stage_from_config
from seqpack.node import Node
from seqpack.stages.context import StageContext

# PackMIL keys the loader decides itself: one loader iteration is one epoch, ranks come from the loader
LOADER_OWNED = ("num_epochs",)


class MILStage(Node[MILBatch]):
    """One consumer's share of a PackMIL epoch.

    Args:
        mil: the stage (built with ``rank=0, world_size=1``: sharding is done here).
        epoch: the loader's epoch (selects the plan and the sampling).
        consumer, n_consumers: this consumer's index among ``world_size * num_workers``.
        report_screen: report the slides skipped when the stage opens (empty bag, missing label);
            every consumer sees them, so only one consumer per rank should, for summed stats.
    """

    def __init__(self, mil: PackMIL, epoch: int, consumer: int, n_consumers: int, report_screen: bool = True):
        super().__init__()
        self.report_screen = report_screen
        self.mil, self.epoch = mil, int(epoch)
        self.consumer, self.n_consumers = int(consumer), int(n_consumers)

    def rounds(self) -> int:
        """Batches this consumer yields in the epoch (the same for every consumer)."""
        return -(-self.mil.plan_epoch(self.epoch).n_real // self.n_consumers)

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self._round = 0
        if initial_state is not None:
            if int(initial_state["epoch"]) != self.epoch:
                raise ValueError(
                    f"state is for epoch {initial_state['epoch']}, this stage runs epoch {self.epoch}"
                )
            self.mil.load_state_dict(initial_state["mil"])  # checks seed / capacity / slide count
            self._round = int(initial_state["round"])

    def next(self) -> MILBatch:
        plan = self.mil.plan_epoch(self.epoch)
        if self._round >= self.rounds():
            raise StopIteration
        g = self._round * self.n_consumers + self.consumer
        batch = self.mil.build_batch(self.epoch, g % plan.n_real, filler=g >= plan.n_real)
        self._round += 1
        return batch

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "round": self._round, "mil": self.mil.state_dict()}

    def own_stats(self) -> dict[str, Any]:
        screen = ("skipped_empty", "skipped_missing_label")
        stats = self.mil.stats
        return {f"mil/{k}": (0 if k in screen and not self.report_screen else v) for k, v in stats.items()}


def _resolve(path, base_dir: str | None):
    if base_dir is None:
        return path
    if isinstance(path, list):
        return [_resolve(p, base_dir) for p in path]
    p = os.fspath(path)
    return p if os.path.isabs(p) else os.path.join(base_dir, p)


def validate(cfg: dict, base_dir: str | None = None) -> dict:
    """Check the stage keys (errors name the key), rename old keys (DeprecationWarning) and resolve
    relative paths against the config file's folder. Feature files are opened when the loader starts."""
    stage = check_stage(cfg["stage"])
    for key in LOADER_OWNED:
        if key in stage:
            raise ConfigError(
                f"stage.{key}: not used with build_loader (each pass over the loader is one epoch); remove it"
            )
    check_choice(cfg.get("dtype", "float32"), "dtype", DTYPES)
    sources = [{**s, "path": _resolve(s["path"], base_dir)} for s in check_sources(cfg.get("sources"))]
    out = {**cfg, "stage": {"type": "mil", **stage}, "sources": sources}
    labels = check_labels(cfg.get("labels"))
    if labels:
        out["labels"] = {**labels, "path": _resolve(labels["path"], base_dir)}
    return out


def factory(docs: None, stage: dict, ctx: StageContext) -> MILStage:
    """PackMIL from the whole config (``ctx.config``), sharded over the loader's consumers."""
    cfg = dict(ctx.config)
    shuffle = cfg.get("shuffle")
    if "seed" not in stage and not (isinstance(shuffle, Mapping) and "seed" in shuffle):
        stage = {**stage, "seed": ctx.seed}
    mil = mil_stage_from_config({**cfg, "stage": stage}, rank=0, world_size=1)
    return MILStage(mil, ctx.epoch, ctx.consumer, ctx.n_consumers, report_screen=ctx.worker_id == 0)


def padding(stage: dict, ctx: StageContext, last: Any) -> MILBatch:
    """A zero-loss copy of the last batch (ranks never run short here; this is a safety net)."""
    if not isinstance(last, MILBatch):
        raise RuntimeError("the mil stage has no batch to pad with (this rank yielded none)")
    res = None if last.residual is None else dataclasses.replace(last.residual, loss_scale=0.0)
    return dataclasses.replace(last, loss_scale=0.0, residual=res)
