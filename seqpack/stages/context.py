"""What a stage factory is given: :class:`StageContext` (where it runs) and :class:`StageEntry`.

Kept apart from the registry in ``stages/__init__.py`` so that stage modules can name these types
without importing every other stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torchdata.nodes import BaseNode


@dataclass
class StageContext:
    """What a stage factory knows about where it runs.

    Attributes:
        rank, world_size: data-parallel position.
        worker_id, num_workers: DataLoader worker (``num_workers`` is at least 1 here).
        consumer, n_consumers: ``rank * num_workers + worker_id`` and ``world_size * num_workers``;
            records are partitioned over consumers, so a stage sees only its consumer's documents.
        epoch, seed: epoch number and the config's global seed (mix both into any RNG).
        pad_id, bos_id, eos_id, vocab_size: from the tokenizer.
        config: the whole validated config (for sections such as ``curriculum``).
        build_chain: ``build_chain(cfg, ctx) -> node``, the pipeline's chain builder, for transforms
            that need another consumer's chain (the loader passes :func:`seqpack.pipeline.build_chain`).
    """

    rank: int
    world_size: int
    worker_id: int
    num_workers: int
    epoch: int
    seed: int
    pad_id: int
    bos_id: int | None
    eos_id: int | None
    vocab_size: int
    config: dict = field(repr=False, default_factory=dict)
    build_chain: Callable[[dict, StageContext], BaseNode] | None = field(repr=False, default=None)

    @property
    def consumer(self) -> int:
        return self.rank * self.num_workers + self.worker_id

    @property
    def n_consumers(self) -> int:
        return self.world_size * self.num_workers


StageFactory = Callable[[BaseNode, dict, StageContext], BaseNode]
PaddingFactory = Callable[[dict, StageContext, Any], Any]
ConfigValidator = Callable[[dict, "str | None"], dict]


@dataclass
class StageEntry:
    """One registered stage: how to build it, its padding batch, its config check."""

    factory: StageFactory
    padding: PaddingFactory | None = None
    # validate(cfg, base_dir) -> cfg: checks the stage's keys when the config is loaded
    validate: ConfigValidator | None = None
    # False: the stage reads cfg["sources"] itself (e.g. feature bags); the factory gets docs=None
    documents: bool = True
