"""check_packing (packed vs alone on a real transformers Llama) and the boundary guard."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from hf_models import tiny_llama  # noqa: E402

from seqpack import (  # noqa: E402
    PackingError,
    assert_packing_safe,
    check_packing,
    install_packing_guard,
    pack_documents,
)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 128, n) for n in (17, 5, 40, 23, 1)]
    (b,) = list(pack_documents(docs, 96, pad_to=96))
    return b


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_correct_path_passes(batch, attn):
    report = check_packing(tiny_llama(attn=attn), batch, atol=1e-5)
    assert report.ok, str(report)
    assert report.segments == 5 and report.max_logit_diff < 1e-5
    assert report.packed_loss_sum == pytest.approx(report.reference_loss_sum, rel=1e-5)
    assert report.packed_loss_sum > 0


def test_kv_cache_leak_is_caught(batch):
    model = tiny_llama(use_cache=True)  # transformers skips packed detection when a cache exists
    model.train()
    report = check_packing(model, batch)
    assert not report.ok and report.max_logit_diff > 1e-2, str(report)
    assert "LEAK" in str(report)
    assert model.training  # mode restored
    with pytest.raises(PackingError, match="LEAK"):
        check_packing(model, batch, raise_on_leak=True)


def test_continued_positions_compare_like_for_like():
    rng = np.random.default_rng(3)
    docs = [rng.integers(1, 128, 150), rng.integers(1, 128, 30)]
    batches = list(pack_documents(docs, 64, continue_positions=True, algorithm="greedy"))
    assert any(int(b.seg_start.max()) > 0 for b in batches)
    model = tiny_llama()
    for b in batches:
        assert check_packing(model, b, atol=1e-5).ok


def test_guard_rejects_attention_mask_with_packed_positions(batch):
    model = tiny_llama()
    hf = batch.to_hf()
    with pytest.raises(PackingError, match="attention_mask"):
        assert_packing_safe(model, {**hf, "attention_mask": torch.ones_like(hf["input_ids"])})
    # one document per row with a padding mask is not packing: allowed
    assert_packing_safe(
        model,
        {
            "input_ids": torch.ones(2, 8, dtype=torch.long),
            "position_ids": torch.arange(8).expand(2, 8),
            "attention_mask": torch.ones(2, 8, dtype=torch.long),
        },
    )


def test_guard_rejects_use_cache_in_training(batch):
    model = tiny_llama(use_cache=True).train()
    with pytest.raises(PackingError, match="use_cache"):
        assert_packing_safe(model, batch.to_hf())
    assert_packing_safe(model, {**batch.to_hf(), "use_cache": False})  # explicit override is fine
    model.config.use_cache = False
    assert_packing_safe(model, batch.to_hf())
    with pytest.raises(PackingError, match="use_cache=True"):
        assert_packing_safe(model, {**batch.to_hf(), "use_cache": True})


def test_guard_rejects_unsupported_attention_and_recurrent_models(batch):
    model = torch.nn.Linear(2, 2)
    model.config = SimpleNamespace(
        use_cache=False, _attn_implementation="paged|my_kernel", model_type="llama"
    )
    with pytest.raises(PackingError, match="paged\\|my_kernel"):
        assert_packing_safe(model, batch.to_hf())
    model.config = SimpleNamespace(use_cache=False, _attn_implementation="eager", model_type="mamba2")
    with pytest.raises(PackingError, match="seq_idx"):
        assert_packing_safe(model, batch.to_hf())
    assert_packing_safe(model, {**batch.to_hf(), "seq_idx": batch.seq_idx[None]})


def test_installed_guard_stops_a_bad_forward_and_lets_a_good_one_train(batch):
    model = tiny_llama().train()
    handle = install_packing_guard(model)
    hf = batch.to_hf()
    out = model(input_ids=hf["input_ids"], position_ids=hf["position_ids"], labels=hf["labels"])
    out.loss.backward()
    with pytest.raises(PackingError, match="attention_mask"):
        model(
            input_ids=hf["input_ids"],
            position_ids=hf["position_ids"],
            attention_mask=torch.ones_like(hf["input_ids"]),
        )
    handle.remove()
    ones = torch.ones_like(hf["input_ids"])
    model(input_ids=hf["input_ids"], position_ids=hf["position_ids"], attention_mask=ones)
