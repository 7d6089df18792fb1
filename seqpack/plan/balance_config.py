"""The loader's ``balance:`` section, checked (apart from :mod:`seqpack.plan.balance`, which stays
numpy only, and from :mod:`seqpack.stages.balance`, so that :mod:`seqpack.counting` can read it
without importing the stage registry)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from seqpack.checks import ConfigError, check_choice, check_float, check_int, check_keys, check_mapping
from seqpack.plan.balance import METHODS

# keys of the loader's ``balance:`` section
BALANCE_KEYS = ("world_size", "a", "b", "c", "micro_batches_per_rank", "window_steps", "method")


def validate_balance(section: Mapping[str, Any] | None, world_size: int) -> dict[str, Any]:
    """The ``balance:`` section checked and completed with defaults; ConfigError naming ``balance.<key>``.

    ``world_size``, when given, must equal the loader's ``world_size``.
    """
    cfg = dict(check_mapping(section or {}, "balance"))
    check_keys(cfg, BALANCE_KEYS, "balance")
    out: dict[str, Any] = {
        "world_size": check_int(cfg.get("world_size", world_size), "balance.world_size", minimum=1),
        "micro_batches_per_rank": check_int(
            cfg.get("micro_batches_per_rank", 1), "balance.micro_batches_per_rank", minimum=1
        ),
        "window_steps": check_int(cfg.get("window_steps", 16), "balance.window_steps", minimum=1),
        # kept for configs that set it: the rank split of balance_batches; the loader's ranks keep their own
        "method": check_choice(cfg.get("method", "best"), "balance.method", METHODS),
    }
    if out["world_size"] != world_size:
        raise ConfigError(
            f"balance.world_size: {out['world_size']} but the loader runs with world_size={world_size}"
        )
    for key, default in (("a", 1.0), ("b", 0.0), ("c", 0.0)):
        value = check_float(cfg.get(key, default), f"balance.{key}", minimum=0.0)
        if not math.isfinite(value):
            raise ConfigError(f"balance.{key}: must be finite, got {value}")
        out[key] = value
    return out


__all__ = ["BALANCE_KEYS", "validate_balance"]
