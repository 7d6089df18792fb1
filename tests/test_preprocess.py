"""Offline preprocessing: every token accounted for (compared with reading + tokenizing directly),
identical bytes for any worker count, resume after a kill, hash re-verification, output-dir guards,
config errors, a real ``tokenizers`` BPE file, bad records."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import zstandard

import seqpack.preprocess as pp
import seqpack.preprocess.executors as pp_executors
import seqpack.preprocess.task as pp_task
from seqpack.shards import MANIFEST, ShardFile, read_manifest, shard_paths
from seqpack.sources.read import read
from seqpack.sources.tokenize import Tokenize

WORDS = "the a packed row holds several documents split at capacity with masks and counts".split()


def make_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


@pytest.fixture
def corpus(tmp_path):
    """Two JSON-lines files (one zstd) with log-normal document lengths, some longer than 256 bytes."""
    rng = random.Random(0)
    paths = []
    for i, name in enumerate(["a.jsonl", "b.jsonl.zst"]):
        n_words = [int(rng.lognormvariate(3.0, 1.0)) + 1 for _ in range(120)]
        lines = [json.dumps({"text": make_text(rng, n)}) for n in n_words]
        data = ("\n".join(lines) + "\n").encode()
        p = tmp_path / name
        p.write_bytes(zstandard.ZstdCompressor().compress(data) if i else data)
        paths.append(str(p))
    return paths


def run(inputs, out, **kw):
    workers = kw.pop("workers", 1)
    overwrite = kw.pop("overwrite", False)
    engine = kw.pop("engine", "local")
    only = kw.pop("only_tasks", None)
    kw.setdefault("capacity", 256)
    kw.setdefault("tasks", 3)
    cfg = pp.build_config(inputs, **kw)
    return pp.preprocess(
        cfg, str(out), workers=workers, engine=engine, overwrite=overwrite, progress=False, only_tasks=only
    )


def reference_docs(manifest: dict) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """doc_id -> (tokens, loss mask) by reading and tokenizing the inputs directly, no planning."""
    cfg = pp.PreprocessConfig(**manifest["config"])
    out = {}
    for i, s in enumerate(cfg.sources):
        opts = {k: v for k, v in s.items() if k not in ("path", "format", "weight")}
        for d in Tokenize(read(s["path"], format=s["format"], source_index=i, **opts), cfg.tokenizer):
            out[d.doc_id] = (d.tokens, np.ones(len(d.tokens), bool) if d.loss_mask is None else d.loss_mask)
    return out


def reassemble(out_dir: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """doc_id -> (tokens, loss mask) glued back from the shards' segments (checked contiguous)."""
    pieces: dict[int, list] = {}
    for path in shard_paths(out_dir):
        for row in ShardFile(path).rows():
            for doc_id, start, toks, mask in row.segments():
                pieces.setdefault(doc_id, []).append((start, toks.astype(np.int64), mask.astype(bool)))
    out = {}
    for doc_id, ps in pieces.items():
        ps.sort(key=lambda p: p[0])
        pos = 0
        for start, toks, _ in ps:
            assert start == pos, f"doc {doc_id}: gap or overlap at {start} (expected {pos})"
            pos += len(toks)
        out[doc_id] = (np.concatenate([p[1] for p in ps]), np.concatenate([p[2] for p in ps]))
    return out


def output_bytes(out_dir: str) -> dict[str, bytes]:
    names = [n for n in os.listdir(out_dir) if not n.startswith(".")]
    return {n: open(os.path.join(out_dir, n), "rb").read() for n in sorted(names)}


def test_pack_keeps_every_token(corpus, tmp_path):
    man = run(corpus, tmp_path / "out")
    ref, got = reference_docs(man), reassemble(str(tmp_path / "out"))
    assert set(got) == set(ref) and len(ref) == 240
    for k, (toks, mask) in ref.items():
        np.testing.assert_array_equal(got[k][0], toks)
        np.testing.assert_array_equal(got[k][1], mask)
    t = man["totals"]
    n_tok = sum(len(v[0]) for v in ref.values())
    assert t["documents"] == 240 and t["tokens_in"] == t["tokens_out"] == n_tok
    assert t["dropped_tokens"] == t["truncated_tokens"] == 0
    assert t["fill"] == pytest.approx(n_tok / (t["rows"] * 256))
    assert t["fill"] > 0.9
    assert sum(s["rows"] for s in man["shards"]) == t["rows"]
    assert man["tokenizer"]["name"] == "byte" and len(man["tokenizer"]["sha256"]) == 64
    assert sum(man["histograms"]["doc_length"]["counts"]) == 240
    assert sum(man["histograms"]["row_fill"]["counts"]) == t["rows"]
    lens = sorted(len(v[0]) for v in ref.values())
    pct = man["doc_length_percentiles"]
    assert (pct["min"], pct["max"]) == (lens[0], lens[-1])
    for path in shard_paths(str(tmp_path / "out")):
        assert all(len(r) <= 256 for r in ShardFile(path).rows())


@pytest.mark.parametrize(
    "strategy,overflow", [("none", "truncate"), ("pack", "drop"), ("decompose", "split"), ("none", "split")]
)
def test_every_token_is_emitted_or_counted(corpus, tmp_path, strategy, overflow):
    man = run(corpus, tmp_path / "out", strategy=strategy, overflow=overflow, min_log2=4)
    t = man["totals"]
    assert t["tokens_in"] == t["tokens_out"] + t["dropped_tokens"] + t["truncated_tokens"]
    ref, got = reference_docs(man), reassemble(str(tmp_path / "out"))
    for k, (toks, _) in ref.items():
        kept = got.get(k, (np.zeros(0, np.int64),))[0]
        np.testing.assert_array_equal(kept, toks[: len(kept)])  # a prefix of the document survives
    lens = [len(r) for p in shard_paths(str(tmp_path / "out")) for r in ShardFile(p).rows()]
    if strategy == "decompose":
        assert t["dropped_tokens"] > 0  # tails shorter than 2^4 + 1
        assert all(((n - 1) & (n - 2)) == 0 and 17 <= n <= 257 for n in lens)  # 2^k + 1 tokens
        assert t["fill"] == 1.0
    else:
        assert max(lens) <= 256
    if overflow in ("truncate", "drop") and strategy != "decompose":
        assert t["truncated_tokens" if overflow == "truncate" else "dropped_tokens"] > 0
    if strategy == "none":
        assert t["rows"] == t["segments"]


def test_identical_bytes_for_any_worker_count(corpus, tmp_path):
    one = run(corpus, tmp_path / "w1", workers=1, format="wds")
    two = run(corpus, tmp_path / "w2", workers=2, format="wds")  # spawned processes
    assert one == two
    assert output_bytes(str(tmp_path / "w1")) == output_bytes(str(tmp_path / "w2"))


def test_resume_after_kill_mid_shard(corpus, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    run(corpus, clean)
    out = tmp_path / "out"
    real_write = pp_task.write_shard
    calls = {"n": 0}

    def dying_write(path, rows, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # killed while writing the second task's shard
            tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp-999")
            open(tmp, "wb").write(b"PAR1 half")
            raise KeyboardInterrupt
        return real_write(path, rows, **kw)

    monkeypatch.setattr(pp_task, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run(corpus, out)
    assert not os.path.exists(out / MANIFEST)
    assert sorted(n for n in os.listdir(out) if n.startswith("part-")) == ["part-00000-0000.parquet"]
    monkeypatch.setattr(pp_task, "write_shard", real_write)
    ran = []
    real_task = pp_executors.run_task
    monkeypatch.setattr(
        pp_executors, "run_task", lambda spec, **kw: ran.append(spec.task) or real_task(spec, **kw)
    )
    run(corpus, out)
    assert ran == [1, 2]  # task 0 was finished and verified by hash, so skipped
    assert output_bytes(str(out)) == output_bytes(str(clean))
    assert not [n for n in os.listdir(out) if ".tmp-" in n]


def test_rerun_reverifies_shard_hashes(corpus, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run(corpus, out)
    before = output_bytes(str(out))
    victim = out / "part-00001-0000.parquet"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x55
    victim.write_bytes(bytes(data))
    ran = []
    real_task = pp_executors.run_task
    monkeypatch.setattr(
        pp_executors, "run_task", lambda spec, **kw: ran.append(spec.task) or real_task(spec, **kw)
    )
    run(corpus, out)
    assert ran == [1]
    assert output_bytes(str(out)) == before
    ran.clear()
    run(corpus, out)  # complete and intact: nothing to do, same bytes
    assert ran == [] and output_bytes(str(out)) == before


def test_output_dir_guards(corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST).write_text(json.dumps({"format": "someone-elses", "files": []}))
    with pytest.raises(pp.PreprocessError, match="not a seqpack manifest.*--overwrite"):
        run(corpus, out)
    run(corpus, out, overwrite=True)
    assert read_manifest(str(out))["config"]["capacity"] == 256
    with pytest.raises(pp.PreprocessError, match="different run"):
        run(corpus, out, capacity=128)
    run(corpus, out, capacity=128, overwrite=True)
    assert read_manifest(str(out))["config"]["capacity"] == 128
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(pp.PreprocessError, match="notes.txt"):
        run(corpus, user)
    run(corpus, user, overwrite=True)
    assert (user / "notes.txt").read_text() == "keep me"  # --overwrite removes only seqpack's files


def test_config_file_and_unknown_keys(corpus, tmp_path):
    cfg_path = tmp_path / "pre.yaml"
    cfg_path.write_text(
        "sources:\n  - {path: a.jsonl}\ntokenizer: {name: byte, add_bos: true}\n"
        "stage: {type: pack, capacity: 128}\npreprocess: {tasks: 2, rows_per_shard: 5}\n"
    )
    file_cfg = pp.load_config_file(str(cfg_path))
    cfg = pp.build_config([], config_file=file_cfg, algorithm="ffd")
    assert (cfg.capacity, cfg.tasks, cfg.rows_per_shard, cfg.algorithm) == (128, 2, 5, "ffd")
    assert cfg.tokenizer["add_bos"] is True and cfg.sources[0]["path"] == [corpus[0]]
    man = pp.preprocess(cfg, str(tmp_path / "o"), progress=False)
    assert all(s["rows"] <= 5 for s in man["shards"]) and len(man["shards"]) > 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: [a.jsonl]\npreproces: {tasks: 2}\n")
    with pytest.raises(pp.PreprocessError, match=r"bad.yaml: preproces: unknown key"):
        pp.load_config_file(str(bad))
    bad.write_text("sources: [a.jsonl]\npreprocess: {tasks: 2, seq_length: 9}\n")
    with pytest.raises(pp.PreprocessError, match="preprocess.seq_length: unknown key"):
        pp.load_config_file(str(bad))
    bad.write_text("sources: [{path: a.jsonl, txt_key: body}]\n")
    with pytest.raises(pp.PreprocessError, match="txt_key"):
        pp.build_config([], config_file=pp.load_config_file(str(bad)))
    with pytest.raises(pp.PreprocessError, match="strategy"):
        pp.build_config(corpus, strategy="zip")


def test_sft_loss_masks_survive_packing(tmp_path):
    rng = random.Random(1)
    rows = []
    for _ in range(60):
        msgs = [
            {"role": "user", "content": make_text(rng, rng.randint(1, 30))},
            {"role": "assistant", "content": make_text(rng, rng.randint(1, 60))},
        ]
        rows.append(json.dumps({"messages": msgs}))
    p = tmp_path / "chat.jsonl"
    p.write_text("\n".join(rows) + "\n")
    man = run([str(p)], tmp_path / "out", fields={"messages_key": "messages"}, capacity=300)
    ref, got = reference_docs(man), reassemble(str(tmp_path / "out"))
    assert len(ref) == 60
    n_masked = 0
    for k, (toks, mask) in ref.items():
        np.testing.assert_array_equal(got[k][0], toks)
        np.testing.assert_array_equal(got[k][1], mask)
        n_masked += int((~mask).sum())
    assert n_masked > 0  # user turns are not targets


def test_tokenizer_file_is_hashed_and_used(corpus, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "</s>"], show_progress=False)
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    man = run(corpus, tmp_path / "out", tokenizer=str(path))
    import hashlib

    assert man["tokenizer"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert man["tokenizer"]["eos_id"] == tok.token_to_id("</s>")
    ref, got = reference_docs(man), reassemble(str(tmp_path / "out"))
    assert all(np.array_equal(got[k][0], v[0]) for k, v in ref.items())
    assert man["totals"]["tokens_in"] < 0.6 * sum(os.path.getsize(c) for c in corpus[:1])  # words, not bytes


def test_bad_records_raise_or_are_counted(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "fine"}\n{"text": 5}\n{not json\n{"text": "also fine"}\n')
    with pytest.raises(Exception, match=r"bad.jsonl: record 1: field 'text'"):
        run([str(p)], tmp_path / "o1", tasks=1)
    man = run([str(p)], tmp_path / "o2", on_error="skip")
    assert man["totals"]["skipped_records"] == 2 and man["totals"]["documents"] == 2


def test_loader_reads_the_shards(corpus, tmp_path):
    """``format: seqpack`` (guessed from the manifest): the loader re-packs the stored documents and
    every token comes back; preprocess also accepts its own output as input (re-pack to 128)."""
    import torch

    from seqpack.loader import build_loader

    out = tmp_path / "out"
    man = run(corpus, out)
    loader = build_loader({"sources": [{"path": str(out)}], "stage": {"type": "pack", "capacity": 300}})
    batches = list(loader)
    n_tokens = sum(int(b.seqlens[: b.n_real_segments].sum()) for b in batches)
    assert n_tokens == man["totals"]["tokens_out"]
    ids = torch.cat([b.doc_ids[: b.n_real_segments] for b in batches]).unique()
    assert len(ids) == man["totals"]["documents"]
    # each stored segment is a document to a reader of the shards (ids kept, offsets restart)
    again = run([str(out)], tmp_path / "repacked", capacity=128)
    assert again["totals"]["tokens_in"] == again["totals"]["tokens_out"] == man["totals"]["tokens_out"]
    assert again["totals"]["documents"] == man["totals"]["segments"]
    pieces: dict[int, list] = {}
    for path in shard_paths(str(tmp_path / "repacked")):
        for row in ShardFile(path).rows():
            for doc_id, _, toks, _ in row.segments():
                pieces.setdefault(doc_id, []).append(toks)
    for k, (toks, _) in reference_docs(man).items():
        np.testing.assert_array_equal(np.sort(np.concatenate(pieces[k])), np.sort(toks))


def test_resume_inside_a_task_after_its_last_window(corpus, tmp_path, monkeypatch):
    """Small windows: each task writes several windows; a kill in the middle of a task resumes after
    its last complete window (reader state in the window marker), with the same bytes at the end."""
    kw = {"window_tokens": 2000, "rows_per_shard": 4}
    clean = tmp_path / "clean"
    man = run(corpus, clean, **kw)
    n_shards = len(man["shards"])
    assert n_shards >= 12
    ref, got = reference_docs(man), reassemble(str(clean))
    assert set(got) == set(ref) and all(np.array_equal(got[k][0], v[0]) for k, v in ref.items())

    out = tmp_path / "out"
    real_write = pp_task.write_shard
    calls = []

    def dying_write(path, rows, **kw):
        calls.append(os.path.basename(path))
        if len(calls) == n_shards // 2:
            raise KeyboardInterrupt
        return real_write(path, rows, **kw)

    monkeypatch.setattr(pp_task, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run(corpus, out, **kw)
    killed_in = calls[-1]
    written_before = len(calls) - 1
    calls.clear()

    def counting_write(path, rows, **kw):
        calls.append(path)
        return real_write(path, rows, **kw)

    monkeypatch.setattr(pp_task, "write_shard", counting_write)
    run(corpus, out, **kw)
    # only the shards from the killed window on are written again (earlier windows were kept)
    assert len(calls) < n_shards - written_before + 4
    assert os.path.basename(calls[0]).startswith(killed_in[:10])
    assert output_bytes(str(out)) == output_bytes(str(clean))


def test_edited_input_is_a_different_run(corpus, tmp_path):
    out = tmp_path / "out"
    run(corpus, out)
    data = bytearray(open(corpus[0], "rb").read())
    i = data.index(b"packed")
    data[i : i + 6] = b"PACKED"  # same size, different content
    open(corpus[0], "wb").write(bytes(data))
    with pytest.raises(pp.PreprocessError, match="different run"):
        run(corpus, out)


def test_disk_full_mid_shard_lists_nothing_half_written(corpus, tmp_path, monkeypatch):
    import errno

    import pyarrow.parquet as pq

    from seqpack.cli import main

    real = pq.write_table
    calls = {"n": 0}

    def full_disk(table, where, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            with open(where, "wb") as f:
                f.write(b"PAR1" + b"\0" * 100)  # the part that fit
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, where, **kw)

    monkeypatch.setattr(pq, "write_table", full_disk)
    out = tmp_path / "out"
    argv = ["preprocess", *corpus, "--output", str(out), "--seq-len", "256", "--tasks", "3", "--quiet"]
    assert main(argv) == 2
    assert not (out / MANIFEST).exists()
    names = os.listdir(out)
    assert not [n for n in names if ".tmp-" in n]
    written = sorted(n for n in names if n.startswith("part-"))
    assert written == ["part-00000-0000.parquet", "part-00001-0000.parquet"]
    monkeypatch.setattr(pq, "write_table", real)
    assert main(argv) == 0
    # one shard per task, then the merge's shard of the tasks' part-filled tails
    names = [s["name"] for s in read_manifest(str(out))["shards"]]
    assert names == [f"part-0000{k}-0000.parquet" for k in range(4)]


def test_job_array_tasks_then_merge(corpus, tmp_path, monkeypatch):
    """``--only-task K`` (one Slurm array job each) writes no manifest; the final run merges."""
    clean = tmp_path / "clean"
    run(corpus, clean)
    out = tmp_path / "out"
    assert run(corpus, out, only_tasks=[2]) is None
    assert run(corpus, out, only_tasks=[0]) is None
    assert not (out / MANIFEST).exists()
    with pytest.raises(pp.PreprocessError, match="out of range"):
        run(corpus, out, only_tasks=[3])
    ran = []
    real_task = pp_executors.run_task
    monkeypatch.setattr(
        pp_executors, "run_task", lambda spec, **kw: ran.append(spec.task) or real_task(spec, **kw)
    )
    run(corpus, out)
    assert ran == [1]
    assert output_bytes(str(out)) == output_bytes(str(clean))


def test_loader_serves_prepacked_rows(corpus, tmp_path):
    """``stage: {type: packed_rows}``: the loader yields the offline rows as batches, split over
    ranks without loss, padded to the capacity (``pad_to: max``), and resumes exactly."""
    from seqpack.loader import build_loader
    from seqpack.shards import PackedRowReader

    out = tmp_path / "out"
    man = run(corpus, out)
    cfg = {"sources": [str(out)], "stage": {"type": "packed_rows", "pad_to": "max"}}
    rows = list(PackedRowReader(str(out), as_batch=False))
    seen = []
    for rank in range(2):
        batches = list(build_loader(cfg, rank=rank, world_size=2))
        for b in batches:
            b.validate()
            assert b.input_ids.shape[-1] == 256
            n = b.n_real_segments
            if n:
                seen.append((tuple(b.doc_ids[:n].tolist()), int(b.seqlens[:n].sum())))
    want = sorted((tuple(r.doc_ids.tolist()), len(r)) for r in rows)
    assert sorted(seen) == want and sum(s[1] for s in seen) == man["totals"]["tokens_out"]
    loader = build_loader(cfg)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    rest = [b.input_ids.clone() for b in it]
    again = build_loader(cfg)
    again.load_state_dict(state)
    rest2 = [b.input_ids.clone() for b in again]
    assert len(rest) == len(rest2) == len(rows) - 3
    assert all((a == b).all() for a, b in zip(rest, rest2))
    with pytest.raises(ValueError, match="sources\\[0\\].*manifest"):
        build_loader({"sources": [str(tmp_path)], "stage": {"type": "packed_rows"}})


def test_ray_engine_without_ray_says_how_to_install(corpus, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(pp.PreprocessError, match=r"pip install 'seqpack\[ray\]'"):
        run(corpus, tmp_path / "out", engine="ray")


def test_deprecated_seq_len_key_warns_and_means_capacity(corpus, tmp_path):
    """``seq_len`` (option, config-file key, PreprocessConfig field) is the old name of ``capacity``:
    it still works for one release, with a DeprecationWarning naming the new key, and gives the
    same bytes."""
    with pytest.warns(DeprecationWarning, match="seq_len is deprecated.*use capacity"):
        cfg = pp.build_config(corpus, seq_len=256, tasks=3)
    assert cfg.capacity == 256 and "seq_len" not in cfg.as_dict()
    new = pp.build_config(corpus, capacity=256, tasks=3)
    assert cfg == new
    with pytest.raises(pp.PreprocessError, match="seq_len: deprecated name of capacity"):
        pp.build_config(corpus, seq_len=256, capacity=128)
    path = tmp_path / "old.yaml"
    path.write_text("sources: [a.jsonl]\npreprocess: {seq_len: 200, tasks: 2}\n")
    with pytest.warns(DeprecationWarning, match=r"preprocess\.seq_len is deprecated.*preprocess\.capacity"):
        file_cfg = pp.load_config_file(str(path))
    assert file_cfg["preprocess"] == {"capacity": 200, "tasks": 2}
    with pytest.warns(DeprecationWarning, match="use capacity"):
        direct = pp.PreprocessConfig(**{**new.as_dict(), "capacity": 2048, "seq_len": 256})
    assert direct == new
    with pytest.warns(DeprecationWarning, match="PreprocessConfig.seq_len is deprecated"):
        assert new.seq_len == 256
    old_out, new_out = tmp_path / "old", tmp_path / "new"
    with pytest.warns(DeprecationWarning):
        run(corpus, old_out, seq_len=256, capacity=None)
    run(corpus, new_out)
    assert output_bytes(str(old_out)) == output_bytes(str(new_out))


def test_outputs_of_the_previous_version_are_still_read(corpus, tmp_path):
    """A manifest of the previous version (version 1, ``config.seq_len``) is read by the shard
    readers, ``seqpack stats``/``inspect`` and the ``packed_rows`` stage, whose old ``pad_to: seq_len``
    warns and means ``max``."""
    from seqpack.loader import build_loader
    from seqpack.shards import write_json_atomic
    from seqpack.shards.stats import inspect_rows, shard_stats

    out = tmp_path / "out"
    run(corpus, out)
    path = out / MANIFEST
    man = json.loads(path.read_text())
    man["version"] = 1
    man["config"]["seq_len"] = man["config"].pop("capacity")
    write_json_atomic(str(path), man)
    assert read_manifest(str(out))["config"]["capacity"] == 256
    st = shard_stats(str(out))
    assert st["capacity"] == 256 and st["tokens_out"] == man["totals"]["tokens_out"]
    assert "of 256" in inspect_rows(str(out), 1)
    new_cfg = {"sources": [str(out)], "stage": {"type": "packed_rows", "pad_to": "max"}}
    with pytest.warns(DeprecationWarning, match="pad_to: 'seq_len' is deprecated.*'max'"):
        old_loader = build_loader(
            {"sources": [str(out)], "stage": {"type": "packed_rows", "pad_to": "seq_len"}}
        )
    old = [b.input_ids for b in old_loader]
    new = [b.input_ids for b in build_loader(new_cfg)]
    assert len(old) == len(new) == man["totals"]["rows"]
    assert all(a.shape[-1] == 256 and (a == b).all() for a, b in zip(old, new))


def test_pad_to_max_of_a_decompose_output_is_its_largest_bucket(corpus, tmp_path):
    """Decomposed rows hold ``2^k + 1`` tokens: ``pad_to: max`` pads to the largest bucket's rows."""
    from seqpack.loader import build_loader

    out = tmp_path / "dec"
    run(corpus, out, strategy="decompose", min_log2=4, capacity=200)  # buckets up to 2^7
    batches = list(build_loader({"sources": [str(out)], "stage": {"type": "packed_rows", "pad_to": "max"}}))
    assert batches and all(b.input_ids.shape[-1] == 129 for b in batches)
    with pytest.raises(ValueError, match="stage.pad_to: expected null, a positive integer or 'max'"):
        build_loader({"sources": [str(out)], "stage": {"type": "packed_rows", "pad_to": "longest"}})
    packed = tmp_path / "packed"
    run(corpus, packed, capacity=128)  # rows of at most 128 tokens, not 129
    both = {"sources": [str(out), str(packed)], "stage": {"type": "packed_rows", "pad_to": "max"}}
    with pytest.raises(ValueError, match=r"'max' needs sources with one row size, they have \[128, 129\]"):
        build_loader(both)
