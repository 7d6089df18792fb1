"""examples/train_hf.py: killed (SIGKILL) at a random step and resumed, the loss curve is bitwise the
uninterrupted one; the packed-vs-unpacked comparison writes its PNG with matching losses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_hf.py"
MAX_STEPS = 12


def write_corpus(path: Path, n_docs: int = 14, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    words = ["pack", "the", "tokens", "of", "every", "document", "without", "padding", "waste", "and", "loss"]
    with open(path, "w") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": " ".join(rng.choice(words, int(rng.integers(3, 40))))}) + "\n")
    return path


def args_for(data: Path, out: Path) -> list[str]:
    return [sys.executable, str(SCRIPT), "--data", str(data), "--out", str(out), "--capacity", "128",
            "--accum", "2", "--max-steps", str(MAX_STEPS), "--hidden", "32", "--layers", "1",
            "--ckpt-every", "3", "--quiet"]  # fmt: skip


def env() -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    return e


def losses(out: Path) -> list[float]:
    return json.loads((out / "losses.json").read_text())["losses"]


# 10: killed right after the checkpoint at step 9, the last step of epoch 0 (a resume from there
# once skipped an epoch); 5: mid-epoch, between checkpoints
@pytest.mark.parametrize("kill_at", [5, 10])
def test_kill_and_resume_gives_the_same_loss_curve_bitwise(tmp_path, kill_at):
    data = write_corpus(tmp_path / "corpus.jsonl")
    ref_out = tmp_path / "ref"
    subprocess.run(args_for(data, ref_out), check=True, env=env(), capture_output=True, timeout=300)
    reference = losses(ref_out)
    info = json.loads((ref_out / "losses.json").read_text())
    assert len(reference) == MAX_STEPS and info["steps_per_epoch"] < MAX_STEPS  # crosses an epoch end
    assert reference[-1] < reference[0]

    out = tmp_path / "killed"
    proc = subprocess.Popen(args_for(data, out), env=env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)  # fmt: skip
    seen = []
    for line in proc.stdout:
        if line.startswith("step "):
            seen.append(line)
            if len(seen) == kill_at:
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"killed at step {kill_at}"
    assert not (out / "losses.json").exists()
    resumed = subprocess.run(args_for(data, out) + ["--resume"], check=True, env=env(), capture_output=True,
                             text=True, timeout=300)  # fmt: skip
    first = [ln for ln in resumed.stdout.splitlines() if ln.startswith("step ")][0]
    assert int(first.split()[1]) <= kill_at + 1, (kill_at, first)  # it really continued, not restarted
    assert int(first.split()[1]) > 1 or kill_at < 3
    assert losses(out) == reference  # bitwise: floats compared exactly


def test_packed_and_unpacked_training_agree_and_the_png_is_written(tmp_path):
    data = write_corpus(tmp_path / "corpus.jsonl", n_docs=40)
    out = tmp_path / "cmp"
    subprocess.run([sys.executable, str(SCRIPT), "--data", str(data), "--out", str(out), "--compare",
                    "--capacity", "512", "--max-steps", "6", "--hidden", "32", "--layers", "1"],
                   check=True, env=env(), capture_output=True, timeout=300)  # fmt: skip
    summary = json.loads((out / "compare.json").read_text())
    assert (out / "compare.png").stat().st_size > 10_000
    assert summary["steps"] == 6
    assert summary["packed_passes"] == 6 and summary["unpacked_passes"] >= 3 * 6  # several documents per bin
    assert summary["max_abs_loss_diff"] < 1e-4  # same documents per step: same loss per token
    assert summary["final_loss_packed"] == pytest.approx(summary["final_loss_unpacked"], abs=1e-4)
