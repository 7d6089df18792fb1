"""Loader stage ``packed_rows``: the rows of ``seqpack preprocess`` output as training batches, as
they were packed offline (no reading of raw text, no tokenization, no re-packing at train time).

Config::

    sources: [build/shards]            # one or more preprocess output directories
    stage: {type: packed_rows, pad_to: seq_len}   # pad_to: null, an int, or "seq_len" (manifest's)

Each row becomes one :class:`~seqpack.batch.VarlenBatch` (labels from the stored loss mask, every
segment's first token masked). Consumer ``k`` of ``n`` (rank x worker) takes rows ``k, k+n, ...``
(:class:`~seqpack.shards.PackedRowReader`), so counts differ by at most one and the loader's
``even_batches`` padding covers the rest. Resume state is ``(shard, row)``. Token arrays are numpy
views of the decoded shard buffers until the batch is assembled.
"""

from __future__ import annotations

import os

from seqpack.shards import PackedRowReader, ShardError, read_manifest

STAGE_KEYS = ("pad_to",)


def _source_dirs(cfg: dict) -> list[str]:
    dirs = []
    for i, s in enumerate(cfg.get("sources") or []):
        path = s.get("path") if isinstance(s, dict) else s
        paths = path if isinstance(path, list) else [path]
        for p in paths:
            if not isinstance(p, (str, os.PathLike)):
                raise ValueError(f"sources[{i}].path: expected a preprocess output directory, got {p!r}")
            dirs.append(os.fspath(p))
    return dirs


def validate_rows_config(cfg: dict, base_dir: str | None = None) -> dict:
    """Check the stage keys and that every source is a preprocess output with one ``seq_len``."""
    stage = dict(cfg["stage"])
    unknown = sorted(set(stage) - {"type", *STAGE_KEYS})
    if unknown:
        raise ValueError(f"stage: unknown keys {unknown} for 'packed_rows' (allowed: {list(STAGE_KEYS)})")
    sources = cfg.get("sources")
    if not isinstance(sources, list) or not sources:
        raise ValueError("sources: expected a non-empty list of preprocess output directories")
    dirs = [
        d if base_dir is None or os.path.isabs(d) else os.path.join(base_dir, d) for d in _source_dirs(cfg)
    ]
    seq_lens = set()
    for i, d in enumerate(dirs):
        try:
            seq_lens.add(int(read_manifest(d)["config"]["seq_len"]))
        except ShardError as e:
            raise ValueError(f"sources[{i}]: {e}") from None
    pad_to = stage.get("pad_to")
    if pad_to == "seq_len":
        if len(seq_lens) != 1:
            raise ValueError(f"stage.pad_to: 'seq_len' needs one seq_len, sources have {sorted(seq_lens)}")
        pad_to = seq_lens.pop()
    if pad_to is not None and (isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to <= 0):
        raise ValueError(f"stage.pad_to: expected null, a positive integer or 'seq_len', got {pad_to!r}")
    stage["pad_to"] = pad_to
    return dict(cfg, sources=[{"path": d, "name": f"source{i}"} for i, d in enumerate(dirs)], stage=stage)


def rows_factory(docs, stage_cfg: dict, ctx) -> PackedRowReader:
    """The consumer's share of rows (``docs`` is None: this stage reads the shards itself)."""
    dirs = [s["path"] for s in ctx.config["sources"]]
    return PackedRowReader(dirs, consumer=(ctx.consumer, ctx.n_consumers), pad_to=stage_cfg.get("pad_to"))
