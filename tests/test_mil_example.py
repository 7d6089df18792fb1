"""examples/wsi_packmil.py runs end to end on files it writes (h5/npy + labels.csv) and resumes exactly."""

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
    out = _load().main(
        [
            "--slides",
            "10",
            "--epochs",
            "2",
            "--dim",
            "8",
            "--pack-len",
            "256",
            "--downsample",
            str(downsample),
        ]
    )
    s = out["stats"]
    assert out["resumed_ok"] is True
    assert s["slides"] == 20 and s["bags"] == 20
    assert (
        s["main_features"] + s["residual_features"] + s["discarded_features"] - s["shared_features"]
        == s["input_features"]
    )
