"""Maximum-length schedules (sequence-length warmup, Li et al.; DeepSpeed ``curriculum_learning`` with
``curriculum_type: seqlen``): :class:`SeqlenSchedule` maps progress ``t`` to a maximum length.

The seqlen stage (``seqpack.stages.seqlen``) applies a schedule to a document stream; the
decompose and bucket stages use one as a cap on the buckets they may draw.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from seqpack.checks import check_choice, check_int, check_keys, check_mapping

SCHEDULE_TYPES = ("fixed_linear", "fixed_root", "fixed_discrete")
# how the seqlen stage applies the length: pack to capacity L, cut rows to L, or regroup into rows of L
LENGTH_MODES = ("pack", "truncate", "reshape")
SCHEDULE_KEYS = ("min_difficulty", "max_difficulty", "schedule_type", "schedule_config", "mode")
SCHEDULE_CONFIG_KEYS = ("total_curriculum_step", "difficulty_step", "root_degree", "difficulty", "max_step")


@dataclass
class SeqlenSchedule:
    """Maximum sequence length as a function of progress ``t`` (DeepSpeed ``seqlen`` curriculum keys).

    ``fixed_root``: ``d = floor((t/T)^(1/root_degree) * (max-min) + min)``, ``d -= d % difficulty_step``,
    ``d = min(d, max)`` with ``T = total_curriculum_step``; ``fixed_linear`` is ``root_degree = 1``;
    ``fixed_discrete``: ``difficulty[i]`` while ``t <= max_step[i]``, then the last difficulty
    (``max_step`` is one shorter than ``difficulty``). ``t`` is in steps or tokens (see ``progress``).
    ``min_difficulty`` must be a multiple of ``difficulty_step`` so rounding never goes below it.
    """

    min_difficulty: int = 0
    max_difficulty: int = 0
    schedule_type: str = "fixed_linear"
    total_curriculum_step: int | None = None
    difficulty_step: int = 1
    root_degree: int = 1
    difficulty: list[int] = field(default_factory=list)
    max_step: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        where = "curriculum.seqlen"
        check_choice(self.schedule_type, f"{where}.schedule_type", SCHEDULE_TYPES)
        if self.schedule_type == "fixed_discrete":
            if not self.difficulty or any(int(d) <= 0 for d in self.difficulty):
                raise ValueError(
                    f"{where}.schedule_config.difficulty: a non-empty list of positive lengths, "
                    f"got {self.difficulty}"
                )
            if len(self.max_step) != len(self.difficulty) - 1:
                raise ValueError(
                    f"{where}.schedule_config.max_step: needs len(difficulty)-1 = {len(self.difficulty) - 1} "
                    f"entries, got {len(self.max_step)}"
                )
            if any(b <= a for a, b in zip(self.max_step, self.max_step[1:])):
                raise ValueError(
                    f"{where}.schedule_config.max_step: must be strictly increasing, got {self.max_step}"
                )
            return
        for key in ("min_difficulty", "max_difficulty", "difficulty_step", "root_degree"):
            sub = "schedule_config." if key in ("difficulty_step", "root_degree") else ""
            check_int(getattr(self, key), f"{where}.{sub}{key}", 1)
        if self.max_difficulty < self.min_difficulty:
            raise ValueError(
                f"{where}.max_difficulty ({self.max_difficulty}) must be >= "
                f"min_difficulty ({self.min_difficulty})"
            )
        if self.min_difficulty % self.difficulty_step:
            raise ValueError(
                f"{where}.min_difficulty ({self.min_difficulty}) must be a multiple of "
                f"schedule_config.difficulty_step ({self.difficulty_step})"
            )
        if self.total_curriculum_step is None or self.total_curriculum_step <= 0:
            raise ValueError(
                f"{where}.schedule_config.total_curriculum_step: must be a positive number, "
                f"got {self.total_curriculum_step!r}"
            )
        if self.schedule_type == "fixed_linear" and self.root_degree != 1:
            raise ValueError(
                f"{where}.schedule_config.root_degree: fixed_linear means 1, got {self.root_degree}"
            )

    @property
    def peak(self) -> int:
        """The longest length the schedule ever returns."""
        return max(self.difficulty) if self.schedule_type == "fixed_discrete" else int(self.max_difficulty)

    def __call__(self, t: float) -> int:
        if self.schedule_type == "fixed_discrete":
            for d, until in zip(self.difficulty, self.max_step):
                if t <= until:
                    return int(d)
            return int(self.difficulty[-1])
        frac = (max(float(t), 0.0) / self.total_curriculum_step) ** (1.0 / self.root_degree)
        d = math.floor(frac * (self.max_difficulty - self.min_difficulty) + self.min_difficulty)
        d -= d % self.difficulty_step
        return int(min(d, self.max_difficulty))

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> SeqlenSchedule:
        """From DeepSpeed-style keys: ``min_difficulty``, ``max_difficulty``, ``schedule_type``,
        ``schedule_config: {total_curriculum_step, difficulty_step, root_degree, difficulty, max_step}``
        (``mode`` is the seqlen stage's and is ignored here)."""
        where = "curriculum.seqlen"
        check_keys(cfg, SCHEDULE_KEYS, where)
        sc = check_mapping(cfg.get("schedule_config") or {}, f"{where}.schedule_config")
        check_keys(sc, SCHEDULE_CONFIG_KEYS, f"{where}.schedule_config")
        stype = cfg.get("schedule_type", "fixed_linear")
        return cls(
            min_difficulty=cfg.get("min_difficulty", 0 if stype == "fixed_discrete" else None),
            max_difficulty=cfg.get("max_difficulty", 0 if stype == "fixed_discrete" else None),
            schedule_type=stype,
            total_curriculum_step=sc.get("total_curriculum_step"),
            difficulty_step=sc.get("difficulty_step", 1),
            root_degree=sc.get("root_degree", 1),
            difficulty=list(sc.get("difficulty", [])),
            max_step=list(sc.get("max_step", [])),
        )
