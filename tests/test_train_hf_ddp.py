"""examples/train_hf.py under torchrun (2 gloo ranks): equal step counts on both ranks with uneven
data (zero-loss padding micro-batches, nothing dropped), and checkpoint + resume == uninterrupted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_hf.py"


def write_uneven_corpus(path: Path) -> Path:
    rng = np.random.default_rng(1)
    words = ["rank", "step", "pad", "never", "drop", "a", "token"]
    with open(path, "w") as f:
        f.write(json.dumps({"text": "long " * 400}) + "\n")  # one rank gets far more batches
        for _ in range(9):
            f.write(json.dumps({"text": " ".join(rng.choice(words, int(rng.integers(3, 30))))}) + "\n")
    return path


def torchrun(data: Path, out: Path, max_steps: int, resume: bool = False) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(SCRIPT), "--data", str(data), "--out", str(out), "--capacity", "128", "--accum", "2",
           "--max-steps", str(max_steps), "--hidden", "32", "--layers", "1", "--ckpt-every", "100",
           "--quiet"]  # fmt: skip
    if resume:
        cmd.append("--resume")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_ddp_equal_steps_and_exact_resume(tmp_path):
    data = write_uneven_corpus(tmp_path / "corpus.jsonl")
    full = tmp_path / "full"
    torchrun(data, full, 8)
    ranks = [json.loads((full / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["steps_per_epoch"] == ranks[1]["steps_per_epoch"]
    assert ranks[0]["micro_batches"] == ranks[1]["micro_batches"] == 16
    assert ranks[0]["padding_batches"] + ranks[1]["padding_batches"] > 0  # uneven data was padded
    reference = json.loads((full / "losses.json").read_text())["losses"]
    assert len(reference) == 8 and all(np.isfinite(reference))

    split = tmp_path / "split"
    torchrun(data, split, 4)  # stops after step 4, writing its checkpoint
    torchrun(data, split, 8, resume=True)
    assert json.loads((split / "losses.json").read_text())["losses"] == reference
