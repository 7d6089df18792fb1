"""Elastic resume, loose ends: split documents keep their offsets, the step count continues (and
``precount`` pads to the resumed epoch's exact count), ``balance:`` delivers every document once,
leftover work is dealt by size."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from seqpack import build_loader, read, tokenize
from tests.test_loader_state import assert_each_document_once, make_corpus, run_old, segments


def long_corpus(tmp_path, n=60, longest=400, capacity=64, seed=0) -> dict:
    """Byte-tokenized text documents of 1..``longest`` tokens in 2 files, most longer than
    ``capacity``, so the pack stage splits them (``overflow: split``)."""
    rng = np.random.default_rng(seed)
    texts = ["".join(rng.choice(list("abcdefgh "), int(rng.integers(1, longest)))) for _ in range(n)]
    for f in range(2):
        (tmp_path / f"t{f}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[f::2]))
    return {
        "sources": [str(tmp_path / "t*.jsonl")],
        "tokenizer": "byte",
        "tokenize_batch": 8,
        "stage": {"type": "pack", "capacity": capacity, "pad_to": capacity, "buffer_docs": 12},
        "shuffle": {"seed": 5, "buffer_docs": 16},
        "even_batches": "none",
    }


def pieces(batch) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """(doc_id, seg_start, tokens, position_ids) of each real segment."""
    cu = batch.cu_seqlens.tolist()
    return [
        (
            int(batch.doc_ids[s]),
            int(batch.seg_start[s]),
            batch.input_ids[cu[s] : cu[s + 1]].numpy(),
            batch.position_ids[cu[s] : cu[s + 1]].numpy(),
        )
        for s in range(batch.n_real_segments)
    ]


# ------------------------------------------------------------------------------------------ 1. offsets
@pytest.mark.parametrize(("old", "new", "steps"), [((2, 1), (1, 0), [3, 3]), ((3, 0), (2, 2), [2, 5, 1])])
def test_split_documents_keep_their_offsets_and_positions(tmp_path, old, new, steps):
    cfg = long_corpus(tmp_path)
    cfg["stage"]["continue_positions"] = True
    docs = {d.doc_id: d.tokens for d in tokenize(read(cfg["sources"][0]), "byte")}
    assert sum(len(t) > 64 for t in docs.values()) > 30  # most documents are split
    delivered, states = [], []
    for r in range(old[0]):
        loader = build_loader(cfg, rank=r, world_size=old[0], num_workers=old[1])
        it = iter(loader)
        for _ in range(steps[r]):
            delivered += pieces(next(it))
        states.append(copy.deepcopy(loader.state_dict()))
        del it
    n_old = len(delivered)
    # the checkpoint falls inside split documents: a piece delivered, the document's rest is not
    cut = {d for d, s, t, _ in delivered if s + len(t) < len(docs[d])}
    assert cut
    resumed = []
    for r in range(new[0]):
        loader = build_loader(cfg, rank=r, world_size=new[0], num_workers=new[1])
        loader.load_state_dict(states)
        for b in loader:
            resumed += pieces(b)
    # the rest of every cut document comes after the resume, from its true offset
    later = {d: sorted(s for d2, s, _, _ in resumed if d2 == d) for d in cut}
    assert all(later[d] and later[d][0] > 0 for d in cut)
    covered = {d: np.zeros(len(t), np.int64) for d, t in docs.items()}
    for d, s, toks, pos in delivered + resumed:
        assert np.array_equal(toks, docs[d][s : s + len(toks)]), (d, s)
        assert np.array_equal(pos, np.arange(s, s + len(toks))), (d, s)  # continue_positions
        covered[d][s : s + len(toks)] += 1
    assert all((c == 1).all() for c in covered.values())  # every token exactly once
    assert n_old < len(delivered + resumed)


# ------------------------------------------------------------------------------------------ 2. steps
def resume_all(cfg, states, world: int, workers: int) -> tuple[list, list[int], list[dict]]:
    """Every new rank loads ``states`` and finishes the epoch: (segments, steps per rank, its state
    right after loading)."""
    delivered, steps, loaded = [], [], []
    for r in range(world):
        loader = build_loader(cfg, rank=r, world_size=world, num_workers=workers)
        loader.load_state_dict(states)
        loaded.append(copy.deepcopy(loader.state_dict()))
        n = 0
        for b in loader:
            delivered += segments(b)
            n += 1
        steps.append(n)
    return delivered, steps, loaded


@pytest.mark.parametrize(("old", "new"), [((2, 1), (3, 0)), ((3, 0), (1, 2))])
def test_precount_continues_the_step_and_pads_to_the_resumed_count(tmp_path, old, new, monkeypatch):
    """precount after an elastic resume: the step continues (max over old ranks), steps_per_epoch()
    is that step plus the longest new rank's remaining batches (counted exactly: that rank pads
    none), every new rank takes exactly that many steps, every document once."""
    cfg = make_corpus(tmp_path, 90, 40)
    cfg["even_batches"] = "precount"
    delivered, states = run_old(cfg, *old, [3] * old[0])  # DDP: every old rank took 3 steps
    assert {s["step"] for s in states} == {3}
    more, steps, loaded = resume_all(cfg, states, *new)
    total = loaded[0]["epoch_steps"]
    assert all(s["step"] == 3 and s["epoch_steps"] == total for s in loaded)
    assert steps == [total - 3] * new[0]  # equal steps, none "has more than steps_per_epoch()"
    real = []  # real batches per new rank: the longest one has exactly the counted steps
    for r in range(new[0]):
        loader = build_loader(cfg, rank=r, world_size=new[0], num_workers=new[1])
        loader.load_state_dict(states)
        assert loader.steps_per_epoch() == len(loader) == total
        real.append(sum(b.n_real_segments > 0 for b in loader))
    assert max(real) == total - 3 and (new[0] == 1 or min(real) < max(real))  # the others pad
    assert_each_document_once(delivered + more, cfg)
    # the count from length indexes equals the count of the real re-partitioned chains
    monkeypatch.setattr("seqpack.elastic.by_lengths_reason", lambda cfg: "counted by running the chains")
    loader = build_loader(cfg, rank=0, world_size=new[0], num_workers=new[1])
    loader.load_state_dict(states)
    assert loader.steps_per_epoch() == total


def test_precount_count_survives_a_resume_in_the_new_topology(tmp_path):
    cfg = make_corpus(tmp_path, 90, 40)
    cfg["even_batches"] = "precount"
    delivered, states = run_old(cfg, 2, 0, [4, 4])
    for r in range(3):
        loader = build_loader(cfg, rank=r, world_size=3)
        loader.load_state_dict(states)
        total = loader.steps_per_epoch()
        it = iter(loader)
        for _ in range(2):
            delivered += segments(next(it))
        state = copy.deepcopy(loader.state_dict())  # the new topology's own checkpoint
        del it
        assert state["step"] == 6 and state["epoch_steps"] == total
        again = build_loader(cfg, rank=r, world_size=3)
        again.load_state_dict(state)
        n = 0
        for b in again:
            delivered += segments(b)
            n += 1
        assert 6 + n == total == again.steps_per_epoch(0)
    assert_each_document_once(delivered, cfg)


def test_allreduce_and_none_count_nothing_and_continue_the_step(tmp_path):
    cfg = make_corpus(tmp_path, 60, 20)
    _, states = run_old(cfg, 2, 0, [2, 5])
    loader = build_loader(cfg, rank=0, world_size=3)
    loader.load_state_dict(states)
    st = loader.state_dict()
    assert st["step"] == 5 and st["epoch_steps"] is None


# ------------------------------------------------------------------------------------------ 3. balance
@pytest.mark.parametrize(
    ("old", "new", "even"), [((2, 1), (3, 0), "none"), ((3, 0), (2, 2), "precount"), ((2, 2), (1, 0), "none")]
)
def test_balance_delivers_each_document_once_with_equal_steps(tmp_path, old, new, even):
    """balance: windows pulled but not yielded at the checkpoint are carried as pieces; the new
    ranks' RankBalance agree on window step counts from the re-partitioned chains' counts."""
    cfg = make_corpus(tmp_path, 90, 40)
    cfg["even_batches"] = even
    cfg["balance"] = {"micro_batches_per_rank": 2, "window_steps": 2}
    delivered, states = run_old(cfg, *old, [3] * old[0])  # 3 of a window of 4: one pulled, not yielded
    assert all(s["workers"][0]["window"] >= 0 for s in states)
    more, steps, loaded = resume_all(cfg, states, *new)
    assert len(set(steps)) == 1 and steps[0] > 0
    if even == "precount":
        assert steps[0] == loaded[0]["epoch_steps"] - 3
    assert_each_document_once(delivered + more, cfg)


def test_balance_under_a_process_group_needs_no_collective(tmp_path):
    """Under torch.distributed the balance: transform exchanges by all_gather; an elastic resume
    re-pulls old windows and counts new ones without any collective (here a 1-rank gloo group, in
    which an all_gather for the old or new world size would fail)."""
    import torch.distributed as dist

    cfg = make_corpus(tmp_path, 60, 20)
    cfg["balance"] = {"micro_batches_per_rank": 2, "window_steps": 2}
    delivered, states = run_old(cfg, 2, 0, [3, 3])  # counted exchange: the same windows as all_gather
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        cfg["even_batches"] = "none"
        more, steps, _ = resume_all(cfg, states, 3, 0)
    finally:
        dist.destroy_process_group()
    assert len(set(steps)) == 1
    assert_each_document_once(delivered + more, cfg)


# ------------------------------------------------------------------------------------------ 4. by size
def test_split_items_cuts_leftovers_into_equal_sizes():
    from seqpack.elastic_deal import split_items
    from seqpack.sources.partition import UnitSize

    sizes = {(0, 0): UnitSize(0, 0, 100.0, 1000), (1, 0): UnitSize(1, 0, 50.0, None)}
    # the rest of unit (0, 0) from row 200 (80 of its 100 bytes), and an unsplittable unit of 50
    got = split_items([(0, 0, 200, -1), (1, 0, 0, -1)], 3, sizes)
    assert got == [[(0, 0, 200, 633)], [(0, 0, 633, -1)], [(1, 0, 0, -1)]]
    got = split_items([(0, 0, 0, 500), (0, 0, 500, -1)], 2, sizes)  # two halves of one unit
    assert got == [[(0, 0, 0, 500)], [(0, 0, 500, -1)]]
    assert split_items([(0, 0, 0, 500)], 4, sizes) == [
        [(0, 0, 0, 125)],
        [(0, 0, 125, 250)],
        [(0, 0, 250, 375)],
        [(0, 0, 375, 500)],
    ]
    assert split_items([(0, 0, 0, -1), (1, 0, 0, -1)], 2, None) == [[(0, 0, 0, -1)], [(1, 0, 0, -1)]]


@pytest.mark.parametrize(("old", "new", "steps"), [((2, 0), (8, 0), [2, 2]), ((1, 0), (6, 0), [3])])
def test_new_consumers_get_near_equal_tokens(tmp_path, old, new, steps):
    """A few large leftover items over more new consumers: each gets within 10% of the mean
    (dealt round robin, some got 2.3x the mean and some 0.2x)."""
    cfg = make_corpus(tmp_path, 300, 150)
    cfg["shuffle"] = None
    delivered, states = run_old(cfg, *old, steps)
    tokens = []
    for r in range(new[0]):
        loader = build_loader(cfg, rank=r, world_size=new[0])
        loader.load_state_dict(states)
        mine = [s for b in loader for s in segments(b)]
        delivered += mine
        tokens.append(sum(n for _, _, n in mine))
    assert max(tokens) <= 1.1 * np.mean(tokens) and min(tokens) >= 0.9 * np.mean(tokens), tokens
    assert_each_document_once(delivered, cfg)
