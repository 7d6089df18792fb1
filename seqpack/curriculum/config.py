"""The ``curriculum:`` section of a loader config: keys, checks (errors name the key), file loading.

Keys: ``progress`` (steps|tokens), ``tokens_per_step``, ``seed``, ``decompose`` {min_log2, max_log2,
overlong: random|cap, remainder: drop|emit, pad_to: null|int|max}, ``buckets`` {odds: name or list,
n_cycles, weighting: odds|odds_by_mass, table: [{at, odds}]}, ``boundaries`` (plain length
bucketing), ``seqlen`` {DeepSpeed keys + mode: pack|truncate|reshape}.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from seqpack.checks import (
    ConfigError,
    check_choice,
    check_int,
    check_keys,
    check_mapping,
    check_pad_to,
    choices,
    read_config_file,
    upgrade_pad_flag,
)
from seqpack.curriculum.odds import NAMED_ODDS, PROGRESS_UNITS, BucketCurriculum, check_odds
from seqpack.curriculum.schedule import LENGTH_MODES, SeqlenSchedule
from seqpack.plan.decompose import OVERLONG_POLICIES, REMAINDER_POLICIES, check_log2_range

TOP_KEYS = ("progress", "tokens_per_step", "seed", "decompose", "buckets", "boundaries", "seqlen")
DECOMPOSE_KEYS = ("min_log2", "max_log2", "overlong", "remainder", "pad_to")
BUCKETS_KEYS = ("odds", "n_cycles", "weighting", "table")


def upgrade_curriculum_section(raw: Mapping[str, Any] | None) -> dict:
    """A copy of a ``curriculum:`` section with deprecated keys renamed (each warns once, here)."""
    out = dict(check_mapping(raw or {}, "curriculum"))
    if isinstance(out.get("decompose"), Mapping):
        out["decompose"] = upgrade_pad_flag(dict(out["decompose"]), "pad_to_fixed", "curriculum.decompose")
    return out


@dataclass
class DecomposeConfig:
    """``curriculum.decompose``: see :func:`seqpack.plan.decompose.decompose_lengths`."""

    min_log2: int = 8
    max_log2: int = 13
    overlong: str = "random"
    remainder: str = "drop"
    pad_to: int | str | None = None


@dataclass
class CurriculumConfig:
    """The validated ``curriculum:`` section."""

    progress: str = "steps"
    tokens_per_step: int | None = None
    seed: int = 0
    decompose: DecomposeConfig | None = None
    buckets: BucketCurriculum | None = None
    boundaries: list[int] | None = None
    seqlen: SeqlenSchedule | None = None
    seqlen_mode: str = "pack"

    def to_dict(self) -> dict:
        return asdict(self)


def check_boundaries(b: Any, where: str) -> list[int]:
    """A non-empty strictly increasing list of positive integers."""
    if not isinstance(b, list) or not b:
        raise ConfigError(f"{where}: a non-empty list of positive integers, got {b!r}")
    for i, x in enumerate(b):
        check_int(x, f"{where}[{i}]", 1)
    if any(y <= x for x, y in zip(b, b[1:])):
        raise ConfigError(f"{where}: must be strictly increasing, got {b}")
    return list(b)


def _parse_decompose(d: Mapping, tokens_per_step: int | None) -> DecomposeConfig:
    w = "curriculum.decompose"
    d = check_mapping(d or {}, w)
    check_keys(d, DECOMPOSE_KEYS, w)
    dc = DecomposeConfig(
        min_log2=d.get("min_log2", 8),
        max_log2=d.get("max_log2", 13),
        overlong=check_choice(d.get("overlong", "random"), f"{w}.overlong", OVERLONG_POLICIES),
        remainder=check_choice(d.get("remainder", "drop"), f"{w}.remainder", REMAINDER_POLICIES),
        pad_to=d.get("pad_to"),
    )
    check_pad_to(dc.pad_to, f"{w}.pad_to", 1)  # the form; the stage checks it against its largest step
    check_log2_range(dc.min_log2, dc.max_log2, w)
    if tokens_per_step is not None and tokens_per_step % (1 << dc.max_log2):
        raise ConfigError(
            f"curriculum.tokens_per_step ({tokens_per_step}) must be divisible by the largest bucket "
            f"2^max_log2 = {1 << dc.max_log2}"
        )
    return dc


def _parse_buckets(bc: Mapping, progress: str, n_buckets: int | None) -> BucketCurriculum:
    w = "curriculum.buckets"
    bc = check_mapping(bc or {}, w)
    check_keys(bc, BUCKETS_KEYS, w)
    odds = bc.get("odds", "uniform")
    if not isinstance(odds, (str, list)):
        raise ConfigError(f"{w}.odds: a name ({choices(NAMED_ODDS)}) or a list of numbers, got {odds!r}")
    table = None
    if "table" in bc:
        if not isinstance(bc["table"], list):
            raise ConfigError(f"{w}.table: a list of {{at, odds}} rows, got {bc['table']!r}")
        table = []
        for r, row in enumerate(bc["table"]):
            if not isinstance(row, Mapping) or set(row) != {"at", "odds"}:
                raise ConfigError(
                    f"{w}.table[{r}]: each row needs exactly the keys 'at' and 'odds', got {row!r}"
                )
            table.append((float(row["at"]), list(row["odds"])))
    out = BucketCurriculum(
        odds=odds,
        n_cycles=bc.get("n_cycles", 1),
        weighting=bc.get("weighting", "odds"),
        table=table,
        progress=progress,
    )
    if n_buckets is not None:
        out.check(n_buckets)
    elif not isinstance(odds, str):
        check_odds(odds, len(odds), f"{w}.odds")
    return out


def parse_curriculum_config(cfg: Mapping[str, Any] | None) -> CurriculumConfig:
    """Validate the ``curriculum:`` section of a loader config (already parsed from YAML/TOML).

    Keys as in this module's docstring. Errors name the key and the allowed values; deprecated keys
    (``decompose.pad_to_fixed``) still work with a DeprecationWarning.
    """
    where = "curriculum"
    cfg = upgrade_curriculum_section(cfg)
    check_keys(cfg, TOP_KEYS, where)
    progress = check_choice(cfg.get("progress", "steps"), f"{where}.progress", PROGRESS_UNITS)
    out = CurriculumConfig(
        progress=progress,
        tokens_per_step=check_int(cfg.get("tokens_per_step"), f"{where}.tokens_per_step", 1, allow_none=True),
        seed=check_int(cfg.get("seed", 0), f"{where}.seed", 0),
    )
    if "decompose" in cfg:
        out.decompose = _parse_decompose(cfg["decompose"], out.tokens_per_step)
    if "boundaries" in cfg:
        out.boundaries = check_boundaries(cfg["boundaries"], f"{where}.boundaries")
    if "buckets" in cfg:
        n = None
        if out.decompose is not None:
            n = out.decompose.max_log2 - out.decompose.min_log2 + 1
        elif out.boundaries is not None:
            n = len(out.boundaries)
        out.buckets = _parse_buckets(cfg["buckets"], progress, n)
    if "seqlen" in cfg:
        s = check_mapping(cfg["seqlen"] or {}, f"{where}.seqlen")
        out.seqlen = SeqlenSchedule.from_config(s)
        out.seqlen_mode = check_choice(s.get("mode", "pack"), f"{where}.seqlen.mode", LENGTH_MODES)
    return out


def load_curriculum_config(path: str | os.PathLike) -> CurriculumConfig:
    """Read a loader config file (YAML, TOML or JSON, :func:`seqpack.checks.read_config_file`) and
    validate its ``curriculum:`` section; errors start with the file's path."""
    data = read_config_file(path)
    if "curriculum" not in data:
        raise ConfigError(f"{os.fspath(path)}: no 'curriculum:' section")
    try:
        return parse_curriculum_config(data["curriculum"])
    except ValueError as e:
        raise ConfigError(f"{os.fspath(path)}: {e}") from e
