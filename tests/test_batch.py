"""VarlenBatch contract: invariants, labels, padding, adapters."""

from __future__ import annotations

import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from seqpack.ops import segments

from seqpack import IGNORE_INDEX, VarlenBatch, pack_documents, views
from seqpack.batch import accelerator_available, batch_tokens, padding_batch
from seqpack.wire import decode_batch, encode_batch, state_bytes, widen_worker_pipe


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
    assert "seq_idx" not in hf
    seq = b.to_hf(seq_idx=True)["seq_idx"]
    assert seq.dtype == torch.int32 and seq.tolist() == [[0, 0, 0, 1, 1, 1, 1, 1, 2, 2]]


def test_pin_memory_pins_with_an_accelerator_and_is_a_no_op_without():
    b = VarlenBatch.from_segments([np.arange(1, 4), np.arange(1, 6)], [0, 1], pad_to=10)
    pinned = b.pin_memory()
    if accelerator_available():
        assert pinned.input_ids.is_pinned() and torch.equal(pinned.input_ids, b.input_ids)
    else:
        assert pinned is b


def test_pin_memory_without_accelerator_returns_self(monkeypatch):
    monkeypatch.setattr("seqpack.batch.accelerator_available", lambda: False)
    b = VarlenBatch.from_segments([np.arange(1, 4)], [0], pad_to=4)
    assert b.pin_memory() is b


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


@settings(max_examples=80, deadline=None)
@given(
    lens=st.lists(st.integers(1, 40), min_size=0, max_size=8),
    pad=st.integers(0, 20),
    masked=st.booleans(),
    cont=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_batch_fields_kernel_matches_reference(lens, pad, masked, cont, seed):
    rng = np.random.default_rng(seed)
    lens = np.array(lens, np.int64)
    size = int(lens.sum()) + pad
    if size == 0:
        return
    ids = rng.integers(0, 100, size)
    target = rng.random(size) < 0.5
    doc, start = rng.integers(0, 50, len(lens)), rng.integers(0, 50, len(lens))
    outs = []
    for fn in (segments.batch_fields, segments.batch_fields_reference):
        arrays = (np.empty(size, np.int64), np.empty(size, np.int64), np.empty(size, np.int32))
        n = len(lens)
        table = (np.empty(n + 2, np.int32), np.empty(n + 1, np.int64), np.empty(n + 1, np.int64))
        x = ids.copy()
        ret = fn(x, target, masked, lens, doc, start, cont, IGNORE_INDEX, 7, *arrays, *table)
        n_seg = ret[1]
        written = [t[: n_seg + (i == 0)].tolist() for i, t in enumerate(table)]  # cu has one more entry
        outs.append((tuple(int(v) for v in ret), x.tolist(), [a.tolist() for a in arrays], written))
    assert outs[0] == outs[1]


def test_from_arrays_is_the_builder_of_from_segments_and_padding_batch():
    toks = [np.array([5, 6, 7]), np.array([8, 9])]
    masks = [np.array([1, 1, 0], bool), None]
    a = VarlenBatch.from_segments(toks, [10, 11], seg_start=[0, 4], loss_masks=masks, pad_to=8, pad_id=3)
    ids = np.zeros(8, np.int64)
    ids[:5] = [5, 6, 7, 8, 9]
    target = np.array([1, 1, 0, 1, 1], bool)
    b = VarlenBatch.from_arrays(ids, [3, 2], [10, 11], [0, 4], target=target, pad_id=3)
    for name in ("input_ids", "labels", "position_ids", "cu_seqlens", "seq_idx", "doc_ids", "seg_start"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.max_seqlen, a.num_loss_tokens, a.n_real_segments) == (b.max_seqlen, b.num_loss_tokens, 2)
    assert (
        b.labels.tolist() == [-100, 6, -100, -100, 9, -100, -100, -100]
        and b.input_ids[5:].tolist() == [3] * 3
    )
    p = padding_batch(4, pad_id=9)
    assert p.input_ids.tolist() == [9] * 4 and p.doc_ids.tolist() == [-1] and p.num_loss_tokens == 0
    with pytest.raises(ValueError, match="sum"):
        VarlenBatch.from_arrays(np.zeros(3, np.int64), [4], [0], [0])


def _fields(b: VarlenBatch) -> dict:
    return {
        k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in vars(b).items() if k != "_storage"
    }


def test_one_storage_per_batch_and_the_wire_sends_it_as_is():
    ids = batch_tokens(10, 2)
    ids[:8] = np.arange(1, 9)
    b = VarlenBatch.from_arrays(ids, [5, 3], [7, 8], [0, 2], pad_id=0)
    b.validate()
    assert b.input_ids.data_ptr() == ids.ctypes.data  # built around the given tokens, no copy
    # a storage holds one batch: its input_ids given again are copied, the first batch stays intact
    before = _fields(b)
    c = VarlenBatch.from_arrays(b.input_ids.numpy(), [4, 4], [1, 2], [0, 0])
    c.validate()
    assert _fields(b) == before and c.input_ids.data_ptr() != b.input_ids.data_ptr()
    # sent as its storage (the same array: no copy), rebuilt equal, with the state beside it
    item = encode_batch(b, {"k": torch.arange(3)}, 1, {"n": 1}, 0)
    assert item.buffer is b._storage[0] and item.worker_id == 1
    assert _fields(decode_batch(item)) == before and state_bytes(item) is not None
    assert state_bytes(encode_batch(b, None, 0, {}, 2)) is None
    # a field replaced or re-viewed since the build goes the general (copying) path, still exact
    for name, value in (
        ("labels", b.labels.clone()),
        ("loss_weights", torch.ones(10)),
        ("cu_seqlens", b.cu_seqlens[:2]),
        ("seq_idx", b.seq_idx.long()),
    ):
        changed = VarlenBatch.from_segments(
            [np.arange(1, 6), np.arange(6, 9)], [7, 8], seg_start=[0, 2], pad_to=10
        )
        setattr(changed, name, value)
        item = encode_batch(changed, None, 0, {}, 0)
        assert item.buffer is not changed._storage[0]
        assert _fields(decode_batch(item)) == _fields(changed)
    assert encode_batch(replace(b), None, 0, {}, 0).buffer is not b._storage[0]
    # pickled batches (no workers' wire) carry their tensors, not the storage note
    assert (
        "_storage" not in vars(pickle.loads(pickle.dumps(b)))
        and _fields(pickle.loads(pickle.dumps(b))) == before
    )


def test_methods_are_the_views():
    b = VarlenBatch.from_segments([np.arange(1, 4), np.arange(1, 6)], [0, 1], pad_to=10)
    assert torch.equal(b.shift_labels, views.shift_labels(b))
    assert b.to_flash_attn() == views.to_flash_attn(b)
    for got, want in ((b.to_thd(4), views.to_thd(b, 4)), (b.shard_for_cp(2, 1), views.shard_for_cp(b, 2, 1))):
        assert got.keys() == want.keys()
        assert all(torch.equal(v, want[k]) if torch.is_tensor(v) else v == want[k] for k, v in got.items())


def test_widen_worker_pipe_grows_a_dataloader_result_pipe():
    """The loader's transport: a worker's results pipe holds a whole batch (Linux), items intact."""
    dl = torch.utils.data.DataLoader(list(range(4)), batch_size=None, num_workers=1)
    it = iter(dl)
    widened = widen_worker_pipe(it)
    fcntl = pytest.importorskip("fcntl")
    if hasattr(fcntl, "F_GETPIPE_SZ") and widened:
        assert fcntl.fcntl(it._worker_result_queue._reader.fileno(), fcntl.F_GETPIPE_SZ) >= 1 << 20
    assert [int(x) for x in it] == [0, 1, 2, 3]
    assert widen_worker_pipe(iter([1])) is False  # not a multi-process iterator: left alone
