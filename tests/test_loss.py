"""Loss weights and normalization: accumulated packed gradients equal the per-document reference,
on one process and across gloo DDP ranks."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from hf_models import tiny_llama as build_tiny_llama  # noqa: E402

from seqpack import (  # noqa: E402
    count_doc_targets,
    loss_normalizer,
    pack_documents,
    packed_loss,
    step_normalizer,
    with_loss_weights,
)
from seqpack.batch import padding_batch  # noqa: E402

LENGTHS = (17, 5, 40, 23, 9, 31, 2, 60, 12)


def tiny_llama():
    """Smaller than the default tiny Llama: these tests backpropagate through it many times."""
    return build_tiny_llama(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
    )


def make_docs(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 64, n) for n in LENGTHS]


def reference_grads(model, docs, mode):
    """Gradient of the per-document loss: token mean over all targets, or mean of document means."""
    model.zero_grad()
    per_doc = []
    for d in docs:
        logits = model(input_ids=torch.as_tensor(d)[None]).logits[0]
        per_doc.append(F.cross_entropy(logits[:-1], torch.as_tensor(d[1:]), reduction="sum"))
    if mode == "token":
        loss = torch.stack(per_doc).sum() / sum(len(d) - 1 for d in docs)
    else:
        loss = torch.stack([s / (len(d) - 1) for s, d in zip(per_doc, docs)]).mean()
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


def accumulated_grads(model, batches, normalizer, scale=1.0):
    model.zero_grad()
    total = 0.0
    for b in batches:
        hf = b.to_hf()
        logits = model(input_ids=hf["input_ids"], position_ids=hf["position_ids"]).logits
        loss = packed_loss(logits, b, normalizer=normalizer, scale=scale)
        loss.backward()
        total += loss.item()
    return total, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("mode", ["token", "sample"])
def test_accumulated_packed_gradient_equals_per_document_gradient(mode):
    docs = make_docs()
    model = tiny_llama()
    ref_loss, ref_grads = reference_grads(model, docs, mode)
    batches = list(pack_documents(docs, 64, pad_to=64))  # 4 micro-batches, no document split
    assert len(batches) >= 3
    if mode == "sample":
        batches = [with_loss_weights(b, "sample") for b in batches]
    normalizer = step_normalizer(batches)
    assert normalizer == (sum(len(d) - 1 for d in docs) if mode == "token" else pytest.approx(len(docs)))
    loss, grads = accumulated_grads(model, batches, normalizer)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_sample_mode_counts_a_split_document_once():
    docs = make_docs()
    batches = list(pack_documents(docs, 32, pad_to=32))  # the 40- and 60-token documents are split
    assert sum(int((b.doc_ids == 7).sum()) for b in batches) == 2
    weighted = [with_loss_weights(b, "sample", count_doc_targets(batches)) for b in batches]
    assert step_normalizer(weighted) == pytest.approx(len(docs))
    per_doc = {}
    for b in weighted:
        for s in range(b.n_real_segments):
            lo, hi = int(b.cu_seqlens[s]), int(b.cu_seqlens[s + 1])
            d = int(b.doc_ids[s])
            per_doc[d] = per_doc.get(d, 0.0) + float(b.loss_weights[lo:hi].sum())
    assert all(v == pytest.approx(1.0) for v in per_doc.values()) and len(per_doc) == len(docs)
    # without the totals each piece would count as a document of its own
    assert step_normalizer([with_loss_weights(b, "sample") for b in batches]) == pytest.approx(len(docs) + 2)


def test_sample_weights_make_every_document_count_once():
    docs = [np.arange(1, 41), np.arange(1, 4)]
    (b,) = list(pack_documents(docs, 64))
    w = with_loss_weights(b, "sample").loss_weights
    first = slice(0, 40)
    assert float(w[first].sum()) == pytest.approx(1.0) and float(w[40:].sum()) == pytest.approx(1.0)
    assert float(w[first][1]) == pytest.approx(1 / 39) and float(w[41]) == pytest.approx(1 / 2)
    assert loss_normalizer(with_loss_weights(b, "sample")) == pytest.approx(2.0)
    assert loss_normalizer(b) == b.num_loss_tokens == 39 + 2
    with_loss_weights(b, "token").validate()
    with pytest.raises(ValueError, match="mode"):
        with_loss_weights(b, "doc")
    with pytest.raises(KeyError, match="document id 1"):
        with_loss_weights(b, "sample", {0: 39})


def test_packed_loss_matches_transformers_own_loss():
    docs = make_docs(1)[:4]
    (b,) = list(pack_documents(docs, 128))
    model = tiny_llama()
    hf = b.to_hf()
    with torch.no_grad():
        out = model(input_ids=hf["input_ids"], position_ids=hf["position_ids"], labels=hf["labels"])
        ours = packed_loss(out.logits, b)
    assert ours.item() == pytest.approx(out.loss.item(), rel=1e-6)


def test_padding_only_step_gives_zero_loss_not_nan():
    pad = padding_batch(16)
    logits = torch.randn(16, 8, requires_grad=True)
    loss = packed_loss(logits, pad, normalizer=step_normalizer([pad]))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all() and not logits.grad.any()
    with pytest.raises(ValueError, match="covers|cover"):
        packed_loss(torch.randn(15, 8), pad)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(tiny_llama())
        batches = list(pack_documents(make_docs(), 32, pad_to=32))
        mine = batches[rank::world]
        while len(mine) < -(-len(batches) // world):  # equal step counts: zero-loss padding batches
            mine.append(padding_batch(32))
        normalizer = step_normalizer(mine)  # all-reduced over ranks
        model.zero_grad()
        for i, b in enumerate(mine):
            hf = b.to_hf()
            ctx = model.no_sync() if i < len(mine) - 1 else torch.enable_grad()
            with ctx:
                logits = model(input_ids=hf["input_ids"], position_ids=hf["position_ids"]).logits
                packed_loss(logits, b, normalizer=normalizer, scale=world).backward()
        torch.save(
            {"normalizer": normalizer, "grads": [p.grad for p in model.module.parameters()]},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        dist.barrier()  # tear down together: gloo aborts a rank whose peer left first
    finally:
        dist.destroy_process_group()


def test_ddp_all_reduced_normalizer_gives_the_global_gradient(tmp_path):
    world = 2
    torch.multiprocessing.spawn(_ddp_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world)
    model = tiny_llama()
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    total_targets = sum(len(d) - 1 for d in make_docs()) - 2  # the 40/60-token docs are split once each
    for res in results:
        assert res["normalizer"] == total_targets
    # ranks agree exactly (DDP averaged them) and match a single-process accumulation of all batches
    batches = list(pack_documents(make_docs(), 32, pad_to=32))
    _, single = accumulated_grads(model, batches, step_normalizer(batches))
    for g0, g1, s in zip(results[0]["grads"], results[1]["grads"], single):
        torch.testing.assert_close(g0, g1, rtol=0, atol=0)
        torch.testing.assert_close(g0, s, rtol=1e-4, atol=1e-6)
