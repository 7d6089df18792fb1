"""A real transformers Llama consumes packed batches exactly like per-document batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from hf_models import tiny_llama as build_tiny_llama  # noqa: E402

from seqpack import IGNORE_INDEX, pack_documents  # noqa: E402


@pytest.fixture(scope="module")
def tiny_llama():
    return build_tiny_llama().float().eval()


def test_packed_logits_and_loss_equal_per_document(tiny_llama):
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 128, n) for n in (17, 5, 40, 23, 1, 9, 31)]
    batches = list(pack_documents(docs, 64, pad_to=64))
    assert len(batches) >= 2
    total_packed = 0.0
    total_ref = 0.0
    for b in batches:
        hf = b.to_hf()
        with torch.no_grad():
            out = tiny_llama(input_ids=hf["input_ids"], position_ids=hf["position_ids"], use_cache=False)
        logits = out.logits[0]
        for s in range(b.n_real_segments):
            lo, hi = int(b.cu_seqlens[s]), int(b.cu_seqlens[s + 1])
            doc = docs[int(b.doc_ids[s])]
            with torch.no_grad():
                ref = tiny_llama(input_ids=torch.as_tensor(doc)[None], use_cache=False).logits[0]
            assert torch.allclose(logits[lo:hi], ref, atol=1e-5, rtol=0), float(
                (logits[lo:hi] - ref).abs().max()
            )
            if len(doc) > 1:
                total_ref += torch.nn.functional.cross_entropy(
                    ref[:-1], torch.as_tensor(doc[1:]), reduction="sum"
                ).item()
        # summed loss over the packed row with the batch's labels (shift inside, as HF does)
        shifted = b.shift_labels
        total_packed += torch.nn.functional.cross_entropy(
            logits, shifted, ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()
        assert int((shifted != IGNORE_INDEX).sum()) == b.num_loss_tokens
    assert total_packed == pytest.approx(total_ref, rel=1e-5)


def test_hf_loss_with_labels_matches_num_loss_tokens(tiny_llama):
    rng = np.random.default_rng(1)
    docs = [rng.integers(1, 128, n) for n in (12, 30, 7)]
    (b,) = list(pack_documents(docs, 64))
    hf = b.to_hf()
    with torch.no_grad():
        out = tiny_llama(input_ids=hf["input_ids"], position_ids=hf["position_ids"], labels=hf["labels"])
        ref_sum = 0.0
        for d in docs:
            logits = tiny_llama(input_ids=torch.as_tensor(d)[None]).logits[0]
            ref_sum += torch.nn.functional.cross_entropy(
                logits[:-1], torch.as_tensor(d[1:]), reduction="sum"
            ).item()
    assert b.num_loss_tokens == sum(len(d) - 1 for d in docs)
    assert out.loss.item() * b.num_loss_tokens == pytest.approx(ref_sum, rel=1e-5)


def test_to_hf_seq_idx_matches_the_hf_flattening_collator():
    from transformers import DataCollatorWithFlattening

    rng = np.random.default_rng(2)
    docs = [rng.integers(1, 128, n) for n in (12, 1, 30, 7)]
    (b,) = list(pack_documents(docs, 64))  # no padding: the collator has none either
    hf = b.to_hf(seq_idx=True)
    ref = DataCollatorWithFlattening(return_seq_idx=True, return_flash_attn_kwargs=True)(
        [{"input_ids": docs[int(d)].tolist()} for d in b.doc_ids]
    )
    assert hf["seq_idx"].shape == ref["seq_idx"].shape == (1, 50)
    assert hf["seq_idx"].dtype == ref["seq_idx"].dtype == torch.int32
    assert torch.equal(hf["seq_idx"], ref["seq_idx"])
    for key in ("input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k"):
        assert torch.equal(hf[key], ref[key]), key
    assert "seq_idx" not in b.to_hf()  # default output unchanged
