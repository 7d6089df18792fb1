"""The MIL config (``stage: {type: mil, ...}`` plus ``sources``, ``labels``, ``dtype``): checks that
name the key, and :func:`read_mil_config`, which opens the feature bags and labels it names::

    sources: [{path: feats/, key: features}]     # dir, .tar shard(s), .safetensors, or files
    labels: {path: labels.csv, id_column: slide_id, label_columns: [...], classes: [...]}
    stage: {type: mil, capacity: 600, packs_per_batch: 8, main_fraction: 0.4, pad_to: max}
    shuffle: {seed: 0}
    dtype: float32                               # or float16 / bfloat16 / float64 / null (keep stored)

Old stage keys (one release, DeprecationWarning): ``pack_len`` -> ``capacity``; ``pad: true/false``
-> ``pad_to: max/null``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from seqpack.checks import ConfigError, check_bool, check_choice, check_int, check_keys, rename_keys
from seqpack.mil.bags import FeatureBagSource
from seqpack.mil.formats import read_feature_bags
from seqpack.mil.labels import LabelTable, read_labels

STAGE_KEYS = (
    "capacity", "packs_per_batch", "max_instances", "main_fraction", "min_seq_len", "downsample", "residual",
    "residual_label", "algorithm", "shuffle", "seed", "num_epochs", "pad_to", "empty", "missing_label", "nan",
)  # fmt: skip
RENAMED = {"pack_len": "capacity", "pad": "pad_to"}
SOURCE_KEYS = ("path", "key", "recursive")
DTYPES = ("float32", "float16", "bfloat16", "float64", None)


def pad_to_from_pad(kw: dict, given: Mapping, where: str) -> None:
    """The old ``pad: true/false`` (moved to ``pad_to`` by ``RENAMED``) means ``pad_to: max/null``."""
    if "pad" in given:
        kw["pad_to"] = "max" if check_bool(kw["pad_to"], f"{where}.pad") else None


def check_stage(stage: Mapping[str, Any], where: str = "stage") -> dict:
    """The ``stage`` mapping as PackMIL keyword arguments (``type`` dropped, old keys renamed with a
    DeprecationWarning); ConfigError naming the key for unknown keys or a bad ``capacity``."""
    given = dict(stage)
    if given.pop("type", "mil") != "mil":
        raise ConfigError(f"{where}.type: expected 'mil', got {stage['type']!r}")
    out = rename_keys(dict(given), RENAMED, where)
    pad_to_from_pad(out, given, where)
    check_keys(out, STAGE_KEYS, where)
    check_int(out.get("capacity"), f"{where}.capacity", minimum=1)
    return out


def check_sources(sources: Any) -> list[dict]:
    """``sources`` as a list of ``{path, key, recursive}`` mappings (a bare path is ``{path: ...}``)."""
    if not sources or not isinstance(sources, (list, tuple)):
        raise ConfigError("sources: expected a non-empty list of feature-bag paths or {path, key, recursive}")
    out = []
    for i, s in enumerate(sources):
        s = {"path": s} if isinstance(s, (str, os.PathLike)) else dict(s) if isinstance(s, Mapping) else s
        if not isinstance(s, dict) or "path" not in s:
            raise ConfigError(f"sources[{i}]: expected a path or a mapping with 'path', got {s!r}")
        check_keys(s, SOURCE_KEYS, f"sources[{i}]")
        out.append(s)
    keys = {s.get("key", "features") for s in out}
    if len(keys) > 1:
        raise ConfigError(f"sources: all feature sources must use one key, got {sorted(keys)}")
    return out


def check_labels(labels: Any) -> dict | None:
    """``labels`` as a mapping with ``path`` (a bare path is ``{path: ...}``), or None."""
    if not labels:
        return None
    out = {"path": labels} if isinstance(labels, (str, os.PathLike)) else dict(labels)
    if "path" not in out:
        raise ConfigError(f"labels: expected a path or a mapping with 'path', got {labels!r}")
    return out


def read_mil_config(config: Mapping[str, Any]) -> tuple[FeatureBagSource, LabelTable | None, dict]:
    """Open what a MIL config names: ``(feature bags, labels or None, PackMIL keyword arguments)``.

    Several sources are read as one list of slides (their paths concatenated); the MIL stage has no
    weighted mixing. ``shuffle.seed`` is the stage's seed unless ``stage.seed`` is given.
    """
    kw = check_stage(config.get("stage") or {})
    sources = check_sources(config.get("sources"))
    paths = [s["path"] for s in sources]
    source = read_feature_bags(
        paths[0] if len(paths) == 1 else paths,
        key=sources[0].get("key", "features"),
        recursive=bool(sources[0].get("recursive", False)),
    )
    lab = check_labels(config.get("labels"))
    labels = read_labels(lab.pop("path"), **lab) if lab else None
    shuffle = config.get("shuffle")
    if "seed" not in kw and isinstance(shuffle, Mapping) and "seed" in shuffle:
        kw["seed"] = shuffle["seed"]
    dtype = check_choice(config.get("dtype", "float32"), "dtype", DTYPES)
    kw["dtype"] = None if dtype is None else getattr(torch, dtype)
    return source, labels, kw
