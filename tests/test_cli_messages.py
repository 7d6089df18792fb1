"""What the CLI says: a too-small ``--seq-len``, target tokens in ``stats``, re-runs of a finished
output, missing inputs and directories, mistyped flags, ``--eos-token``, Hub names from the local
cache, and the columns of ``inspect``."""

from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np
import pytest

import seqpack.preprocess as pp
from seqpack.cli import main
from seqpack.config import ConfigError, validate_config
from seqpack.preprocess.config import MIN_CAPACITY
from seqpack.shards import ShardFile, shard_paths
from seqpack.shards.stats import segment_lines
from seqpack.sources.tokenize import TokenizerSpec, load_tokenizer, special_ids

WORDS = ["hello", "world", "packed", "rows"]


@pytest.fixture
def corpus(tmp_path):
    lines = [json.dumps({"text": " ".join(WORDS[(i + j) % 4] for j in range(3 + i % 40))}) for i in range(80)]
    p = tmp_path / "docs.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def preprocess(*argv: str) -> int:
    return main(["preprocess", *argv, "--quiet"])


# ------------------------------------------------------------------------------------------ 1. capacity
@pytest.mark.parametrize("seq_len", ["1", "15"])
def test_seq_len_below_the_minimum_is_refused_with_the_reason(corpus, tmp_path, capsys, seq_len):
    assert MIN_CAPACITY == 16
    assert preprocess(corpus, "-o", str(tmp_path / "o"), "--seq-len", seq_len) == 2
    err = capsys.readouterr().err
    assert f"{seq_len} tokens per row is below the minimum of 16" in err
    assert "never a loss target" in err and not (tmp_path / "o" / "manifest.json").exists()


def test_capacity_minimum_holds_in_the_config_file_too(corpus, tmp_path, capsys):
    for section in ("preprocess: {capacity: 8}", "stage: {type: pack, capacity: 8}"):
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"sources: [{corpus}]\n{section}\n")
        assert preprocess("-o", str(tmp_path / "o"), "--config", str(cfg)) == 2
        assert "8 tokens per row is below the minimum of 16" in capsys.readouterr().err
    with pytest.raises(pp.PreprocessError, match="below the minimum of 16"):
        pp.build_config([corpus], capacity=4)
    assert preprocess(corpus, "-o", str(tmp_path / "ok"), "--seq-len", "16", "--tasks", "1") == 0


# ------------------------------------------------------------------------------------------ 2. targets
def _targets_in_shards(out: str) -> int:
    return sum(
        int(mask[1:].sum())
        for path in shard_paths(out)
        for row in ShardFile(path).rows()
        for _, _, _, mask in row.segments()
    )


def test_stats_reports_target_tokens(corpus, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert preprocess(corpus, "-o", out, "--seq-len", "64", "--tasks", "2") == 0
    capsys.readouterr()
    assert main(["stats", out, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    # plain text: every token is a target except each segment's first
    assert st["target_tokens"] == st["tokens_out"] - st["segments"] == _targets_in_shards(out)
    assert main(["stats", out]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "target tokens" in x)
    assert f"{st['target_tokens']:,}" in line and f"{st['target_tokens'] / st['tokens_out']:.2%}" in line


def test_target_tokens_follow_loss_masks(tmp_path, capsys):
    chat = [
        {
            "messages": [
                {"role": "user", "content": "hi " * (i + 1)},
                {"role": "assistant", "content": "ok " * 9},
            ]
        }
        for i in range(30)
    ]
    p = tmp_path / "chat.jsonl"
    p.write_text("\n".join(json.dumps(c) for c in chat) + "\n")
    out = str(tmp_path / "o")
    assert preprocess(str(p), "-o", out, "--seq-len", "64", "--messages-key", "messages") == 0
    capsys.readouterr()
    assert main(["stats", out, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert 0 < st["target_tokens"] == _targets_in_shards(out) < st["tokens_out"] - st["segments"]


def test_old_manifest_without_target_tokens_reads_as_unknown(corpus, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert preprocess(corpus, "-o", out, "--tasks", "1") == 0
    path = os.path.join(out, "manifest.json")
    man = json.load(open(path))
    del man["totals"]["target_tokens"]
    json.dump(man, open(path, "w"))
    capsys.readouterr()
    assert main(["stats", out, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["target_tokens"] is None
    assert main(["stats", out]) == 0
    assert re.search(r"target tokens\s+unknown", capsys.readouterr().out)


# ------------------------------------------------------------------------------------------ 3. re-runs
def test_identical_rerun_says_already_complete(corpus, tmp_path, capsys):
    out = str(tmp_path / "o")
    argv = (corpus, "-o", out, "--seq-len", "128", "--tasks", "2")
    assert preprocess(*argv) == 0
    capsys.readouterr()
    stamps = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)}
    assert preprocess(*argv) == 0
    said = capsys.readouterr()
    assert "already complete" in said.out and "nothing to do" in said.out and said.err == ""
    assert {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)} == stamps


def test_finished_output_of_another_config_says_what_differs(corpus, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert preprocess(corpus, "-o", out, "--seq-len", "128", "--tasks", "2") == 0
    capsys.readouterr()
    assert preprocess(corpus, "-o", out, "--seq-len", "256", "--tasks", "2") == 2
    err = capsys.readouterr().err
    assert "holds a finished run with another config" in err and "capacity 128 -> 256" in err
    assert "--overwrite" in err and "another --output" in err and "unfinished" not in err
    assert json.load(open(os.path.join(out, "manifest.json")))["config"]["capacity"] == 128
    # the library says "finished" too (not "holds an unfinished run")
    with pytest.raises(pp.PreprocessError, match="finished output of a different run") as e:
        pp.preprocess(pp.build_config([corpus], capacity=256, tasks=2), out, progress=False)
    assert "unfinished" not in str(e.value)
    assert preprocess(corpus, "-o", out, "--seq-len", "256", "--tasks", "2", "--overwrite") == 0
    assert json.load(open(os.path.join(out, "manifest.json")))["config"]["capacity"] == 256


def test_changed_input_is_named(corpus, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert preprocess(corpus, "-o", out, "--tasks", "1") == 0
    with open(corpus, "a") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    capsys.readouterr()
    assert preprocess(corpus, "-o", out, "--tasks", "1") == 2
    assert "inputs changed since: ['docs.jsonl']" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ 4. paths
def test_missing_input_says_it_does_not_exist(tmp_path, capsys):
    missing = str(tmp_path / "nowhere" / "docs.jsonl")
    assert preprocess(missing, "-o", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert f"input {missing!r} does not exist" in err and "cannot tell the format" not in err
    assert preprocess(str(tmp_path / "*.jsonl"), "-o", str(tmp_path / "o")) == 2
    assert "the pattern matches no files" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sources: [missing.jsonl]\n")
    assert preprocess("-o", str(tmp_path / "o"), "--config", str(cfg)) == 2
    err = capsys.readouterr().err
    assert "sources[0].path" in err and "missing.jsonl' does not exist" in err


def test_stats_says_what_the_directory_is(corpus, tmp_path, capsys):
    assert main(["stats", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "the directory does not exist" in err and "manifest" not in err
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    assert "the directory does not exist" in capsys.readouterr().err
    assert main(["stats", str(tmp_path)]) == 2
    assert "not a seqpack preprocess output" in capsys.readouterr().err
    out = str(tmp_path / "o")
    assert preprocess(corpus, "-o", out, "--tasks", "2", "--only-task", "0") == 0
    capsys.readouterr()
    assert main(["stats", out]) == 2
    assert "an unfinished preprocess run" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ 5. flags
def test_mistyped_flag_gets_the_subcommand_usage_and_a_suggestion(corpus, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["preprocess", corpus, "-o", str(tmp_path / "o"), "--seq-lenght", "64"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: seqpack preprocess ")
    assert "unrecognized arguments: --seq-lenght (did you mean --seq-len?)" in err
    with pytest.raises(SystemExit):
        main(["stats", str(tmp_path), "--jsno"])
    err = capsys.readouterr().err
    assert err.startswith("usage: seqpack stats ") and "(did you mean --json?)" in err
    with pytest.raises(SystemExit):
        main(["inspect", str(tmp_path), "--zzz"])
    err = capsys.readouterr().err
    assert err.startswith("usage: seqpack inspect ") and "unrecognized arguments: --zzz\n" in err


# ------------------------------------------------------------------------------------------ 6. EOS
@pytest.fixture
def no_eos_tokenizer(tmp_path):
    """A word-level tokenizer whose end token has a name seqpack does not guess."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}, "<END>": 5}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "noeos" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    return str(path)


def test_eos_token_flag_names_the_end_token(corpus, tmp_path, capsys, no_eos_tokenizer):
    out = str(tmp_path / "o")
    assert preprocess(corpus, "-o", out, "--tokenizer", no_eos_tokenizer) == 2
    assert "name it with --eos-token TOKEN" in capsys.readouterr().err
    assert preprocess(corpus, "-o", out, "--tokenizer", no_eos_tokenizer, "--eos-token", "<nope>") == 2
    assert "eos_token '<nope>' is not in its vocabulary (6 tokens)" in capsys.readouterr().err
    assert preprocess(corpus, "-o", out, "--tokenizer", no_eos_tokenizer, "--eos-token", "<END>") == 0
    man = json.load(open(os.path.join(out, "manifest.json")))
    assert man["tokenizer"]["eos_id"] == 5 and man["config"]["tokenizer"]["eos_token"] == "<END>"
    ends = [
        int(toks[-1])
        for path in shard_paths(out)
        for row in ShardFile(path).rows()
        for _, start, toks, _ in row.segments()
    ]
    assert ends.count(5) == man["totals"]["documents"]  # one EOS per document (split pieces end otherwise)


def test_eos_token_in_configs(corpus, tmp_path, capsys, no_eos_tokenizer):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"sources: [{corpus}]\ntokenizer: {{name: {no_eos_tokenizer}, eos_token: <END>}}\n")
    assert preprocess("-o", str(tmp_path / "o"), "--config", str(cfg)) == 0
    assert json.load(open(tmp_path / "o" / "manifest.json"))["tokenizer"]["eos_id"] == 5
    # a loader config takes the same key; a named token must be in the vocabulary
    loader = validate_config(
        {
            "sources": [corpus],
            "tokenizer": {"name": no_eos_tokenizer, "eos_token": "<END>"},
            "stage": {"type": "pack", "capacity": 64},
        }
    )
    spec = TokenizerSpec.parse(loader["tokenizer"])
    assert special_ids(load_tokenizer(spec.name), spec)[1] == 5
    bad = TokenizerSpec.parse({"name": no_eos_tokenizer, "eos_token": "</s>", "add_eos": False})
    with pytest.raises(ValueError, match=r"eos_token '</s>' is not in its vocabulary"):
        special_ids(load_tokenizer(bad.name), bad)
    stage = {"type": "pack", "capacity": 64}
    with pytest.raises(ConfigError, match="tokenizer.eos_token: expected a token string"):
        validate_config({"sources": [corpus], "tokenizer": {"name": "byte", "eos_token": 7}, "stage": stage})


# ------------------------------------------------------------------------------------------ 7. hub cache
def test_hub_name_resolved_from_the_local_cache_offline(corpus, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-byte"
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    from seqpack.sources.tokenize import ByteTokenizer

    ByteTokenizer.to_tokenizers().save(str(snap / "tokenizer.json"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = str(tmp_path / "o")
    assert preprocess(corpus, "-o", out, "--tokenizer", "acme/tiny-byte", "--tasks", "1") == 0
    man = json.load(open(os.path.join(out, "manifest.json")))
    assert man["tokenizer"]["name"] == "acme/tiny-byte" and man["tokenizer"]["eos_id"] == 257
    assert man["tokenizer"]["sha256"] == hashlib.sha256((snap / "tokenizer.json").read_bytes()).hexdigest()
    assert man["totals"]["tokens_in"] == sum(
        len(json.loads(x)["text"].encode()) + 1 for x in open(corpus)
    )  # the same ids as the byte tokenizer (UTF-8 bytes + EOS)
    capsys.readouterr()
    assert preprocess(corpus, "-o", str(tmp_path / "o2"), "--tokenizer", "acme/not-cached") == 2
    err = capsys.readouterr().err
    assert "tokenizer 'acme/not-cached'" in err and "not in the local Hugging Face cache" in err
    assert str(cache) in err and "HF_HUB_OFFLINE" in err


# ------------------------------------------------------------------------------------------ 8. inspect
def test_inspect_columns_stay_aligned_past_a_million():
    rows = [
        [(0, 9, "0/0/1", 0, 8, 9, "'a'"), (9, 4096, "0/0/22", 5, 4086, 4087, "'b'")],
        [(0, 4096, "0/12/345678", 1_234_567, 4095, 4096, "'c'")],
    ]
    lines = [x for segs in segment_lines(rows) for x in segs]
    assert len(lines) == 3
    for mark in ("doc ", "@", "targets ", "/", "'"):
        assert len({x.index(mark, x.index("doc ")) for x in lines}) == 1, mark
    assert "@1234567 targets" in lines[2] and "[   0:4096)" in lines[2]


def test_inspect_prints_a_legend_and_aligned_rows(tmp_path, capsys):
    p = tmp_path / "long.jsonl"
    p.write_text(json.dumps({"text": "x" * 1_100_000}) + "\n" + json.dumps({"text": "short one"}) + "\n")
    out = str(tmp_path / "o")
    assert preprocess(str(p), "-o", out, "--seq-len", "65536", "--tasks", "1") == 0
    capsys.readouterr()
    assert main(["inspect", out, "--n", "30"]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[0].startswith("columns: [start:end) tokens of the row | doc source/shard/record | @offset")
    segs = [x for x in shown if x.startswith("  [")]
    offsets = [int(re.search(r"@(\d+)", x).group(1)) for x in segs]
    assert max(offsets) >= 1_000_000 and min(offsets) == 0
    for mark in ("@", "targets"):
        assert len({x.index(mark) for x in segs}) == 1, mark
    assert np.all([re.search(r"targets\s+\d+/\d+", x) for x in segs])
