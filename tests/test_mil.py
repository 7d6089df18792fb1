"""PackMIL: packed == per-bag (pooling, ADS), label composition, seeded sampling, accounting,
rank sharding, resume, and bad-input policies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from seqpack.ops.mil import (
    ABMIL,
    AttentionDownsampler,
    ads_bag_perms,
    bag_logits_reference,
    segment_softmax,
)

from seqpack.mil import (
    FeatureBagError,
    InMemoryBags,
    LabelTable,
    MILBatch,
    PackMIL,
    branch_sizes,
    compose_labels,
    compose_survival_label,
    read_feature_bags,
    sample_rows,
)

LENGTHS = [3, 50, 500, 1200, 80, 7, 2000, 300, 1, 640, 64, 999]


def _source(lengths=LENGTHS, d=8, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return InMemoryBags([rng.standard_normal((n, d)).astype(dtype) for n in lengths])


def _labels(src, n_classes=3, multi=False):
    if multi:
        lab = (np.random.default_rng(1).random((len(src), n_classes)) < 0.5).astype(np.int64)
    else:
        lab = np.arange(len(src)) % n_classes
    return LabelTable(list(src.slide_ids), lab, [f"c{k}" for k in range(n_classes)], multi)


def _stage(src=None, **kw):
    src = src or _source()
    kw.setdefault("capacity", 1024)
    kw.setdefault("max_instances", 512)
    kw.setdefault("min_seq_len", 10)
    return PackMIL(src, kw.pop("labels", _labels(src)), **kw)


# ---------------------------------------------------------------------------------------- exactness
def test_abmil_packed_equals_per_bag_on_a_real_batch():
    torch.manual_seed(0)
    batch = next(iter(_stage(seed=3)))
    assert batch.n_bags >= 3 and batch.cu_seqlens.numel() == batch.n_bags + 2  # padding segment present
    model = ABMIL(8, 3, hidden=32, attn_dim=16)
    packed = model(batch.features, batch.bag_ids, batch.n_bags)
    ref = bag_logits_reference(model, batch.features, batch.cu_seqlens, batch.n_bags)
    torch.testing.assert_close(packed, ref, rtol=0, atol=1e-5)
    # gradients agree too (one loss per slide)
    loss_p = torch.nn.functional.cross_entropy(packed, batch.labels, reduction="sum")
    gp = torch.autograd.grad(loss_p, list(model.parameters()))
    loss_r = torch.nn.functional.cross_entropy(ref, batch.labels, reduction="sum")
    gr = torch.autograd.grad(loss_r, list(model.parameters()))
    for a, b in zip(gp, gr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_no_feature_crosses_bags_in_pooling():
    torch.manual_seed(0)
    batch = next(iter(_stage(seed=3)))
    model = ABMIL(8, 3, hidden=32)
    base = model(batch.features, batch.bag_ids, batch.n_bags)
    cu = batch.cu_seqlens.tolist()
    x = batch.features.clone()
    x[cu[1] : cu[2]] += 100.0  # disturb bag 1 and the padding only
    x[cu[-2] :] = 1e6
    out = model(x, batch.bag_ids, batch.n_bags)
    others = [i for i in range(batch.n_bags) if i != 1]
    torch.testing.assert_close(out[others], base[others], rtol=0, atol=0)
    assert not torch.allclose(out[1], base[1])


def test_segment_softmax_sums_to_one_per_bag_and_zero_on_padding():
    torch.manual_seed(0)
    ids = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3])  # bag 3 is padding (n_bags=3)
    s = torch.randn(8, 2) * 50
    w = segment_softmax(s, ids, 3)
    sums = torch.zeros(4, 2).index_add(0, ids, w)
    torch.testing.assert_close(sums[:3], torch.ones(3, 2))
    assert (w[6:] == 0).all()
    torch.testing.assert_close(w[:3, 0], torch.softmax(s[:3, 0], 0))


@pytest.mark.parametrize("mode", ["max", "random"])
@pytest.mark.parametrize("r", [1, 3, 4])
def test_ads_packed_equals_per_bag(mode, r):
    torch.manual_seed(0)
    lens = [5, 17, 1, 33, 8]
    cu = torch.tensor(np.r_[0, np.cumsum(lens)], dtype=torch.int32)
    x = torch.randn(sum(lens), 16)
    ads = AttentionDownsampler(16, r, attn_dim=8, mode=mode)
    perm, keep = ads.sample_shuffle(cu, torch.Generator().manual_seed(1))
    y, out_cu = ads(x, cu, perm=perm, keep=keep)
    expect_lens = [-(-n // r) for n in lens]
    assert torch.diff(out_cu).tolist() == expect_lens and y.shape == (sum(expect_lens), 16)
    c, oc = cu.tolist(), out_cu.tolist()
    perms = ads_bag_perms(perm, out_cu, r)
    for i in range(len(lens)):
        # the shuffle stays inside bag i: its local permutation is a permutation of its own slots
        assert sorted(perms[i].tolist()) == list(range(expect_lens[i] * r))
        ref = ads.forward_bag(x[c[i] : c[i + 1]], perms[i] if r > 1 else None, keep)
        torch.testing.assert_close(y[oc[i] : oc[i + 1]], ref, rtol=0, atol=1e-5)


def test_ads_then_abmil_on_a_stage_batch_with_downsample():
    torch.manual_seed(0)
    stage = _stage(capacity=128, downsample=4, max_instances=None, seed=0)
    batch = next(iter(stage))
    ads = AttentionDownsampler(8, 4, attn_dim=8)
    real = batch.features[: batch.num_features]
    y, out_cu = ads(real, batch.bag_cu_seqlens, generator=torch.Generator().manual_seed(0))
    assert y.shape[0] <= 128  # the pack fits capacity after downsampling
    model = ABMIL(8, 3, hidden=16)
    from seqpack.ops.mil import seq_idx_from_cu

    logits = model(y, seq_idx_from_cu(out_cu), batch.n_bags)
    ref = bag_logits_reference(model, y, out_cu, batch.n_bags)
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------- labels
@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 4), st.integers(1, 5000)), min_size=1, max_size=12),
)
def test_composed_soft_labels_sum_to_one(parts):
    lab = np.array([p[0] for p in parts])
    w = np.array([p[1] for p in parts])
    y = compose_labels(lab, w, 5, "soft")
    assert abs(y.sum() - 1.0) < 1e-6
    for k in range(5):  # proportional to each class's feature count
        assert abs(y[k] - w[lab == k].sum() / w.sum()) < 1e-6
    ym = compose_labels(lab, w, 5, "max")
    assert abs(ym.max() - 1.0) < 1e-6 and ym.argmax() == y.argmax()


def test_composed_multi_label():
    lab = np.array([[1, 0, 0], [0, 0, 1], [1, 0, 0]])
    assert compose_labels(lab, [10, 30, 10], 3, "multi_hot").tolist() == [1, 0, 1]
    np.testing.assert_allclose(compose_labels(lab, [10, 30, 10], 3, "soft"), [0.4, 0, 0.6])


def test_stage_hyperslide_labels_match_constituents():
    src = _source()
    stage = _stage(src, seed=5, algorithm="bfd")
    lab = _labels(src)
    n = 0
    for batch in stage:
        res = batch.residual
        res.validate()
        assert res.labels.shape == (res.n_bags, 3)
        torch.testing.assert_close(res.labels.sum(1), torch.ones(res.n_bags))
        for h in range(res.n_bags):
            sel = res.part_bag == h
            w = res.part_len[sel].numpy()
            y = np.array([lab.get(src.slide_ids[s]) for s in res.slide_ids[sel].tolist()])
            np.testing.assert_allclose(res.labels[h].numpy(), compose_labels(y, w, 3), atol=1e-6)
            n += 1
    assert n >= 2


def test_multi_label_stage_labels():
    src = _source()
    stage = _stage(src, labels=_labels(src, 4, multi=True))
    batch = next(iter(stage))
    assert batch.labels.dtype == torch.float32 and batch.labels.shape == (batch.n_bags, 4)
    assert set(batch.residual.labels.unique().tolist()) <= {0.0, 1.0}


# ---------------------------------------------------------------------------------------- sampling
def test_sampling_deterministic_per_seed_and_epoch():
    kw = dict(main_fraction=0.4, max_instances=300, small_below=20)
    a = sample_rows(1000, 7, epoch=2, seed=1, **kw)
    b = sample_rows(1000, 7, epoch=2, seed=1, **kw)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    c = sample_rows(1000, 7, epoch=3, seed=1, **kw)
    d = sample_rows(1000, 7, epoch=2, seed=2, **kw)
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[0], d[0])
    assert len(a[0]) == 300 and len(a[1]) == 300 and not set(a[0]) & set(a[1])
    small_main, small_res = sample_rows(15, 7, epoch=0, seed=1, **kw)
    assert small_main.tolist() == small_res.tolist() == list(range(15))


def test_stage_epochs_reproducible_and_different():
    def run(seed):
        stage = _stage(seed=seed, num_epochs=2)
        return [(b.slide_ids.tolist(), b.instance_idx.tolist()) for b in stage]

    a, b, c = run(0), run(0), run(1)
    assert a == b and a != c
    n = len(a) // 2
    assert a[:n] != a[n:]  # epoch 1 reshuffles and resamples


@pytest.mark.parametrize("residual", [True, False])
def test_every_feature_in_main_residual_or_counted(residual):
    src = _source()
    stage = _stage(src, residual=residual, main_fraction=0.4, max_instances=256)
    main: dict[int, set] = {i: set() for i in range(len(src))}
    res: dict[int, set] = {i: set() for i in range(len(src))}
    for batch in stage:
        for b, part_of in ((batch, main), (batch.residual, res)):
            if b is None:
                continue
            rows = b.instance_idx[b.mask].numpy()
            slides = np.repeat(b.slide_ids.numpy(), b.part_len.numpy())
            for s, r in zip(slides.tolist(), rows.tolist()):
                assert r not in part_of[s], "feature emitted twice in one branch"
                part_of[s].add(r)
    sizes = branch_sizes(src.lengths, main_fraction=0.4, max_instances=256, small_below=10, residual=residual)
    for i, n in enumerate(src.lengths.tolist()):
        assert len(main[i]) == sizes["main"][i] and len(res[i]) == sizes["residual"][i]
        both = main[i] | res[i]
        assert both <= set(range(n))
        if n >= 10 and residual:
            assert not main[i] & res[i]  # large bags: branches disjoint
        assert len(both) + sizes["discarded"][i] == n  # nothing lost silently
    s = stage.stats
    assert s["input_features"] == int(src.lengths.sum()) and s["slides"] == len(src)
    assert s["main_features"] + s["residual_features"] + s["discarded_features"] - s[
        "shared_features"
    ] == int(src.lengths.sum())


# ---------------------------------------------------------------------------------------- batches
def test_batch_contract_and_device_moves():
    stage = _stage(packs_per_batch=2, capacity=700)
    for batch in stage:
        batch.validate()
        assert batch.features.shape == (1400, 8) and batch.features.dtype == torch.float32
        assert batch.cu_seqlens.dtype == torch.int32 and int(batch.cu_seqlens[-1]) == 1400
        assert (batch.features[~batch.mask] == 0).all() and (batch.instance_idx[~batch.mask] == -1).all()
        moved = batch.to("cpu")
        assert isinstance(moved, MILBatch) and moved.residual is not None
        if torch.cuda.is_available():
            assert batch.pin_memory().features.is_pinned()
        elif not torch.accelerator.is_available():
            assert batch.pin_memory() is batch  # no accelerator: nothing to pin for


def test_bfd_fills_at_least_as_well_as_greedy():
    rng = np.random.default_rng(0)
    src = _source(rng.integers(20, 600, 80).tolist(), d=2)
    packs = {}
    for algo in ("greedy", "bfd"):
        stage = _stage(src, algorithm=algo, capacity=1000, max_instances=400)
        list(stage)
        packs[algo] = stage.stats["packs"]
        assert stage.stats["bags"] == 80
    assert packs["bfd"] <= packs["greedy"]


def test_float16_kept_when_dtype_none():
    stage = _stage(_source(dtype=np.float16), dtype=None)
    assert next(iter(stage)).features.dtype == torch.float16


# ---------------------------------------------------------------------------------------- sharding
def _key(b: MILBatch):
    return (tuple(b.slide_ids.tolist()), tuple(b.instance_idx.tolist()))


def test_rank_sharding_partitions_epoch_with_equal_counts():
    rng = np.random.default_rng(1)
    src = _source(rng.integers(5, 900, 41).tolist(), d=2)
    full = [_key(b) for b in _stage(src, capacity=600, max_instances=300)]
    per_rank = [list(_stage(src, capacity=600, max_instances=300, rank=r, world_size=3)) for r in range(3)]
    assert len({len(p) for p in per_rank}) == 1  # DDP-safe: same number of steps on every rank
    real = sorted(_key(b) for p in per_rank for b in p if b.loss_scale == 1.0)
    assert real == sorted(full)
    fillers = [b for p in per_rank for b in p if b.loss_scale == 0.0]
    assert len(fillers) == 3 * len(per_rank[0]) - len(full)


@pytest.mark.parametrize("new_world", [1, 2, 3])
def test_resume_exact_also_after_world_size_change(new_world):
    src = _source()
    uninterrupted = [_key(b) for b in _stage(src, capacity=400, max_instances=200, num_epochs=2)]
    # two ranks consume 3 rounds, then checkpoint (each rank's state is the same position)
    ranks = [
        _stage(src, capacity=400, max_instances=200, num_epochs=2, rank=r, world_size=2) for r in range(2)
    ]
    seen = []
    for rnd, pair in enumerate(zip(*ranks)):
        seen += [_key(b) for b in pair if b.loss_scale]
        if rnd == 2:
            break
    state = ranks[0].state_dict()
    assert state == ranks[1].state_dict() | {"stats": state["stats"]}
    resumed = [
        _stage(src, capacity=400, max_instances=200, num_epochs=2, rank=r, world_size=new_world)
        for r in range(new_world)
    ]
    for s in resumed:
        s.load_state_dict(state)
    rest = [[_key(b) for b in s if b.loss_scale] for s in resumed]
    # interleave rounds back into global order
    merged = [
        k for rnd in zip(*[r + [None] * (max(map(len, rest)) - len(r)) for r in rest]) for k in rnd if k
    ]
    assert seen + merged == uninterrupted


def test_state_mismatch_rejected():
    state = _stage(seed=1).state_dict()
    with pytest.raises(ValueError, match="seed=1"):
        _stage(seed=2).load_state_dict(state)


# ---------------------------------------------------------------------------------------- bad input
def test_empty_bag_error_or_counted_skip():
    src = _source([5, 0, 30])
    with pytest.raises(FeatureBagError, match="'slide_1'.*N = 0"):
        _stage(src)
    stage = _stage(src, empty="skip")
    assert stage.stats["skipped_empty"] == 1 and sum(b.n_bags for b in stage) == 2


def test_missing_label_error_or_counted_skip():
    src = _source([5, 6, 30])
    lab = LabelTable(["slide_0", "slide_2"], np.array([0, 1]), ["a", "b"], False, "labels.csv")
    with pytest.raises(FeatureBagError, match="'slide_1'.*no row in label file labels.csv"):
        _stage(src, labels=lab)
    stage = _stage(src, labels=lab, missing_label="skip")
    assert stage.stats["skipped_missing_label"] == 1 and sum(b.n_bags for b in stage) == 2


def test_nan_features_error_or_counted_skip():
    rng = np.random.default_rng(0)
    bags = [rng.standard_normal((n, 4)).astype(np.float32) for n in (20, 30, 40)]
    bags[1][17, 2] = np.nan
    src = InMemoryBags(bags, ["a", "b", "c"])
    with pytest.raises(FeatureBagError, match="'b'.*non-finite feature in row 17"):
        list(_stage(src))
    stage = _stage(src, nan="skip")
    batches = list(stage)
    assert stage.stats["skipped_nan"] == 1 and stage.stats["skipped_nan_features"] == 30
    assert sum(b.n_bags for b in batches) == 2
    assert all(torch.isfinite(b.features).all() for b in batches)
    assert 1 not in torch.cat([b.slide_ids for b in batches]).tolist()
    assert all(b.labels.shape[0] == b.n_bags for b in batches)


def test_argument_validation():
    with pytest.raises(ValueError, match="max_instances"):
        _stage(max_instances=5000, capacity=1000)
    with pytest.raises(ValueError, match="main_fraction"):
        _stage(main_fraction=0.0)
    with pytest.raises(ValueError, match="algorithm"):
        _stage(algorithm="online")


@pytest.mark.parametrize("dense_max", [0, 10**6])
def test_both_pooling_paths_equal_per_bag(monkeypatch, dense_max):
    import seqpack.ops.mil as mil_ops

    monkeypatch.setattr(mil_ops, "DENSE_POOL_MAX_BAGS", dense_max)  # index_add path / one-GEMM path
    torch.manual_seed(0)
    batch = next(iter(_stage(seed=5)))
    model = ABMIL(8, 3, hidden=32, attn_dim=16)
    packed = model(batch.features, batch.bag_ids, batch.n_bags)
    ref = bag_logits_reference(model, batch.features, batch.cu_seqlens, batch.n_bags)
    torch.testing.assert_close(packed, ref, rtol=0, atol=1e-5)
    gp = torch.autograd.grad(packed.square().sum(), list(model.parameters()))
    gr = torch.autograd.grad(ref.square().sum(), list(model.parameters()))
    for a, b in zip(gp, gr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_file_backed_stage_reads_rows_and_matches_in_memory(tmp_path):

    mem = _source([5000, 40, 3000, 700], dtype=np.float16)
    src = InMemoryBags([mem.load(i) for i in range(len(mem))], [f"s{i:02d}" for i in range(len(mem))])
    for i, sid in enumerate(src.slide_ids):
        np.save(tmp_path / f"{sid}.npy", src.load(i))
    files = read_feature_bags(tmp_path)
    assert files.slide_ids == src.slide_ids
    calls = []
    orig = files.load
    files.load = lambda i: calls.append(i) or orig(i)  # count whole-bag reads
    a = _stage(src, num_epochs=3, seed=2, capacity=600, max_instances=256)
    b = _stage(files, num_epochs=3, seed=2, capacity=600, max_instances=256)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.features, y.features) and torch.equal(x.instance_idx, y.instance_idx)
        assert torch.equal(x.residual.features, y.residual.features)
    # big bags: whole read once (the NaN check), then only the sampled rows; small bags are read whole
    assert calls.count(0) == 1 and calls.count(2) == 1 and calls.count(1) == 3


# ---------------------------------------------------------------------------------------- survival
def test_compose_survival_label_rule():

    # smallest uncensored bin, even when a censored slide has a smaller bin
    assert compose_survival_label([3, 1, 2, 0], [0, 1, 0, 1]).tolist() == [2, 0]
    assert compose_survival_label([4], [0]).tolist() == [4, 0]
    # all censored: censored at the smallest censoring bin
    assert compose_survival_label([3, 1, 2], [1, 1, 1]).tolist() == [1, 1]
    with pytest.raises(ValueError):
        compose_survival_label([], [])


def test_survival_stage_labels_follow_constituents():

    src = _source()
    rng = np.random.default_rng(4)
    lab = np.stack([rng.integers(0, 4, len(src)), rng.integers(0, 2, len(src))], 1)
    table = LabelTable(list(src.slide_ids), lab, ["0", "1", "2", "3"], False, survival=True)
    with pytest.raises(ValueError, match="does not fit"):
        _stage(src, labels=table, residual_label="soft")
    n_multi = 0
    for batch in _stage(src, labels=table, seed=1, num_epochs=2, capacity=1500):
        assert batch.labels.dtype == torch.int64 and batch.labels.shape == (batch.n_bags, 2)
        slides = batch.slide_ids.numpy()
        np.testing.assert_array_equal(batch.labels.numpy(), lab[slides])
        res = batch.residual
        assert res.labels.shape == (res.n_bags, 2)
        for h in range(res.n_bags):
            members = res.slide_ids[res.part_bag == h].numpy()
            n_multi += len(members) > 1
            want = compose_survival_label(lab[members, 0], lab[members, 1])
            assert res.labels[h].tolist() == want.tolist()
    assert n_multi >= 2  # hyperslides with several constituents were checked


# ---------------------------------------------------------------------------------------- packed view
class _TinyTransformerMIL(torch.nn.Module):
    """One pre-norm self-attention block + MLP, then gated-attention pooling per bag (TransMIL-like)."""

    def __init__(self, d=8, hidden=16, heads=2, n_classes=3):
        super().__init__()
        self.heads = heads
        self.inp = torch.nn.Linear(d, hidden)
        self.norm = torch.nn.LayerNorm(hidden)
        self.qkv = torch.nn.Linear(hidden, 3 * hidden)
        self.proj = torch.nn.Linear(hidden, hidden)
        nn = torch.nn
        self.mlp = nn.Sequential(nn.Linear(hidden, 32), nn.GELU(), nn.Linear(32, hidden))
        self.score = torch.nn.Linear(hidden, 1)
        self.cls = torch.nn.Linear(hidden, n_classes)

    def encode(self, x, attn_mask=None):  # x [B, L, d]; attn_mask [B, L, L] True = may attend
        B, L, _ = x.shape
        h = self.inp(x)
        q, k, v = self.qkv(self.norm(h)).view(B, L, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        mask = None if attn_mask is None else attn_mask[:, None]
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        h = h + self.proj(a.transpose(1, 2).reshape(B, L, -1))
        return h + self.mlp(h)

    def forward_packed(self, view, n_bags):
        from seqpack.ops.mil import attention_pool

        h = self.encode(view.features, view.attn_mask)
        real = ~view.key_padding_mask
        flat = h[real]
        z, _ = attention_pool(flat, self.score(flat).squeeze(-1), view.bag_ids[real], n_bags)
        return self.cls(z)

    def forward_bag(self, x):
        h = self.encode(x[None])[0]
        w = torch.softmax(self.score(h).squeeze(-1), 0)
        return self.cls((w[:, None] * h).sum(0))


def test_transformer_mil_over_packed_view_equals_per_bag():
    torch.manual_seed(0)
    src = _source([3, 50, 120, 200, 80, 7, 260, 30, 1, 64, 64, 99, 150, 40])
    stage = _stage(src, capacity=256, packs_per_batch=3, max_instances=256, seed=4, num_epochs=1)
    model = _TinyTransformerMIL()
    checked_multi = 0
    for batch in stage:
        for b in (batch, batch.residual):
            b.validate()
            view = b.packed_view()
            P, L = view.key_padding_mask.shape
            assert P == len(b.pack_offsets) - 1 and L == 256
            real = ~view.key_padding_mask
            assert torch.equal(view.features[real], b.features[: b.num_features])
            assert torch.equal(view.bag_ids[real], b.bag_ids[: b.num_features].long())
            assert not view.attn_mask[view.bag_ids.unsqueeze(2) != view.bag_ids.unsqueeze(1)].any()
            packed = model.forward_packed(view, b.n_bags)
            cu = b.cu_seqlens.tolist()
            ref = torch.stack([model.forward_bag(b.features[cu[i] : cu[i + 1]]) for i in range(b.n_bags)])
            torch.testing.assert_close(packed, ref, rtol=1e-5, atol=1e-5)
            checked_multi += int(((view.bag_ids.max(1).values - view.bag_ids[:, 0]) > 0).sum())
    assert checked_multi >= 2  # packs holding several bags were compared


def test_pack_offsets_validated():
    batch = next(iter(_stage(capacity=1024)))
    batch.validate()
    assert batch.pack_offsets[-1] == batch.num_features and batch.capacity == 1024
    bad = batch.pack_offsets.clone()
    bad[1] += 1  # inside a bag
    batch.pack_offsets = bad
    with pytest.raises(ValueError, match="bag boundaries|rise"):
        batch.validate()
    with pytest.raises(ValueError, match="pack_offsets"):
        MILBatch(**{**batch.__dict__, "pack_offsets": None}).packed_view()
