"""Dataset decomposition and length bucketing: conservation, per-step token counts, resume, bad input."""

from __future__ import annotations

import io
import json
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from seqpack.ops import decompose as kernels

from seqpack import IGNORE_INDEX
from seqpack.curriculum import BucketCurriculum
from seqpack.node import SequenceNode
from seqpack.plan import pack
from seqpack.plan.decompose import bucket_of, decompose_lengths
from seqpack.sources.records import Document
from seqpack.stages.bucket import LengthBucketing, StreamingBucketing, padded_rows
from seqpack.stages.decompose import DecomposedDataset, StreamingDecomposer, decompose_documents


def corpus(n=200, median=120, seed=0, vocab=1000, hi=3000):
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(median), 1.2, n), 1, hi).astype(np.int64)
    return [rng.integers(1, vocab, int(n_)) for n_ in lengths]


# ------------------------------------------------------------------------------------------- the kernel
@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 5000), min_size=1, max_size=20),
    min_log2=st.integers(0, 6),
    span=st.integers(0, 5),
    cap=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_kernel_matches_reference(lengths, min_log2, span, cap, seed):
    max_log2 = min_log2 + span
    arr = np.array(lengths, np.int64)
    keys = np.arange(len(arr), dtype=np.int64) * 7 + 3
    offsets, starts, log2s, dropped = kernels.decompose_kernel(arr, keys, min_log2, max_log2, cap, seed)
    for d, n in enumerate(lengths):
        pieces, rest = kernels.decompose_reference(n, int(keys[d]), min_log2, max_log2, cap, seed)
        got = list(
            zip(starts[offsets[d] : offsets[d + 1]].tolist(), log2s[offsets[d] : offsets[d + 1]].tolist())
        )
        assert got == pieces
        assert int(dropped[d]) == rest


def test_greedy_binary_pieces_from_the_front():
    # 1000 tokens: 513 (k=9) + 257 (k=8) leaves 230 < 257 -> dropped
    dec = decompose_lengths([1000], min_log2=8, max_log2=13)
    assert dec.piece_log2.tolist() == [9, 8]
    assert dec.piece_start.tolist() == [0, 513]
    assert dec.dropped_tokens == 230
    # exactly 2^k + 1 tokens is one piece with nothing dropped; 2^k tokens is too short for D_k
    assert decompose_lengths([257], min_log2=8).piece_log2.tolist() == [8]
    assert decompose_lengths([256], min_log2=8).n_pieces == 0
    assert decompose_lengths([256], min_log2=8).dropped_tokens == 256


def test_conservation_and_tiling_on_a_corpus():
    rng = np.random.default_rng(1)
    lengths = np.clip(rng.lognormal(np.log(350), 1.2, 20_000), 0, 40_000).astype(np.int64)
    for overlong in ("random", "cap"):
        dec = decompose_lengths(lengths, min_log2=6, max_log2=11, overlong=overlong, seed=3)
        dec.validate(lengths)
        assert int(dec.piece_len.sum()) + dec.dropped_tokens == int(lengths.sum())
        assert dec.piece_log2.min() >= 6 and dec.piece_log2.max() <= 11
        assert (dec.dropped_per_doc <= 2**6).all()
        s = dec.summary()
        assert sum(s["bucket_tokens"].values()) == s["piece_tokens"]


def test_overlong_draw_spreads_tokens_evenly_and_cap_is_deterministic():
    lengths = np.full(400, 50_000, np.int64)  # every piece but the tail is over-long for max_log2=10
    dec = decompose_lengths(lengths, min_log2=6, max_log2=10, overlong="random", seed=0)
    over = dec.piece_start + dec.piece_len <= 50_000 - 2**11  # pieces cut while > 2^max remained
    counts = np.bincount(dec.piece_log2[over] - 6, minlength=5).astype(float)
    expected = 2.0 ** np.arange(4, -1, -1) / 31 * counts.sum()  # P(k) ∝ 2^(max-k)
    assert np.abs(counts - expected).max() / expected.max() < 0.05
    mass = counts * 2.0 ** np.arange(6, 11)
    assert mass.max() / mass.min() < 1.25  # equal token mass per bucket
    capped = decompose_lengths(lengths, min_log2=6, max_log2=10, overlong="cap")
    assert (capped.piece_log2[: 50_000 // 1025] == 10).all()
    # the draw depends on (seed, doc key, piece), not on order: reversing the corpus keeps each doc's pieces
    a = decompose_lengths([50_000, 9_000], min_log2=6, max_log2=10, doc_keys=[5, 9])
    b = decompose_lengths([9_000, 50_000], min_log2=6, max_log2=10, doc_keys=[9, 5])
    assert a.piece_log2[a.piece_doc == 0].tolist() == b.piece_log2[b.piece_doc == 1].tolist()


def test_decompose_documents_slices_tokens_and_appends_eot():
    docs = corpus(50)
    out = decompose_documents(docs, min_log2=4, max_log2=7, eot_id=0, seed=2)
    total = 0
    for k, pieces in out.pieces.items():
        for p, d, s in zip(pieces, out.doc_ids[k], out.starts[k]):
            full = np.append(docs[d], 0)
            assert len(p) == 2**k + 1
            assert np.array_equal(p, full[s : s + len(p)])
            total += len(p)
    assert total + out.counts["dropped_tokens"] == sum(len(d) + 1 for d in docs)


def test_bad_input_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"lengths\[1\] = -3"):
        decompose_lengths([5, -3])
    with pytest.raises(ValueError, match="max_log2 .* must be >= min_log2"):
        decompose_lengths([5], min_log2=9, max_log2=8)
    with pytest.raises(ValueError, match="overlong: must be 'random' or 'cap', got 'wrap'"):
        decompose_lengths([5], overlong="wrap")
    with pytest.raises(ValueError, match=r"divisible by the largest bucket 2\^max_log2 = 512"):
        DecomposedDataset(corpus(5), tokens_per_step=1000, min_log2=5, max_log2=9)
    with pytest.raises(ValueError, match=r"docs\[1\] must be 1-D"):
        DecomposedDataset([np.arange(5), np.zeros((2, 2), np.int64)], tokens_per_step=512, max_log2=9)
    with pytest.raises(ValueError, match=r"docs\[0\] must hold integer token ids"):
        decompose_documents([np.array([0.5, 1.5])])
    with pytest.raises(ValueError, match=r"docs\[1\] must be 1-D"):
        StreamingDecomposer([np.arange(5), np.zeros((2, 2), np.int64)], tokens_per_step=512, max_log2=9)


# ------------------------------------------------------------------------------------------- offline stage
def _pieces_of(batches):
    return [(int(d), int(s), int(n)) for b in batches for d, s, n in zip(b.doc_ids, b.seg_start, b.seqlens)]


@pytest.mark.parametrize("remainder", ["drop", "emit"])
def test_every_step_has_tokens_per_step_targets_and_nothing_is_unaccounted(remainder):
    docs = corpus(300, median=200)
    tps = 2048
    ds = DecomposedDataset(
        docs,
        tokens_per_step=tps,
        min_log2=4,
        max_log2=9,
        eot_id=0,
        remainder=remainder,
        curriculum=BucketCurriculum("grow_p2", n_cycles=3),
        seed=1,
    )
    batches = list(ds)
    assert len(batches) == len(ds)
    full = batches[: int(ds.full_batches.sum())]
    for b, k in zip(full, ds.bucket_history):
        b.validate()
        assert b.num_loss_tokens == tps
        assert (b.seqlens == 2**k + 1).all() and b.n_real_segments == tps >> k
        assert b.num_tokens == tps + (tps >> k)
        # each segment: first label masked, the rest are the segment's own tokens (2^k targets)
        lo = int(b.cu_seqlens[0])
        assert int(b.labels[lo]) == IGNORE_INDEX
        assert torch.equal(b.labels[lo + 1 : lo + 2**k + 1], b.input_ids[lo + 1 : lo + 2**k + 1])
    pieces = _pieces_of(batches)
    assert len(pieces) == len(set(pieces))  # no piece twice
    for bt in batches:  # every segment is the right slice of its document (EOT appended)
        for j, (d, s) in enumerate(zip(bt.doc_ids.tolist(), bt.seg_start.tolist())):
            seg = bt.input_ids[int(bt.cu_seqlens[j]) : int(bt.cu_seqlens[j + 1])].numpy()
            assert np.array_equal(seg, np.append(docs[d], 0)[s : s + len(seg)])
    st_ = ds.stats()
    emitted = sum(n for _, _, n in pieces)
    assert emitted == st_["emitted_tokens_all_ranks"]
    assert st_["input_tokens"] == emitted + st_["leftover_tokens"] + st_["dropped_tokens"]
    assert st_["input_tokens"] == sum(len(d) + 1 for d in docs)
    if remainder == "emit":
        assert st_["leftover_tokens"] == 0


def test_pad_to_max_gives_one_shape_and_pad_to_fixed_is_its_deprecated_name():
    kw = dict(tokens_per_step=1024, min_log2=4, max_log2=8)
    ref = [b.input_ids.tolist() for b in DecomposedDataset(corpus(100), pad_to="max", **kw)]
    assert {len(x) for x in ref} == {1024 + 1024 // 16}  # the largest step: 64 pieces of 2^4 + 1
    with pytest.warns(
        DeprecationWarning, match="DecomposedDataset.pad_to_fixed is deprecated.*use DecomposedDataset.pad_to"
    ):
        old = DecomposedDataset(corpus(100), pad_to_fixed=True, **kw)
    assert [b.input_ids.tolist() for b in old] == ref
    assert {b.num_tokens for b in DecomposedDataset(corpus(100), pad_to=1200, **kw)} == {1200}
    with pytest.warns(DeprecationWarning):
        assert DecomposedDataset(corpus(100), pad_to_fixed=False, **kw).pad_to is None
    with pytest.raises(ValueError, match=r"pad_to: must be >= 1088, got 1000"):
        DecomposedDataset(corpus(100), pad_to=1000, **kw)
    with pytest.raises(ValueError, match="pad_to: expected null, 'max' or an integer, got 'fixed'"):
        StreamingDecomposer(corpus(100), pad_to="fixed", **kw)
    with pytest.raises(ValueError, match="give only 'pad_to'"):
        StreamingDecomposer(corpus(100), pad_to="max", pad_to_fixed=True, **kw)
    with pytest.raises(TypeError, match="unexpected keyword argument 'pad_to_fix'"):
        StreamingDecomposer(corpus(100), pad_to_fix=True, **kw)
    stream = StreamingDecomposer(corpus(100), pad_to="max", remainder="emit", **kw)
    assert {b.num_tokens for b in stream} == {1088}


def test_ranks_draw_the_same_buckets_and_disjoint_pieces():
    docs = corpus(400, median=150)
    kw = dict(
        tokens_per_step=1024, min_log2=4, max_log2=8, seed=5, curriculum=BucketCurriculum("grow_linear")
    )
    ranks = [DecomposedDataset(docs, rank=r, world_size=3, **kw) for r in range(3)]
    outs = [list(r) for r in ranks]
    assert len({len(o) for o in outs}) == 1  # equal step counts: DDP never hangs
    assert ranks[0].bucket_history == ranks[1].bucket_history == ranks[2].bucket_history
    all_pieces = [p for o in outs for p in _pieces_of(o)]
    assert len(all_pieces) == len(set(all_pieces))
    st_ = ranks[0].stats()
    assert sum(n for _, _, n in all_pieces) == st_["emitted_tokens_all_ranks"]
    assert (
        st_["input_tokens"]
        == st_["emitted_tokens_all_ranks"] + st_["leftover_tokens"] + st_["dropped_tokens"]
    )


def test_resume_mid_cycle_is_exact():
    docs = corpus(300, median=200)
    kw = dict(
        tokens_per_step=1024,
        min_log2=4,
        max_log2=8,
        seed=7,
        eot_id=0,
        remainder="emit",
        curriculum=BucketCurriculum("grow_p2", n_cycles=4, weighting="odds_by_mass"),
    )
    ref = list(DecomposedDataset(docs, **kw))
    for cut in (1, len(ref) // 3, len(ref) // 2 + 1, len(ref) - 1):
        a = DecomposedDataset(docs, **kw)
        head = [next(a) for _ in range(cut)]
        state = json.loads(json.dumps(a.state_dict()))  # checkpoints are plain JSON
        b = DecomposedDataset(docs, **kw)
        b.load_state_dict(state)
        tail = list(b)
        assert len(head) + len(tail) == len(ref)
        for x, y in zip(head + tail, ref):
            assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.doc_ids, y.doc_ids)
    other = DecomposedDataset(docs[:-10], **kw)
    with pytest.raises(ValueError, match="bucket sizes"):
        other.load_state_dict(state)


def test_dd_batch_loss_equals_paper_inputs_and_targets():
    """A piece as a VarlenBatch segment gives the loss of inputs piece[:-1] / targets piece[1:]."""
    pytest.importorskip("transformers")
    from hf_models import tiny_llama

    model = tiny_llama(vocab_size=64, max_position_embeddings=128).eval()
    docs = corpus(20, median=60, vocab=64)
    ds = DecomposedDataset(docs, tokens_per_step=64, min_log2=3, max_log2=5, eot_id=0)
    b = next(ds)
    hf = b.to_hf()
    with torch.no_grad():
        logits = model(input_ids=hf["input_ids"], position_ids=hf["position_ids"]).logits[0]
        packed = torch.nn.functional.cross_entropy(
            logits[:-1], b.labels[1:], ignore_index=IGNORE_INDEX, reduction="sum"
        )
        ref = 0.0
        for s in range(b.n_real_segments):
            piece = b.input_ids[int(b.cu_seqlens[s]) : int(b.cu_seqlens[s + 1])]
            out = model(input_ids=piece[:-1][None]).logits[0]
            ref += torch.nn.functional.cross_entropy(out, piece[1:], reduction="sum")
    assert b.num_loss_tokens == 64
    assert torch.allclose(packed, ref, rtol=1e-5)


# ------------------------------------------------------------------------------------------ streaming stage
def roundtrip(state):
    """A state through torch.save / torch.load(weights_only=True), as a checkpoint stores it."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def document_node(docs):
    """What the loader gives a stage: a node of Documents (global ids, not indices)."""
    return SequenceNode([Document(1000 + i, np.asarray(d, np.int64)) for i, d in enumerate(docs)])


def resumed_run(make, cuts):
    """Batches of an uninterrupted run, and for each cut the head + the tail after a state round trip."""
    ref = [b.input_ids.tolist() for b in make()]
    for cut in cuts:
        a = make()
        head = [next(a).input_ids.tolist() for _ in range(cut)]
        b = make()
        b.load_state_dict(roundtrip(a.state_dict()))
        yield ref, head + [x.input_ids.tolist() for x in b]


def test_streaming_emits_the_offline_pieces_with_bounded_buffer():
    docs = corpus(300, median=200)
    kw = dict(tokens_per_step=1024, min_log2=4, max_log2=8, seed=3, eot_id=0)
    stream = StreamingDecomposer(docs, remainder="emit", buffer_tokens=5 * 1024, **kw)
    batches = list(stream)
    offline = DecomposedDataset(docs, **kw).decomposition
    want = Counter(zip(offline.piece_doc.tolist(), offline.piece_start.tolist(), offline.piece_len.tolist()))
    assert Counter(_pieces_of(batches)) == want
    assert stream.counts["max_buffered_tokens"] <= 5 * 1024 + max(len(d) + 1 for d in docs)
    n_full = sum(b.num_loss_tokens == 1024 for b in batches)
    assert n_full >= len(batches) - 5  # only the end-of-stream remainders are short
    st_ = stream.stats()
    assert st_ == {f"decompose/{k}": v for k, v in stream.counts.items()} | {"decompose/buffered_tokens": 0}
    assert st_["decompose/input_tokens"] == sum(len(d) + 1 for d in docs)
    assert (
        st_["decompose/input_tokens"]
        == st_["decompose/emitted_tokens"]
        + st_["decompose/dropped_tokens"]
        + st_["decompose/leftover_tokens"]
    )
    with pytest.raises(ValueError, match="buffer_tokens"):
        StreamingDecomposer(docs, buffer_tokens=1024, **kw)
    with pytest.raises(ValueError, match="n_cycles"):
        StreamingDecomposer(docs, curriculum=BucketCurriculum(n_cycles=2), **kw)


@pytest.mark.parametrize("as_node", [False, True])
def test_streaming_resume_is_exact(as_node):
    docs = corpus(200, median=200)
    kw = dict(tokens_per_step=1024, min_log2=4, max_log2=8, seed=3, curriculum=BucketCurriculum("grow_p2"))

    def make():
        return StreamingDecomposer(document_node(docs) if as_node else docs, remainder="emit", **kw)

    n = sum(1 for _ in make())
    cuts = np.random.default_rng(0).choice(np.arange(1, n), 4, replace=False).tolist()
    for ref, got in resumed_run(make, cuts):
        assert got == ref
    state = make().state_dict()
    assert set(state) >= {"upstream", "buffer", "rng", "counts"}  # the upstream state nested, torchdata style
    assert set(state["buffer"]["documents"]) >= {"doc_ids", "lens", "tokens", "has_mask", "mask"}


def test_streaming_keeps_document_ids_offsets_and_loss_masks():
    rng = np.random.default_rng(4)
    docs = [Document(50 + i, rng.integers(1, 99, int(n)), rng.random(int(n)) < 0.7) for i, n in
            enumerate(rng.integers(20, 300, 40))]  # fmt: skip
    stream = StreamingDecomposer(
        SequenceNode(docs), tokens_per_step=256, min_log2=3, max_log2=6, remainder="emit"
    )
    by_id = {d.doc_id: d for d in docs}
    for b in stream:
        for j in range(b.n_real_segments):
            d, s = int(b.doc_ids[j]), int(b.seg_start[j])
            lo, hi = int(b.cu_seqlens[j]), int(b.cu_seqlens[j + 1])
            assert b.input_ids[lo:hi].tolist() == by_id[d].tokens[s : s + hi - lo].tolist()
            target = by_id[d].loss_mask[s + 1 : s + hi - lo]
            assert ((b.labels[lo + 1 : hi] != IGNORE_INDEX).numpy() == target).all()


# ------------------------------------------------------------------------------------------ length bucketing
def test_bucket_of_boundaries():
    assert bucket_of([1, 64, 65, 256, 257], [64, 256]).tolist() == [0, 0, 1, 1, 2]
    with pytest.raises(ValueError, match="strictly increasing"):
        bucket_of([1], [64, 64])


@pytest.mark.parametrize("mode", ["pad", "pack"])
def test_length_bucketing_keeps_every_token(mode):
    docs = corpus(300, median=150, hi=2000)
    lb = LengthBucketing(
        docs, [64, 256, 1024], capacity=2048, mode=mode, seed=1, curriculum=BucketCurriculum("grow_p2")
    )
    batches = list(lb)
    assert len(batches) == len(lb)
    seen = np.zeros(sum(len(d) for d in docs), np.int64)
    offs = np.cumsum([0] + [len(d) for d in docs])
    for b in batches:
        b.validate()
        lens = b.seqlens[: b.n_real_segments]
        bound = next(x for x in (64, 256, 1024) if int(lens.max()) <= x)
        assert int(lens.min()) > {64: 0, 256: 64, 1024: 256}[bound]  # one bucket per batch
        if mode == "pad":
            assert b.num_tokens == b.n_real_segments * bound
            rows = padded_rows(b, bound)
            assert rows["input_ids"].shape == (b.n_real_segments, bound)
            assert int(rows["attention_mask"].sum()) == b.num_real_tokens
        else:
            assert b.num_tokens <= 2048
        for d, s, n in zip(b.doc_ids[: b.n_real_segments], b.seg_start, lens):
            seen[offs[int(d)] + int(s) : offs[int(d)] + int(s) + int(n)] += 1
        for j in range(b.n_real_segments):
            d, s = int(b.doc_ids[j]), int(b.seg_start[j])
            seg = b.input_ids[int(b.cu_seqlens[j]) : int(b.cu_seqlens[j + 1])].numpy()
            assert np.array_equal(seg, docs[d][s : s + len(seg)])
    assert (seen == 1).all()  # split overflow: every token exactly once
    assert lb.stats()["emitted_tokens"] == lb.stats()["input_tokens"]


def test_length_bucketing_resume():
    docs = corpus(200, median=150, hi=2000)
    kw = dict(capacity=1024, mode="pack", seed=4)
    ref = list(LengthBucketing(docs, [64, 256, 1024], **kw))
    a = LengthBucketing(docs, [64, 256, 1024], **kw)
    head = [next(a) for _ in range(7)]
    b = LengthBucketing(docs, [64, 256, 1024], **kw)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # offline states are plain JSON
    assert [x.input_ids.tolist() for x in head + list(b)] == [y.input_ids.tolist() for y in ref]


def test_batch_tokens_is_the_deprecated_name_of_capacity():
    docs = corpus(100, median=150, hi=2000)
    new = [b.input_ids.tolist() for b in LengthBucketing(docs, [64, 256, 1024], capacity=1024, seed=2)]
    with pytest.warns(DeprecationWarning, match="LengthBucketing.batch_tokens is deprecated.*capacity"):
        lb = LengthBucketing(docs, [64, 256, 1024], batch_tokens=1024, seed=2)
    assert lb.capacity == 1024 and [b.input_ids.tolist() for b in lb] == new
    with pytest.warns(DeprecationWarning, match="StreamingBucketing.batch_tokens is deprecated"):
        sb = StreamingBucketing(docs, [64, 256, 1024], batch_tokens=1024)
    assert sb.capacity == 1024
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name warns about nothing
        StreamingBucketing(docs, [64, 256, 1024], capacity=1024)
    with pytest.raises(TypeError, match="capacity"):
        LengthBucketing(docs, [64, 256, 1024])


def _bin_lengths(batches):
    return sorted(tuple(sorted(b.seqlens[: b.n_real_segments].tolist())) for b in batches)


def test_streamed_pack_bins_are_the_offline_bfd_bins():
    """With the whole corpus buffered, the streamed bucket stage emits exactly the bins of a best-fit-
    decreasing plan of each bucket (the planner LengthBucketing uses), fullest first."""
    docs = corpus(300, median=150, hi=1000)
    bounds = [64, 256, 1024]
    stream = StreamingBucketing(docs, bounds, capacity=2048, mode="pack", buffer_tokens=10**7)
    streamed = list(stream)
    lengths = np.array([len(d) for d in docs])
    bucket = bucket_of(lengths, bounds)
    want = []
    for j in range(len(bounds)):
        plan = pack(lengths[bucket == j], 2048, algorithm="bfd")
        want += [tuple(sorted(plan.bin(b)[2].tolist())) for b in range(plan.n_bins)]
    assert _bin_lengths(streamed) == sorted(want)
    offline = LengthBucketing(docs, bounds, capacity=2048, mode="pack")
    assert _bin_lengths(offline) == sorted(want)
    assert stream.counts["emitted_tokens"] == stream.counts["input_tokens"] == int(lengths.sum())


@pytest.mark.parametrize("mode", ["pad", "pack"])
def test_streaming_bucketing_accounts_and_resumes_exactly(mode):
    docs = corpus(250, median=150, hi=3000)
    bounds = [64, 256, 1024]

    def make():
        return StreamingBucketing(
            document_node(docs), bounds, capacity=2048, mode=mode, overflow="truncate", seed=[1, 0, 0]
        )

    stream = make()
    batches = list(stream)
    c = stream.counts
    assert c["input_tokens"] == sum(len(d) for d in docs)
    assert c["input_tokens"] == c["emitted_tokens"] + c["truncated_tokens"] + c["dropped_tokens"] > 0
    assert c["truncated_docs"] == sum(len(d) > 1024 for d in docs)
    assert all(b.num_tokens <= 2048 for b in batches)
    cuts = np.random.default_rng(1).choice(np.arange(1, len(batches)), 4, replace=False).tolist()
    for ref, got in resumed_run(make, cuts):
        assert got == ref
