"""The pack stage's config: its keys, the forms of ``pad_to``, and ``validate_pack_stage`` (the
registry's check of ``stage: {type: pack, ...}``, run when a loader config is loaded).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from seqpack.checks import (
    ConfigError,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_keys,
    rename_keys,
)
from seqpack.plan import PACK_OVERFLOW

STREAM_ALGORITHMS = ("online", "bfd", "ffd", "greedy")
PACK_KEYS = (
    "type",
    "capacity",
    "algorithm",
    "buffer_docs",
    "warmup_docs",
    "min_fill",
    "max_age",
    "overflow",
    "pad_to",
    "continue_positions",
    "seed",
    "max_segments_per_bin",
    "group_key",
    "bin_count_multiple",
)


def check_pad_to(
    pad_to: Any, capacity: int, max_segments: int | None = None, where: str = ""
) -> tuple[int | None, int | None, int | None]:
    """``(tokens, segments, max_segments)`` of a pack stage's ``pad_to``: None (no padding), an int
    (tokens, at least ``capacity``), ``"max"`` (``capacity``), or a fixed shape ``{tokens: T,
    segments: S}`` / ``(T, S)``, which needs ``capacity <= T - S + 1`` and ``max_segments <= S - 1``
    (its default). Errors (:class:`ConfigError`, a ValueError) name the key after ``where``."""
    if pad_to is None or pad_to == "max":
        return (None if pad_to is None else capacity), None, max_segments
    if isinstance(pad_to, Mapping):
        if set(pad_to) != {"tokens", "segments"}:
            raise ConfigError(f"{where}pad_to: expected {{tokens: T, segments: S}}, got {dict(pad_to)!r}")
        T, S = pad_to["tokens"], pad_to["segments"]
    elif isinstance(pad_to, (list, tuple)) and len(pad_to) == 2:
        T, S = pad_to
    elif isinstance(pad_to, str):
        raise ConfigError(
            f"{where}pad_to: expected an integer, 'max' or {{tokens, segments}}, got {pad_to!r}"
        )
    else:
        return check_int(pad_to, f"{where}pad_to", minimum=capacity), None, max_segments
    T = check_int(T, f"{where}pad_to.tokens", minimum=1)
    S = check_int(S, f"{where}pad_to.segments", minimum=1)
    if T < S:
        raise ConfigError(f"{where}pad_to: tokens ({T}) must be >= segments ({S})")
    if capacity > T - S + 1:
        raise ConfigError(
            f"{where}capacity: {capacity} leaves too few padding tokens for pad_to ({T} tokens, "
            f"{S} segments): use capacity <= tokens - segments + 1 = {T - S + 1}"
        )
    max_segments = S - 1 if max_segments is None else max_segments
    if max_segments > S - 1:
        raise ConfigError(
            f"{where}max_segments_per_bin: {max_segments} leaves no padding segment for pad_to "
            f"({S} segments): use at most segments - 1 = {S - 1}"
        )
    return T, S, max_segments


def validate_pack_stage(cfg: dict, base_dir: str | None) -> dict:
    """Check ``stage: {type: pack, ...}`` (errors name the key), normalize ``pad_to`` (None, an
    int or ``{tokens, segments}``) and give every source the stage's ``group_key``."""
    stage = rename_keys(dict(cfg["stage"]), {"pad_to_shape": "pad_to"}, "stage")
    check_keys(stage, PACK_KEYS, "stage")
    capacity = check_int(stage.get("capacity"), "stage.capacity", minimum=1)
    if stage.pop("bin_count_multiple", None) is not None:
        raise ConfigError(
            "stage.bin_count_multiple: only the offline planner (seqpack.pack) can round the number of "
            "bins, a stream does not know its bin count in advance; use even_batches (the loader pads "
            "ranks to equal steps with zero-loss batches) or plan offline"
        )
    check_choice(stage.get("algorithm", "online"), "stage.algorithm", STREAM_ALGORITHMS)
    check_choice(stage.get("overflow", "split"), "stage.overflow", PACK_OVERFLOW)
    for key in ("buffer_docs", "max_segments_per_bin"):
        check_int(stage.get(key), f"stage.{key}", minimum=1, allow_none=True)
    check_int(stage.get("max_age"), "stage.max_age", minimum=0, allow_none=True)
    check_int(stage.get("warmup_docs"), "stage.warmup_docs", minimum=0, allow_none=True)
    check_int(stage.get("seed"), "stage.seed", allow_none=True)
    check_float(stage.get("min_fill"), "stage.min_fill", 0.0, 1.0, allow_none=True)
    if "continue_positions" in stage:
        check_bool(stage["continue_positions"], "stage.continue_positions")
    if stage.get("pad_to") == "capacity":
        warnings.warn("stage.pad_to: 'capacity' is deprecated; use 'max'", DeprecationWarning, stacklevel=3)
        stage["pad_to"] = "max"
    if stage.get("pad_to") is not None:
        T, S, m = check_pad_to(stage["pad_to"], capacity, stage.get("max_segments_per_bin"), "stage.")
        stage["pad_to"] = T if S is None else {"tokens": T, "segments": S}
        if m is not None:
            stage["max_segments_per_bin"] = m
    group_key = stage.get("group_key")
    if group_key is not None and (not isinstance(group_key, str) or not group_key):
        raise ConfigError(f"stage.group_key: expected a record field name, got {group_key!r}")
    for i, s in enumerate(cfg["sources"] if group_key is not None else []):
        if s.get("group_key") not in (None, group_key):
            raise ConfigError(
                f"sources[{i}].group_key: {s['group_key']!r} differs from stage.group_key {group_key!r}"
            )
        s["group_key"] = group_key
    cfg["stage"] = stage
    return cfg
