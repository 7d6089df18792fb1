"""Smoke test of examples/decomposition_curriculum.py: a few steps of both runs, PNG + JSON written."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")


def test_example_runs_and_dd_attention_is_cheaper(tmp_path):
    path = Path(__file__).resolve().parent.parent / "examples" / "decomposition_curriculum.py"
    spec = importlib.util.spec_from_file_location("decomposition_curriculum", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "train.png"
    summary = mod.main(["--steps", "6", "--eval-every", "3", "--train-bytes", "120000", "--out", str(out)])
    assert out.exists() and out.with_suffix(".json").exists()
    runs = summary["runs"]
    assert len(runs) == 2 and all(r["tokens_seen"] == 6 * 2048 for r in runs.values())
    assert summary["dd_attn_cost_vs_concat_chunk"] < 1.0
