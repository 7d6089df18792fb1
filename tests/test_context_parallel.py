"""Context-parallel shards: zigzag chunks that reassemble to the batch, global positions, CP attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seqpack import IGNORE_INDEX, VarlenBatch


def _batch(seed=0, continue_positions=False, pad_to=None, with_masks=True):
    rng = np.random.default_rng(seed)
    lens = [1, 2, 3, 7, 8, 15, 33, 64, 100]  # shorter and longer than 2*cp for every cp tested
    rng.shuffle(lens)
    tokens = [rng.integers(1, 1000, n) for n in lens]
    masks = [rng.random(n) > 0.3 for n in lens] if with_masks else None
    total = sum(lens)
    return VarlenBatch.from_segments(
        tokens,
        np.arange(len(lens)) + 10,
        seg_start=rng.integers(0, 50, len(lens)),
        loss_masks=masks,
        pad_to=None if pad_to is None else total + pad_to,
        continue_positions=continue_positions,
    )


CASES = [
    (cp, kw)
    for cp in (1, 2, 3, 4, 8)
    for kw in ({}, {"continue_positions": True, "pad_to": 5}, {"pad_to": 1, "with_masks": False})
]


@pytest.mark.parametrize("cp,kw", CASES)
def test_shards_reassemble_to_the_batch(cp, kw):
    batch = _batch(cp, **kw)
    batch.validate()
    thd = batch.to_thd(pad_multiple=2 * cp)
    shards = [batch.shard_for_cp(cp, r) for r in range(cp)]
    # every padded token on exactly one rank, each rank the same number of tokens
    index = torch.cat([s["index"] for s in shards])
    assert sorted(index.tolist()) == list(range(thd["total_tokens"]))
    assert (
        len({s["total_tokens"] for s in shards}) == 1
        and shards[0]["total_tokens"] * cp == thd["total_tokens"]
    )
    for key in ("input_ids", "labels", "shift_labels", "position_ids", "seq_idx"):
        back = torch.empty_like(thd[key])
        for s in shards:
            back[s["index"]] = s[key]
        assert torch.equal(back, thd[key]), key
    # strip the per-segment padding of the THD layout: exactly the original batch
    cu, cu_pad = batch.cu_seqlens.long(), thd["cu_seqlens_padded"].long()
    real = torch.cat(
        [torch.arange(int(p), int(p) + int(c1 - c0)) for p, c0, c1 in zip(cu_pad, cu[:-1], cu[1:])]
    )
    assert torch.equal(thd["input_ids"][real], batch.input_ids)
    assert torch.equal(thd["labels"][real], batch.labels)
    assert torch.equal(thd["position_ids"][real], batch.position_ids)  # global positions, RoPE intact
    assert torch.equal(thd["shift_labels"][real], batch.shift_labels)
    # per-segment padding carries no target
    pad_mask = torch.ones(thd["total_tokens"], dtype=torch.bool)
    pad_mask[real] = False
    assert (thd["labels"][pad_mask] == IGNORE_INDEX).all()
    assert (thd["shift_labels"][pad_mask] == IGNORE_INDEX).all()
    assert sum(s["num_loss_tokens"] for s in shards) == batch.num_loss_tokens


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_zigzag_chunks_and_cu_seqlens(cp):
    batch = _batch(1, pad_to=3)
    thd = batch.to_thd(pad_multiple=2 * cp)
    cu_pad = thd["cu_seqlens_padded"].long()
    lens = batch.seqlens.long()
    for r in range(cp):
        s = batch.shard_for_cp(cp, r)
        assert s["cp_rank"] == r and s["cp_size"] == cp
        assert s["cu_seqlens"].dtype == torch.int32 and s["cu_seqlens_padded"].dtype == torch.int32
        assert torch.equal(s["cu_seqlens_padded"].long() * cp, cu_pad)  # each rank 2 of 2*cp chunks
        assert torch.equal(s["global_cu_seqlens_padded"], thd["cu_seqlens_padded"])
        assert torch.equal(s["global_cu_seqlens"], batch.cu_seqlens)
        assert s["max_seqlen"] == thd["max_seqlen"]
        real_counts = []
        for seg in range(len(lens)):
            chunk = int(cu_pad[seg + 1] - cu_pad[seg]) // (2 * cp)
            lo, hi = int(s["cu_seqlens_padded"][seg]), int(s["cu_seqlens_padded"][seg + 1])
            first = torch.arange(r * chunk, (r + 1) * chunk)
            last = torch.arange((2 * cp - 1 - r) * chunk, (2 * cp - r) * chunk)
            want = int(cu_pad[seg]) + torch.cat([first, last])
            assert torch.equal(s["index"][lo:hi], want)
            real_counts.append(int(((want - int(cu_pad[seg])) < lens[seg]).sum()))
        assert s["cu_seqlens"].tolist() == np.concatenate([[0], np.cumsum(real_counts)]).tolist()
    # the real-token counts of all ranks add up to the segment lengths
    per_rank = torch.stack([batch.shard_for_cp(cp, r)["cu_seqlens"].diff() for r in range(cp)])
    assert torch.equal(per_rank.sum(0).long(), lens)


def test_zigzag_balances_causal_work():
    batch = VarlenBatch.from_segments([np.arange(1, 4097)], [0])
    cp = 4
    work = []
    for r in range(cp):
        pos = batch.shard_for_cp(cp, r)["position_ids"].double()
        work.append(float((pos + 1).sum()))  # keys each query attends to under a causal mask
    assert max(work) / min(work) == pytest.approx(1.0)
    contiguous = [float((torch.arange(r * 1024, (r + 1) * 1024) + 1.0).sum()) for r in range(cp)]
    assert max(contiguous) / min(contiguous) > 6  # what zigzag avoids


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_attention_equals_full_attention(cp):
    """Each rank's queries against all-gathered keys (what ring attention computes), masked by the
    shards' own seq_idx and global positions, equal full document-causal attention on the batch."""
    torch.manual_seed(0)
    batch = _batch(2, pad_to=4)
    T, d = batch.num_tokens, 8
    q, k, v = torch.randn(3, T, d, dtype=torch.float64).unbind(0)

    def attend(q_, k_, v_, seg_q, seg_k, pos_q, pos_k):
        mask = (seg_q[:, None] == seg_k[None, :]) & (pos_k[None, :] <= pos_q[:, None])
        scores = (q_ @ k_.T).masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, -1) @ v_

    full = attend(q, k, v, batch.seq_idx, batch.seq_idx, batch.position_ids, batch.position_ids)
    thd = batch.to_thd(pad_multiple=2 * cp)
    cu, cu_pad = batch.cu_seqlens.long(), thd["cu_seqlens_padded"].long()
    real = torch.cat(
        [torch.arange(int(p), int(p) + int(c1 - c0)) for p, c0, c1 in zip(cu_pad, cu[:-1], cu[1:])]
    )
    place = torch.full((thd["total_tokens"],), -1, dtype=torch.long)
    place[real] = torch.arange(T)  # THD slot -> batch token (-1 on per-segment padding)
    shards = [batch.shard_for_cp(cp, r) for r in range(cp)]

    def gather(x, s):
        out = torch.zeros(len(s["index"]), d, dtype=x.dtype)
        src = place[s["index"]]
        out[src >= 0] = x[src[src >= 0]]
        return out

    k_all = torch.cat([gather(k, s) for s in shards])
    v_all = torch.cat([gather(v, s) for s in shards])
    seg_all = torch.cat([s["seq_idx"] for s in shards])
    pos_all = torch.cat([s["position_ids"] for s in shards])
    real_k = torch.cat([place[s["index"]] >= 0 for s in shards])
    for s in shards:
        src = place[s["index"]]
        seg_k = torch.where(real_k, seg_all, -1)  # padding keys belong to no segment
        out = attend(gather(q, s), k_all, v_all, s["seq_idx"], seg_k, s["position_ids"], pos_all)
        keep = src >= 0
        torch.testing.assert_close(out[keep], full[src[keep]])


def test_to_thd_keeps_continued_positions_and_shift_labels():
    batch = VarlenBatch.from_segments(
        [np.arange(1, 6), np.arange(1, 4)], [0, 0], seg_start=[0, 5], continue_positions=True
    )
    thd = batch.to_thd(pad_multiple=4)
    assert thd["position_ids"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 5, 6, 7, 8]
    assert thd["shift_labels"].tolist() == [2, 3, 4, 5, -100, -100, -100, -100, 2, 3, -100, -100]


@pytest.mark.parametrize(
    "cp,rank,match",
    [
        (0, 0, "cp_size"),
        (-1, 0, "cp_size"),
        (2.0, 0, "cp_size"),
        (2, 2, "rank"),
        (2, -1, "rank"),
        (3, 5, "rank"),
    ],
)
def test_bad_arguments(cp, rank, match):
    with pytest.raises(ValueError, match=match):
        _batch().shard_for_cp(cp, rank)
