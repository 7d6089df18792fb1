"""examples/wsi_packmil.py runs end to end on files it writes (h5/npy + labels.csv), resumes exactly,
and learns the synthetic task (held-out accuracy well above chance)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "wsi_packmil.py"


def _load():
    spec = importlib.util.spec_from_file_location("wsi_packmil", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("downsample", [1, 4])
def test_example_trains_and_resumes(downsample):
    args = ["--slides", "12", "--epochs", "2", "--dim", "8", "--median", "300", "--capacity", "256"]
    out = _load().main([*args, "--downsample", str(downsample)])
    s = out["stats"]
    assert out["resumed_ok"] is True
    assert s["slides"] == 2 * 9 and s["bags"] == 2 * 9  # 3 of 12 slides held out
    assert (
        s["main_features"] + s["residual_features"] + s["discarded_features"] - s["shared_features"]
        == s["input_features"]
    )


def test_example_learns_the_synthetic_task():
    # 225 training slides, 75 held out, 3 balanced classes (chance 1/3); a few seconds on one core
    out = _load().main(["--slides", "300", "--median", "300", "--epochs", "10", "--seed", "0"])
    assert out["resumed_ok"] is True
    assert out["accuracy"] >= 0.65, out["accuracy"]
