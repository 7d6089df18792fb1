"""PackMIL as a loader stage: ``stage: {type: mil, ...}`` in a :func:`seqpack.build_loader` config.

::

    sources: [{path: feats/, key: features}]     # feature bags: dirs, .tar shards, .safetensors, files
    labels: {path: labels.csv, id_column: slide_id}
    stage: {type: mil, pack_len: 600, packs_per_batch: 8, main_fraction: 0.4}
    shuffle: {seed: 0}
    dtype: float32

The stage reads its own sources (feature bags, not text), so the loader builds no readers for it
(``register_stage(..., documents=False)``). Rank sharding and resume follow the text loader: each
of the ``world_size * num_workers`` consumers takes every ``n``-th main batch of the epoch's global
plan (:meth:`PackMIL.plan_epoch`, the same on every rank), starting at its own index; the last
round's missing batches are fillers (``loss_scale == 0``, counted in ``mil/padding_batches``), so every
consumer yields the same count and DDP never hangs. The node state is the round reached (plus the
stage's counters), so ``SeqpackLoader.load_state_dict`` continues batch for batch.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from seqpack.node import Node
from seqpack.stages.mil import STAGE_KEYS, MILBatch, PackMIL, mil_stage_from_config

# PackMIL keys the loader decides itself: one loader iteration is one epoch, ranks come from the loader
LOADER_OWNED = ("num_epochs",)


class MILStage(Node[MILBatch]):
    """One consumer's share of a PackMIL epoch.

    Args:
        mil: the stage (built with ``rank=0, world_size=1``: sharding is done here).
        epoch: the loader's epoch (selects the plan and the sampling).
        consumer, n_consumers: this consumer's index among ``world_size * num_workers``.
    """

    def __init__(self, mil: PackMIL, epoch: int, consumer: int, n_consumers: int, report_screen: bool = True):
        super().__init__()
        # slides skipped when the stage opens (empty bag, missing label) are a fact of the dataset that
        # every consumer sees; only one consumer per rank reports them, so summed stats count them once
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
            self.mil.load_state_dict(initial_state["mil"])  # checks seed / pack_len / slide count
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


def validate_mil_config(cfg: dict, base_dir: str | None = None) -> dict:
    """Check the stage keys (errors name the key and the allowed keys) and resolve relative paths
    against the config file's folder. Feature files are opened only when the loader starts."""
    stage = dict(cfg["stage"])
    unknown = sorted(set(stage) - {"type", *STAGE_KEYS})
    if unknown:
        raise ValueError(f"stage: unknown keys {unknown} for type 'mil' (allowed: {list(STAGE_KEYS)})")
    for key in LOADER_OWNED:
        if key in stage:
            raise ValueError(
                f"stage.{key}: not used with build_loader (each pass over the loader is one epoch); remove it"
            )
    pack_len = stage.get("pack_len")
    if isinstance(pack_len, bool) or not isinstance(pack_len, int) or pack_len <= 0:
        raise ValueError(f"stage.pack_len: expected a positive integer, got {pack_len!r}")
    if cfg.get("dtype", "float32") not in (None, "float32", "float16", "bfloat16", "float64"):
        raise ValueError(
            f"dtype: {cfg['dtype']!r} not allowed; allowed: 'float32', 'float16', 'bfloat16', 'float64', null"
        )
    sources = []
    for i, s in enumerate(cfg["sources"]):
        s = {"path": s} if isinstance(s, (str, os.PathLike)) else dict(s) if isinstance(s, Mapping) else s
        if not isinstance(s, dict) or "path" not in s:
            raise ValueError(f"sources[{i}]: expected a path or a mapping with 'path', got {s!r}")
        unknown = sorted(set(s) - {"path", "key", "recursive"})
        if unknown:
            raise ValueError(
                f"sources[{i}]: unknown keys {unknown} for feature bags "
                "(allowed: ['path', 'key', 'recursive'])"
            )
        s["path"] = _resolve(s["path"], base_dir)
        sources.append(s)
    out = {**cfg, "sources": sources}
    labels = cfg.get("labels")
    if labels:
        labels = {"path": labels} if isinstance(labels, (str, os.PathLike)) else dict(labels)
        if "path" not in labels:
            raise ValueError(f"labels: expected a path or a mapping with 'path', got {cfg['labels']!r}")
        labels["path"] = _resolve(labels["path"], base_dir)
        out["labels"] = labels
    return out


def mil_factory(docs: None, stage: dict, ctx) -> MILStage:
    """Loader factory: PackMIL from the whole config, sharded over the loader's consumers."""
    cfg = dict(ctx.config)
    if "seed" not in stage and not (isinstance(cfg.get("shuffle"), Mapping) and "seed" in cfg["shuffle"]):
        stage = {**stage, "seed": ctx.seed}
    mil = mil_stage_from_config({**cfg, "stage": stage}, rank=0, world_size=1)
    return MILStage(mil, ctx.epoch, ctx.consumer, ctx.n_consumers, report_screen=ctx.worker_id == 0)


def mil_padding(stage: dict, ctx, last: Any) -> MILBatch:
    """A zero-loss copy of the last batch (ranks never run short here; this is a safety net)."""
    if not isinstance(last, MILBatch):
        raise RuntimeError("the mil stage has no batch to pad with (this rank yielded none)")
    res = None if last.residual is None else dataclasses.replace(last.residual, loss_scale=0.0)
    return dataclasses.replace(last, loss_scale=0.0, residual=res)
