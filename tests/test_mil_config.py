"""PackMIL names: ``capacity`` and ``pad_to``; the old ``pack_len`` / ``pad`` (keyword arguments,
config keys, checkpoint state) still work for one release with a DeprecationWarning naming the new one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seqpack import build_loader
from seqpack.checks import ConfigError
from seqpack.mil import InMemoryBags, LabelTable, PackMIL
from seqpack.mil.config import check_stage
from seqpack.stages import mil as mil_stage

LENGTHS = [3, 50, 500, 1200, 80, 7, 2000, 300, 1, 640]


def _source():
    rng = np.random.default_rng(0)
    return InMemoryBags([rng.standard_normal((n, 4)).astype(np.float32) for n in LENGTHS])


def _labels(src):
    return LabelTable(list(src.slide_ids), np.arange(len(src)) % 2, ["a", "b"], False)


def _batches(stage):
    return [(b.slide_ids.tolist(), b.instance_idx.tolist(), tuple(b.features.shape)) for b in stage]


def test_old_keyword_arguments_warn_and_work():
    src = _source()
    with pytest.warns(DeprecationWarning) as record:
        old = PackMIL(src, _labels(src), pack_len=512, pad=False, seed=3)
    messages = " ".join(str(w.message) for w in record)
    assert "PackMIL.pack_len" in messages and "PackMIL.capacity" in messages
    assert "PackMIL.pad " in messages and "PackMIL.pad_to" in messages
    new = PackMIL(src, _labels(src), capacity=512, pad_to=None, seed=3)
    assert old.capacity == new.capacity == 512 and old.pad_to is new.pad_to is None
    assert _batches(old) == _batches(new)
    with pytest.warns(DeprecationWarning, match="PackMIL.capacity"):
        assert new.pack_len == 512
    with pytest.warns(DeprecationWarning):
        assert PackMIL(src, _labels(src), capacity=512, pad=True).pad_to == 512
    with pytest.raises(ConfigError, match="give only 'capacity'"):
        PackMIL(src, _labels(src), capacity=512, pack_len=512)
    with pytest.raises(TypeError, match="unexpected keyword argument 'packlen'"):
        PackMIL(src, _labels(src), capacity=512, packlen=512)


def test_pad_to_values():
    src = _source()
    stage = PackMIL(src, _labels(src), capacity=256, packs_per_batch=2, downsample=2, max_instances=300)
    assert stage.pad_to == 2 * 256 * 2  # "max" is the default: packs_per_batch * capacity * downsample
    batches = list(stage)
    assert all(b.features.shape[0] == 1024 for b in batches)
    assert all(b.capacity == 512 and b.residual.capacity == 512 for b in batches)
    with pytest.warns(DeprecationWarning, match="MILBatch.capacity"):
        assert batches[0].pack_len == 512
    fixed = PackMIL(src, _labels(src), capacity=256, packs_per_batch=2, downsample=2, pad_to=1100)
    assert {b.features.shape[0] for b in fixed} == {1100}
    with pytest.raises(ConfigError, match="pad_to: must be >= 1024, got 1000"):
        PackMIL(src, _labels(src), capacity=256, packs_per_batch=2, downsample=2, pad_to=1000)


def test_old_state_loads():
    src = _source()
    stage = PackMIL(src, _labels(src), capacity=256, max_instances=200, num_epochs=2)
    it = iter(stage)
    for _ in range(3):
        next(it)
    state = stage.state_dict()
    old_state = {("pack_len" if k == "capacity" else k): v for k, v in state.items()}
    want = list(it)
    resumed = PackMIL(src, _labels(src), capacity=256, max_instances=200, num_epochs=2)
    resumed.load_state_dict(old_state)
    got = list(resumed)
    assert [b.instance_idx.tolist() for b in got] == [b.instance_idx.tolist() for b in want]
    other = PackMIL(src, _labels(src), capacity=128, max_instances=100)
    with pytest.raises(ValueError, match="capacity=256, this stage has capacity=128"):
        other.load_state_dict(old_state)


def test_old_config_keys_warn_and_map():
    with pytest.warns(DeprecationWarning) as record:
        kw = check_stage({"type": "mil", "pack_len": 96, "pad": False, "seed": 2})
    messages = " ".join(str(w.message) for w in record)
    assert "stage.pack_len" in messages and "stage.capacity" in messages and "stage.pad_to" in messages
    assert kw == {"capacity": 96, "pad_to": None, "seed": 2}
    with pytest.warns(DeprecationWarning):
        assert check_stage({"pack_len": 96, "pad": True})["pad_to"] == "max"
    with pytest.raises(ConfigError, match="stage.capacity: expected an integer"):
        check_stage({"type": "mil"})
    cfg = {"sources": ["bags"], "stage": {"type": "mil", "pack_len": 96}}
    with pytest.warns(DeprecationWarning, match="stage.pack_len"):
        out = mil_stage.validate(cfg, base_dir="/data")
    assert out["stage"] == {"type": "mil", "capacity": 96}
    assert out["sources"] == [{"path": "/data/bags"}]


def test_old_config_keys_through_the_loader(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "bags").mkdir()
    rows = ["slide_id,label"]
    for i in range(8):
        np.save(tmp_path / "bags" / f"s{i}.npy", rng.standard_normal((15 + 29 * i, 4)).astype(np.float16))
        rows.append(f"s{i},{i % 2}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    base = {
        "sources": [str(tmp_path / "bags")],
        "labels": str(tmp_path / "labels.csv"),
        "shuffle": {"seed": 1},
    }
    with pytest.warns(DeprecationWarning):
        old = list(build_loader({**base, "stage": {"type": "mil", "pack_len": 128, "pad": False}}))
    new = list(build_loader({**base, "stage": {"type": "mil", "capacity": 128, "pad_to": None}}))
    assert [b.instance_idx.tolist() for b in old] == [b.instance_idx.tolist() for b in new]
    assert any(b.features.shape[0] < 128 for b in new) and all(b.features.dtype == torch.float32 for b in new)
