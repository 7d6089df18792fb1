"""Loader state: by reference (size bound, old token states), exact resume at 0/1/2/4 workers,
elastic resume 3x2 -> 2x1 and 2x1 -> 4x0 in one process with doc-id accounting, bad states."""

from __future__ import annotations

import copy
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from seqpack import build_loader, pipeline, read, tokenize
from seqpack.arena import documents_from_state, documents_to_state
from seqpack.refs import is_refs


def make_corpus(tmp_path, n_text=120, n_tok=60, seed=0, tokenize_batch=8):
    """Raw text in 3 JSON-lines files and pre-tokenized ids in 2 Parquet files; every document is
    shorter than the capacity, so each is delivered as one segment."""
    rng = np.random.default_rng(seed)
    texts = ["".join(rng.choice(list("abcdefgh "), int(rng.integers(1, 200)))) for _ in range(n_text)]
    for f in range(3):
        (tmp_path / f"t{f}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[f::3]))
    ids = [rng.integers(300, 1000, int(rng.integers(1, 200))).tolist() for _ in range(n_tok)]
    for f in range(2):
        pq.write_table(pa.table({"input_ids": ids[f::2]}), tmp_path / f"p{f}.parquet", row_group_size=8)
    return {
        "sources": [
            {"path": str(tmp_path / "t*.jsonl"), "name": "web", "weight": 2},
            {"path": str(tmp_path / "p*.parquet"), "name": "code", "input_ids_key": "input_ids"},
        ],
        "tokenizer": "byte",
        "tokenize_batch": tokenize_batch,
        "stage": {"type": "pack", "capacity": 256, "pad_to": 256, "buffer_docs": 12},
        "shuffle": {"seed": 5, "buffer_docs": 16},
        "even_batches": "none",
    }


def doc_lengths(cfg) -> dict[int, int]:
    out = {}
    for i, s in enumerate(cfg["sources"]):
        keys = {k: s[k] for k in ("input_ids_key",) if k in s}
        for d in tokenize(read(s["path"], source_index=i, **keys), cfg["tokenizer"]):
            out[d.doc_id] = len(d.tokens)
    return out


def segments(batch) -> list[tuple[int, int, int]]:
    """(doc_id, seg_start, length) of each real segment."""
    cu = batch.cu_seqlens.tolist()
    return [
        (int(batch.doc_ids[s]), int(batch.seg_start[s]), cu[s + 1] - cu[s])
        for s in range(batch.n_real_segments)
    ]


def ref_states(state) -> list[dict]:
    """Every buffered-document state inside a (nested) state."""
    out = []
    if isinstance(state, dict):
        if "doc_ids" in state and "lens" in state:
            return [state]
        for v in state.values():
            out += ref_states(v)
    elif isinstance(state, list):
        for v in state:
            out += ref_states(v)
    return out


def assert_each_document_once(delivered: list[tuple[int, int, int]], cfg) -> None:
    want = doc_lengths(cfg)
    seen: dict[int, int] = {}
    for doc_id, _start, n in delivered:
        seen[doc_id] = seen.get(doc_id, 0) + n
    lost = sorted(set(want) - set(seen))
    dup = sorted(d for d, n in seen.items() if n > want.get(d, 0))
    assert not lost and not dup, f"{len(lost)} documents lost, {len(dup)} duplicated"
    assert seen == want


# ------------------------------------------------------------------------------------------ by reference
def test_state_is_by_reference_and_bounded_whatever_the_lengths(tmp_path):
    for long in (False, True):
        rng = np.random.default_rng(1)
        n = 300 if long else 2000
        size = (20_000, 40_000) if long else (10, 200)
        rows = ["".join(rng.choice(list("abcd"), int(rng.integers(*size)))) for _ in range(n)]
        (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
        cfg = {
            "sources": [str(tmp_path / "a.jsonl")],
            "stage": {"type": "pack", "capacity": 4096, "pad_to": 4096, "buffer_docs": 64},
            "shuffle": {"seed": 1, "buffer_docs": 100},
        }
        loader = build_loader(cfg)
        it = iter(loader)
        for _ in range(10):
            next(it)
        state = loader.state_dict()
        refs = ref_states(state)
        assert refs and all(is_refs(r) for r in refs)  # never tokens
        buffered = sum(len(r["doc_ids"]) for r in refs) + cfg.get("tokenize_batch", 256)
        buf = io.BytesIO()
        torch.save(state["workers"][0], buf)
        assert len(buf.getvalue()) <= 64 * 1024 + 64 * buffered, (long, len(buf.getvalue()), buffered)


def test_token_format_states_still_load(tmp_path):
    """A state whose buffers hold tokens (written before references) resumes identically."""
    cfg = make_corpus(tmp_path)
    loader = build_loader(cfg)
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = copy.deepcopy(loader.state_dict())
    ref = [b.input_ids.clone() for b in it]
    chain = loader.dataset.chain(0)  # a chain of the same consumer, to re-read the references

    def to_tokens(value):
        if isinstance(value, dict):
            if is_refs(value):
                return documents_to_state(documents_from_state(value, chain.refetch))
            return {k: to_tokens(v) for k, v in value.items()}
        if isinstance(value, list):
            return [to_tokens(v) for v in value]
        return value

    old = to_tokens(state)
    assert not any(is_refs(r) for r in ref_states(old)) and any(len(r["tokens"]) for r in ref_states(old))
    resumed = build_loader(cfg)
    resumed.load_state_dict(old)
    got = [b.input_ids for b in resumed]
    assert len(got) == len(ref) and all(torch.equal(a, b) for a, b in zip(got, ref))


@pytest.mark.parametrize("num_workers", [1, 4])
def test_exact_resume_with_one_and_four_workers(tmp_path, num_workers):
    """0 and 2 workers: tests/test_loader.py::test_resume_at_random_points_is_token_identical."""
    cfg = make_corpus(tmp_path, 60, 30)
    ref, states = [], {}
    loader = build_loader(cfg, num_workers=num_workers)
    for i, b in enumerate(loader):
        ref.append(b.input_ids.clone())
        if i + 1 in (1, 3, 7):
            states[i + 1] = copy.deepcopy(loader.state_dict())
    assert len(ref) > 8
    for p, state in states.items():
        buf = io.BytesIO()  # worker states (rebuilt from the wire) save and load like any state
        torch.save(state, buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
        resumed = build_loader(cfg, num_workers=num_workers)
        resumed.load_state_dict(state)
        rest = [b.input_ids for b in resumed]
        assert len(rest) == len(ref) - p and all(torch.equal(a, b) for a, b in zip(rest, ref[p:])), p


def test_zero_and_one_worker_states_are_interchangeable(tmp_path):
    cfg = make_corpus(tmp_path, 60, 30)
    loader = build_loader(cfg, num_workers=0)
    it = iter(loader)
    for _ in range(4):
        next(it)
    state = copy.deepcopy(loader.state_dict())
    ref = [b.input_ids.clone() for b in it]
    resumed = build_loader(cfg, num_workers=1)
    resumed.load_state_dict(state)
    rest = [b.input_ids for b in resumed]
    assert len(rest) == len(ref) and all(torch.equal(a, b) for a, b in zip(rest, ref))


# ------------------------------------------------------------------------------------------ elastic
def run_old(cfg, world: int, workers: int, steps: list[int]):
    """Each old rank delivers ``steps[rank]`` batches, then checkpoints; returns (delivered, states)."""
    delivered, states = [], []
    for r in range(world):
        loader = build_loader(cfg, rank=r, world_size=world, num_workers=workers)
        it = iter(loader)
        for _ in range(steps[r]):
            delivered += segments(next(it))
        states.append(copy.deepcopy(loader.state_dict()))
        del it
    return delivered, states


@pytest.mark.parametrize(("old", "new", "steps"), [((3, 2), (2, 1), [2, 5, 0]), ((2, 1), (4, 0), [4, 1])])
def test_elastic_resume_delivers_each_document_once(tmp_path, old, new, steps):
    cfg = make_corpus(tmp_path)
    delivered, states = run_old(cfg, *old, steps)
    assert delivered
    buf = io.BytesIO()  # the states survive torch.save / torch.load(weights_only=True)
    torch.save(states, buf)
    buf.seek(0)
    states = torch.load(buf, weights_only=True)
    for r in range(new[0]):
        loader = build_loader(cfg, rank=r, world_size=new[0], num_workers=new[1])
        loader.load_state_dict(states)
        for b in loader:
            delivered += segments(b)
    assert_each_document_once(delivered, cfg)


def test_a_ranks_own_state_resumes_token_identically(tmp_path):
    """Same topology: a rank's own state is the token-identical path (a list of every rank's state
    is always the elastic re-partition, exactly-once but reshuffled)."""
    cfg = make_corpus(tmp_path, 60, 30)
    loader = build_loader(cfg, rank=1, world_size=2)
    it = iter(loader)
    next(it)
    state = copy.deepcopy(loader.state_dict())
    ref = [b.input_ids.clone() for b in it]
    resumed = build_loader(cfg, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b.input_ids) for a, b in zip(ref, resumed))


def test_unloadable_states_are_value_errors(tmp_path):
    cfg = make_corpus(tmp_path, 30, 10)
    _, states = run_old(cfg, 2, 0, [1, 1])
    target = build_loader(cfg, rank=0, world_size=3)
    with pytest.raises(ValueError, match="every old rank 0..1 exactly once, got ranks \\[0\\]"):
        target.load_state_dict(states[:1])
    with pytest.raises(ValueError, match="different epochs"):
        target.load_state_dict([states[0], {**states[1], "epoch": 1}])
    with pytest.raises(ValueError, match="not a version-2 loader state"):
        target.load_state_dict([states[0], {"epoch": 0}])
    with pytest.raises(ValueError, match="pass the list of EVERY old rank's state"):
        target.load_state_dict(states[0])
    with pytest.raises(ValueError, match="not a loader state"):
        target.load_state_dict({"workers": []})
    bad = copy.deepcopy(states[0])
    bad["next_worker"] = 3
    with pytest.raises(ValueError, match="next_worker=3"):
        build_loader(cfg, rank=0, world_size=2).load_state_dict(bad)


@pytest.mark.parametrize("stage", ["decompose", "bucket", "seqlen", "chunkflow"])
def test_every_document_stage_saves_references(tmp_path, stage):
    """Their exact resume through references: tests/test_loader_stages.py (random points, 0/2 workers)."""
    from tests.test_loader_stages import stage_config

    loader = build_loader(stage_config(tmp_path, stage))
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = copy.deepcopy(loader.state_dict())
    refs = ref_states(state)
    assert refs and all(is_refs(r) for r in refs) and sum(len(r["doc_ids"]) for r in refs) > 0
    ref = [b for b in it]
    resumed = build_loader(stage_config(tmp_path, stage))
    resumed.load_state_dict(state)
    got = list(resumed)
    assert len(got) == len(ref)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(got, ref) if hasattr(a, "input_ids"))


def test_workers_sending_states_rarely_resume_exactly(tmp_path, monkeypatch):
    """Workers send their state every few batches (seqpack.pipeline.SNAPSHOT_RATIO); here only with
    their first batch, so every checkpoint is batches behind: exact and elastic resume remake them."""
    monkeypatch.setattr(pipeline, "SNAPSHOT_RATIO", 1e12)
    cfg = make_corpus(tmp_path, 60, 30)
    ref, states = [], {}
    loader = build_loader(cfg, num_workers=2)
    for i, b in enumerate(loader):
        ref.append(b.input_ids.clone())
        if i + 1 in (4, 9):
            states[i + 1] = copy.deepcopy(loader.state_dict())
    assert all(max(s["skip"]) > 0 for s in states.values())
    for p, state in states.items():
        resumed = build_loader(cfg, num_workers=2)
        resumed.load_state_dict(state)
        rest = [b.input_ids for b in resumed]
        assert len(rest) == len(ref) - p and all(torch.equal(a, b) for a, b in zip(rest, ref[p:])), p
    delivered, old = run_old(cfg, 2, 2, [3, 6])
    assert all(max(s["skip"]) > 0 for s in old)
    for r in range(3):
        new = build_loader(cfg, rank=r, world_size=3)
        new.load_state_dict(old)
        for b in new:
            delivered += segments(b)
    assert_each_document_once(delivered, cfg)


def test_references_rebuild_pieces_and_name_changed_documents():
    from seqpack.refs import documents_refs, fetch_pieces
    from seqpack.sources.records import Document

    full = {
        7: Document(7, np.arange(10), np.arange(10) % 2 == 0, "a", np.array([0, 4, 8]), 3),
        9: Document(9, np.arange(5) + 100, None, "b"),
    }
    pieces = [
        Document(7, full[7].tokens[4:9], full[7].loss_mask[4:9], "a", np.array([0, 4]), 3, start=4),
        full[9],
        Document(9, full[9].tokens[1:3], None, "b", start=1),
    ]
    state = documents_refs(pieces)
    assert set(state) == {"refs", "doc_ids", "starts", "lens", "flags"}  # no tokens
    got = fetch_pieces(state, lambda ids: [full[i] for i in ids])
    for a, b in zip(got, pieces):
        assert (a.doc_id, a.start, a.source, a.group) == (b.doc_id, b.start, b.source, b.group)
        np.testing.assert_array_equal(a.tokens, b.tokens)
        assert (a.loss_mask is None) == (b.loss_mask is None)
        if a.loss_mask is not None:
            np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
        if b.turn_starts is not None:
            np.testing.assert_array_equal(a.turn_starts, b.turn_starts)
    shorter = {7: Document(7, np.arange(6)), 9: full[9]}
    with pytest.raises(ValueError, match=r"buffered document 7 \(piece \[4, 9\)\) has 6 tokens"):
        fetch_pieces(state, lambda ids: [shorter[i] for i in ids])
    with pytest.raises(ValueError, match="cannot re-read documents"):
        fetch_pieces(state, None)
