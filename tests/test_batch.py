"""VarlenBatch contract: invariants, labels, padding, adapters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seqpack import IGNORE_INDEX, VarlenBatch, pack_documents


def make_docs(seed: int, n: int = 12, hi: int = 40) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 1000, int(rng.integers(1, hi))) for _ in range(n)]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("pad", [False, True])
def test_batches_hold_every_token_once_and_satisfy_contract(seed, pad):
    docs = make_docs(seed)
    capacity = 64
    batches = list(pack_documents(docs, capacity, pad_to=capacity if pad else None))
    seen = {i: [] for i in range(len(docs))}
    for b in batches:
        b.validate()
        cu = b.cu_seqlens.tolist()
        assert cu[-1] == b.num_tokens == (capacity if pad else cu[-1])
        for s in range(b.n_real_segments):
            d, start = int(b.doc_ids[s]), int(b.seg_start[s])
            seen[d].append((start, b.input_ids[cu[s] : cu[s + 1]].numpy()))
    for i, d in enumerate(docs):
        pieces = sorted(seen[i], key=lambda p: p[0])
        assert np.array_equal(np.concatenate([p[1] for p in pieces]), d)


def test_labels_positions_and_padding_segment():
    b = VarlenBatch.from_segments([np.array([5, 6, 7]), np.array([8, 9])], [10, 11], pad_to=8, pad_id=0)
    assert b.cu_seqlens.dtype == torch.int32 and b.cu_seqlens.tolist() == [0, 3, 5, 8]
    assert b.input_ids.tolist() == [5, 6, 7, 8, 9, 0, 0, 0]
    assert b.labels.tolist() == [-100, 6, 7, -100, 9, -100, -100, -100]
    assert b.position_ids.tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert b.seq_idx.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert b.doc_ids.tolist() == [10, 11, -1]
    assert b.n_real_segments == 2 and b.max_seqlen == 3 and b.num_loss_tokens == 3
    assert b.shift_labels.tolist() == [6, 7, -100, 9, -100, -100, -100, -100]
    assert b.num_real_tokens == 5


def test_loss_masks_survive_packing_and_splitting():
    docs = [np.arange(1, 11), np.arange(100, 104)]
    masks = [np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1], bool), None]
    batches = list(pack_documents(docs, 6, loss_masks=masks, seed=None))
    labels = {}
    for b in batches:
        for s in range(b.n_real_segments):
            lo, hi = b.cu_seqlens[s].item(), b.cu_seqlens[s + 1].item()
            labels[(int(b.doc_ids[s]), int(b.seg_start[s]))] = b.labels[lo:hi].tolist()
    assert labels[(0, 0)] == [-100, -100, -100, 4, 5, 6]
    assert labels[(0, 6)] == [-100, 8, 9, 10]  # first token of the later piece has no visible context
    assert labels[(1, 0)] == [-100, 101, 102, 103]


def test_continue_positions():
    b = VarlenBatch.from_segments([np.arange(4)], [0], seg_start=[8], continue_positions=True)
    assert b.position_ids.tolist() == [8, 9, 10, 11]
    b.validate()


def test_validate_catches_broken_batches():
    b = VarlenBatch.from_segments([np.arange(3), np.arange(2)], [0, 1])
    b.cu_seqlens = torch.tensor([0, 3, 3, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="strictly increasing"):
        b.validate()
    b = VarlenBatch.from_segments([np.arange(3), np.arange(2)], [0, 1])
    b.labels[3] = 7
    with pytest.raises(ValueError, match="first label"):
        b.validate()
    b = VarlenBatch.from_segments([np.arange(3)], [0])
    b.cu_seqlens = b.cu_seqlens.long()
    with pytest.raises(ValueError, match="int32"):
        b.validate()


def test_bad_construction():
    with pytest.raises(ValueError, match="pad_to=3"):
        VarlenBatch.from_segments([np.arange(5)], [0], pad_to=3)
    with pytest.raises(ValueError, match="segment 1 is empty"):
        VarlenBatch.from_segments([np.arange(5), np.arange(0)], [0, 1])
    with pytest.raises(ValueError, match=r"docs\[1\] must hold integer"):
        list(pack_documents([np.arange(3), np.array([0.5, 1.0])], 8))
    with pytest.raises(ValueError, match=r"docs\[0\] must be 1-D"):
        list(pack_documents([np.zeros((2, 2), np.int64)], 8))
    with pytest.raises(ValueError, match=r"loss_masks\[0\] has length 2"):
        list(pack_documents([np.arange(3)], 8, loss_masks=[np.ones(2, bool)]))


def test_adapters():
    b = VarlenBatch.from_segments([np.arange(1, 4), np.arange(1, 6)], [0, 1], pad_to=10)
    fa = b.to_flash_attn()
    assert (
        fa["cu_seqlens_q"] is b.cu_seqlens and fa["max_seqlen_q"] == 5 and isinstance(fa["max_seqlen_k"], int)
    )
    hf = b.to_hf(position_start=2)
    assert hf["input_ids"].shape == (1, 10) and hf["position_ids"][0, :3].tolist() == [2, 3, 4]
    assert hf["cu_seq_lens_q"].tolist() == [0, 3, 8, 10]
    assert any(k.startswith("max_") and v == 5 for k, v in hf.items())
    thd = b.to_thd(pad_multiple=4)
    assert thd["cu_seqlens"].tolist() == [0, 3, 8, 10]
    assert thd["cu_seqlens_padded"].tolist() == [0, 4, 12, 16] and thd["total_tokens"] == 16
    assert thd["input_ids"].tolist()[:8] == [1, 2, 3, 0, 1, 2, 3, 4]
    assert thd["labels"].tolist()[:4] == [IGNORE_INDEX, 2, 3, IGNORE_INDEX]
    assert thd["position_ids"].tolist()[4:12] == list(range(8))
    moved = b.to("cpu")
    assert torch.equal(moved.input_ids, b.input_ids) and moved.max_seqlen == b.max_seqlen


def test_block_mask_matches_document_causal_mask():
    b = VarlenBatch.from_segments(
        [np.arange(1, 60), np.arange(1, 140), np.arange(1, 30)], [0, 1, 2], pad_to=256
    )
    bm = b.block_mask(block_size=128)
    dense = bm.to_dense()  # block level [1, 1, nq, nk]
    seg = b.seq_idx
    T = b.num_tokens
    q = torch.arange(T)[:, None]
    k = torch.arange(T)[None, :]
    want = (q >= k) & (seg[:, None] == seg[None, :])
    blocks = want.reshape(2, 128, 2, 128).any(dim=(1, 3))
    assert torch.equal(dense[0, 0].bool(), blocks)
