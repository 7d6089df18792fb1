"""Injected faults end in a clear error or a counted skip, never in silently different, missing or
duplicated tokens: bit flips in shards, size and sha256 mismatches, shard names that leave the
output directory, concurrent and killed preprocess runs, killed workers, errors inside DataLoader
workers, counters over several sources, weights-only checkpoints."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

import seqpack
import seqpack.preprocess as pp
from seqpack.checks import ConfigError
from seqpack.cli import main
from seqpack.preprocess.lock import LOCK_NAME, LockError, StaleLockWarning
from seqpack.shards import (
    MANIFEST,
    PackedRowReader,
    SeqpackShardReader,
    ShardError,
    ShardFile,
    read_manifest,
    shard_paths,
    write_json_atomic,
)
from seqpack.sources.records import SourceError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "a packed row holds several documents cut at capacity with their masks and every count kept".split()
PACK = {"type": "pack", "capacity": 128}
CLI = "import sys; from seqpack.cli import main; sys.exit(main(sys.argv[1:]))"


def write_corpus(path, n_docs=160, seed=0) -> str:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            n = int(rng.lognormvariate(2.8, 0.9)) + 1
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(n))}) + "\n")
    return str(path)


def run(inputs, out, **kw) -> dict | None:
    kw.setdefault("capacity", 128)
    kw.setdefault("tasks", 2)
    only = kw.pop("only_tasks", None)
    return pp.preprocess(pp.build_config(inputs, **kw), str(out), progress=False, only_tasks=only)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A preprocess output of real text with many small row groups."""
    d = tmp_path_factory.mktemp("faults")
    out = d / "out"
    run([write_corpus(d / "c.jsonl")], out, row_group_rows=4, rows_per_shard=64, tasks=1)
    return str(out)


def records_by_unit(directory: str, **kw) -> tuple[list[tuple[int, bytes]], dict]:
    r = SeqpackShardReader(directory, **kw)
    r.reset()
    got = [(rec.doc_id, np.asarray(rec.tokens).tobytes()) for rec in r]
    return got, r.stats()


def reference_units(directory: str) -> list[list[tuple[int, bytes]]]:
    """The records of every unit (row group) in reader order, read from an intact copy."""
    out = []
    r = SeqpackShardReader(directory)
    for shard, path in enumerate(shard_paths(directory)):
        for g in range(ShardFile(path).num_groups):
            recs = list(r.read_unit(shard, path, g, 0, 1))
            out.append([(rec.doc_id, np.asarray(rec.tokens).tobytes()) for _, rec in recs])
    return out


def flip(path: str, pos: int, bit: int = 3) -> bytes:
    data = open(path, "rb").read()
    b = bytearray(data)
    b[pos] ^= 1 << bit
    with open(path, "wb") as f:
        f.write(b)
    return data


def data_page_positions(path: str, n: int) -> list[int]:
    """``n`` byte offsets spread over the first row group's ``input_ids`` column chunk (its page
    header and zstd data page)."""
    col = pq.ParquetFile(path).metadata.row_group(0).column(0)
    start, size = col.data_page_offset, col.total_compressed_size
    return sorted({int(x) for x in np.linspace(start, start + size - 1, n)})


# ---------------------------------------------------------------------------------------- checksums
def test_bit_flips_in_a_data_page_raise_or_are_skipped_and_counted(shards):
    """40 positions across a zstd data page: each raises naming shard and row group, or (skip) the
    damaged row group is left out and counted; the records served are exactly the intact groups'."""
    ref_units = reference_units(shards)
    ref = [rec for u in ref_units for rec in u]
    assert records_by_unit(shards)[0] == ref
    path = shard_paths(shards)[0]
    positions = data_page_positions(path, 40)
    assert len(positions) == 40
    outcomes = {"raised": 0, "skipped": 0}
    for pos in positions:
        original = flip(path, pos)
        try:
            with pytest.raises(SourceError, match=r"part-00000-0000\.parquet: row group 0"):
                records_by_unit(shards)
            with pytest.raises(ShardError, match="row group 0"):
                list(PackedRowReader(shards, as_batch=False))
            got, stats = records_by_unit(shards, on_error="skip")
            # the damaged group (group 0, the first unit) is skipped whole and counted, the rest intact
            assert stats["read/source0/skipped_files"] == 1
            assert got == [rec for u in ref_units[1:] for rec in u]
            outcomes["raised"] += 1
            outcomes["skipped"] += 1
        finally:
            with open(path, "wb") as f:
                f.write(original)
    assert outcomes == {"raised": 40, "skipped": 40}


def test_bit_flips_anywhere_in_a_shard_never_change_tokens(shards):
    """~250 positions over the whole file (footer included): an error, a counted skip, or the same
    tokens; with ``verify=True`` every flip is an error naming the shard before any token is read."""
    ref = records_by_unit(shards)[0]
    path = shard_paths(shards)[0]
    size = os.path.getsize(path)
    silent, errors, same = [], 0, 0
    for i, pos in enumerate(range(0, size, max(1, size // 250))):
        original = flip(path, pos, bit=pos % 8)
        try:
            try:
                got, stats = records_by_unit(shards, on_error="skip")
            except (SourceError, ShardError):
                errors += 1
            else:
                if got == ref:
                    same += 1
                elif not stats["read/source0/skipped_files"] or not set(got) < set(ref):
                    silent.append(pos)
                else:
                    errors += 1
            if i % 10 == 0:
                with pytest.raises(SourceError, match=r"part-00000-0000\.parquet: "):
                    records_by_unit(shards, verify=True)
        finally:
            with open(path, "wb") as f:
                f.write(original)
    assert silent == [] and errors > 0


def test_footer_flips_never_lose_or_repeat_segments_over_two_consumers(shards):
    """Consumers split row groups by the footer's value counts: a damaged footer must not make
    them lose or repeat segments. Two consumers, ~60 footer positions: together they serve every
    record once, or fewer with a counted skip or an error."""
    ref = records_by_unit(shards)[0]
    path = shard_paths(shards)[0]
    data = open(path, "rb").read()
    footer = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    for pos in range(footer, len(data) - 8, max(1, (len(data) - 8 - footer) // 60)):
        original = flip(path, pos, bit=pos % 8)
        try:
            got, skipped = [], 0
            for k in range(2):
                recs, stats = records_by_unit(shards, on_error="skip", consumer=(k, 2))
                got += recs
                skipped += stats["read/source0/skipped_files"]
        except (SourceError, ShardError):
            continue
        finally:
            with open(path, "wb") as f:
                f.write(original)
        assert len(got) == len(set(got)), f"flip at {pos}: a segment served twice"
        assert set(got) <= set(ref), f"flip at {pos}: different tokens"
        assert len(got) == len(ref) or skipped > 0, f"flip at {pos}: segments lost without a count"


def test_size_mismatch_fails_on_open_naming_the_shard(shards, tmp_path):
    path = shard_paths(shards)[0]
    rest = [rec for u in reference_units(shards)[ShardFile(path).num_groups :] for rec in u]
    original = open(path, "rb").read()
    try:
        with open(path, "ab") as f:
            f.write(b"\0")
        with pytest.raises(SourceError, match=r"part-00000-0000\.parquet: .*the manifest says"):
            records_by_unit(shards)
        got, stats = records_by_unit(shards, on_error="skip")
        assert got == rest
        assert stats["read/source0/skipped_files"] == 1
    finally:
        with open(path, "wb") as f:
            f.write(original)


def test_verify_in_the_loader_config_and_the_cli(shards, tmp_path, capsys):
    """``verify: true`` on a seqpack source (loader) and ``--verify`` (stats, inspect)."""
    cfg = {
        "sources": [{"path": shards, "format": "seqpack", "verify": True}],
        "stage": {"type": "pack", "capacity": 128},
    }
    n_tokens = sum(int(b.num_real_tokens) for b in seqpack.build_loader(cfg))
    assert n_tokens == read_manifest(shards)["totals"]["tokens_out"]
    path = shard_paths(shards)[0]
    # the leading magic is never read: a flip there decodes to the same tokens, only the sha256 sees it
    original = flip(path, 0)
    try:
        assert (
            sum(
                int(b.num_real_tokens)
                for b in seqpack.build_loader(dict(cfg, sources=[dict(cfg["sources"][0], verify=False)]))
            )
            == n_tokens
        )
        with pytest.raises(SourceError, match="sha256"):
            list(seqpack.build_loader(cfg))
        capsys.readouterr()
        assert main(["stats", shards, "--verify"]) == 1
        assert "BAD" in capsys.readouterr().out
        assert main(["inspect", shards, "--verify"]) == 2
        assert "sha256" in capsys.readouterr().err
    finally:
        with open(path, "wb") as f:
            f.write(original)
    with pytest.raises(ConfigError, match=r"sources\[0\]\.verify: only sources of format 'seqpack'"):
        seqpack.build_loader({"sources": [{"path": path, "format": "parquet", "verify": True}]})


def test_webdataset_shards_are_hashed_when_read(tmp_path):
    out = tmp_path / "wds"
    run([write_corpus(tmp_path / "c.jsonl", n_docs=40)], out, format="wds", tasks=1)
    path = shard_paths(str(out))[0]
    ref = records_by_unit(str(out))[0]
    for pos in np.linspace(0, os.path.getsize(path) - 1, 12).astype(int):
        original = flip(path, int(pos))
        try:
            with pytest.raises(SourceError, match="sha256"):
                records_by_unit(str(out))
        finally:
            with open(path, "wb") as f:
                f.write(original)
    assert records_by_unit(str(out))[0] == ref


# ---------------------------------------------------------------------------------------- confinement
@pytest.mark.parametrize(
    "name",
    ["../outside.parquet", "/etc/passwd", "sub/../../outside.parquet", "./part.parquet", "link.parquet"],
)
def test_manifest_names_outside_the_directory_are_refused(shards, tmp_path, capsys, name):
    d = tmp_path / "out"
    d.mkdir()
    man = read_manifest(shards)
    first = man["shards"][0]
    outside = tmp_path / "outside.parquet"
    outside.write_bytes(open(shard_paths(shards)[0], "rb").read())
    if name == "link.parquet":
        os.symlink(outside, d / name)
    man["shards"] = [dict(first, name=name)]
    write_json_atomic(str(d / MANIFEST), man)
    entry = r"manifest\.json: shards\[0\]\.name"
    with pytest.raises(ShardError, match=entry):
        read_manifest(str(d))
    with pytest.raises(ShardError, match=entry):  # the loader's seqpack source
        SeqpackShardReader(str(d))
    with pytest.raises(ShardError, match=entry):
        list(seqpack.build_loader({"sources": [{"path": str(d), "format": "seqpack"}], "stage": PACK}))
    with pytest.raises(ConfigError, match=entry):  # the packed_rows stage
        seqpack.build_loader({"sources": [str(d)], "stage": {"type": "packed_rows"}})
    for argv in (["inspect", str(d)], ["stats", str(d), "--verify"]):
        capsys.readouterr()
        assert main(argv) == 2
        assert "shards[0].name" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- run lock
def _runner(inputs, out, results, key, **kw):
    try:
        results[key] = run(inputs, out, **kw)
    except Exception as e:  # noqa: BLE001 - the test inspects what each run ended with
        results[key] = e


def test_concurrent_runs_with_different_configs_one_refused(tmp_path, monkeypatch):
    """Two runs into one directory with a widened window between reading and writing the run
    marker: exactly one writes, the other is refused naming the holder; the output verifies."""
    corpus = write_corpus(tmp_path / "c.jsonl")
    out = tmp_path / "out"
    monkeypatch.setenv("SEQPACK_TEST_DELAY_RUN_MARKER", "1.0")
    results: dict = {}
    threads = [
        threading.Thread(target=_runner, args=([corpus], out, results, cap), kwargs={"capacity": cap})
        for cap in (128, 256)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [v for v in results.values() if isinstance(v, Exception)]
    done = {k: v for k, v in results.items() if isinstance(v, dict)}
    assert len(errors) == 1 and len(done) == 1
    assert isinstance(errors[0], LockError)
    assert "another preprocess run with a different config" in str(errors[0]) and f"pid {os.getpid()}" in str(
        errors[0]
    )
    ((cap, man),) = done.items()
    assert read_manifest(str(out))["config"]["capacity"] == cap
    assert main(["stats", str(out), "--verify"]) == 0
    served = sum(
        int(b.num_real_tokens)
        for b in seqpack.build_loader({"sources": [str(out)], "stage": {"type": "packed_rows"}})
    )
    assert served == man["totals"]["tokens_out"] == man["totals"]["tokens_in"]


def test_concurrent_runs_of_one_config_wait_and_never_interleave(tmp_path, monkeypatch, capfd):
    corpus = write_corpus(tmp_path / "c.jsonl")
    ref = run([corpus], tmp_path / "ref")
    out = tmp_path / "out"
    monkeypatch.setenv("SEQPACK_TEST_DELAY_RUN_MARKER", "0.5")
    results: dict = {}
    threads = [threading.Thread(target=_runner, args=([corpus], out, results, i)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(v, dict) for v in results.values()), results
    assert "waiting for it to finish" in capfd.readouterr().err
    for man in results.values():
        assert man["shards"] == ref["shards"]  # same bytes (sha256) as a run alone
    assert main(["stats", str(out), "--verify"]) == 0


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def _wait_for(cond, what: str, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _lock_holder(out) -> dict:
    try:
        return json.loads(open(os.path.join(out, LOCK_NAME)).read() or "{}")
    except (OSError, ValueError):
        return {}


def test_a_stale_lock_of_a_killed_run_is_reported_and_taken_over(tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl")
    out = str(tmp_path / "out")
    argv = [corpus, "--output", out, "--seq-len", "128", "--tasks", "2", "--quiet"]
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI, "preprocess", *argv], env=_env(SEQPACK_TEST_DELAY_WINDOW="60")
    )
    try:
        _wait_for(lambda: _lock_holder(out).get("pid") == proc.pid, "the run to take its lock")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with pytest.warns(StaleLockWarning, match=f"stale run lock of pid {proc.pid} on host"):
        man = run([corpus], out)
    assert man["shards"] == run([corpus], tmp_path / "ref")["shards"]
    assert _lock_holder(out) == {}  # released


def _children(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                status = open(f"/proc/{name}/status").read()
            except OSError:
                continue
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            if fields.get("PPid", "").strip() == str(pid) and not fields.get("State", "").startswith("Z"):
                out.append(int(name))
    return out


def _alive(pid: int) -> bool:
    try:
        return not open(f"/proc/{pid}/status").read().split("State:\t", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_a_killed_parent(tmp_path):
    """SIGKILL of ``preprocess --workers 2``: its worker processes end too, nothing writes after."""
    corpus = write_corpus(tmp_path / "c.jsonl")
    out = str(tmp_path / "out")
    argv = [corpus, "--output", out, "--seq-len", "128", "--tasks", "2", "--workers", "2", "--quiet"]
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI, "preprocess", *argv], env=_env(SEQPACK_TEST_DELAY_WINDOW="60")
    )
    try:
        # both tasks started (their window directories exist): the workers are inside run_task
        _wait_for(
            lambda: all(os.path.isdir(os.path.join(out, ".seqpack", f"task-{k:05d}")) for k in (0, 1)),
            "both tasks",
        )
        workers = [c for c in _children(proc.pid) if "spawn_main" in open(f"/proc/{c}/cmdline").read()]
        assert len(workers) == 2
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    _wait_for(lambda: not any(_alive(w) for w in workers), "the workers to die", timeout=20)
    before = sorted(os.listdir(out))
    time.sleep(0.5)
    assert sorted(os.listdir(out)) == before


# ------------------------------------------------------------------------------- loader errors, counts
def test_an_error_in_a_dataloader_worker_keeps_its_type_and_names_the_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = (
        [json.dumps({"text": "fine words here"})] * 6 + ['{"text": 5}'] + [json.dumps({"text": "more"})] * 6
    )
    bad.write_text("\n".join(lines) + "\n")
    loader = seqpack.build_loader(
        {"sources": [str(bad)], "stage": {"type": "pack", "capacity": 64}}, num_workers=2
    )
    with pytest.raises(SourceError, match=r"bad\.jsonl: record 6") as info:
        list(loader)
    assert info.value.path == str(bad) and info.value.record == 6


def test_loader_stats_add_up_over_sources(tmp_path):
    a, b = write_corpus(tmp_path / "a.jsonl", 30, seed=1), write_corpus(tmp_path / "b.jsonl", 50, seed=2)
    loader = seqpack.build_loader({"sources": [a, b], "stage": {"type": "pack", "capacity": 256}})
    for _ in loader:
        pass
    st = loader.stats()
    assert st["tokenize/documents"] == 80 == st["mix/source0/documents"] + st["mix/source1/documents"]
    assert st["tokenize/tokens"] == st["mix/source0/tokens"] + st["mix/source1/tokens"]


def test_cli_summaries_list_skipped_files_and_records(tmp_path, capsys):
    good = write_corpus(tmp_path / "a.jsonl", 30)
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + '{"text": 5}\n')
    broken = tmp_path / "c.jsonl.zst"
    broken.write_bytes(b"\x28\xb5\x2f\xfd" + os.urandom(64))  # a zstd magic, then garbage
    out = str(tmp_path / "out")
    argv = [good, str(bad), str(broken), "--output", out, "--on-error", "skip", "--tasks", "3", "--quiet"]
    assert main(["preprocess", *argv]) == 0
    res = capsys.readouterr()
    assert "skipped files 1, records 1" in res.out and "warning: skipped 1 unreadable files" in res.err
    assert main(["stats", out]) == 0
    text = capsys.readouterr().out
    assert "skipped records 1" in text and re.search(r"skipped files +1 ", text)


def test_train_hf_checkpoints_load_weights_only():
    src = open(os.path.join(ROOT, "examples", "train_hf.py")).read()
    assert "weights_only=True" in src and "weights_only=False" not in src
