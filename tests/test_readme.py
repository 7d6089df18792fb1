"""The README's ```python blocks run as written (a newcomer copies them)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)
TRAINING_SECTION = "## Use it in your training script"


def run_block(code: str, name: str) -> dict:
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, name, "exec"), namespace)
    return namespace


def training_block() -> str:
    section = TEXT.split(TRAINING_SECTION, 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return block


def test_readme_has_code():
    assert BLOCKS and TRAINING_SECTION in TEXT


@pytest.mark.parametrize("index", [i for i, b in enumerate(BLOCKS) if b != training_block()])
def test_readme_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_block(BLOCKS[index], f"README.md block {index}")


def test_training_block_is_short():
    code = [ln for ln in training_block().splitlines() if ln.strip()]
    assert len(code) < 15, len(code)


def test_training_block_trains(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    ns = run_block(training_block(), "README.md training block")
    assert ns["step"] == 2
    states = list(ns["opt"].state.values())
    assert states and all(int(s["step"]) == 3 for s in states)
    assert ns["batch"].num_loss_tokens > 0
