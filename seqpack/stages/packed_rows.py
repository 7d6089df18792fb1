"""Loader stage ``packed_rows``: the rows of ``seqpack preprocess`` output as training batches, as
they were packed offline (no reading of raw text, no tokenization, no re-packing at train time).

Config::

    sources: [build/shards]            # one or more preprocess output directories
    stage: {type: packed_rows, pad_to: max}   # pad_to: null (default), an int, or "max"

``pad_to: max`` pads every batch to the longest row the outputs can hold (the manifests' ``capacity``;
``2^k + 1`` of the largest bucket for ``decompose`` outputs); the sources must agree on it. The old
value ``seq_len`` means ``max`` (DeprecationWarning).

Each row becomes one :class:`~seqpack.batch.VarlenBatch` (labels from the stored loss mask, every
segment's first token masked). Consumer ``k`` of ``n`` (rank x worker) takes rows ``k, k+n, ...``
(:class:`~seqpack.shards.PackedRowReader`), so counts differ by at most one and the loader's
``even_batches`` padding covers the rest. Resume state is ``(shard, row)``. Token arrays are numpy
views of the decoded shard buffers until the batch is assembled.
"""

from __future__ import annotations

import os
import warnings

from seqpack.checks import ConfigError, check_int, check_keys
from seqpack.shards import PackedRowReader, ShardError, max_row_tokens, read_manifest

STAGE_KEYS = ("pad_to",)


def _source_dirs(cfg: dict) -> list[str]:
    dirs = []
    for i, s in enumerate(cfg.get("sources") or []):
        path = s.get("path") if isinstance(s, dict) else s
        paths = path if isinstance(path, list) else [path]
        for p in paths:
            if not isinstance(p, (str, os.PathLike)):
                raise ConfigError(f"sources[{i}].path: expected a preprocess output directory, got {p!r}")
            dirs.append(os.fspath(p))
    return dirs


def validate(cfg: dict, base_dir: str | None = None) -> dict:
    """Check the stage keys and that every source is a preprocess output; resolve ``pad_to: max``."""
    stage = dict(cfg["stage"])
    check_keys(stage, {"type", *STAGE_KEYS}, "stage")
    sources = cfg.get("sources")
    if not isinstance(sources, list) or not sources:
        raise ConfigError("sources: expected a non-empty list of preprocess output directories")
    dirs = [
        d if base_dir is None or os.path.isabs(d) else os.path.join(base_dir, d) for d in _source_dirs(cfg)
    ]
    longest = set()
    for i, d in enumerate(dirs):
        try:
            longest.add(max_row_tokens(read_manifest(d)))
        except ShardError as e:
            raise ConfigError(f"sources[{i}]: {e}") from None
    pad_to = stage.get("pad_to")
    if pad_to == "seq_len":
        warnings.warn(
            "stage.pad_to: 'seq_len' is deprecated and will be removed in the next release; use 'max'",
            DeprecationWarning,
            stacklevel=3,
        )
        pad_to = "max"
    if pad_to == "max":
        if len(longest) != 1:
            raise ConfigError(
                f"stage.pad_to: 'max' needs sources with one row size, they have {sorted(longest)}"
            )
        pad_to = longest.pop()
    if isinstance(pad_to, str):
        raise ConfigError(f"stage.pad_to: expected null, a positive integer or 'max', got {pad_to!r}")
    stage["pad_to"] = check_int(pad_to, "stage.pad_to", minimum=1, allow_none=True)
    # `verify: true` on any source: every shard's sha256 is checked before its rows are read
    verify = any(isinstance(s, dict) and s.get("verify") is True for s in sources)
    out = [{"path": d, "name": f"source{i}", "verify": verify} for i, d in enumerate(dirs)]
    return dict(cfg, sources=out, stage=stage)


def factory(docs, stage_cfg: dict, ctx) -> PackedRowReader:
    """The consumer's share of rows (``docs`` is None: this stage reads the shards itself)."""
    dirs = [s["path"] for s in ctx.config["sources"]]
    verify = any(s.get("verify", False) for s in ctx.config["sources"])
    return PackedRowReader(
        dirs, consumer=(ctx.consumer, ctx.n_consumers), pad_to=stage_cfg.get("pad_to"), verify=verify
    )
