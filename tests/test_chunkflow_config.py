"""ChunkFlow names: ``capacity`` and ``pad_to``; the old ``chunk_size`` / ``pad_to_chunk`` (keyword
arguments and config keys) still work for one release with a DeprecationWarning naming the new one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seqpack import build_loader
from seqpack.checks import ConfigError
from seqpack.plan.chunks import plan_chunks
from seqpack.stages import chunkflow
from seqpack.stages.chunkflow import build_chunks
from seqpack.train.chunkflow import iter_chunk_batches

LENGTHS = [37, 5, 9, 16, 3, 50, 12]


def _docs(lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 50, n) for n in lengths]


def _same_chunks(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.chain_id, x.chain_pos, x.chain_len, x.kv_prefix_len) == (
            y.chain_id,
            y.chain_pos,
            y.chain_len,
            y.kv_prefix_len,
        )
        torch.testing.assert_close(x.batch.input_ids, y.batch.input_ids)
        torch.testing.assert_close(x.batch.cu_seqlens, y.batch.cu_seqlens)
        torch.testing.assert_close(x.shift_labels, y.shift_labels)


def test_old_keyword_arguments_warn_and_work():
    with pytest.warns(DeprecationWarning, match="plan_chunks.chunk_size.*plan_chunks.capacity"):
        old = plan_chunks(LENGTHS, chunk_size=16)
    new = plan_chunks(LENGTHS, 16)
    assert old.summary() == new.summary() and old.capacity == 16
    with pytest.warns(DeprecationWarning, match="ChunkPlan.capacity"):
        assert new.chunk_size == 16
    docs = _docs()
    with pytest.warns(DeprecationWarning, match="build_chunks.pad_to_chunk.*build_chunks.pad_to"):
        old_chunks = build_chunks(docs, chunk_size=16, pad_to_chunk=True)
    new_chunks = build_chunks(docs, 16, pad_to="max")
    _same_chunks(old_chunks, new_chunks)
    assert all(c.batch.num_tokens == 16 for c in new_chunks)
    with pytest.warns(DeprecationWarning, match="chunk_size"):
        streamed = list(iter_chunk_batches(iter([docs]), chunk_size=16))
    _same_chunks(streamed[0], build_chunks(docs, 16))


def test_old_and_new_names_together_or_unknown_keyword():
    with pytest.raises(ConfigError, match="give only 'capacity'"):
        plan_chunks(LENGTHS, 16, chunk_size=16)
    with pytest.raises(TypeError, match="unexpected keyword argument 'chunksize'"):
        build_chunks(_docs(), chunksize=16)


def test_pad_to_values():
    docs = _docs()
    assert all(c.batch.num_tokens == 24 for c in build_chunks(docs, 16, pad_to=24))
    assert any(c.batch.num_tokens < 16 for c in build_chunks(docs, 16, pad_to=None))
    with pytest.raises(ConfigError, match="pad_to: must be >= 16, got 8"):
        build_chunks(docs, 16, pad_to=8)
    with pytest.raises(ConfigError, match="pad_to: expected null, 'max' or an integer"):
        build_chunks(docs, 16, pad_to="capacity")


def _stage_cfg(**stage):
    return {"seed": 4, "stage": {"type": "chunkflow", "tokens_per_step": 64, **stage}}


def test_old_config_keys_warn_and_map():
    with pytest.warns(DeprecationWarning) as record:
        cfg = chunkflow.validate(_stage_cfg(chunk_size=32, pad_to_chunk=True))
    messages = " ".join(str(w.message) for w in record)
    assert "stage.chunk_size" in messages and "stage.capacity" in messages
    assert "stage.pad_to_chunk" in messages and "stage.pad_to" in messages
    assert cfg["stage"] == {
        "type": "chunkflow",
        "tokens_per_step": 64,
        "capacity": 32,
        "pad_to": "max",
        "seed": 4,
    }
    with pytest.warns(DeprecationWarning):
        assert chunkflow.validate(_stage_cfg(capacity=32, pad_to_chunk=False))["stage"]["pad_to"] is None
    with (
        pytest.warns(DeprecationWarning),
        pytest.raises(ConfigError, match="stage.pad_to_chunk: expected true"),
    ):
        chunkflow.validate(_stage_cfg(capacity=32, pad_to_chunk="yes"))
    with pytest.raises(ConfigError, match="stage.pad_to: must be >= 32"):
        chunkflow.validate(_stage_cfg(capacity=32, pad_to=16))
    with pytest.raises(ConfigError, match="stage.capcity: unknown key"):
        chunkflow.validate(_stage_cfg(capcity=32))


def test_old_config_keys_through_the_loader(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join('{"text": "%s"}\n' % ("ab" * n) for n in (3, 40, 7, 90, 12)))
    old = {"sources": [str(tmp_path / "d.jsonl")], **_stage_cfg(chunk_size=32, pad_to_chunk=True)}
    new = {"sources": [str(tmp_path / "d.jsonl")], **_stage_cfg(capacity=32, pad_to="max")}
    with pytest.warns(DeprecationWarning):
        old_steps = list(build_loader(old))
    new_steps = list(build_loader(new))
    assert len(old_steps) == len(new_steps) > 1
    for a, b in zip(old_steps, new_steps):
        _same_chunks(a, b)
        assert all(c.batch.num_tokens == 32 for c in a)
    ctx = type("Ctx", (), {"pad_id": 0})()
    (pad,) = chunkflow.padding({"capacity": 32, "pad_to": 40}, ctx, None)
    assert pad.batch.num_tokens == 40 and pad.num_loss_tokens == 0
