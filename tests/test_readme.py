"""The README's ```python blocks run as written (a newcomer copies them)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from seqpack.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEXT = README.read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)
TRAINING_SECTION = "## Use it in your training script"
CLI_SECTION = "## From the command line"


def run_block(code: str, name: str) -> dict:
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, name, "exec"), namespace)
    return namespace


def section(title: str) -> str:
    return TEXT.split(title, 1)[1].split("\n## ", 1)[0]


def training_block() -> str:
    (block,) = re.findall(r"```python\n(.*?)```", section(TRAINING_SECTION), flags=re.S)
    return block


def cli_blocks() -> tuple[list[list[str]], str]:
    """The walk-through's ``seqpack ...`` commands (argv after ``seqpack``) and its Python block."""
    text = section(CLI_SECTION)
    (bash,) = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    (code,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    commands = [shlex.split(ln, comments=True) for ln in bash.splitlines() if ln.strip()]
    assert all(c[0] == "seqpack" for c in commands), commands
    return [c[1:] for c in commands], code


def test_readme_has_code():
    assert BLOCKS and TRAINING_SECTION in TEXT


@pytest.mark.parametrize(
    "index", [i for i, b in enumerate(BLOCKS) if b not in (training_block(), cli_blocks()[1])]
)
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


def test_cli_walk_through_runs_from_a_clone(tmp_path, monkeypatch, capsys):
    """preprocess -> stats -> inspect on the bundled corpus, then the Python block trains from out/."""
    commands, code = cli_blocks()
    assert [c[0] for c in commands] == ["preprocess", "stats", "inspect"]
    monkeypatch.chdir(tmp_path)  # the commands' relative paths, as from the clone's root
    (tmp_path / "seqpack" / "data").mkdir(parents=True)
    corpus = "seqpack/data/corpus.jsonl.zst"
    (tmp_path / corpus).symlink_to(ROOT / corpus)
    for argv in commands:
        assert main([*argv, "--quiet"] if argv[0] == "preprocess" else argv) == 0, argv
    assert "1,196,836" in capsys.readouterr().out  # the corpus's byte tokens, in and out
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["config"]["capacity"] == 512
    ns = run_block(code, "README.md walk-through block")
    assert ns["step"] == 2 and ns["hf"]["input_ids"].shape[1] <= 512
