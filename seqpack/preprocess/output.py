"""The output directory of a preprocess run: its layout, the run marker, the task and window
markers that make it resumable, and the final ``manifest.json``.

Layout::

    OUT/part-KKKKK-JJJJ.parquet|tar     shards of task K (J counts across its windows); K = tasks:
                                        the rows of all tasks' tails, planned together by the merge
    OUT/manifest.json                   written last, once every task is done
    OUT/.seqpack/run.json               the run's fingerprint (a directory holds one run)
    OUT/.seqpack/task-KKKKK.json        task K done: its shards (sha256) and counts
    OUT/.seqpack/lengths-KKKKK.npz      its document and row lengths (for the manifest histograms)
    OUT/.seqpack/tail-KKKKK.npz         its tail: pieces of its part-filled rows, for the merge
    OUT/.seqpack/timing-KKKKK.json      its timings (vary run to run: never in a marker)
    OUT/.seqpack/task-KKKKK/window-WWWWW.json|npz   window W of task K done (resume inside a task)

Every file is written atomically (``seqpack.shards.writer``): a marker exists only after the
shards it lists were renamed into place, so a half-written shard is never listed.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Sequence

import numpy as np

from seqpack.preprocess.config import (
    PreprocessConfig,
    PreprocessError,
    fingerprint,
    input_files,
    tokenizer_info,
)
from seqpack.preprocess.lock import fault_delay
from seqpack.shards import MANIFEST, MANIFEST_FORMAT, MANIFEST_VERSION, verify_shard, write_json_atomic

WORK_DIR = ".seqpack"
SHARD_NAME = re.compile(r"^part-\d{5}-\d{4}\.(parquet|tar)$")


# ------------------------------------------------------------------------------------------ paths
def task_marker(out_dir: str, task: int) -> str:
    return os.path.join(out_dir, WORK_DIR, f"task-{task:05d}.json")


def lengths_path(out_dir: str, task: int) -> str:
    return os.path.join(out_dir, WORK_DIR, f"lengths-{task:05d}.npz")


def tail_path(out_dir: str, task: int) -> str:
    return os.path.join(out_dir, WORK_DIR, f"tail-{task:05d}.npz")


def timing_path(out_dir: str, task: int) -> str:
    return os.path.join(out_dir, WORK_DIR, f"timing-{task:05d}.json")


def window_dir(out_dir: str, task: int) -> str:
    return os.path.join(out_dir, WORK_DIR, f"task-{task:05d}")


def window_marker(out_dir: str, task: int, window: int) -> str:
    return os.path.join(window_dir(out_dir, task), f"window-{window:05d}.json")


def window_lengths(out_dir: str, task: int, window: int) -> str:
    return os.path.join(window_dir(out_dir, task), f"window-{window:05d}.npz")


def shard_path(out_dir: str, task: int, part: int, suffix: str) -> str:
    return os.path.join(out_dir, f"part-{task:05d}-{part:04d}{suffix}")


def _read_json(path: str) -> dict | None:
    """The JSON object in ``path``, or None when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


# ------------------------------------------------------------------------------------------ markers
def task_done(out_dir: str, task: int, fp: str) -> dict | None:
    """The task's marker if it matches ``fp`` and every shard it lists still verifies, else None."""
    if not (os.path.isfile(lengths_path(out_dir, task)) and os.path.isfile(tail_path(out_dir, task))):
        return None
    marker = _read_json(task_marker(out_dir, task))
    if marker is None or marker.get("fingerprint") != fp:
        return None
    if not all(verify_shard(out_dir, s) for s in marker["shards"]):
        return None
    return marker


def finished_windows(out_dir: str, task: int, fp: str) -> list[dict]:
    """Window markers of an interrupted task, from window 0 up to the first missing or broken one."""
    out: list[dict] = []
    while True:
        m = _read_json(window_marker(out_dir, task, len(out)))
        if (
            m is None
            or m.get("fingerprint") != fp
            or not os.path.isfile(window_lengths(out_dir, task, len(out)))
        ):
            return out
        if not all(verify_shard(out_dir, s) for s in m["shards"]):
            return out
        out.append(m)


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
            d = window_dir(self.out_dir, k)
            for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
                if not (name.startswith("window-") and name.endswith(".json")):
                    continue
                path = os.path.join(d, name)
                if path not in self._seen:
                    m = _read_json(path)
                    if m is None:
                        continue
                    self._seen[path] = int(m["stats"]["tokens_in"]) if m.get("fingerprint") == self.fp else 0
                total += self._seen[path]
        return total

    def tokens(self) -> int:
        return self._scan() - self._base


# ------------------------------------------------------------------------------------------ the directory
def _is_ours(name: str) -> bool:
    return name in (MANIFEST, WORK_DIR) or bool(SHARD_NAME.match(name))


def prepare_output(out_dir: str, fp: str, overwrite: bool, clean_temp: bool = True) -> None:
    """Create ``out_dir`` or check it belongs to this run (same fingerprint); refuse otherwise.

    Call it holding the run lock (:mod:`seqpack.preprocess.lock`, as :func:`preprocess` does): the
    lock makes reading the markers and writing this run's one step.

    A directory holding a manifest or a work dir of a different run, or files seqpack did not write,
    is refused unless ``overwrite`` (which removes only seqpack's own files there).
    """
    os.makedirs(out_dir, exist_ok=True)
    work = os.path.join(out_dir, WORK_DIR)
    problems = []
    man_path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(man_path):
        man = _read_json(man_path)
        if man is None or man.get("format") != MANIFEST_FORMAT:
            problems.append(f"{man_path} is not a seqpack manifest")
        elif man.get("fingerprint") != fp:
            problems.append(
                f"{out_dir} holds the finished output of a different run (other config, inputs or tokenizer)"
            )
    run_path = os.path.join(work, "run.json")
    # a finished output's own run marker says nothing more than its manifest did
    if not problems and os.path.exists(run_path) and (_read_json(run_path) or {}).get("fingerprint") != fp:
        problems.append(f"{out_dir} holds an unfinished different run (other config, inputs or tokenizer)")
    foreign = sorted(n for n in os.listdir(out_dir) if not _is_ours(n) and not n.startswith("."))
    if foreign:
        problems.append(f"{out_dir} holds files seqpack did not write: {foreign[:5]}")
    fault_delay("RUN_MARKER")  # tests: the window between reading the markers and writing ours
    if problems and not overwrite:
        raise PreprocessError(
            "; ".join(problems) + "; refusing to write there (pass --overwrite to replace it, or choose "
            "another output directory)"
        )
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
    write_json_atomic(run_path, {"fingerprint": fp})


def run_differences(man: dict, cfg: PreprocessConfig, inputs: list[dict], tokenizer_sha: str) -> list[str]:
    """What differs between the run that wrote manifest ``man`` and this one, one phrase per item
    (``capacity 512 -> 256``, ``inputs added: [...]``, ``tokenizer file changed``)."""
    old = dict(man.get("config") or {})
    if "seq_len" in old and "capacity" not in old:  # a version-1 manifest
        old["capacity"] = old.pop("seq_len")
    new = cfg.as_dict()
    out = []
    for key in [*new, *(k for k in old if k not in new)]:
        if old.get(key) == new.get(key):
            continue
        if key == "sources":
            out.append("sources (paths, formats or field keys)")
        elif key == "tokenizer":
            a, b = old.get(key) or {}, new.get(key) or {}
            changed = sorted(k for k in {*a, *b} if a.get(k) != b.get(k))
            out += [f"tokenizer.{k} {a.get(k)!r} -> {b.get(k)!r}" for k in changed]
        else:
            out.append(f"{key} {old.get(key)!r} -> {new.get(key)!r}")
    before = {i["path"]: (i.get("bytes"), i.get("sample_sha256")) for i in man.get("inputs") or []}
    now = {i["path"]: (i.get("bytes"), i.get("sample_sha256")) for i in inputs}
    for what, paths in (
        ("inputs added", sorted(set(now) - set(before))),
        ("inputs removed", sorted(set(before) - set(now))),
        ("inputs changed since", sorted(p for p in set(now) & set(before) if now[p] != before[p])),
    ):
        if paths:
            more = " ..." if len(paths) > 3 else ""
            out.append(f"{what}: {[os.path.basename(p) for p in paths[:3]]}{more}")
    old_sha = (man.get("tokenizer") or {}).get("sha256")
    if not any(d.startswith("tokenizer") for d in out) and old_sha not in (None, tokenizer_sha):
        out.append("tokenizer file changed")
    return out or ["the run fingerprint"]


def existing_run(out_dir: str, cfg: PreprocessConfig) -> tuple[str, str]:
    """What a run of ``cfg`` finds in ``out_dir`` before it starts, with a message for the user.

    Returns ``("complete", summary)`` when the directory holds this very run, finished, with every
    shard intact (nothing to do); ``("different", what differs and what to do)`` when it holds a
    finished run of another config, inputs or tokenizer; ``("other", "")`` otherwise (new, resumable,
    or refused with its own message by :func:`prepare_output`).
    """
    man = _read_json(os.path.join(out_dir, MANIFEST))
    if man is None or man.get("format") != MANIFEST_FORMAT:
        return "other", ""
    inputs = input_files(cfg)
    tok = tokenizer_info(cfg)
    fp = fingerprint(cfg, inputs, tok["sha256"])
    if man.get("fingerprint") != fp:
        diff = "; ".join(run_differences(man, cfg, inputs, tok["sha256"]))
        return "different", (
            f"{out_dir} holds a finished run with another config (differs in: {diff}); pass --overwrite "
            "to replace it, or choose another --output directory"
        )
    if not all(verify_shard(out_dir, s) for s in man.get("shards", [])):
        return "other", ""  # a damaged shard: the run redoes its task
    t = man.get("totals", {})
    return "complete", (
        f"{out_dir} is already complete for this config and input ({int(t.get('rows', 0)):,} rows in "
        f"{int(t.get('shards', 0))} shards, all verified); nothing to do"
    )


# ------------------------------------------------------------------------------------------ manifest
def _percentiles(x: np.ndarray) -> dict:
    if not len(x):
        return {k: 0 for k in ("min", "p50", "p90", "p99", "max", "mean")}
    p = np.percentile(x, [50, 90, 99], method="lower")
    return {
        "min": int(x.min()),
        "p50": int(p[0]),
        "p90": int(p[1]),
        "p99": int(p[2]),
        "max": int(x.max()),
        "mean": round(float(x.mean()), 3),
    }


def _log2_edges(max_len: int, per_octave: int = 4) -> np.ndarray:
    top = max(1.0, math.log2(max(max_len, 1) + 1))
    edges = np.unique(np.floor(2 ** (np.arange(0, int(math.ceil(top * per_octave)) + 1) / per_octave)))
    edges = edges.astype(np.int64)
    return np.append(edges, edges[-1] + 1) if edges[-1] <= max_len else edges


def merge_manifest(
    out_dir: str, cfg: PreprocessConfig, fp: str, markers: list[dict], tok: dict, merged: dict | None = None
) -> dict:
    """Combine task markers (in task order) and their length files into ``manifest.json``.

    ``merged``: the rows the merge wrote from the tasks' tails
    (:func:`seqpack.preprocess.executors.merge_tails`), counted and listed after the tasks'.
    """
    markers = sorted(markers, key=lambda m: m["task"])
    doc_len, row_len, row_cap = [], [], []
    for m in markers:
        with np.load(lengths_path(out_dir, m["task"])) as z:
            doc_len.append(z["doc_lengths"])
            row_len.append(z["row_lengths"])
            row_cap.append(z["row_capacity"])
    if merged is not None:
        markers = [*markers, merged]
        row_len.append(merged["row_lengths"])
        row_cap.append(merged["row_capacity"])
    totals: dict[str, int] = {}
    for m in markers:
        for key, v in m["stats"].items():
            totals[key] = totals.get(key, 0) + int(v)
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
            "row_fill": {
                "edges": fill_edges.round(4).tolist(),
                "counts": np.histogram(np.minimum(row_fill, 1.0), fill_edges)[0].tolist(),
            },
        },
    }
    write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)
    return manifest
