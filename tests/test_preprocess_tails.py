"""Part-filled rows held back and planned again: each task's tail is packed with the others' by the
merge, so a run needs at most one row more than ``ceil(tokens / capacity)`` where per-task packing
needs one more per task; nothing lost, resumable, and ``decompose``/``none`` unchanged."""

from __future__ import annotations

import json
import math
import os
import random

import numpy as np
import pytest
from test_preprocess import make_text, output_bytes, reassemble, reference_docs, run

import seqpack.preprocess.executors as pp_executors
import seqpack.preprocess.task as pp_task
from seqpack.plan import pack
from seqpack.preprocess.tails import TAIL_ROWS, held_rows, load_pieces
from seqpack.shards import MANIFEST, ShardFile, shard_paths

TASKS = 6


@pytest.fixture
def many(tmp_path):
    """One JSON-lines file of 360 short documents (about 60 per task at 6 tasks)."""
    rng = random.Random(1)
    p = tmp_path / "many.jsonl"
    lines = [json.dumps({"text": make_text(rng, int(rng.lognormvariate(2.5, 0.8)) + 1)}) for _ in range(360)]
    p.write_text("\n".join(lines) + "\n")
    return [str(p)]


def check_every_token_once(man: dict, out: str) -> None:
    ref, got = reference_docs(man), reassemble(out)  # reassemble checks pieces are contiguous
    assert set(got) == set(ref)
    for k, (toks, mask) in ref.items():
        np.testing.assert_array_equal(got[k][0], toks)
        np.testing.assert_array_equal(got[k][1], mask)
    t = man["totals"]
    assert t["tokens_in"] == t["tokens_out"] == sum(len(v[0]) for v in ref.values())
    assert t["rows"] == sum(s["rows"] for s in man["shards"]) == sum(man["histograms"]["row_fill"]["counts"])
    assert t["segments"] == sum(s["segments"] for s in man["shards"])
    assert t["tokens_out"] == sum(s["tokens"] for s in man["shards"])
    assert t["capacity_tokens"] == t["rows"] * man["config"]["capacity"]
    segments = [seg for p in shard_paths(out) for row in ShardFile(p).rows() for seg in row.segments()]
    assert t["target_tokens"] == sum(int(m.sum()) - int(m[0]) for _, _, _, m in segments)


def per_task_rows(out: str, tasks: int, capacity: int) -> int:
    """Rows the previous behaviour wrote: each task's documents packed alone."""
    n = 0
    for k in range(tasks):
        with np.load(os.path.join(out, ".seqpack", f"lengths-{k:05d}.npz")) as z:
            n += pack(z["doc_lengths"], capacity).n_bins
    return n


@pytest.mark.parametrize("algorithm", ["bfd", "ffd", "online"])
def test_tails_are_planned_together(many, tmp_path, algorithm):
    out = tmp_path / "out"
    man = run(many, out, capacity=256, tasks=TASKS, algorithm=algorithm)
    t = man["totals"]
    need = math.ceil(t["tokens_in"] / 256)
    assert t["rows"] <= need + 1
    assert per_task_rows(str(out), TASKS, 256) >= need + 3  # what packing each task alone gave
    check_every_token_once(man, str(out))
    # the merge's rows come last, as the shards of pseudo-task TASKS
    assert man["shards"][-1]["name"] == f"part-{TASKS:05d}-0000.parquet"
    assert man["shards"][-1]["task"] == TASKS
    tails = [load_pieces(str(out / ".seqpack" / f"tail-{k:05d}.npz")) for k in range(TASKS)]
    assert 0 < sum(len(p) for p in tails) and all(sum(len(d) for d in p) <= TAIL_ROWS * 256 for p in tails)
    assert man["shards"][-1]["tokens"] == sum(len(d.tokens) for p in tails for d in p)


def test_pieces_held_across_windows(many, tmp_path):
    """Small windows: part-filled rows go to the next window, split documents keep their offsets."""
    man = run(many, tmp_path / "out", capacity=256, tasks=2, window_tokens=1500, rows_per_shard=3)
    windows = os.listdir(tmp_path / "out" / ".seqpack" / "task-00000")
    assert len(windows) >= 2 * 4  # several windows (json + npz each)
    t = man["totals"]
    assert t["rows"] <= math.ceil(t["tokens_in"] / 256) + 1
    check_every_token_once(man, str(tmp_path / "out"))


def test_split_documents_held_back_keep_their_offsets(many, tmp_path):
    """Capacity below the longest documents: their last pieces may be held back and packed by the
    merge; every piece keeps its offset inside its document."""
    out = tmp_path / "out"
    man = run(many, out, capacity=48, tasks=TASKS)
    # most rows are part-filled here (each task holds back only TAIL_ROWS): fewer rows, not the bound
    assert man["totals"]["rows"] < per_task_rows(str(out), TASKS, 48)
    tails = [d for k in range(TASKS) for d in load_pieces(str(out / ".seqpack" / f"tail-{k:05d}.npz"))]
    assert any(d.start > 0 for d in tails)
    check_every_token_once(man, str(out))


def test_kill_in_a_task_or_in_the_merge_resumes_to_the_same_bytes(many, tmp_path, monkeypatch):
    kw = {"capacity": 256, "tasks": TASKS, "rows_per_shard": 8}
    clean = tmp_path / "clean"
    run(many, clean, **kw)
    real_write = pp_task.write_shard
    merged_name = f"part-{TASKS:05d}-"

    def dying(prefix):
        def write(path, rows, **k):
            if os.path.basename(path).startswith(prefix):
                raise KeyboardInterrupt
            return real_write(path, rows, **k)

        return write

    out = tmp_path / "out"
    monkeypatch.setattr(pp_task, "write_shard", dying("part-00003-"))  # between tasks 2 and 4
    with pytest.raises(KeyboardInterrupt):
        run(many, out, **kw)
    monkeypatch.setattr(pp_task, "write_shard", dying(merged_name))  # every task done, the merge dies
    with pytest.raises(KeyboardInterrupt):
        run(many, out, **kw)
    assert not (out / MANIFEST).exists()
    assert not [n for n in os.listdir(out) if n.startswith(merged_name)]
    monkeypatch.setattr(pp_task, "write_shard", real_write)
    ran = []
    real_task = pp_executors.run_task
    monkeypatch.setattr(
        pp_executors, "run_task", lambda spec, **k: ran.append(spec.task) or real_task(spec, **k)
    )
    run(many, out, **kw)
    assert ran == []  # the tasks were done: only the merge ran again
    assert output_bytes(str(out)) == output_bytes(str(clean))


def test_job_array_then_merge(many, tmp_path):
    kw = {"capacity": 256, "tasks": TASKS}
    clean = tmp_path / "clean"
    run(many, clean, **kw)
    out = tmp_path / "out"
    for k in reversed(range(TASKS)):
        assert run(many, out, only_tasks=[k], **kw) is None
    assert not [n for n in os.listdir(out) if n.startswith(f"part-{TASKS:05d}-")]
    run(many, out, **kw)
    assert output_bytes(str(out)) == output_bytes(str(clean))


@pytest.mark.parametrize("strategy", ["decompose", "none"])
def test_rows_that_do_not_share_room_are_never_held(many, tmp_path, strategy):
    out = tmp_path / "out"
    man = run(many, out, capacity=64, tasks=3, strategy=strategy, min_log2=3)
    assert [s["task"] for s in man["shards"]] == [0, 1, 2]
    assert all(load_pieces(str(out / ".seqpack" / f"tail-{k:05d}.npz")) == [] for k in range(3))


def test_held_rows_are_the_least_filled_part_filled_rows():
    cap = np.full(40, 1280, np.int64)
    tokens = np.full(40, 1280, np.int64)
    tokens[[3, 7, 9]] = [1271, 1270, 600]  # room 9 (under 1280/128 = 10: full enough), 10 and 680
    np.testing.assert_array_equal(held_rows(tokens, cap), [7, 9])
    tokens[:] = np.arange(40) + 100  # every row part-filled: the TAIL_ROWS least filled, in row order
    np.testing.assert_array_equal(held_rows(tokens, cap), np.arange(TAIL_ROWS))
    assert len(held_rows(np.zeros(0, np.int64), np.zeros(0, np.int64))) == 0
