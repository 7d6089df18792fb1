"""ChunkFlow chunk construction, schedule invariants, token accounting, bad input, chunked attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from seqpack.ops.attention import sdpa_varlen_attention
from seqpack.ops.chunked import chunk_attention

from seqpack import IGNORE_INDEX, VarlenBatch, build_chunks, build_schedule, pack, plan_chunks
from seqpack.plan.chunks import ChunkAction, check_schedule, peak_live_chunks, schedule_chain
from seqpack.train.chunkflow import chunkflow_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _docs(lengths, seed=0, vocab=50):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n) for n in lengths]


# ---------------------------------------------------------------------------- planning
def test_plan_chains_and_standalone():
    lengths = [40, 5, 16, 17, 3, 0, 12, 33]
    plan = plan_chunks(lengths, 16, seed=None)
    plan.validate()
    assert plan.chain_doc.tolist() == [0, 3, 7]
    assert plan.chain_len.tolist() == [3, 2, 3]
    short = [5, 16, 3, 12]  # the 0-length document holds nothing and gets no chunk
    assert plan.n_standalone_chunks == pack(short, 16, algorithm="bfd").n_bins == 3
    assert plan.n_chunks == 8 + 3
    assert plan.input_tokens == sum(lengths)
    assert plan.fill == pytest.approx(sum(lengths) / (11 * 16))
    s = plan.summary()
    assert s["chains"] == 3 and s["dependent_chunks"] == 8 and s["max_chain_len"] == 3


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 200), max_size=40), st.integers(1, 64))
def test_plan_covers_every_token(lengths, capacity):
    plan = plan_chunks(lengths, capacity)
    plan.validate()
    arr = np.asarray(lengths, np.int64)
    assert plan.n_dependent_chunks == int((-(-arr[arr > capacity] // capacity)).sum())
    assert np.all(plan.standalone.bin_lengths() <= capacity)


# ---------------------------------------------------------------------------- chunks
def _full_batch(docs, masks=None):
    return VarlenBatch.from_segments(docs, np.arange(len(docs)), loss_masks=masks)


@pytest.mark.parametrize("pad", [False, True])
def test_chunks_token_accounting(pad):
    lengths = [37, 5, 9, 16, 3, 50, 12, 7, 1, 2, 32]
    docs = _docs(lengths)
    rng = np.random.default_rng(1)
    masks = [rng.random(n) < 0.7 for n in lengths]
    masks[2] = None
    C = 16
    chunks = build_chunks(docs, C, loss_masks=masks, pad_to="max" if pad else None, seed=3)
    seen = {d: np.zeros(n, np.int64) for d, n in enumerate(lengths)}
    for c in chunks:
        b = c.batch
        b.validate()
        assert b.num_tokens <= C and (b.num_tokens == C or not pad)
        assert len(c.shift_labels) == b.num_tokens
        assert c.num_loss_tokens == int((c.shift_labels != IGNORE_INDEX).sum())
        cu = b.cu_seqlens.tolist()
        for s in range(b.n_real_segments):
            d, start = int(b.doc_ids[s]), int(b.seg_start[s])
            toks = b.input_ids[cu[s] : cu[s + 1]].numpy()
            np.testing.assert_array_equal(toks, docs[d][start : start + len(toks)])
            seen[d][start : start + len(toks)] += 1
            # positions continue across a chain: RoPE sees the same positions as full-sequence
            np.testing.assert_array_equal(
                b.position_ids[cu[s] : cu[s + 1]].numpy(), start + np.arange(len(toks))
            )
        if b.n_real_segments < len(cu) - 1:
            assert (c.shift_labels[cu[-2] :] == IGNORE_INDEX).all()
        if c.is_dependent:
            assert b.n_real_segments == 1 and c.kv_prefix_len == c.chain_pos * C == int(b.seg_start[0])
        else:
            assert c.chain_pos == 0 and c.kv_prefix_len == 0 and c.chain_len == 1
    assert all((v == 1).all() for v in seen.values()), "every token in exactly one chunk"
    full = _full_batch(docs, masks)
    assert sum(c.num_loss_tokens for c in chunks) == full.num_loss_tokens
    # the chain's concatenated targets are the whole document's pre-shifted targets
    for cid in {c.chain_id for c in chunks if c.is_dependent}:
        chain = sorted((c for c in chunks if c.chain_id == cid), key=lambda c: c.chain_pos)
        d = int(chain[0].batch.doc_ids[0])
        tgt = torch.cat([c.shift_labels[: c.batch.num_real_tokens] for c in chain])
        lo = int(full.cu_seqlens[d])
        torch.testing.assert_close(tgt, full.shift_labels[lo : lo + lengths[d]])
        assert [c.chain_pos for c in chain] == list(range(chain[0].chain_len))


def test_chain_boundary_target_kept():
    docs = _docs([10])
    chunks = build_chunks(docs, 4)
    assert [c.batch.num_tokens for c in chunks] == [4, 4, 2]
    # token 3 (last of chunk 0) predicts token 4 (first of chunk 1), though chunk 1's label[0] is -100
    assert int(chunks[0].shift_labels[-1]) == int(docs[0][4])
    assert int(chunks[1].batch.labels[0]) == IGNORE_INDEX
    assert int(chunks[-1].shift_labels[-1]) == IGNORE_INDEX
    assert sum(c.num_loss_tokens for c in chunks) == 9


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [0, -3, 1.5, True, None])
def test_bad_capacity(bad):
    with pytest.raises(ValueError, match=rf"capacity: .*got {bad!r}"):
        plan_chunks([3, 4], bad)
    with pytest.raises(ValueError, match="capacity"):
        build_chunks(_docs([3]), bad)


@pytest.mark.parametrize("bad", [0, -1, 1.0])
def test_bad_k(bad):
    chunks = build_chunks(_docs([9, 3]), 4)
    with pytest.raises(ValueError, match=rf"k \(chunks with live activations\): .*got {bad!r}"):
        build_schedule(chunks, bad)
    with pytest.raises(ValueError, match=rf"got {bad!r}"):
        schedule_chain([0, 1], bad)
    with pytest.raises(ValueError, match=rf"got {bad!r}"):
        chunkflow_step(torch.nn.Linear(1, 1), chunks, bad)


def test_document_over_hard_max():
    with pytest.raises(ValueError, match=r"document 2 has 300 tokens > max_doc_len=256 \(2 document"):
        plan_chunks([10, 256, 300, 400], 64, max_doc_len=256)
    with pytest.raises(ValueError, match="document 1 has 9 tokens > max_doc_len=8"):
        build_chunks(_docs([8, 9]), 4, max_doc_len=8)
    with pytest.raises(ValueError, match="max_doc_len"):
        plan_chunks([1], 4, max_doc_len=0)
    with pytest.raises(ValueError, match=r"lengths\[1\] = -2"):
        plan_chunks([1, -2], 4)
    with pytest.raises(ValueError, match=r"docs\[1\] must be 1-D"):
        build_chunks([np.arange(3), np.zeros((2, 2), np.int64)], 4)


# ---------------------------------------------------------------------------- schedule
def _expected_chain(n, k):
    """Algorithm 2, spelled out: (kind, chain_pos)."""
    if n <= k:
        return [("forward", i) for i in range(n)] + [("backward", i) for i in reversed(range(n))]
    out = [("forward_kv", i) for i in range(n - k)] + [("forward", i) for i in range(n - k, n)]
    out += [("backward", i) for i in reversed(range(n - k, n))]
    for i in reversed(range(n - k)):
        out += [("recompute", i), ("backward", i)]
    return out


@pytest.mark.parametrize("n", range(1, 8))
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_schedule_chain_is_algorithm_2(n, k):
    acts = schedule_chain(list(range(100, 100 + n)), k, chain_id=5)
    assert [(a.kind, a.chain_pos) for a in acts] == _expected_chain(n, k)
    assert all(a.chunk == 100 + a.chain_pos and a.chain_id == 5 for a in acts)
    assert peak_live_chunks(acts) == min(n, k)
    assert sum(a.kind == "recompute" for a in acts) == max(0, n - k)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=1, max_size=12), st.integers(1, 16), st.integers(1, 5))
def test_schedule_invariants(lengths, capacity, k):
    chunks = build_chunks(_docs(lengths), capacity)
    acts = build_schedule(chunks, k)
    check_schedule(acts, chunks, k)
    assert peak_live_chunks(acts) <= k
    assert len(acts) == 2 * len(chunks) + sum(max(0, c.chain_len - k) for c in chunks if c.chain_pos == 0)


def test_check_schedule_rejects_broken_orders():
    chunks = build_chunks(_docs([12]), 4)  # one chain of 3
    good = build_schedule(chunks, 3)
    check_schedule(good, chunks, 3)
    with pytest.raises(AssertionError, match="k=2"):
        check_schedule(good, chunks, 2)
    ascending = [a for a in good if a.kind == "forward"] + [
        ChunkAction("backward", i, 0, i) for i in range(3)
    ]
    with pytest.raises(AssertionError, match="before later chunk"):
        check_schedule(ascending, chunks, 3)
    early = [ChunkAction("forward", 1, 0, 1)] + good
    with pytest.raises(AssertionError, match="predecessor"):
        check_schedule(early, chunks, 3)
    with pytest.raises(AssertionError, match="never backwarded"):
        check_schedule(good[:-1], chunks, 3)


# ---------------------------------------------------------------------------- chunked attention
def _qkv(T, H, Hkv, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, h, D, generator=g, dtype=dtype, requires_grad=True) for h in (H, Hkv, Hkv)]


@pytest.mark.parametrize("hkv", [1, 2, 4])
def test_blockwise_matches_reference_values_and_grads(hkv):
    q, k, v = _qkv(13, 4, hkv, 8)
    cu = torch.tensor([0, 6, 7, 13], dtype=torch.int32)
    g = torch.Generator().manual_seed(1)
    pk = [torch.randn(n, hkv, 8, generator=g, dtype=torch.float64, requires_grad=True) for n in (5, 1, 9)]
    pv = [torch.randn(n, hkv, 8, generator=g, dtype=torch.float64, requires_grad=True) for n in (5, 1, 9)]
    grad_out = torch.randn(13, 4, 8, generator=g, dtype=torch.float64)
    results = []
    for backend in ("reference", "blockwise"):
        out = chunk_attention(q, k, v, cu, 6, pk, pv, backend=backend)
        results.append((out, torch.autograd.grad(out, [q, k, v, *pk, *pv], grad_out)))
    (ref, ref_g), (blk, blk_g) = results
    torch.testing.assert_close(blk, ref, atol=1e-12, rtol=1e-12)
    for a, b in zip(blk_g, ref_g):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_chunk_with_prefix_equals_full_document_attention():
    q, k, v = _qkv(20, 2, 2, 8)
    full = sdpa_varlen_attention(q, k, v, torch.tensor([0, 20], dtype=torch.int32))
    cu = torch.tensor([0, 7], dtype=torch.int32)
    # document tokens 13..19 as a chunk, 0..12 carried as two prefix blocks
    out = chunk_attention(
        q[13:], k[13:], v[13:], cu, 7, [k[:5], k[5:13]], [v[:5], v[5:13]], backend="blockwise"
    )
    torch.testing.assert_close(out, full[13:], atol=1e-12, rtol=1e-12)


def test_no_prefix_matches_varlen_reference():
    q, k, v = _qkv(17, 4, 2, 8)
    cu = torch.tensor([0, 3, 11, 17], dtype=torch.int32)
    want = sdpa_varlen_attention(q, k, v, cu)
    for backend in ("reference", "blockwise", "auto"):
        torch.testing.assert_close(
            chunk_attention(q, k, v, cu, 8, backend=backend), want, atol=1e-12, rtol=1e-12
        )


def test_blockwise_runs_on_meta():
    q, k, v = (t.detach().to("meta").requires_grad_() for t in _qkv(9, 2, 1, 4))
    pk = [torch.empty(5, 1, 4, device="meta", dtype=torch.float64, requires_grad=True)]
    out = chunk_attention(q, k, v, torch.tensor([0, 9], dtype=torch.int32), 9, pk, pk, backend="blockwise")
    out.sum().backward()
    assert out.shape == (9, 2, 4) and pk[0].grad.shape == (5, 1, 4)


def test_attention_bad_input():
    q, k, v = _qkv(6, 3, 2, 4)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="not a multiple"):
        chunk_attention(q, k, v, cu, 6)
    q, k, v = _qkv(6, 2, 2, 4)
    with pytest.raises(ValueError, match="backend"):
        chunk_attention(q, k, v, cu, 6, backend="nope")
    with pytest.raises(ValueError, match="prefix block 0"):
        chunk_attention(q, k, v, cu, 6, [torch.zeros(3, 1, 4)], [torch.zeros(3, 1, 4)])
    with pytest.raises(ValueError, match="cu_seqlens"):
        chunk_attention(q, k, v, torch.tensor([0, 5], dtype=torch.int32), 5)


@pytest.mark.parametrize("backend", ["blockwise", "reference"])
def test_prefix_gradient_accumulators_equal_autograd(backend):
    """The state store's dK/dV accumulators receive exactly the prefix gradients autograd would give."""
    q, k, v = _qkv(7, 4, 2, 8)
    cu = torch.tensor([0, 4, 7], dtype=torch.int32)
    g = torch.Generator().manual_seed(2)
    pk = [torch.randn(n, 2, 8, generator=g, dtype=torch.float64, requires_grad=True) for n in (3, 5)]
    pv = [torch.randn(n, 2, 8, generator=g, dtype=torch.float64, requires_grad=True) for n in (3, 5)]
    grad_out = torch.randn(7, 4, 8, generator=g, dtype=torch.float64)
    out = chunk_attention(q, k, v, cu, 4, pk, pv, backend=backend)
    want = torch.autograd.grad(out, [q, *pk, *pv], grad_out)
    sink_k = [torch.ones_like(t) for t in pk]  # accumulators add: start from ones
    sink_v = [torch.ones_like(t) for t in pv]
    detached_k, detached_v = [t.detach() for t in pk], [t.detach() for t in pv]
    out2 = chunk_attention(
        q, k, v, cu, 4, detached_k, detached_v, prefix_grad_k=sink_k, prefix_grad_v=sink_v, backend=backend
    )
    out2.backward(grad_out)  # as the executor does: a full backward, not autograd.grad over q only
    torch.testing.assert_close(q.grad, want[0])
    for got, exp in zip(sink_k + sink_v, want[1:]):
        torch.testing.assert_close(got - 1, exp)
