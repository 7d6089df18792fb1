"""PackPlan invariants, kernel references, overflow policies and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from seqpack.ops import packing as kernels

from seqpack import pack
from seqpack.plan import (
    ALGORITHMS,
    LENGTH_OVERFLOW,
    OVERFLOW_POLICIES,
    PACK_OVERFLOW,
    expand_overflow,
)

SETTINGS = settings(max_examples=60, deadline=None)


@pytest.mark.parametrize("seed", range(30))
def test_kernels_match_python_references(seed):
    rng = np.random.default_rng(seed)
    capacity = int(rng.integers(1, 64))
    lens = np.sort(rng.integers(1, capacity + 1, int(rng.integers(1, 80))))[::-1].astype(np.int64).copy()
    a, n = kernels.bfd_assign(lens, capacity)
    ar, nr = kernels.bfd_assign_reference(list(lens), capacity)
    assert (list(a), n) == (ar, nr)
    a, n = kernels.ffd_assign(lens, capacity)
    ar, nr = kernels.ffd_assign_reference(list(lens), capacity)
    assert (list(a), n) == (ar, nr)


@SETTINGS
@given(
    lengths=st.lists(st.integers(0, 300), min_size=1, max_size=200),
    capacity=st.integers(1, 128),
    algorithm=st.sampled_from(ALGORITHMS),
    overflow=st.sampled_from(["split", "truncate", "drop"]),
)
def test_plan_covers_every_token_once(lengths, capacity, algorithm, overflow):
    plan = pack(lengths, capacity, algorithm=algorithm, overflow=overflow, buffer_docs=16)
    plan.validate(lengths)
    lens = np.asarray(lengths)
    if overflow == "split":
        assert plan.packed_tokens == lens.sum() and plan.dropped_tokens == plan.truncated_tokens == 0
    if overflow == "truncate":
        assert plan.truncated_tokens == np.maximum(lens - capacity, 0).sum()
    if overflow == "drop":
        assert plan.dropped_tokens == lens[lens > capacity].sum()


ADVERSARIAL = {
    "zeros": [0] * 50,
    "all_capacity": [64] * 40,
    "capacity_plus_one": [65] * 40,
    "one_huge": [64 * 1000 + 7],
    "mixed_zeros": [0, 64, 0, 1, 65, 0, 63, 2],
    "single_token": [1] * 129,
}


@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_adversarial_lengths(case, algorithm):
    lengths = ADVERSARIAL[case]
    plan = pack(lengths, 64, algorithm=algorithm, buffer_docs=8)
    plan.validate(lengths)
    assert plan.packed_tokens == sum(lengths)
    if case == "zeros":
        assert plan.n_bins == 0 and plan.fill == 1.0
    if case == "all_capacity":
        assert plan.n_bins == 40 and plan.fill == 1.0
    if case == "capacity_plus_one":
        # each document: one full piece + a 1-token tail; tails share bins
        expected = {"bfd": 41, "ffd": 41, "greedy": 80}
        if algorithm in expected:
            assert plan.n_bins == expected[algorithm]
        else:  # a buffer of 8 items closes a window of tails at least every 4 documents
            assert 41 <= plan.n_bins <= 50
    if case == "one_huge":
        assert plan.n_bins == 1001 and sorted(plan.seg_start.tolist()) == [64 * i for i in range(1001)]
    if case == "single_token":
        # online: a full buffer of 8 one-token items can only close a bin of 8 tokens
        assert plan.n_bins == (3 if algorithm != "online" else 17)


def test_one_million_documents():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(350), 1.2, 1_000_000), 8, 16384).astype(np.int64)
    plan = pack(lengths, 8192)
    plan.validate(lengths)
    assert plan.packed_tokens == lengths.sum()
    assert plan.fill > 0.999


@pytest.mark.parametrize("seed", range(8))
def test_bfd_fill_not_below_ffd(seed):
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(300 + 200 * seed), 1.0, 20_000), 1, 9000).astype(np.int64)
    for capacity in (2048, 4096, 8192):
        bfd = pack(lengths, capacity, algorithm="bfd")
        ffd = pack(lengths, capacity, algorithm="ffd")
        assert bfd.fill >= ffd.fill - 0.001


def test_online_close_to_bfd():
    rng = np.random.default_rng(1)
    lengths = np.clip(rng.lognormal(np.log(350), 1.2, 100_000), 8, 16384).astype(np.int64)
    bfd = pack(lengths, 8192, algorithm="bfd")
    online = pack(lengths, 8192, algorithm="online", buffer_docs=10_000)
    online.validate(lengths)
    assert online.fill >= bfd.fill - 0.002


def test_greedy_keeps_document_order():
    lengths = [5, 3, 9, 1, 1, 7, 2]
    plan = pack(lengths, 10, algorithm="greedy")
    assert plan.seg_doc.tolist() == list(range(7))
    assert plan.bin_offsets.tolist() == [0, 2, 4, 7]


def test_deterministic_and_seeded_bin_order():
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 500, 3000)
    a, b = pack(lengths, 1024, seed=7), pack(lengths, 1024, seed=7)
    assert np.array_equal(a.seg_doc, b.seg_doc) and np.array_equal(a.bin_offsets, b.bin_offsets)
    c = pack(lengths, 1024, seed=8)
    assert not np.array_equal(a.seg_doc, c.seg_doc)
    assert sorted(a.bin_lengths().tolist()) == sorted(c.bin_lengths().tolist())
    unshuffled = pack(lengths, 1024, seed=None)
    assert np.all(np.diff(unshuffled.seg_len[unshuffled.bin_offsets[:-1]]) <= 0)  # decreasing first items


def test_overflow_error_names_document():
    with pytest.raises(ValueError, match=r"document 2 has 11 tokens > capacity 10"):
        pack([3, 10, 11, 12], 10, overflow="error")


@pytest.mark.parametrize(
    "lengths, capacity, message",
    [
        ([1, -2, 3], 10, r"lengths\[1\] = -2"),
        ([1.0, 2.5], 10, r"lengths\[1\] = 2.5"),
        (["a"], 10, "must be integers"),
        ([[1, 2]], 10, "1-D"),
        ([1, 2], 0, "capacity"),
        ([1, 2], -5, "capacity"),
        ([1, 2], 2.5, "capacity"),
    ],
)
def test_bad_input(lengths, capacity, message):
    with pytest.raises(ValueError, match=message):
        pack(lengths, capacity)


def test_bad_algorithm_and_overflow():
    with pytest.raises(ValueError, match="algorithm"):
        pack([1], 4, algorithm="best")
    with pytest.raises(ValueError, match="overflow"):
        pack([1], 4, overflow="wrap")


def test_empty_input():
    plan = pack([], 16)
    assert plan.n_bins == 0 and plan.packed_tokens == 0
    plan.validate([])


def test_online_packer_resume_is_exact():
    from seqpack import OnlinePacker

    rng = np.random.default_rng(5)
    lens = rng.integers(1, 100, 2000)
    full = OnlinePacker(256, buffer_docs=50)
    ref = [b.tolist() for i, n in enumerate(lens) for b in full.add(i, n)] + [
        b.tolist() for b in full.flush()
    ]
    first = OnlinePacker(256, buffer_docs=50)
    out = [b.tolist() for i, n in enumerate(lens[:777]) for b in first.add(i, n)]
    second = OnlinePacker(256, buffer_docs=50)
    second.load_state_dict(first.state_dict())
    out += [b.tolist() for i, n in enumerate(lens[777:], 777) for b in second.add(i, n)]
    out += [b.tolist() for b in second.flush()]
    assert out == ref
    assert sorted(k for b in out for k in b) == list(range(2000))


def test_planners_never_import_torch():
    """seqpack/plan/ is numpy (and numba kernels) only: lengths in, plans out."""
    import ast
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "seqpack" / "plan"
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "torch" for n in names), f"{path.name} imports torch"


def test_overflow_policy_sets():
    assert OVERFLOW_POLICIES[0] == "split" and set(PACK_OVERFLOW) == set(OVERFLOW_POLICIES)
    assert set(LENGTH_OVERFLOW) == set(OVERFLOW_POLICIES) - {"split_turns"}
    lengths = np.array([3, 0, 12, 5], np.int64)
    doc, start, ln, counts = expand_overflow(lengths, 5, "split")
    assert (doc.tolist(), start.tolist(), ln.tolist()) == ([0, 2, 2, 2, 3], [0, 0, 5, 10, 0], [3, 5, 5, 2, 5])
    doc, start, ln, counts = expand_overflow(lengths, 5, "truncate")
    assert (doc.tolist(), ln.tolist()) == ([0, 2, 3], [3, 5, 5])
    assert (counts["truncated_tokens"], counts["truncated_docs"]) == (7, 1)
    doc, _, ln, counts = expand_overflow(lengths, 5, "split_turns", [None, None, [4, 9], None])
    assert (doc.tolist(), ln.tolist(), counts["truncated_tokens"]) == ([0, 2, 2, 2, 3], [3, 4, 5, 3, 5], 0)
    with pytest.raises(ValueError, match="document 77 has 12 tokens"):
        expand_overflow(lengths, 5, "error", doc_ids=np.array([5, 6, 77, 8]))


def test_online_packer_pending_keys():
    from seqpack import OnlinePacker

    packer = OnlinePacker(10, buffer_docs=4, min_fill=1.0)
    assert packer.add_many(np.array([3, 4, 5]), np.array([6, 6, 6])) == []
    assert packer.pending_keys().tolist() == [3, 4, 5] and packer.pending_lengths().tolist() == [6, 6, 6]
    packer.pending_keys()[0] = 99  # a copy: the buffer is the packer's own
    assert packer.pending_keys().tolist() == [3, 4, 5]
    state = packer.state_dict(keys=np.array([0, 1, 2]))
    assert state["keys"] == [0, 1, 2] and state["lens"] == [6, 6, 6]
