"""The README's "use it in your training script" block: short (under 15 lines) and it trains."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")

README = Path(__file__).resolve().parents[1] / "README.md"


def training_block() -> str:
    text = README.read_text()
    section = text.split("## Use it in your training script", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return block


def test_block_is_short():
    code = [ln for ln in training_block().splitlines() if ln.strip()]
    assert len(code) < 15, len(code)


def test_block_trains(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "__readme__"}
    exec(compile(training_block(), "README.md training block", "exec"), ns)
    assert ns["step"] == 2
    states = list(ns["opt"].state.values())
    assert states and all(int(s["step"]) == 3 for s in states)
    assert ns["batch"].num_loss_tokens > 0
