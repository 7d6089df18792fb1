"""Offline preprocessing: read -> tokenize -> plan rows -> write shards, as independent tasks.

The input is split into ``tasks`` fixed parts with the readers' own partition (task ``k`` of ``T``
is consumer ``(k, T)``: whole files/row groups when there are at least ``T`` of them, otherwise
every ``T``-th record). ``T`` is part of the config, never derived from the worker count, so the
output bytes are the same for any number of workers and for either executor. Each task

1. reads and tokenizes its records (``seqpack.sources``; one tokenizer per process),
2. plans rows: ``pack`` (bin-packing, :func:`seqpack.pack`), ``decompose`` (dataset
   decomposition, :func:`seqpack.stages.decompose.decompose_lengths`) or ``none`` (one row per
   document, split/truncated to ``seq_len`` by the overflow policy),
3. writes its shards ``part-KKKKK-JJJJ.parquet`` (atomic: temp file, fsync, rename), then its
   lengths and a completion marker ``.seqpack/task-KKKKK.json`` (shard names, sizes, sha256, counts).

Steps 1-3 run per *window* of ``window_tokens`` tokens, so a task's memory is bounded and a task
killed mid-way resumes after its last written window (the window marker holds the readers' state).

When every task is done, the markers are merged into ``manifest.json`` (written last, atomically).
A rerun skips tasks whose marker matches the config fingerprint and whose shards still hash to
the recorded sha256, so a killed run resumes and ends with the same bytes. A shard is listed in the
manifest only after its task's marker exists, and a marker only after its shards were renamed
into place, so a half-written shard is never listed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from seqpack.shards import (
    MANIFEST,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    SHARD_FORMATS,
    SHARD_SUFFIX,
    PackedRows,
    ShardInfo,
    atomic_write,
    verify_shard,
    write_json_atomic,
    write_shard,
)

STRATEGIES = ("pack", "decompose", "none")
PACK_ALGORITHMS = ("bfd", "ffd", "greedy", "online")
ENGINES = ("local", "ray")
WORK_DIR = ".seqpack"
SHARD_NAME = re.compile(r"^part-\d{5}-\d{4}\.(parquet|tar)$")
BYTE_TOKENIZER_ID = "seqpack-byte-tokenizer-v1"
# the small self-written corpus shipped with the package (seqpack/data/make_corpus.py rebuilds it)
DEMO_CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "corpus.jsonl.zst")
# keys of a ``preprocess:`` config section (and of the CLI options with the same names)
OPTION_KEYS = (
    "seq_len", "strategy", "algorithm", "overflow", "format", "tasks", "rows_per_shard", "row_group_rows",
    "seed", "min_log2", "tokenize_batch", "compression_level", "window_tokens",
)
# top-level keys of a config file preprocess accepts (a loader config is accepted as is)
CONFIG_KEYS = {
    "sources", "tokenizer", "on_error", "seed", "preprocess", "stage", "shuffle", "mix_by", "tokenize_batch",
    "even_batches", "curriculum", "balance",
}


class PreprocessError(ValueError):
    """Bad arguments, config or output directory; the message names the offending item."""


# ------------------------------------------------------------------------------------------ config
@dataclass
class PreprocessConfig:
    """Everything that determines the output bytes (stored in full in the manifest).

    Attributes:
        sources: validated source dicts of the loader config (``path`` list, ``format``, field keys).
        tokenizer: tokenizer spec (``name``, ``add_bos``, ``add_eos``, ...), see ``TokenizerSpec``.
        seq_len: tokens per row (bin capacity for ``pack``; max row length for ``none``; the largest
            bucket ``2^floor(log2(seq_len))`` for ``decompose``, whose rows hold ``2^k + 1`` tokens).
        strategy: ``pack``, ``decompose`` or ``none``.
        algorithm: packing algorithm (``bfd``, ``ffd``, ``greedy``, ``online``).
        overflow: documents longer than ``seq_len``: ``split`` (default), ``truncate``, ``drop``, ``error``.
        format: ``parquet`` or ``wds``.
        tasks: number of tasks the input is split into (fixed; independent of the worker count).
        rows_per_shard: rows per output shard; row_group_rows: rows per Parquet row group.
        seed: bin-order shuffle of ``pack`` (task ``k`` uses ``seed + k``) and decomposition draws.
        min_log2: smallest bucket of ``decompose`` (shorter tails are dropped and counted).
        window_tokens: a task plans and writes its documents in windows of about this many tokens,
            which bounds its memory and is the unit of resume inside a task.
    """

    sources: list[dict]
    tokenizer: dict = field(default_factory=lambda: {"name": "byte"})
    seq_len: int = 2048
    strategy: str = "pack"
    algorithm: str = "bfd"
    overflow: str = "split"
    format: str = "parquet"
    tasks: int = 4
    rows_per_shard: int = 4096
    row_group_rows: int = 256
    seed: int = 0
    min_log2: int = 6
    tokenize_batch: int = 256
    compression_level: int = 3
    window_tokens: int = 1 << 24

    def __post_init__(self) -> None:
        def choice(name: str, options: Sequence[str]) -> None:
            if getattr(self, name) not in options:
                raise PreprocessError(f"{name}: {getattr(self, name)!r} is not one of {list(options)}")

        choice("strategy", STRATEGIES)
        choice("algorithm", PACK_ALGORITHMS)
        choice("overflow", ("split", "truncate", "drop", "error"))
        choice("format", SHARD_FORMATS)
        positive = ("seq_len", "tasks", "rows_per_shard", "row_group_rows", "tokenize_batch", "window_tokens")
        for name in positive:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise PreprocessError(f"{name}: expected a positive integer, got {v!r}")
        if self.strategy == "decompose" and not 0 <= self.min_log2 <= self.max_log2:
            raise PreprocessError(
                f"min_log2: {self.min_log2} must be in [0, {self.max_log2}] (max_log2 = floor(log2(seq_len)))"
            )

    @property
    def max_log2(self) -> int:
        return int(math.floor(math.log2(self.seq_len)))

    def as_dict(self) -> dict:
        return asdict(self)


def tokenizer_fingerprint(spec: Mapping[str, Any]) -> str:
    """sha256 of what defines the token ids: the ``tokenizer.json`` bytes (or the byte tokenizer's id)."""
    from seqpack.sources.tokenize import TokenizerSpec

    s = TokenizerSpec.parse(dict(spec))
    h = hashlib.sha256()
    if s.name == "byte":
        h.update(BYTE_TOKENIZER_ID.encode())
    elif os.path.exists(s.name):
        path = os.path.join(s.name, "tokenizer.json") if os.path.isdir(s.name) else s.name
        with open(path, "rb") as f:
            h.update(f.read())
    else:  # a hub name: only its name is known without the network
        h.update(s.name.encode())
    return h.hexdigest()


def input_files(cfg: PreprocessConfig) -> list[dict]:
    """Each input file with its size and a sampled hash (part of the fingerprint: a changed input
    is a different run)."""
    from seqpack.sources.reader import resolve_paths

    out = []
    for s in cfg.sources:
        paths = s["path"] if s["format"] == "hf" else resolve_paths(s["path"])
        for p in paths:
            if os.path.isfile(p):
                entry = {"bytes": os.path.getsize(p), "sample_sha256": _sample_hash(p)}
            else:
                entry = {"bytes": None, "sample_sha256": None}
            out.append({"source": s["name"], "path": os.path.abspath(p), **entry})
    return out


def _sample_hash(path: str, n: int = 1 << 16) -> str:
    """sha256 of a file's first and last ``n`` bytes: catches edited inputs without reading them whole."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(n))
        size = os.fstat(f.fileno()).st_size
        if size > n:
            f.seek(max(size - n, n))
            h.update(f.read(n))
    return h.hexdigest()


def fingerprint(cfg: PreprocessConfig, inputs: list[dict], tokenizer_hash: str) -> str:
    blob = json.dumps(
        {"config": cfg.as_dict(), "inputs": inputs, "tokenizer": tokenizer_hash}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def load_config_file(path: str) -> dict:
    """Read a YAML/TOML/JSON config; unknown top-level or ``preprocess`` keys are errors naming them."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        if path.endswith(".toml"):
            import tomllib

            raw = tomllib.loads(data.decode("utf-8"))
        elif path.endswith(".json"):
            raw = json.loads(data)
        else:
            import yaml

            raw = yaml.safe_load(data)
    except Exception as e:  # yaml/toml/json raise unrelated types
        raise PreprocessError(f"{path}: cannot parse config: {e}") from None
    if not isinstance(raw, Mapping):
        raise PreprocessError(f"{path}: the config must be a mapping, got {type(raw).__name__}")
    unknown = set(raw) - CONFIG_KEYS
    if unknown:
        raise PreprocessError(f"{path}: unknown config keys {sorted(unknown)} (known: {sorted(CONFIG_KEYS)})")
    section = raw.get("preprocess") or {}
    if not isinstance(section, Mapping):
        raise PreprocessError(f"{path}: preprocess: expected a mapping, got {type(section).__name__}")
    unknown = set(section) - set(OPTION_KEYS)
    if unknown:
        raise PreprocessError(
            f"{path}: unknown keys preprocess.{sorted(unknown)} (known: {sorted(OPTION_KEYS)})"
        )
    out = dict(raw)
    out["_base_dir"] = os.path.dirname(os.path.abspath(path))
    # a loader config's stage gives defaults: its capacity is the row length, its algorithm the planner
    stage = raw.get("stage") if isinstance(raw.get("stage"), Mapping) else {}
    opts = {}
    if stage.get("type") == "pack":
        if "capacity" in stage:
            opts["seq_len"] = stage["capacity"]
        for k in ("algorithm", "overflow", "seed"):
            if k in stage:
                opts[k] = stage[k]
    if "seed" in raw:
        opts.setdefault("seed", raw["seed"])
    opts.update(section)
    out["preprocess"] = opts
    return out


def build_config(
    inputs: Sequence[str],
    *,
    config_file: dict | None = None,
    tokenizer: str | Mapping | None = None,
    fields: Mapping[str, str] | None = None,
    on_error: str | None = None,
    **options: Any,
) -> PreprocessConfig:
    """Merge defaults < config file < explicit options into a validated :class:`PreprocessConfig`.

    Args:
        inputs: input files/globs/directories (grouped into one source per format), or empty when
            the config file lists ``sources``.
        config_file: the result of :func:`load_config_file`.
        tokenizer: ``"byte"``, a ``tokenizer.json`` path, or a spec mapping.
        fields: field keys for the CLI inputs (``text_key``, ``messages_key``, ...).
        options: any of :data:`OPTION_KEYS` (None values are ignored).
    """
    from seqpack.config import ConfigError, guess_format, validate_config

    file_cfg = config_file or {}
    opts = dict(file_cfg.get("preprocess", {}))
    unknown = set(options) - set(OPTION_KEYS)
    if unknown:
        raise PreprocessError(f"unknown options {sorted(unknown)} (known: {sorted(OPTION_KEYS)})")
    opts.update({k: v for k, v in options.items() if v is not None})
    sources: list = []
    if inputs:
        by_format: dict[str, list[str]] = {}
        for p in inputs:
            try:
                fmt = guess_format(os.fspath(p))
            except ConfigError as e:
                raise PreprocessError(str(e)) from None
            by_format.setdefault(fmt, []).append(os.path.abspath(os.fspath(p)))
        for fmt, paths in by_format.items():
            sources.append({"path": paths, "format": fmt, "name": fmt, **dict(fields or {})})
    elif file_cfg.get("sources"):
        sources = file_cfg["sources"]
    else:
        raise PreprocessError("no input: pass INPUT files or a --config with 'sources'")
    # only the sources and tokenizer of a loader config matter here; the stage is ours
    loader_cfg = {
        "sources": sources,
        "tokenizer": tokenizer or file_cfg.get("tokenizer", "byte"),
        "stage": {"type": "preprocess"},
    }
    if on_error or file_cfg.get("on_error"):
        loader_cfg["on_error"] = on_error or file_cfg["on_error"]
    try:
        validated = validate_config(loader_cfg, base_dir=None if inputs else file_cfg.get("_base_dir"))
    except ConfigError as e:
        raise PreprocessError(str(e)) from None
    from seqpack.sources.tokenize import TokenizerSpec

    try:
        spec = TokenizerSpec.parse(validated["tokenizer"])
    except (ValueError, TypeError) as e:
        raise PreprocessError(f"tokenizer: {e}") from None
    if spec.name != "byte" and not os.path.exists(spec.name):
        raise PreprocessError(f"tokenizer: {spec.name!r} is neither 'byte' nor an existing tokenizer.json")
    if "tasks" not in opts:
        from seqpack.sources.reader import resolve_paths

        # one task per input file (globs and directories expanded), at least 4 so that a single big
        # file still spreads over workers (records are then split inside it)
        n_files = sum(len(s["path"] if s["format"] in ("hf", "seqpack") else resolve_paths(s["path"]))
                      for s in validated["sources"])
        opts["tasks"] = max(4, min(n_files, 1024))
    try:
        return PreprocessConfig(sources=validated["sources"], tokenizer=asdict(spec), **opts)
    except TypeError as e:
        raise PreprocessError(str(e)) from None


# ------------------------------------------------------------------------------------------ one task
@dataclass
class TaskSpec:
    """What one task needs (picklable, sent to a worker process or Ray task)."""

    config: dict
    out_dir: str
    task: int
    fingerprint: str
    quiet: bool = True


def task_marker(out_dir: str, task: int) -> str:
    return os.path.join(out_dir, WORK_DIR, f"task-{task:05d}.json")


def _lengths_path(out_dir: str, task: int) -> str:
    return os.path.join(out_dir, WORK_DIR, f"lengths-{task:05d}.npz")


COUNT_KEYS = ("skipped_records", "skipped_files", "empty_documents")


class TaskDocuments:
    """The tokenized documents of task ``task``: its share of every source, source after source.

    Resumable with the stages' own state: ``state()`` is ``(source index, Tokenize state)`` plus
    the counters of finished sources, so a task restarts after its last written window.
    """

    def __init__(self, cfg: PreprocessConfig, task: int, state: dict | None = None):
        self.cfg, self.task = cfg, task
        self._source = 0 if state is None else int(state["source"])
        self._done_counts = dict.fromkeys(COUNT_KEYS, 0) if state is None else dict(state["done_counts"])
        self._node = None
        self._open(None if state is None else state["node"])

    def _open(self, node_state: dict | None) -> None:
        from seqpack.sources.read import read
        from seqpack.sources.tokenize import Tokenize

        self._node = None
        if self._source >= len(self.cfg.sources):
            return
        s = self.cfg.sources[self._source]
        opts = {k: v for k, v in s.items() if k not in ("path", "format", "weight")}
        reader = read(s["path"], format=s["format"], source_index=self._source,
                      consumer=(self.task, self.cfg.tasks), **opts)
        self._name = reader.name
        self._node = Tokenize(reader, self.cfg.tokenizer, batch_size=self.cfg.tokenize_batch)
        self._node.reset(node_state)

    def _node_counts(self) -> dict:
        if self._node is None:
            return dict.fromkeys(COUNT_KEYS, 0)
        st = self._node.stats()
        return {
            "skipped_records": int(st.get(f"read/{self._name}/skipped", 0)),
            "skipped_files": int(st.get(f"read/{self._name}/skipped_files", 0)),
            "empty_documents": int(st.get("tokenize/empty", 0)),
        }

    def counts(self) -> dict:
        """Records skipped or empty so far (cumulative over the task)."""
        cur = self._node_counts()
        return {k: self._done_counts[k] + cur[k] for k in COUNT_KEYS}

    @property
    def exhausted(self) -> bool:
        return self._node is None

    def state(self) -> dict:
        return {"source": self._source, "node": None if self._node is None else self._node.state_dict(),
                "done_counts": dict(self._done_counts)}

    def take(self, max_tokens: int) -> list:
        """The next documents, until they hold at least ``max_tokens`` tokens or the input ends."""
        docs, n = [], 0
        while self._node is not None and n < max_tokens:
            try:
                d = next(self._node)
            except StopIteration:
                self._done_counts = self.counts()
                self._source += 1
                self._open(None)
                continue
            docs.append(d)
            n += len(d.tokens)
        return docs


@dataclass
class RowPlan:
    """Rows as segments of documents: CSR ``row_offsets`` over ``seg_doc``/``seg_start``/``seg_len``
    (document *indices* in the task's list), plus lost-token counters."""

    row_offsets: np.ndarray
    seg_doc: np.ndarray
    seg_start: np.ndarray
    seg_len: np.ndarray
    row_capacity: np.ndarray
    counts: dict


def plan_rows(
    lengths: np.ndarray, doc_ids: np.ndarray, cfg: PreprocessConfig, task: int, window: int = 0
) -> RowPlan:
    """Plan the rows of one window of a task's documents (``lengths`` int64 ``[n_docs]`` tokens)."""
    from seqpack.plan import expand_overflow, pack

    zero = {"truncated_tokens": 0, "truncated_docs": 0, "dropped_tokens": 0, "dropped_docs": 0}
    if cfg.strategy == "pack":
        try:
            plan = pack(
                lengths, cfg.seq_len, algorithm=cfg.algorithm, overflow=cfg.overflow,
                seed=cfg.seed + task + 1_000_003 * window,
            )
        except ValueError as e:
            raise PreprocessError(f"task {task}: {e}") from None
        counts = {k: int(getattr(plan, k)) for k in zero}
        cap = np.full(plan.n_bins, cfg.seq_len, np.int64)
        return RowPlan(plan.bin_offsets, plan.seg_doc, plan.seg_start, plan.seg_len, cap, counts)
    if cfg.strategy == "none":
        try:
            doc, start, ln, counts = expand_overflow(lengths, cfg.seq_len, cfg.overflow)
        except ValueError as e:
            raise PreprocessError(f"task {task}: {e}") from None
        offsets = np.arange(len(doc) + 1, dtype=np.int64)
        return RowPlan(offsets, doc, start, ln, np.full(len(doc), cfg.seq_len, np.int64), counts)
    from seqpack.stages.decompose import decompose_lengths

    dec = decompose_lengths(
        lengths, min_log2=cfg.min_log2, max_log2=cfg.max_log2, overlong="random", seed=cfg.seed,
        doc_keys=doc_ids,
    )
    # rows grouped by bucket (smallest first), document order inside a bucket
    order = np.lexsort((np.arange(dec.n_pieces), dec.piece_log2))
    ln = dec.piece_len[order]
    counts = dict(zero, dropped_tokens=dec.dropped_tokens, dropped_docs=int((dec.dropped_per_doc > 0).sum()))
    offsets = np.arange(len(order) + 1, dtype=np.int64)
    return RowPlan(offsets, dec.piece_doc[order], dec.piece_start[order], ln, ln.copy(), counts)


def gather_rows(docs: list, plan: RowPlan) -> PackedRows:
    """Materialize planned rows: one vectorized gather from the concatenated documents."""
    lengths = np.fromiter((len(d.tokens) for d in docs), np.int64, len(docs))
    doc_off = np.zeros(len(docs) + 1, np.int64)
    np.cumsum(lengths, out=doc_off[1:])
    flat = np.concatenate([d.tokens for d in docs]).astype(np.int32) if docs else np.zeros(0, np.int32)
    mask = np.ones(len(flat), np.uint8)
    for i, d in enumerate(docs):
        if d.loss_mask is not None:
            mask[doc_off[i] : doc_off[i + 1]] = d.loss_mask
    seg_len = plan.seg_len
    n = int(seg_len.sum())
    seg_first = np.zeros(len(seg_len), np.int64)
    np.cumsum(seg_len[:-1], out=seg_first[1:])
    # token j of segment s comes from flat[doc_off[doc] + start + j]
    idx = np.repeat(doc_off[plan.seg_doc] + plan.seg_start - seg_first, seg_len)
    idx += np.arange(n, dtype=np.int64)
    doc_ids = np.array([d.doc_id for d in docs], np.int64)
    row_tokens = np.add.reduceat(seg_len, plan.row_offsets[:-1]) if len(seg_len) else np.zeros(0, np.int64)
    row_offsets = np.zeros(len(plan.row_offsets), np.int64)
    np.cumsum(row_tokens, out=row_offsets[1:])
    return PackedRows(
        input_ids=flat[idx],
        loss_mask=mask[idx],
        row_offsets=row_offsets,
        seg_offsets=plan.row_offsets.astype(np.int64),
        seg_len=seg_len.astype(np.int64),
        seg_doc_id=doc_ids[plan.seg_doc],
        seg_start=plan.seg_start.astype(np.int64),
    )


def _window_dir(out_dir: str, task: int) -> str:
    return os.path.join(out_dir, WORK_DIR, f"task-{task:05d}")


def _window_marker(out_dir: str, task: int, window: int) -> str:
    return os.path.join(_window_dir(out_dir, task), f"window-{window:05d}.json")


def _finished_windows(out_dir: str, task: int, fp: str) -> list[dict]:
    """Window markers of an interrupted task, from window 0 up to the first missing or broken one."""
    out = []
    while True:
        path = _window_marker(out_dir, task, len(out))
        try:
            with open(path, encoding="utf-8") as f:
                m = json.load(f)
        except (OSError, ValueError):
            return out
        ok = m.get("fingerprint") == fp and os.path.isfile(path[: -len(".json")] + ".npz")
        if not ok or not all(verify_shard(out_dir, s) for s in m["shards"]):
            return out
        out.append(m)


def _write_window(spec: TaskSpec, cfg: PreprocessConfig, window: int, docs: list, first_shard: int) -> dict:
    """Plan, gather and write one window's rows; returns its stats, shards and length arrays."""
    k, out = spec.task, spec.out_dir
    t0 = time.perf_counter()
    lengths = np.fromiter((len(d.tokens) for d in docs), np.int64, len(docs))
    doc_ids = np.fromiter((d.doc_id for d in docs), np.int64, len(docs))
    plan = plan_rows(lengths, doc_ids, cfg, k, window)
    rows = gather_rows(docs, plan)
    t1 = time.perf_counter()
    shards: list[ShardInfo] = []
    suffix = SHARD_SUFFIX[cfg.format]
    for j, r0 in enumerate(range(0, rows.n_rows, cfg.rows_per_shard)):
        part = rows.slice(r0, min(r0 + cfg.rows_per_shard, rows.n_rows))
        path = os.path.join(out, f"part-{k:05d}-{first_shard + j:04d}{suffix}")
        shards.append(
            write_shard(path, part, fmt=cfg.format, row_group_rows=cfg.row_group_rows,
                        compression_level=cfg.compression_level)
        )
    _save_npz_atomic(
        _window_marker(out, k, window)[: -len(".json")] + ".npz",
        doc_lengths=lengths, row_lengths=rows.row_lengths(), row_capacity=plan.row_capacity,
    )
    stats = {
        "documents": len(lengths),
        "tokens_in": int(lengths.sum()),
        "tokens_out": rows.n_tokens,
        "rows": rows.n_rows,
        "segments": rows.n_segments,
        "capacity_tokens": int(plan.row_capacity.sum()),
        **plan.counts,
    }
    return {"stats": stats, "shards": [s.as_dict() for s in shards], "plan_s": t1 - t0,
            "write_s": time.perf_counter() - t1}


def run_task(spec: TaskSpec, on_window: Callable[[dict], None] | None = None) -> dict:
    """Run (or resume) one task and return its marker (also written to ``.seqpack/task-K.json``).

    The task reads its documents in windows of ``window_tokens``; each window's shards are written,
    then a window marker holding the readers' resume state. A task killed mid-way restarts after
    its last complete window; a finished task's marker lists all its shards.
    """
    cfg = PreprocessConfig(**spec.config)
    k, out = spec.task, spec.out_dir
    os.makedirs(_window_dir(out, k), exist_ok=True)
    windows = _finished_windows(out, k, spec.fingerprint)
    last = windows[-1] if windows else None
    stream = TaskDocuments(cfg, k, None if last is None else last["resume"])
    timing = {"read_tokenize_s": 0.0, "plan_gather_s": 0.0, "write_s": 0.0, "resumed_windows": len(windows)}
    cpu0 = time.process_time()
    while not (last is not None and last["exhausted"]):
        t0 = time.perf_counter()
        docs = stream.take(cfg.window_tokens)
        timing["read_tokenize_s"] += time.perf_counter() - t0
        if not docs and windows:  # the input ended exactly at the previous window's edge
            break
        w = len(windows)
        first_shard = sum(len(m["shards"]) for m in windows)
        res = _write_window(spec, cfg, w, docs, first_shard)
        del docs
        timing["plan_gather_s"] += res.pop("plan_s")
        timing["write_s"] += res.pop("write_s")
        last = dict(res, fingerprint=spec.fingerprint, window=w, resume=stream.state(),
                    exhausted=stream.exhausted, counts=stream.counts())
        write_json_atomic(_window_marker(out, k, w), last)
        windows.append(last)
        if on_window is not None:
            on_window(last)
    stats: dict[str, int] = {}
    for m in windows:
        for key, v in m["stats"].items():
            stats[key] = stats.get(key, 0) + int(v)
    stats.update(windows[-1]["counts"])
    arrays: dict[str, list] = {"doc_lengths": [], "row_lengths": [], "row_capacity": []}
    for w in range(len(windows)):
        with np.load(_window_marker(out, k, w)[: -len(".json")] + ".npz") as z:
            for key in arrays:
                arrays[key].append(z[key])
    _save_npz_atomic(_lengths_path(out, k), **{key: np.concatenate(v) for key, v in arrays.items()})
    marker = {
        "task": k, "fingerprint": spec.fingerprint, "shards": [s for m in windows for s in m["shards"]],
        "stats": stats,
    }
    timing["cpu_s"] = time.process_time() - cpu0
    # timings vary run to run, so they live beside the marker, never in it or in the manifest
    write_json_atomic(os.path.join(out, WORK_DIR, f"timing-{k:05d}.json"), timing)
    write_json_atomic(task_marker(out, k), marker)
    return marker


def _save_npz_atomic(path: str, **arrays: np.ndarray) -> None:
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def task_done(out_dir: str, task: int, fp: str) -> dict | None:
    """The task's marker if it matches ``fp`` and every shard it lists still verifies, else None."""
    path = task_marker(out_dir, task)
    if not os.path.isfile(path) or not os.path.isfile(_lengths_path(out_dir, task)):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    if marker.get("fingerprint") != fp:
        return None
    if not all(verify_shard(out_dir, s) for s in marker["shards"]):
        return None
    return marker


# ------------------------------------------------------------------------------------------ executors
def _worker_init() -> None:
    # parallelism comes from the processes; the Rust pool of `tokenizers` would oversubscribe
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


TICK_S = 2.0  # how often executors let the progress bar look at finished windows


def run_local(
    specs: list[TaskSpec],
    workers: int,
    on_done: Callable[[dict], None],
    on_tick: Callable[[], None] = lambda: None,
) -> None:
    """Tasks in this process (``workers == 1``) or in ``workers`` spawned processes."""
    if workers <= 1 or len(specs) <= 1:
        for s in specs:
            on_done(run_task(s, on_window=lambda _: on_tick()))
        return
    import multiprocessing as mp
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    ctx = mp.get_context("spawn")  # fork would copy tokenizer thread pools and locks
    n = min(workers, len(specs))
    with ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_worker_init) as ex:
        futures = {ex.submit(run_task, s): s for s in specs}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=TICK_S, return_when=FIRST_EXCEPTION)
            on_tick()
            for f in done:
                exc = f.exception()
                if exc is not None:
                    for p in pending:
                        p.cancel()
                    raise PreprocessError(f"task {futures[f].task} failed: {exc}") from exc
                on_done(f.result())


def run_ray(
    specs: list[TaskSpec],
    workers: int,
    on_done: Callable[[dict], None],
    on_tick: Callable[[], None] = lambda: None,
) -> None:
    """The same tasks as Ray tasks (one CPU each); uses a running Ray instance or starts a local one.

    Each worker process keeps its tokenizer cached between tasks (``load_tokenizer`` is cached per
    process). Tasks return only their small marker; shards go straight to the shared output
    directory, never through the object store.
    """
    try:
        import ray
    except ImportError:
        raise PreprocessError("--engine ray needs ray: pip install 'seqpack[ray]'") from None
    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=max(1, workers), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
        started = True
    try:
        remote = ray.remote(num_cpus=1, max_retries=0)(run_task)
        refs = {remote.remote(s): s for s in specs}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=TICK_S)
            on_tick()
            for r in done:
                try:
                    on_done(ray.get(r))
                except ray.exceptions.RayTaskError as e:
                    for p in pending:
                        ray.cancel(p)
                    raise PreprocessError(f"task {refs[r].task} failed: {e}") from e
    finally:
        if started:
            ray.shutdown()


EXECUTORS: dict[str, Callable[..., None]] = {
    "local": run_local,
    "ray": run_ray,
}


# ------------------------------------------------------------------------------------------ output dir
def _is_ours(name: str) -> bool:
    return name in (MANIFEST, WORK_DIR) or bool(SHARD_NAME.match(name))


def prepare_output(out_dir: str, fp: str, overwrite: bool, clean_temp: bool = True) -> None:
    """Create ``out_dir`` or check it belongs to this run (same fingerprint); refuse otherwise.

    A directory holding a manifest or a work dir of a different run, or files seqpack did not write,
    is refused unless ``overwrite`` (which removes only seqpack's own files there).
    """
    os.makedirs(out_dir, exist_ok=True)
    work = os.path.join(out_dir, WORK_DIR)
    problems = []
    man_path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(man_path):
        try:
            with open(man_path, encoding="utf-8") as f:
                man = json.load(f)
        except (OSError, ValueError):
            man = None
        if not isinstance(man, dict) or man.get("format") != MANIFEST_FORMAT:
            problems.append(f"{man_path} is not a seqpack manifest")
        elif man.get("fingerprint") != fp:
            problems.append(f"{man_path} was written by a different run (other inputs, config or tokenizer)")
    plan_path = os.path.join(work, "run.json")
    if os.path.exists(plan_path):
        try:
            with open(plan_path, encoding="utf-8") as f:
                old_fp = json.load(f).get("fingerprint")
        except (OSError, ValueError):
            old_fp = None
        if old_fp != fp:
            problems.append(f"{out_dir} holds an unfinished run with a different config")
    foreign = sorted(n for n in os.listdir(out_dir) if not _is_ours(n) and not n.startswith("."))
    if foreign:
        problems.append(f"{out_dir} holds files seqpack did not write: {foreign[:5]}")
    if problems and not overwrite:
        raise PreprocessError("; ".join(problems) + "; refusing to write there (pass --overwrite to replace)")
    if problems:
        if os.path.exists(man_path):
            os.unlink(man_path)
        shutil.rmtree(work, ignore_errors=True)
        for n in os.listdir(out_dir):
            if SHARD_NAME.match(n):
                os.unlink(os.path.join(out_dir, n))
    # temp files of a killed run: hidden names ".part-....tmp-PID"
    for n in os.listdir(out_dir) if clean_temp else []:
        if n.startswith(".") and ".tmp-" in n:
            os.unlink(os.path.join(out_dir, n))
    os.makedirs(work, exist_ok=True)
    write_json_atomic(plan_path, {"fingerprint": fp})


# ------------------------------------------------------------------------------------------ manifest
def _percentiles(x: np.ndarray) -> dict:
    if not len(x):
        return {k: 0 for k in ("min", "p50", "p90", "p99", "max", "mean")}
    p = np.percentile(x, [50, 90, 99], method="lower")
    return {"min": int(x.min()), "p50": int(p[0]), "p90": int(p[1]), "p99": int(p[2]), "max": int(x.max()),
            "mean": round(float(x.mean()), 3)}


def _log2_edges(max_len: int, per_octave: int = 4) -> np.ndarray:
    top = max(1.0, math.log2(max(max_len, 1) + 1))
    edges = np.unique(np.floor(2 ** (np.arange(0, int(math.ceil(top * per_octave)) + 1) / per_octave)))
    edges = edges.astype(np.int64)
    return np.append(edges, edges[-1] + 1) if edges[-1] <= max_len else edges


def merge_manifest(out_dir: str, cfg: PreprocessConfig, fp: str, markers: list[dict], tok: dict) -> dict:
    """Combine task markers (in task order) and their length files into ``manifest.json``."""
    markers = sorted(markers, key=lambda m: m["task"])
    totals: dict[str, int] = {}
    for m in markers:
        for key, v in m["stats"].items():
            totals[key] = totals.get(key, 0) + int(v)
    doc_len, row_len, row_cap = [], [], []
    for m in markers:
        with np.load(_lengths_path(out_dir, m["task"])) as z:
            doc_len.append(z["doc_lengths"])
            row_len.append(z["row_lengths"])
            row_cap.append(z["row_capacity"])
    doc_len_a = np.concatenate(doc_len) if doc_len else np.zeros(0, np.int64)
    row_len_a = np.concatenate(row_len) if row_len else np.zeros(0, np.int64)
    row_cap_a = np.concatenate(row_cap) if row_cap else np.zeros(0, np.int64)
    edges = _log2_edges(int(doc_len_a.max()) if len(doc_len_a) else 1)
    fill_edges = np.linspace(0.0, 1.0, 51)
    row_fill = row_len_a / np.maximum(row_cap_a, 1)
    totals["fill"] = totals.get("tokens_out", 0) / max(totals.get("capacity_tokens", 0), 1)
    totals["shards"] = sum(len(m["shards"]) for m in markers)
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "fingerprint": fp,
        "config": cfg.as_dict(),
        "tokenizer": tok,
        "inputs": input_files(cfg),
        "shards": [dict(s, task=m["task"]) for m in markers for s in m["shards"]],
        "totals": totals,
        "doc_length_percentiles": _percentiles(doc_len_a),
        "row_length_percentiles": _percentiles(row_len_a),
        "histograms": {
            "doc_length": {"edges": edges.tolist(), "counts": np.histogram(doc_len_a, edges)[0].tolist()},
            "row_fill": {"edges": fill_edges.round(4).tolist(),
                         "counts": np.histogram(np.minimum(row_fill, 1.0), fill_edges)[0].tolist()},
        },
    }
    write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)
    return manifest


# ------------------------------------------------------------------------------------------ driver
class WindowProgress:
    """Tokens read by this run so far, from the window markers tasks write (any executor, any
    process: the output directory is the only channel). Windows present at the start (a resumed
    run) are not counted, so the rate is this run's."""

    def __init__(self, out_dir: str, tasks: Sequence[int], fp: str):
        self.out_dir, self.tasks, self.fp = out_dir, list(tasks), fp
        self._seen: dict[str, int] = {}
        self._base = self._scan()

    def _scan(self) -> int:
        total = 0
        for k in self.tasks:
            d = _window_dir(self.out_dir, k)
            for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
                if not (name.startswith("window-") and name.endswith(".json")):
                    continue
                path = os.path.join(d, name)
                if path not in self._seen:
                    try:
                        with open(path, encoding="utf-8") as f:
                            m = json.load(f)
                    except (OSError, ValueError):
                        continue
                    self._seen[path] = int(m["stats"]["tokens_in"]) if m.get("fingerprint") == self.fp else 0
                total += self._seen[path]
        return total

    def tokens(self) -> int:
        return self._scan() - self._base


def tokenizer_info(cfg: PreprocessConfig) -> dict:
    from seqpack.sources.tokenize import TokenizerSpec, load_tokenizer, special_ids

    spec = TokenizerSpec.parse(cfg.tokenizer)
    try:
        tok = load_tokenizer(spec.name)
        bos, eos, pad = special_ids(tok, spec)
    except (ValueError, OSError) as e:
        raise PreprocessError(f"tokenizer: {e}") from None
    return {
        "name": spec.name, "sha256": tokenizer_fingerprint(cfg.tokenizer), "vocab_size": int(tok.vocab_size),
        "bos_id": bos, "eos_id": eos, "pad_id": pad,
    }


def preprocess(
    cfg: PreprocessConfig,
    out_dir: str,
    *,
    workers: int = 1,
    engine: str = "local",
    overwrite: bool = False,
    progress: bool = True,
    only_tasks: Sequence[int] | None = None,
) -> dict | None:
    """Run (or resume) preprocessing into ``out_dir`` and return the manifest.

    Args:
        cfg: what to produce (its fields and the inputs decide the output bytes).
        workers: parallel tasks (processes or Ray CPUs); does not change the output.
        engine: ``local`` or ``ray``.
        overwrite: replace a different run's output in ``out_dir``.
        progress: tqdm bar over tasks with tokens/s.
        only_tasks: run just these tasks and return None without writing the manifest (one job of
            a Slurm job array each; a final run without it skips the finished tasks and merges).
    """
    if engine not in EXECUTORS:
        raise PreprocessError(f"engine: {engine!r} is not one of {list(EXECUTORS)}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers <= 0:
        raise PreprocessError(f"workers: expected a positive integer, got {workers!r}")
    out_dir = os.path.abspath(out_dir)
    tok = tokenizer_info(cfg)
    fp = fingerprint(cfg, input_files(cfg), tok["sha256"])
    if only_tasks is not None:
        bad = [k for k in only_tasks if not 0 <= k < cfg.tasks]
        if bad:
            raise PreprocessError(f"only_tasks: {bad} out of range for {cfg.tasks} tasks")
    # concurrent single-task jobs share the directory: none of them may delete the others' temp files
    prepare_output(out_dir, fp, overwrite, clean_temp=only_tasks is None)
    markers: list[dict] = []
    todo: list[TaskSpec] = []
    for k in range(cfg.tasks) if only_tasks is None else sorted(set(only_tasks)):
        m = task_done(out_dir, k, fp)
        if m is None:
            todo.append(TaskSpec(cfg.as_dict(), out_dir, k, fp))
        else:
            markers.append(m)
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.tasks, initial=len(markers), unit="task", desc="preprocess", disable=not progress,
               file=sys.stderr)
    watch = WindowProgress(out_dir, [s.task for s in todo], fp)
    t0 = time.perf_counter()

    def on_tick() -> None:
        if progress:
            tokens = watch.tokens()
            bar.set_postfix_str(f"{tokens:,} tok, {tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s")

    def on_done(marker: dict) -> None:
        markers.append(marker)
        bar.update(1)
        on_tick()

    try:
        EXECUTORS[engine](todo, workers, on_done, on_tick)
    finally:
        bar.close()
    if only_tasks is not None:
        return None
    return merge_manifest(out_dir, cfg, fp, markers, tok)


# ------------------------------------------------------------------------------------------ CLI
def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser(
        "preprocess",
        help="tokenize, plan and write training shards with a manifest",
        description="Read INPUT files (jsonl[.zst|.gz], parquet, arrow, webdataset tars, text, HF dataset "
        "dirs, earlier preprocess outputs), tokenize, plan rows and write shards plus manifest.json "
        "into --output. Options left unset come from --config (a loader config; a 'preprocess:' section "
        "may set any option), else defaults.",
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="input files, globs or directories")
    p.add_argument("--output", "-o", required=True, help="output directory")
    p.add_argument("--config", help="YAML/TOML/JSON config (sources, tokenizer, preprocess: {...})")
    p.add_argument("--tokenizer", help="'byte' (default) or a tokenizer.json path")
    p.add_argument("--seq-len", type=_positive_int, help="tokens per row (default 2048)")
    p.add_argument("--strategy", choices=STRATEGIES, help="pack (default), decompose or none")
    p.add_argument("--algorithm", choices=PACK_ALGORITHMS, help="packing algorithm (default bfd)")
    p.add_argument("--overflow", choices=("split", "truncate", "drop", "error"), help="default split")
    p.add_argument("--format", choices=SHARD_FORMATS, help="parquet (default) or wds tars")
    p.add_argument("--tasks", type=_positive_int, help="input parts (default max(4, input files))")
    p.add_argument("--rows-per-shard", type=_positive_int, help="rows per shard (default 4096)")
    p.add_argument("--window-tokens", type=_positive_int,
                   help="tokens a task plans and writes at a time (memory bound, resume unit; default 2^24)")
    p.add_argument("--seed", type=int, help="planning seed (default 0)")
    p.add_argument("--min-log2", type=int, help="decompose: smallest bucket exponent (default 6)")
    p.add_argument("--text-key", help="field holding the text (default 'text')")
    p.add_argument("--messages-key", help="field holding chat messages (assistant turns get loss)")
    p.add_argument("--input-ids-key", help="field holding pre-tokenized ids")
    p.add_argument("--on-error", choices=("raise", "skip"), help="bad records: raise (default) or skip+count")
    p.add_argument("--workers", type=_positive_int, default=1, help="parallel tasks (default 1)")
    p.add_argument("--engine", choices=ENGINES, default="local", help="local processes (default) or ray")
    p.add_argument("--overwrite", action="store_true", help="replace another run's output in --output")
    p.add_argument("--only-task", type=int, action="append", metavar="K",
                   help="run only task K (repeatable; e.g. one per Slurm array job) and skip the manifest; "
                   "a final run without it merges")
    p.add_argument("--quiet", action="store_true", help="no progress bar, summary only")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    try:
        file_cfg = load_config_file(args.config) if args.config else None
        keys = ("text_key", "messages_key", "input_ids_key")
        fields = {k: getattr(args, k) for k in keys if getattr(args, k)}
        cfg = build_config(
            args.inputs,
            config_file=file_cfg,
            tokenizer=args.tokenizer,
            fields=fields,
            on_error=args.on_error,
            seq_len=args.seq_len,
            strategy=args.strategy,
            algorithm=args.algorithm,
            overflow=args.overflow,
            format=args.format,
            tasks=args.tasks,
            rows_per_shard=args.rows_per_shard,
            seed=args.seed,
            min_log2=args.min_log2,
            window_tokens=args.window_tokens,
        )
        t0 = time.perf_counter()
        man = preprocess(cfg, args.output, workers=args.workers, engine=args.engine, overwrite=args.overwrite,
                         progress=not args.quiet, only_tasks=args.only_task)
    except (PreprocessError, OSError, ValueError) as e:  # bad input names file/record/field; disk errors
        print(f"seqpack preprocess: error: {e}", file=sys.stderr)
        return 2
    if man is None:
        print(f"tasks {sorted(set(args.only_task))} of {cfg.tasks} done in {args.output}; "
              "rerun without --only-task to finish and write the manifest")
        return 0
    t = man["totals"]
    dt = time.perf_counter() - t0
    print(
        f"{t['documents']:,} documents, {t['tokens_in']:,} tokens in -> {t['rows']:,} rows in {t['shards']} "
        f"shards, {t['tokens_out']:,} tokens out (fill {t['fill']:.2%}; dropped {t['dropped_tokens']:,}, "
        f"truncated {t['truncated_tokens']:,}; skipped records {t['skipped_records']:,}) in {dt:.1f} s "
        f"-> {os.path.join(os.path.abspath(args.output), MANIFEST)}"
    )
    return 0
