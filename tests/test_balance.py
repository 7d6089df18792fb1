"""Data-parallel cost balancing: kernels vs references, equal counts, never worse than round-robin."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from seqpack.ops import balance as kernels

from seqpack import IGNORE_INDEX, pack
from seqpack.plan.balance import (
    METHODS,
    CostModel,
    assign_ranks,
    imbalance,
    num_steps,
    split_ranks,
    step_imbalance,
)
from seqpack.stages.balance import balance_batches, empty_batch
from seqpack.stages.pack_offline import batches_from_plan


# ----------------------------------------------------------------------------- kernels
@settings(max_examples=150, deadline=None)
@given(st.integers(1, 9), st.lists(st.integers(0, 60), max_size=70), st.integers(1, 12))
def test_kernels_match_references(k, raw, per_rank):
    costs = np.sort(np.asarray(raw, np.float64))[::-1].copy()
    n_kk = len(costs) // k * k
    kk = kernels.kk_assign(costs[:n_kk].copy(), k)
    assert kk.tolist() == kernels.kk_assign_reference(costs[:n_kk].tolist(), k)
    assert (np.bincount(kk, minlength=k) == n_kk // k).all()
    m = min(len(costs), k * per_rank)
    lpt = kernels.lpt_assign(costs[:m].copy(), k, per_rank)
    assert lpt.tolist() == kernels.lpt_assign_reference(costs[:m].tolist(), k, per_rank)
    assert np.bincount(lpt, minlength=k).max(initial=0) <= per_rank


def test_kk_two_way_is_near_exact():
    costs = np.sort(np.random.default_rng(0).uniform(0, 1, 1000))[::-1].copy()
    loads = np.bincount(kernels.kk_assign(costs, 2), weights=costs)
    assert abs(loads[0] - loads[1]) < 1e-9  # differencing: LPT leaves ~1e-3 here


# ----------------------------------------------------------------------------- assignment
def _check_assignment(got, n, world, per_rank):
    assert got.order.shape == (world, per_rank)
    real = got.order[got.order >= 0]
    assert sorted(real.tolist()) == list(range(n))  # every item exactly once
    assert got.n_padding == world * per_rank - n
    for r in range(world):
        row = got.order[r][got.order[r] >= 0]
        assert (got.rank[row] == r).all() and (np.diff(row) > 0).all()  # stream order kept in a rank


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n,world", [(0, 3), (1, 4), (7, 3), (64, 8), (1000, 16), (33, 32)])
def test_equal_counts_and_every_item_once(method, n, world):
    costs = np.random.default_rng(n).lognormal(5, 1.5, n)
    got = assign_ranks(costs, world, method=method)
    _check_assignment(got, n, world, -(-n // world))
    np.testing.assert_allclose(got.rank_costs.sum(), costs.sum())
    roomy = assign_ranks(costs, world, method=method, per_rank=-(-n // world) + 2)
    _check_assignment(roomy, n, world, -(-n // world) + 2)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 16), st.lists(st.floats(0, 1e6), max_size=200))
def test_best_never_worse_than_round_robin(world, costs):
    best = assign_ranks(costs, world, method="best")
    rr = assign_ranks(costs, world, method="round_robin")
    assert best.rank_costs.max() <= rr.rank_costs.max()
    assert best.imbalance <= rr.imbalance + 1e-12


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("world,per_rank", [(8, 4), (64, 4), (16, 16)])
def test_lpt_and_kk_beat_round_robin_on_packed_micro_batches(seed, world, per_rank):
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(350), 1.2, world * per_rank * 30), 8, 8192).astype(np.int64)
    plan = pack(lengths, 8192, seed=seed)
    costs = CostModel.transformer(4096).plan_costs(plan)[: world * per_rank]
    rr = assign_ranks(costs, world, method="round_robin").rank_costs.max()
    for method in ("sorted", "lpt", "kk", "best"):
        assert assign_ranks(costs, world, method=method).rank_costs.max() <= rr * (1 + 1e-12), method
    assert assign_ranks(costs, world, method="best").imbalance < 1.05


def test_known_small_instance():
    # {10, 9, 1, 1} on 2 ranks, 2 each: round robin gives {10, 1} / {9, 1}; LPT pairs 10 with 1
    got = assign_ranks([10.0, 9.0, 1.0, 1.0], 2, method="lpt")
    assert sorted(got.rank_costs.tolist()) == [10.0, 11.0]
    got = assign_ranks([8.0, 7.0, 6.0, 5.0, 4.0, 4.0], 2, method="kk")
    assert got.rank_costs.tolist() in ([17.0, 17.0],)


def test_imbalance_definition():
    assert imbalance([1.0, 1.0, 4.0]) == 2.0
    assert imbalance([0.0, 0.0]) == 1.0
    s = step_imbalance(np.ones(10), 4, 2)
    assert s.tolist() == [1.0, 2.0]  # last step: 2 items padded with 6 empty slots over 4 ranks


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"world_size": 0}, "world_size"),
        ({"world_size": -2}, "world_size"),
        ({"world_size": 2.5}, "world_size"),
        ({"world_size": 2, "method": "greedy"}, "method"),
        ({"world_size": 2, "per_rank": 1}, "per_rank"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        assign_ranks([1.0, 2.0, 3.0], **kwargs)


def test_bad_costs_name_first_offending_index():
    with pytest.raises(ValueError, match=r"costs\[2\]"):
        assign_ranks([1.0, 2.0, -1.0, -5.0], 2)
    with pytest.raises(ValueError, match=r"costs\[1\]"):
        assign_ranks([1.0, float("nan")], 2)


# ----------------------------------------------------------------------------- cost model
def test_cost_model_values():
    m = CostModel(a=2.0, b=0.5, c=3.0)
    assert m.batch_cost([4, 2]) == 3.0 + 2 * 6 + 0.5 * 20
    assert m.batch_cost([]) == 0.0
    np.testing.assert_allclose(m.document_costs([1, 10]), [2.5, 70.0])
    t = CostModel.transformer(4096)
    assert t.a == 1.0 and t.b == pytest.approx(1 / 49152)
    with pytest.raises(ValueError, match="CostModel.b"):
        CostModel(b=-1.0)
    with pytest.raises(ValueError, match="hidden_size"):
        CostModel.transformer(0)


def test_plan_and_batch_costs_agree():
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 300, 200)
    plan = pack(lengths, 512)
    m = CostModel(a=1.0, b=0.01, c=5.0)
    costs = m.plan_costs(plan)
    docs = [np.arange(1, n + 1) for n in lengths]
    for b, batch in enumerate(batches_from_plan(plan, docs, pad_to=512)):
        assert m.varlen_cost(batch) == pytest.approx(costs[b])  # padding segment costs nothing
        assert m.batch_cost(plan.bin(b)[2]) == pytest.approx(costs[b])


def test_varlen_cost_takes_any_object_with_cu_seqlens():
    m = CostModel(a=1.0, b=0.5, c=2.0)
    seg = SimpleNamespace(cu_seqlens=np.array([0, 3, 7, 10], np.int32), n_real_segments=2)
    assert m.varlen_cost(seg) == 2.0 + (3 + 4.5) + (4 + 8.0)  # the last (padding) segment is free


def test_planner_imports_no_torch():
    """The planner is numpy only (docs/architecture.md: plan/ holds no torch); so are its kernels."""
    root = Path(__file__).resolve().parent.parent

    def imported(path):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        return names

    std = {"__future__", "itertools", "collections.abc", "dataclasses", "typing", "heapq"}
    assert imported(root / "seqpack" / "plan" / "balance.py") - std == {"numpy", "seqpack.ops"}
    assert imported(root / "ops" / "balance.py") - std == {"numba", "numpy"}


def test_fit_recovers_coefficients():
    rng = np.random.default_rng(0)
    true = CostModel(a=2e-6, b=3e-10, c=1e-3)
    seqlens = [rng.integers(16, 8192, rng.integers(1, 10)) for _ in range(40)]
    times = np.array([true.batch_cost(s) for s in seqlens]) * rng.normal(1, 0.01, 40)
    got = CostModel.fit(seqlens, times)
    assert got.a == pytest.approx(true.a, rel=0.1)
    assert got.b == pytest.approx(true.b, rel=0.1)
    # a purely linear process gives b == 0, never a negative coefficient
    lin = CostModel.fit(seqlens, [1e-6 * np.sum(s) for s in seqlens])
    assert lin.b == pytest.approx(0.0, abs=1e-15) and lin.a == pytest.approx(1e-6)
    with pytest.raises(ValueError, match="3 measured"):
        CostModel.fit(seqlens[:2], times[:2])
    with pytest.raises(ValueError, match="times"):
        CostModel.fit(seqlens, times[:5])


# ----------------------------------------------------------------------------- loader glue
def _stream(n_docs=300, capacity=256, seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(60), 1.0, n_docs), 2, 600).astype(np.int64)
    docs = [rng.integers(1, 500, n) for n in lengths]
    plan = pack(lengths, capacity, seed=seed)
    return list(batches_from_plan(plan, docs, pad_to=capacity)), docs


@pytest.mark.parametrize("world,per_rank,w", [(4, 2, 1), (3, 1, 4), (8, 3, 2), (1, 1, 1)])
def test_balance_batches_equal_steps_and_nothing_lost(world, per_rank, w):
    batches, docs = _stream()
    out = [
        list(balance_batches(batches, world, r, 1.0, 0.01, micro_batches_per_rank=per_rank, window_steps=w))
        for r in range(world)
    ]
    steps = num_steps(len(batches), world, per_rank)
    assert all(len(o) == steps * per_rank for o in out)  # every rank runs the same number of steps
    real = [b for o in out for b in o if b.n_real_segments]
    assert sorted(id(b) for b in real) == sorted(id(b) for b in batches)  # each batch exactly once
    pads = [b for o in out for b in o if not b.n_real_segments]
    assert len(pads) == steps * per_rank * world - len(batches)
    for b in pads:
        b.validate()
        assert b.num_loss_tokens == 0 and (b.labels == IGNORE_INDEX).all() and b.num_tokens == 256
    assert sum(b.num_loss_tokens for o in out for b in o) == sum(b.num_loss_tokens for b in batches)


def test_balance_batches_lowers_step_imbalance():
    batches, _ = _stream(n_docs=2000)
    world, per_rank = 4, 4
    m = CostModel(a=1.0, b=0.02)

    def worst_step(rank_lists):
        costs = np.array([[m.varlen_cost(b) for b in o] for o in rank_lists])  # [world, steps*per_rank]
        per_step = costs.reshape(world, -1, per_rank).sum(2)
        return (per_step.max(0) / per_step.mean(0)).mean()

    batches = batches[: len(batches) // (world * per_rank) * world * per_rank]  # full steps only
    plain = [batches[r::world] for r in range(world)]  # round-robin sampler
    balanced = [
        list(balance_batches(batches, world, r, m.a, m.b, micro_batches_per_rank=per_rank))
        for r in range(world)
    ]
    assert worst_step(balanced) < worst_step(plain)


def test_balance_batches_bad_arguments():
    batches, _ = _stream(50)
    with pytest.raises(ValueError, match="world_size"):
        next(balance_batches(batches, 0, 0))
    with pytest.raises(ValueError, match="rank"):
        next(balance_batches(batches, 4, 4))
    with pytest.raises(ValueError, match="rank"):
        next(balance_batches(batches, 4, -1))
    with pytest.raises(ValueError, match="micro_batches_per_rank"):
        next(balance_batches(batches, 2, 0, micro_batches_per_rank=0))
    with pytest.raises(ValueError, match="num_tokens"):
        empty_batch(0)


def test_split_ranks():
    assert [split_ranks(8, 2, r) for r in (0, 1, 2, 7)] == [(0, 4, 0), (0, 4, 1), (1, 4, 0), (3, 4, 1)]
    with pytest.raises(ValueError, match="does not divide"):
        split_ranks(6, 4, 0)
    with pytest.raises(ValueError, match="cp_size"):
        split_ranks(4, 0, 0)
    with pytest.raises(ValueError, match="rank"):
        split_ranks(4, 2, 4)
