"""The shipped example configs (examples/configs/) load with the current key names and run."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

import seqpack
from seqpack.batch import VarlenBatch
from seqpack.cli import main
from seqpack.config import load_config
from seqpack.curriculum.config import load_curriculum_config
from seqpack.mil import MILBatch

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
TEXT = ["pack", "decompose_curriculum", "chunkflow"]


@pytest.fixture(autouse=True)
def deprecations_are_errors():
    """An example that still uses a renamed key (pack_len, pad_to_chunk, ...) fails here."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        yield


def test_every_config_is_tested():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted([*TEXT, "mil"])


@pytest.mark.parametrize("name", TEXT)
def test_text_config_loads_and_builds_a_batch(name):
    path = CONFIGS / f"{name}.yaml"
    cfg = load_config(path)
    corpus = Path(seqpack.__file__).parent / "data" / "corpus.jsonl.zst"
    assert [Path(p).resolve() for p in cfg["sources"][0]["path"]] == [corpus.resolve()]
    first = next(iter(seqpack.build_loader(path)))
    batches = first if isinstance(first, list) else [first]  # chunkflow: one step's chunks
    assert batches
    for b in batches:
        (b if isinstance(b, VarlenBatch) else b.batch).validate()
    assert sum(b.num_loss_tokens for b in batches) > 0
    if name == "pack":
        assert first.num_tokens == 4096  # pad_to: 4096


def test_decompose_config_has_a_curriculum_to_plot():
    cur = load_curriculum_config(CONFIGS / "decompose_curriculum.yaml")
    assert cur.decompose is not None and cur.buckets is not None and cur.buckets.odds == "grow_p2"
    assert (cur.decompose.min_log2, cur.decompose.max_log2, cur.tokens_per_step) == (8, 12, 8192)


def test_mil_config_with_a_synthetic_bag_set(tmp_path):
    shutil.copy(CONFIGS / "mil.yaml", tmp_path / "mil.yaml")
    (tmp_path / "bags").mkdir()
    rng = np.random.default_rng(0)
    rows = ["slide_id,label"]
    for i in range(6):
        feats = rng.standard_normal((50 + 97 * i, 8)).astype(np.float16)
        np.save(tmp_path / "bags" / f"s{i}.npy", feats)
        rows.append(f"s{i},{'tumor' if i % 2 else 'normal'}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    cfg = load_config(tmp_path / "mil.yaml")
    assert cfg["stage"]["capacity"] == 600
    batch = next(iter(seqpack.build_loader(tmp_path / "mil.yaml")))
    assert isinstance(batch, MILBatch)
    batch.validate()
    assert batch.features.shape[1] == 8 and batch.features.shape[0] % 600 == 0


def test_curriculum_plot_cli_draws_the_example(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "curriculum.png"
    config = str(CONFIGS / "decompose_curriculum.yaml")
    assert main(["curriculum", "plot", config, "--steps", "40", "-o", str(out)]) == 0
    assert out.stat().st_size > 0


def test_renamed_keys_would_fail_these_tests():
    with pytest.raises(DeprecationWarning, match="chunk_size"):
        load_config({"sources": [{"path": "x.jsonl"}], "stage": {"type": "chunkflow", "chunk_size": 64}})
