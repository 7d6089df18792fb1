"""Planner options: max_segments_per_bin, bin_count_multiple, groups, split_turns; capped kernels."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from seqpack.ops import packing as kernels

from seqpack import pack
from seqpack.plan import group_ids, split_at_turns

SETTINGS = settings(max_examples=50, deadline=None)


@pytest.mark.parametrize("seed", range(25))
def test_capped_kernels_match_references(seed):
    rng = np.random.default_rng(seed)
    capacity = int(rng.integers(1, 64))
    cap = int(rng.integers(1, 5))
    lens = np.sort(rng.integers(1, capacity + 1, int(rng.integers(1, 80))))[::-1].astype(np.int64).copy()
    a, n = kernels.bfd_assign_capped(lens, capacity, cap)
    assert (list(a), n) == kernels.bfd_assign_reference(list(lens), capacity, cap)
    a, n = kernels.ffd_assign_capped(lens, capacity, cap)
    assert (list(a), n) == kernels.ffd_assign_reference(list(lens), capacity, cap)
    # a cap no bin reaches changes nothing
    a, n = kernels.bfd_assign_capped(lens, capacity, 10**6)
    assert (list(a), n) == kernels.bfd_assign_reference(list(lens), capacity)


@SETTINGS
@given(
    lengths=st.lists(st.integers(0, 100), min_size=1, max_size=150),
    capacity=st.integers(1, 64),
    algorithm=st.sampled_from(["bfd", "ffd", "greedy"]),
    max_segments=st.integers(1, 6),
)
def test_max_segments_per_bin(lengths, capacity, algorithm, max_segments):
    plan = pack(lengths, capacity, algorithm=algorithm, max_segments_per_bin=max_segments)
    plan.validate(lengths)
    assert np.diff(plan.bin_offsets).max(initial=0) <= max_segments
    assert plan.packed_tokens == sum(lengths)


def test_max_segments_costs_bins_only_when_binding():
    lengths = [1] * 100
    assert pack(lengths, 100).n_bins == 1
    plan = pack(lengths, 100, max_segments_per_bin=8)
    assert plan.n_bins == 13 and np.diff(plan.bin_offsets).max() == 8


@SETTINGS
@given(
    lengths=st.lists(st.integers(0, 100), min_size=1, max_size=120),
    capacity=st.integers(2, 64),
    algorithm=st.sampled_from(["bfd", "ffd", "greedy", "online"]),
    multiple=st.integers(1, 12),
)
def test_bin_count_multiple(lengths, capacity, algorithm, multiple):
    if sum(lengths) < multiple:  # fewer tokens than bins asked for: nothing to split
        return
    plan = pack(lengths, capacity, algorithm=algorithm, bin_count_multiple=multiple, buffer_docs=16)
    plan.validate(lengths)
    assert plan.n_bins % multiple == 0
    assert plan.packed_tokens == sum(lengths)  # nothing padded, nothing dropped


def test_bin_count_multiple_keeps_the_planner_bins_when_already_a_multiple():
    lengths = np.random.default_rng(0).integers(1, 60, 500)
    base = pack(lengths, 64)
    m = base.n_bins
    same = pack(lengths, 64, bin_count_multiple=m)
    assert np.array_equal(same.seg_len, base.seg_len) and same.stats["bins_added_for_multiple"] == 0
    more = pack(lengths, 64, bin_count_multiple=8)
    assert more.n_bins == -(-m // 8) * 8
    assert more.stats["bins_added_for_multiple"] == more.n_bins - m


def test_bin_count_multiple_impossible_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of 4"):
        pack([1, 1], 8, bin_count_multiple=4)
    with pytest.raises(ValueError, match="does not allow splitting"):
        pack([8], 8, overflow="truncate", bin_count_multiple=2)
    with pytest.raises(ValueError, match="bin_count_multiple"):
        pack([8], 8, bin_count_multiple=0)


@SETTINGS
@given(
    data=st.lists(st.tuples(st.integers(0, 90), st.integers(0, 3)), min_size=1, max_size=120),
    capacity=st.integers(1, 64),
    algorithm=st.sampled_from(["bfd", "ffd", "greedy", "online"]),
)
def test_groups_never_share_a_bin(data, capacity, algorithm):
    lengths = [n for n, _ in data]
    groups = np.array([f"g{g}" for _, g in data])
    plan = pack(lengths, capacity, algorithm=algorithm, groups=groups, buffer_docs=8)
    plan.validate(lengths)
    for b in range(plan.n_bins):
        seg_doc, _, _ = plan.bin(b)
        assert len(set(groups[seg_doc])) == 1


def test_groups_shape_and_missing_key_errors():
    with pytest.raises(ValueError, match="one entry per document"):
        pack([3, 4], 8, groups=[0])
    records = [{"text": "a", "lang": "en"}, {"text": "b", "lang": "de"}, {"text": "c"}]
    with pytest.raises(ValueError, match="record 2 has no group key 'lang'"):
        group_ids(records, "lang")
    assert group_ids(records[:2] + [{"lang": "en"}], "lang").tolist() == [0, 1, 0]


def test_split_at_turns_cuts_only_at_turn_starts():
    # turns start at 0, 30, 50, 90; total 120
    starts, lens, cut = split_at_turns(120, [0, 30, 50, 90], 60)
    assert (starts, lens, cut) == ([0, 50, 90], [50, 40, 30], 0)
    # a turn longer than capacity: keep a prefix, count the rest as truncated
    starts, lens, cut = split_at_turns(200, [0, 20, 150], 60)
    assert (starts, lens, cut) == ([0, 20], [20, 60], 120)


@SETTINGS
@given(
    convs=st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=8), min_size=1, max_size=40),
    capacity=st.integers(1, 80),
    algorithm=st.sampled_from(["bfd", "ffd", "greedy", "online"]),
)
def test_split_turns_plan(convs, capacity, algorithm):
    lengths = [sum(c) for c in convs]
    turn_starts = [np.cumsum([0, *c[:-1]]) for c in convs]
    plan = pack(
        lengths, capacity, algorithm=algorithm, overflow="split_turns", turn_starts=turn_starts, buffer_docs=8
    )
    plan.validate(lengths)
    for d, s in zip(plan.seg_doc, plan.seg_start):
        assert s == 0 or s in set(turn_starts[d].tolist())  # every piece starts at a turn boundary
    fits = all(max(c) <= capacity for c in convs)
    if fits:
        assert plan.truncated_tokens == 0 and plan.packed_tokens == sum(lengths)
    assert plan.packed_tokens + plan.truncated_tokens == sum(lengths)


def test_split_turns_needs_turn_starts():
    with pytest.raises(ValueError, match="turn_starts"):
        pack([10], 4, overflow="split_turns")
