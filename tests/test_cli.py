"""The ``seqpack preprocess / stats / inspect`` commands end to end, their errors, and the demo."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from seqpack.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def corpus(tmp_path):
    lines = [json.dumps({"text": (f"word{i} ") * (3 + (i * 37) % 90)}) for i in range(150)]
    p = tmp_path / "docs.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def test_preprocess_stats_inspect(corpus, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["preprocess", corpus, "--output", out, "--seq-len", "512", "--tasks", "2", "--quiet"]) == 0
    summary = capsys.readouterr().out
    assert "150 documents" in summary and "manifest.json" in summary

    assert main(["stats", out, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    for key in (
        "documents",
        "tokens_in",
        "tokens_out",
        "dropped_tokens",
        "truncated_tokens",
        "fill",
        "doc_length",
        "row_length",
    ):
        assert key in st
    assert st["documents"] == 150 and st["tokens_in"] == st["tokens_out"] > 0
    assert 0.9 < st["fill"] <= 1.0
    d = st["doc_length"]
    assert d["p50"] <= d["p90"] <= d["p99"] <= d["max"]

    png = str(tmp_path / "plots" / "stats.png")
    assert main(["stats", out, "--plot", png]) == 0
    text = capsys.readouterr().out
    assert "fill" in text and png in text
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png) > 10_000

    assert main(["stats", out, "--verify"]) == 0
    assert "3/3 shards match" in capsys.readouterr().out  # 2 tasks' shards and the merge's
    victim = os.path.join(out, "part-00001-0000.parquet")
    data = bytearray(open(victim, "rb").read())
    data[-20] ^= 1
    open(victim, "wb").write(bytes(data))
    assert main(["stats", out, "--verify", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["bad_shards"] == ["part-00001-0000.parquet"]
    open(victim, "wb").write(bytes(data[:-20]) + bytes([data[-20] ^ 1]) + bytes(data[-19:]))

    assert main(["inspect", out, "--n", "2"]) == 0
    shown = capsys.readouterr().out.splitlines()
    headers = [i for i, line in enumerate(shown) if line.startswith("row ")]
    assert len(headers) == 2 and shown[0].startswith("columns: [start:end)")  # the legend comes first
    # the segment lines of a row tile it: [0:a) [a:b) ... [..:len)
    n_tokens = int(re.search(r": ([\d,]+) tokens", shown[headers[0]]).group(1).replace(",", ""))
    ranges = [
        tuple(map(int, m.groups()))
        for line in shown[headers[0] + 1 : headers[1]]
        if (m := re.match(r"\s+\[\s*(\d+):\s*(\d+)\)", line))
    ]
    assert ranges[0][0] == 0 and ranges[-1][1] == n_tokens
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert "'word" in shown[headers[0] + 1]  # decoded text


def test_errors_name_the_problem(corpus, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["preprocess", corpus, "--output", str(tmp_path / "o"), "--seq-lenght", "5"])
    assert e.value.code == 2
    assert "--seq-lenght" in capsys.readouterr().err

    assert main(["stats", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"name": "another tool"}')
    assert main(["preprocess", corpus, "--output", str(foreign), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err

    cfg = tmp_path / "c.yaml"
    cfg.write_text("preprocess: {capacity: 64, shards_per_task: 3}\n")
    o2 = str(tmp_path / "o2")
    assert main(["preprocess", corpus, "--output", o2, "--config", str(cfg), "--quiet"]) == 2
    assert "shards_per_task" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        main(["preprocess", corpus, "--output", str(tmp_path / "o3"), "--strategy", "zip"])
    assert "zip" in capsys.readouterr().err


def test_capacity_is_an_alias_of_seq_len(corpus, tmp_path, capsys):
    """``--seq-len`` stays; its help says it sets ``capacity``, and ``--capacity`` is the same option."""
    with pytest.raises(SystemExit):
        main(["preprocess", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--seq-len N, --capacity N" in help_text and "sets the config's 'capacity'" in help_text
    outs = []
    for flag in ("--seq-len", "--capacity"):
        out = str(tmp_path / flag.strip("-"))
        assert main(["preprocess", corpus, "--output", out, flag, "300", "--tasks", "2", "--quiet"]) == 0
        outs.append(json.load(open(os.path.join(out, "manifest.json"))))
    assert outs[0]["config"]["capacity"] == 300 and outs[0]["shards"] == outs[1]["shards"]
    capsys.readouterr()
    assert main(["stats", str(tmp_path / "capacity"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["capacity"] == 300


def test_demo_runs_and_reports(tmp_path):
    out = tmp_path / "demo"
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "demo.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    for needle in ("tokens in", "tokens out", "0 lost", "fill", "packed_stats.png", "row 0"):
        assert needle in res.stdout
    assert (out / "packed_stats.png").exists() and (out / "packed" / "manifest.json").exists()
