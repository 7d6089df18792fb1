"""Fixed-shape mode: fixed T and segment count, no empty segment; a compiled model never recompiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqpack import IGNORE_INDEX, VarlenBatch, pack, with_loss_weights
from seqpack.stages.pack_offline import batches_from_plan

T, S = 128, 8


def fixed_batches(docs, n):
    plan = pack([len(d) for d in docs], T - S + 1, max_segments_per_bin=S - 1)
    return [b.pad_to_shape(T, S) for b in batches_from_plan(plan, docs)][:n]


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=60), seed=st.integers(0, 3))
def test_every_planned_bin_fits_the_fixed_shape(lengths, seed):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 50, n) for n in lengths]
    plan = pack(lengths, T - S + 1, max_segments_per_bin=S - 1)
    for b in batches_from_plan(plan, docs):
        f = with_loss_weights(b, "sample").pad_to_shape(T, S)
        f.validate()
        assert f.num_tokens == T and f.cu_seqlens.shape == (S + 1,) and f.seq_idx.shape == (T,)
        assert (f.seqlens > 0).all() and f.n_real_segments == b.n_real_segments
        assert f.num_loss_tokens == b.num_loss_tokens
        real = b.num_real_tokens
        assert torch.equal(f.input_ids[:real], b.input_ids[:real]) and torch.equal(
            f.labels[:real], b.labels[:real]
        )
        assert (f.labels[real:] == IGNORE_INDEX).all() and (f.doc_ids[b.n_real_segments :] == -1).all()
        with_targets = int((b.seqlens[: b.n_real_segments] > 1).sum())  # a 1-token document has none
        assert float(f.loss_weights.sum()) == pytest.approx(float(with_targets))


def test_from_segments_fixed_shape_and_clear_errors():
    b = VarlenBatch.from_segments([np.arange(5), np.arange(3)], [7, 8], pad_to=16, pad_segments_to=5)
    b.validate()
    assert b.cu_seqlens.tolist() == [0, 5, 8, 9, 10, 16] and b.doc_ids.tolist() == [7, 8, -1, -1, -1]
    assert b.position_ids[8:].tolist() == [0, 0, 0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="needs 4 padding segments from 2 padding tokens"):
        VarlenBatch.from_segments([np.arange(5), np.arange(3)], [7, 8], pad_to=10, pad_segments_to=6)
    with pytest.raises(ValueError, match="does not fit"):
        VarlenBatch.from_segments([np.arange(5), np.arange(3)], [7, 8], pad_to=16, pad_segments_to=1)
    with pytest.raises(ValueError, match="pad_segments_to needs pad_to"):
        VarlenBatch.from_segments([np.arange(5)], [7], pad_segments_to=3)
    # an exactly full batch with as many segments as asked stays as it is
    full = VarlenBatch.from_segments([np.arange(4), np.arange(4)], [1, 2], pad_to=8, pad_segments_to=2)
    assert full.cu_seqlens.tolist() == [0, 4, 8] and full.n_real_segments == 2


class TinyDocModel(torch.nn.Module):
    """Embedding, one document-masked attention layer, a per-segment pooling (shape [S]), a head."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(64, 16)
        self.qkv = torch.nn.Linear(16, 48)
        self.out = torch.nn.Linear(16, 64)

    def forward(self, input_ids, position_ids, seq_idx, cu_seqlens, shift_labels):
        h = self.emb(input_ids) + position_ids[:, None].float() * 0.01
        q, k, v = self.qkv(h).chunk(3, -1)
        n = input_ids.shape[0]
        mask = torch.ones(n, n, dtype=torch.bool).tril() & (seq_idx[:, None] == seq_idx[None, :])
        a = torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask[None])[
            0
        ]
        pooled = torch.zeros(cu_seqlens.shape[0] - 1, 16).index_add_(0, seq_idx.long(), a)
        logits = self.out(a + pooled[seq_idx.long()])
        return torch.nn.functional.cross_entropy(
            logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum"
        )


def run_compiled(batches):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = torch.compile(TinyDocModel(), backend="eager")
    for b in batches:
        model(b.input_ids, b.position_ids, b.seq_idx, b.cu_seqlens, b.shift_labels).backward()
    return counters["stats"]["unique_graphs"], sum(counters["recompiles"].values())


def test_compiled_model_does_not_recompile_across_20_fixed_shape_batches():
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 64, int(n)) for n in rng.integers(1, 60, 300)]
    batches = fixed_batches(docs, 20)
    assert len(batches) == 20
    assert len({b.n_real_segments for b in batches}) > 1 and len({b.num_real_tokens for b in batches}) > 1
    graphs, recompiles = run_compiled(batches)
    assert (graphs, recompiles) == (1, 0)
    # control: the same documents without fixed shapes make dynamo compile again
    plan = pack([len(d) for d in docs], T)
    varying = list(batches_from_plan(plan, docs))[:20]
    graphs, _ = run_compiled(varying)
    assert graphs > 1
