"""Curricula: odds sum to 1 and follow the schedule, DeepSpeed max-length formulas, resume, config errors."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch

from seqpack.cli import main as cli_main
from seqpack.curriculum import (
    BucketCurriculum,
    BucketSampler,
    SeqlenSchedule,
    load_curriculum_config,
    named_odds,
    parse_curriculum_config,
)
from seqpack.node import SequenceNode
from seqpack.sources.records import Document
from seqpack.stages.seqlen import SeqlenCurriculum


def test_named_odds_match_the_paper_rows():
    assert named_odds("uniform", 6).tolist() == [1, 1, 1, 1, 1, 1]
    assert named_odds("Grow-Linear", 6).tolist() == [6, 5, 4, 3, 2, 1]
    assert named_odds("grow_p2", 6).tolist() == [32, 16, 8, 4, 2, 1]


@pytest.mark.parametrize("weighting", ["odds", "odds_by_mass"])
def test_probabilities_sum_to_one_and_skip_empty_buckets(weighting):
    s = BucketSampler([5, 0, 7, 3], BucketCurriculum([4, 3, 2, 1], weighting=weighting))
    p = s.probabilities(0)
    assert p.sum() == pytest.approx(1.0)
    assert p[1] == 0.0
    if weighting == "odds":
        assert p.tolist() == pytest.approx([4 / 7, 0, 2 / 7, 1 / 7])
    else:
        w = np.array([4 * 5, 0, 2 * 7, 1 * 3], float)
        assert p.tolist() == pytest.approx((w / w.sum()).tolist())
    drawn = [s.next() for _ in range(15)]
    assert s.next() is None
    assert np.bincount(drawn, minlength=4).tolist() == [5, 0, 7, 3]  # every batch drawn exactly once
    assert s.stats["renormalized_draws"] == 15  # bucket 1 had positive odds and was empty each time


def test_grow_p2_draws_short_buckets_first():
    s = BucketSampler([200] * 4, BucketCurriculum("grow_p2"), seed=0)
    drawn = np.array([s.next() for _ in range(800)])
    assert drawn[:400].mean() < 1.0 < 2.5 < drawn[600:].mean()
    assert drawn[:400].mean() < drawn[400:].mean()
    # the empirical share of the first 40 steps follows 8:4:2:1 (bucket 0 not yet exhausted)
    assert abs((drawn[:40] == 0).mean() - 8 / 15) < 0.2


def test_cycles_use_their_share_before_the_next_cycle():
    batches = np.array([300, 210, 120, 90])
    n_cycles = 3
    s = BucketSampler(batches, BucketCurriculum("grow_p2", n_cycles=n_cycles), seed=1)
    drawn = []
    while (i := s.next()) is not None:
        drawn.append(i)
    drawn = np.array(drawn)
    done = 0
    for j in range(n_cycles):
        share = batches * (j + 1) // n_cycles - batches * j // n_cycles
        got = np.bincount(drawn[done : done + share.sum()], minlength=4)
        assert got.tolist() == share.tolist()
        # within the cycle the short bucket dominates the start (odds restart each cycle)
        cyc = drawn[done : done + share.sum()]
        assert cyc[: len(cyc) // 2].mean() < cyc[len(cyc) // 2 :].mean()
        done += share.sum()


def test_zero_odds_fallback_is_counted_and_strands_nothing():
    s = BucketSampler([2, 3], BucketCurriculum([1, 0]))
    drawn = [s.next() for _ in range(5)]
    assert sorted(drawn) == [0, 0, 1, 1, 1] and drawn[:2] == [0, 0]
    assert s.stats["zero_odds_fallbacks"] == 3


def test_odds_table_switches_with_progress():
    cur = BucketCurriculum(table=[(0, [1, 0, 0]), (100, [0, 1, 0]), (200, [0, 0, 1])])
    s = BucketSampler([1000, 1000, 1000], cur)
    assert {s.next(t) for t in range(0, 100)} == {0}
    assert {s.next(t) for t in range(100, 200)} == {1}
    assert {s.next(t) for t in range(200, 300)} == {2}


def test_sampler_resume_mid_cycle_is_exact():
    cur = BucketCurriculum("grow_linear", n_cycles=4, weighting="odds_by_mass")
    ref = BucketSampler([40, 30, 20, 10], cur, seed=9)
    ref_draws = [ref.next(t) for t in range(100)]
    a = BucketSampler([40, 30, 20, 10], cur, seed=9)
    head = [a.next(t) for t in range(37)]
    b = BucketSampler([40, 30, 20, 10], cur, seed=9)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert head + [b.next(t) for t in range(37, 100)] == ref_draws


# ------------------------------------------------------------------------------------------ max length
def test_fixed_root_matches_the_deepspeed_formula():
    sch = SeqlenSchedule(64, 1024, "fixed_root", total_curriculum_step=1000, difficulty_step=8, root_degree=2)
    for t in (0, 1, 10, 123, 500, 999, 1000, 5000):
        d = math.floor((t / 1000) ** 0.5 * (1024 - 64) + 64)
        d -= d % 8
        assert sch(t) == min(d, 1024)
    assert sch(0) == 64 and sch(1000) == 1024 and sch(10**6) == 1024
    lin = SeqlenSchedule(8, 72, "fixed_linear", total_curriculum_step=64, difficulty_step=8)
    assert [lin(t) for t in (0, 7, 8, 32, 63, 64)] == [8, 8, 16, 40, 64, 72]
    assert all(lin(t) % 8 == 0 for t in range(100))


def test_fixed_discrete_switches_after_max_step():
    sch = SeqlenSchedule(schedule_type="fixed_discrete", difficulty=[128, 512, 2048], max_step=[10, 20])
    assert [sch(t) for t in (0, 10, 11, 20, 21, 99)] == [128, 128, 512, 512, 2048, 2048]
    assert sch.peak == 2048


def _docs(n=150, seed=0, median=90):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 500, int(m)) for m in np.clip(rng.lognormal(np.log(median), 1.0, n), 1, 1500)]


def _token_cover(batches, docs, stats_key=None):
    seen = [np.zeros(len(d), np.int64) for d in docs]
    for b in batches:
        for j in range(b.n_real_segments):
            d, s = int(b.doc_ids[j]), int(b.seg_start[j])
            n = int(b.cu_seqlens[j + 1] - b.cu_seqlens[j])
            seg = b.input_ids[int(b.cu_seqlens[j]) : int(b.cu_seqlens[j + 1])].numpy()
            if n <= len(docs[d]) - s:
                assert np.array_equal(seg, docs[d][s : s + n])
            seen[d][s : s + n] += 1
    return np.concatenate(seen)


@pytest.mark.parametrize("progress", ["steps", "tokens"])
def test_pack_mode_respects_length_and_keeps_every_token(progress):
    docs = _docs()
    total = 10 if progress == "steps" else 10 * 1024
    sch = SeqlenSchedule(32, 256, "fixed_root", total_curriculum_step=total, difficulty_step=8, root_degree=2)
    cur = SeqlenCurriculum(docs, sch, tokens_per_step=1024, mode="pack", progress=progress)
    batches, lengths = [], []
    while True:
        L = cur.current_length()
        b = next(cur, None)
        if b is None:
            break
        b.validate()
        assert b.max_seqlen <= L and b.num_tokens <= (1024 // L) * L
        batches.append(b)
        lengths.append(L)
    assert lengths == sorted(lengths) and lengths[0] == 32 and lengths[-1] == 256
    assert (_token_cover(batches, docs) == 1).all()
    fills = [b.num_tokens / ((1024 // L) * L) for b, L in zip(batches[:-3], lengths)]
    assert np.mean(fills) > 0.95


def test_truncate_counts_and_reshape_regroups():
    docs = _docs()
    sch = SeqlenSchedule(schedule_type="fixed_discrete", difficulty=[64, 128], max_step=[5])
    tr = SeqlenCurriculum(docs, sch, batch_size=4, mode="truncate")
    batches = list(tr)
    emitted = sum(b.num_tokens for b in batches)
    assert emitted + tr.counts["truncated_tokens"] == sum(len(d) for d in docs)
    assert all(b.max_seqlen <= 64 for b in batches[:6]) and all(b.n_real_segments <= 4 for b in batches)
    rs = SeqlenCurriculum(docs, sch, tokens_per_step=512, mode="reshape")
    batches = list(rs)
    for i, b in enumerate(batches[:-1]):
        L = 64 if i <= 5 else 128
        assert (b.seqlens == L).all() and b.num_tokens == 512
    assert sum(b.num_tokens for b in batches) == sum(len(d) for d in docs)


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("as_node", [False, True])
@pytest.mark.parametrize("mode", ["pack", "truncate", "reshape"])
def test_seqlen_curriculum_resume_is_exact(mode, as_node):
    docs = _docs(120)
    sch = SeqlenSchedule(32, 256, "fixed_linear", total_curriculum_step=30, difficulty_step=16)

    def make():
        src = SequenceNode([Document(7 + i, d) for i, d in enumerate(docs)]) if as_node else docs
        return SeqlenCurriculum(src, sch, tokens_per_step=512, mode=mode, buffer_docs=16)

    ref = [b.input_ids.tolist() for b in make()]
    for cut in np.random.default_rng(len(mode)).choice(np.arange(1, len(ref)), 4, replace=False).tolist():
        a = make()
        head = [next(a).input_ids.tolist() for _ in range(cut)]
        b = make()
        b.load_state_dict(_roundtrip(a.state_dict()))
        assert head + [x.input_ids.tolist() for x in b] == ref
    state = make().state_dict()
    assert set(state) == {"upstream", "step", "tokens_seen", "pending", "counts"}


def test_seqlen_pad_to_and_its_deprecated_name_pad():
    docs = _docs(60)
    sch = SeqlenSchedule(schedule_type="fixed_discrete", difficulty=[64, 128], max_step=[3])
    kw = dict(tokens_per_step=512, mode="pack")
    per_step = [b.num_tokens for b in SeqlenCurriculum(docs, sch, pad_to="max", **kw)]
    assert per_step[:-1] == [512] * (len(per_step) - 1)  # rows * L = 512 at L = 64 and 128
    with pytest.warns(DeprecationWarning, match="SeqlenCurriculum.pad is deprecated.*pad_to"):
        old = SeqlenCurriculum(docs, sch, pad=True, **kw)
    assert [b.num_tokens for b in old] == per_step
    fixed = SeqlenCurriculum(docs, sch, batch_size=3, mode="truncate", pad_to=400)
    assert {b.num_tokens for b in fixed} == {400}
    with pytest.raises(ValueError, match=r"pad_to: must be >= 384, got 300"):
        SeqlenCurriculum(docs, sch, batch_size=3, pad_to=300)


# ------------------------------------------------------------------------------------------------ config
YAML = """
loader: {batch: 1}
curriculum:
  progress: steps
  tokens_per_step: 65536
  seed: 3
  decompose: {min_log2: 8, max_log2: 13, overlong: random}
  buckets: {odds: grow_p2, n_cycles: 8, weighting: odds}
  seqlen:
    min_difficulty: 64
    max_difficulty: 2048
    schedule_type: fixed_root
    schedule_config: {total_curriculum_step: 300, difficulty_step: 8, root_degree: 2}
"""

TOML = """
[curriculum]
progress = "tokens"
tokens_per_step = 16384
boundaries = [128, 512, 2048]

[curriculum.buckets]
table = [{at = 0, odds = [1, 0, 0]}, {at = 1e6, odds = [1, 1, 1]}]

[curriculum.seqlen]
schedule_type = "fixed_discrete"
schedule_config = {difficulty = [256, 1024], max_step = [100000]}
mode = "truncate"
"""


def test_yaml_and_toml_configs_load(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text(YAML)
    cfg = load_curriculum_config(y)
    assert cfg.decompose.max_log2 == 13 and cfg.buckets.n_cycles == 8 and cfg.seed == 3
    assert cfg.seqlen(300) == 2048 and cfg.seqlen(0) == 64
    t = tmp_path / "c.toml"
    t.write_text(TOML)
    cfg = load_curriculum_config(t)
    assert cfg.progress == "tokens" and cfg.boundaries == [128, 512, 2048]
    assert cfg.buckets.odds_at(2e6, 3).tolist() == [1, 1, 1] and cfg.seqlen_mode == "truncate"
    assert cfg.seqlen(100001) == 1024


@pytest.mark.parametrize(
    ("section", "pattern"),
    [
        ({"progress": "epochs"}, r"curriculum.progress: must be 'steps' or 'tokens', got 'epochs'"),
        ({"speed": 1}, r"curriculum.speed: unknown key \(allowed: boundaries, buckets"),
        ({"tokens_per_step": 1000, "decompose": {}}, r"tokens_per_step \(1000\) must be divisible .* 8192"),
        (
            {"decompose": {"overlong": "wrap"}},
            r"curriculum.decompose.overlong: must be 'random' or 'cap', got 'wrap'",
        ),
        ({"decompose": {"min_log2": 9, "max_log2": 8}}, r"max_log2 \(8\) must be >= min_log2 \(9\)"),
        (
            {"buckets": {"odds": "grow_p3"}},
            r"curriculum.buckets.odds: unknown name 'grow_p3'; allowed: 'uniform'",
        ),
        (
            {"buckets": {"weighting": "mass"}},
            r"curriculum.buckets.weighting: must be 'odds' or 'odds_by_mass', got 'mass'",
        ),
        ({"buckets": {"n_cycles": 0}}, r"curriculum.buckets.n_cycles: must be >= 1, got 0"),
        ({"decompose": {}, "buckets": {"odds": [1, 2]}}, r"curriculum.buckets.odds: expected 6 odds"),
        ({"decompose": {}, "buckets": {"odds": [0] * 6}}, r"odds must sum to a positive number"),
        ({"decompose": {}, "buckets": {"odds": [1, 1, -1, 1, 1, 1]}}, r"curriculum.buckets.odds\[2\] = -1"),
        ({"boundaries": [64, 32]}, r"curriculum.boundaries: must be strictly increasing"),
        (
            {"seqlen": {"schedule_type": "exp"}},
            r"schedule_type: must be 'fixed_linear', 'fixed_root' or 'fixed_discrete', got 'exp'",
        ),
        (
            {
                "seqlen": {
                    "min_difficulty": 60,
                    "max_difficulty": 128,
                    "schedule_config": {"total_curriculum_step": 10, "difficulty_step": 8},
                }
            },
            r"min_difficulty \(60\) must be a multiple of schedule_config.difficulty_step \(8\)",
        ),
        (
            {"seqlen": {"min_difficulty": 64, "max_difficulty": 128}},
            r"schedule_config.total_curriculum_step: must be a positive number",
        ),
        (
            {
                "seqlen": {
                    "schedule_type": "fixed_discrete",
                    "schedule_config": {"difficulty": [1, 2], "max_step": []},
                }
            },
            r"schedule_config.max_step: needs len\(difficulty\)-1 = 1 entries",
        ),
        (
            {"seqlen": {"schedule_config": {"warmup": 3}}},
            r"curriculum.seqlen.schedule_config.warmup: unknown key",
        ),
        (
            {
                "seqlen": {
                    "mode": "crop",
                    "min_difficulty": 8,
                    "max_difficulty": 16,
                    "schedule_config": {"total_curriculum_step": 4},
                }
            },
            r"curriculum.seqlen.mode: must be 'pack', 'truncate' or 'reshape', got 'crop'",
        ),
    ],
)
def test_config_errors_name_key_and_allowed_values(section, pattern):
    with pytest.raises(ValueError, match=pattern):
        parse_curriculum_config(section)


def test_config_file_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("curriculum:\n  progress: epochs\n")
    with pytest.raises(ValueError, match="bad.yaml: curriculum.progress"):
        load_curriculum_config(p)
    p = tmp_path / "none.toml"
    p.write_text("[loader]\nx = 1\n")
    with pytest.raises(ValueError, match="no 'curriculum:' section"):
        load_curriculum_config(p)


def test_cli_plot_writes_png(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text(YAML)
    out = tmp_path / "plot.png"
    assert cli_main(["curriculum", "plot", str(y), "--steps", "400", "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_decompose_pad_to_fixed_is_the_deprecated_name_of_pad_to():
    with pytest.warns(DeprecationWarning, match=r"curriculum.decompose.pad_to_fixed is deprecated.*pad_to"):
        cfg = parse_curriculum_config({"tokens_per_step": 8192, "decompose": {"pad_to_fixed": True}})
    assert cfg.decompose.pad_to == "max"
    with pytest.warns(DeprecationWarning):
        assert parse_curriculum_config({"decompose": {"pad_to_fixed": False}}).decompose.pad_to is None
    assert parse_curriculum_config({"decompose": {"pad_to": 9000}}).decompose.pad_to == 9000
    with pytest.raises(ValueError, match="curriculum.decompose.pad_to_fixed: expected true or false"):
        parse_curriculum_config({"decompose": {"pad_to_fixed": "yes"}})
    with pytest.raises(ValueError, match="give only .pad_to."):
        parse_curriculum_config({"decompose": {"pad_to_fixed": True, "pad_to": "max"}})
    with pytest.raises(ValueError, match="curriculum.decompose.pad_to: expected null, 'max' or an integer"):
        parse_curriculum_config({"decompose": {"pad_to": "fixed"}})


def test_stages_build_from_config(tmp_path):
    from seqpack.stages.bucket import LengthBucketing
    from seqpack.stages.decompose import DecomposedDataset

    docs = _docs(200, median=150)
    cfg = parse_curriculum_config(
        {
            "tokens_per_step": 1024,
            "decompose": {"min_log2": 4, "max_log2": 8, "remainder": "emit"},
            "buckets": {"odds": "grow_p2", "n_cycles": 2},
            "seed": 2,
        }
    )
    ds = DecomposedDataset.from_config(docs, cfg, eot_id=0)
    assert ds.curriculum.n_cycles == 2 and ds.remainder == "emit"
    assert all(b.num_loss_tokens == 1024 for b in list(ds)[: int(ds.full_batches.sum())])
    cfg = parse_curriculum_config({"tokens_per_step": 1024, "boundaries": [64, 256, 1024]})
    lb = LengthBucketing.from_config(docs, cfg, mode="pad")
    assert sum(b.num_real_tokens for b in lb) == sum(len(d) for d in docs)
    with pytest.raises(ValueError, match="needs 'decompose' and 'tokens_per_step'"):
        DecomposedDataset.from_config(docs, cfg)
