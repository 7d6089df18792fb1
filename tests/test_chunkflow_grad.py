"""ChunkFlow is gradient-exact: loss and every parameter gradient equal full-sequence training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from seqpack.ops.chunked import TinyChunkedLM

from seqpack import IGNORE_INDEX, VarlenBatch, build_chunks, build_schedule, chunkflow_step
from seqpack.plan.chunks import ChunkAction, check_schedule
from seqpack.train.chunkflow import ChunkFlowExecutor

C = 16
# mixed global batch: chains of 2..4 chunks (one ending exactly on a chunk boundary, one with a
# 1-token tail), a document of exactly C, and short documents packed into standalone chunks
LENGTHS = [37, 5, 9, 16, 3, 50, 12, 7, 1, 2, 32, 17]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _docs(lengths, seed=0, vocab=64):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n) for n in lengths]


def _model(dtype, backend="auto", seed=0):
    torch.manual_seed(seed)
    return TinyChunkedLM(
        vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, attn_backend=backend
    ).to(dtype)


def _full_sequence(model, docs, masks=None):
    """Reference: every document whole, as segments of one batch, reference attention, no prefix."""
    full = VarlenBatch.from_segments(docs, np.arange(len(docs)), loss_masks=masks)
    backend, model.attn_backend = model.attn_backend, "reference"
    model.zero_grad(set_to_none=True)
    logits, _ = model(full.input_ids, full.position_ids, full.cu_seqlens, full.max_seqlen)
    loss = (
        F.cross_entropy(logits, full.shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
        / full.num_loss_tokens
    )
    loss.backward()
    model.attn_backend = backend
    return (
        float(loss.detach()),
        {n: p.grad.clone() for n, p in model.named_parameters()},
        full.num_loss_tokens,
    )


def _max_grad_err(model, ref):
    return max(float((p.grad - ref[n]).abs().max()) for n, p in model.named_parameters())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_mixed_batch_grad_equal_full_sequence(dtype, tol, k):
    docs = _docs(LENGTHS)
    model = _model(dtype)
    ref_loss, ref_grads, ref_tokens = _full_sequence(model, docs)
    chunks = build_chunks(docs, C)
    assert {c.chain_len for c in chunks if c.is_dependent} == {2, 3, 4}
    assert any(not c.is_dependent and c.batch.n_real_segments > 1 for c in chunks)
    check_schedule(build_schedule(chunks, k), chunks, k)
    model.zero_grad(set_to_none=True)
    res = chunkflow_step(model, chunks, k)
    assert res.num_loss_tokens == ref_tokens
    assert res.peak_live_chunks == min(k, 4)
    assert res.recomputed_chunks == sum(
        max(0, c.chain_len - k) for c in chunks if c.chain_pos == 0 and c.is_dependent
    )
    assert abs(res.loss - ref_loss) <= tol * max(1.0, abs(ref_loss))
    assert set(n for n, p in model.named_parameters() if p.grad is not None) == set(ref_grads)
    assert _max_grad_err(model, ref_grads) <= tol
    # the gradients are not trivially small: a wrong schedule would show
    assert max(float(g.abs().max()) for g in ref_grads.values()) > 1e-2


def test_loss_masks_and_padded_chunks_exact():
    docs = _docs(LENGTHS, seed=4)
    rng = np.random.default_rng(5)
    masks = [rng.random(len(d)) < 0.6 for d in docs]
    model = _model(torch.float64)
    ref_loss, ref_grads, ref_tokens = _full_sequence(model, docs, masks)
    chunks = build_chunks(docs, C, loss_masks=masks, pad_to="max")
    assert all(c.batch.num_tokens == C for c in chunks)
    model.zero_grad(set_to_none=True)
    res = chunkflow_step(model, chunks, 1)
    assert res.num_loss_tokens == ref_tokens
    assert abs(res.loss - ref_loss) < 1e-12
    assert _max_grad_err(model, ref_grads) < 1e-12


def test_reference_attention_backend_also_exact():
    docs = _docs([40, 6, 11], seed=2)
    model = _model(torch.float64, backend="reference")
    _, ref_grads, _ = _full_sequence(model, docs)
    model.zero_grad(set_to_none=True)
    chunkflow_step(model, build_chunks(docs, 8), 2)
    assert _max_grad_err(model, ref_grads) < 1e-12


def test_ascending_backward_is_wrong():
    """Negative control: backward of a chain in ascending order misses the dK/dV of later chunks."""
    docs = _docs([48], seed=3)
    model = _model(torch.float64)
    _, ref_grads, _ = _full_sequence(model, docs)
    chunks = build_chunks(docs, C)
    ex = ChunkFlowExecutor(model, chunks)
    model.zero_grad(set_to_none=True)
    for i in range(3):
        ex.run(ChunkAction("forward", i, 0, i))
    for i in range(3):
        ex.run(ChunkAction("backward", i, 0, i))
    assert _max_grad_err(model, ref_grads) > 1e-4


def test_training_steps_track_full_sequence():
    """Three optimizer steps over two global batches: parameters stay equal to full-sequence training."""
    batches = [_docs([45, 7, 3, 20], seed=10), _docs([9, 33, 16], seed=11)]
    ref_model, cf_model = _model(torch.float64), _model(torch.float64)
    opt_ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
    opt_cf = torch.optim.AdamW(cf_model.parameters(), lr=1e-2)
    for step in range(3):
        docs = batches[step % 2]
        opt_ref.zero_grad(set_to_none=True)
        ref_loss, _, _ = _full_sequence(ref_model, docs)
        opt_ref.step()
        opt_cf.zero_grad(set_to_none=True)
        res = chunkflow_step(cf_model, build_chunks(docs, 8), 1)
        opt_cf.step()
        assert abs(res.loss - ref_loss) < 1e-10
    for (n, a), (_, b) in zip(ref_model.named_parameters(), cf_model.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0, msg=n)


def test_example_trains_and_checks():
    """examples/chunkflow_train.py: the first step matches full-sequence training and loss falls."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "chunkflow_train.py"
    spec = importlib.util.spec_from_file_location("chunkflow_train", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    n = torch.get_num_threads()
    try:
        out = example.main(
            ["--steps", "8", "--capacity", "32", "--long-len", "120", "--check", "--lr", "1e-2"]
        )
    finally:
        torch.set_num_threads(n)
    assert out["max_grad_err"] < 1e-5
    assert np.all(np.isfinite(out["losses"])) and out["losses"][-1] < out["losses"][0]
