"""The one buffered-documents state format (seqpack.arena) and the pack stage's token arena."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from seqpack.arena import Arena, Pieces, documents_from_state, documents_to_state
from seqpack.node import SequenceNode
from seqpack.sources.blocks import DocBlock
from seqpack.sources.records import Document
from seqpack.stages.pack import PackStage


def make_docs(seed: int, n: int = 40) -> list[Document]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        length = int(rng.integers(0, 90))
        mask = rng.random(length) < 0.6 if i % 3 == 0 else None
        turns = None
        if i % 4 == 0:
            turns = np.sort(rng.choice(max(length, 1), size=min(3, length), replace=False))
        group = int(rng.integers(0, 5)) if i % 5 == 0 else None
        start = int(rng.integers(0, 500)) if i % 2 else 0
        tokens = rng.integers(0, 30000, length)
        docs.append(Document(1000 + i, tokens, mask, f"src{i % 2}", turns, group, start))
    return docs


def same_documents(a: list[Document], b: list[Document]) -> bool:
    def key(d: Document):
        turns = None if d.turn_starts is None else np.asarray(d.turn_starts).tolist()
        mask = None if d.loss_mask is None else np.asarray(d.loss_mask).tolist()
        return (d.doc_id, np.asarray(d.tokens).tolist(), mask, d.source, turns, d.group, d.start)

    return [key(d) for d in a] == [key(d) for d in b]


@pytest.mark.parametrize("seed", range(4))
def test_documents_round_trip_through_a_weights_only_checkpoint(seed):
    docs = make_docs(seed)
    buf = io.BytesIO()
    torch.save(documents_to_state(docs), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert same_documents(documents_from_state(state), docs)
    assert state["tokens"].dtype == torch.int64 and int(state["lens"].sum()) == len(state["tokens"])


def test_optional_keys_are_left_out_when_unused():
    docs = [Document(1, np.arange(5)), Document(2, np.arange(3))]
    assert sorted(documents_to_state(docs)) == ["doc_ids", "has_mask", "lens", "mask", "tokens"]
    assert same_documents(documents_from_state(documents_to_state([])), [])
    # a state written with every source name (the format before names became optional) still reads
    state = {**documents_to_state(docs), "sources": ["", ""]}
    assert same_documents(documents_from_state(state), docs)


def test_arena_pieces_are_documents_with_starts():
    """The arena's state is the documents format: a piece reads back as a Document with its offset."""
    values = np.arange(100, 160, dtype=np.int32)
    block = DocBlock(np.array([7, 8]), np.array([0, 30]), np.array([30, 30]), values)
    arena = Arena()
    pieces = (np.array([0, 1]), np.array([10, 0]), np.array([5, 4]))  # (document, offset, length)
    keys = arena.refill(np.zeros(0, np.int64), [block], [pieces])
    assert keys.tolist() == [0, 1]
    tokens = np.empty(9, np.int64)
    assert arena.gather(*arena.rows(keys)[:2], tokens) is None
    assert tokens.tolist() == [110, 111, 112, 113, 114, 130, 131, 132, 133]
    docs = documents_from_state(arena.state_dict(keys))
    assert [(d.doc_id, d.start, d.tokens.tolist()) for d in docs] == [
        (7, 10, [110, 111, 112, 113, 114]),
        (8, 0, [130, 131, 132, 133]),
    ]
    again = Arena.from_state(arena.state_dict(keys[::-1]))
    assert again.next_key == 2 and again.rows(np.array([0]))[2].tolist() == [8]


def old_pack_format(pieces: dict) -> dict:
    """The pack stage's ``pieces`` as written before the one format (``seg_start``, one ``has_mask``)."""
    p = Pieces.from_state(pieces)
    return {
        "lens": torch.from_numpy(p.lens),
        "doc_ids": torch.from_numpy(p.doc_ids),
        "seg_start": torch.from_numpy(p.starts),
        "tokens": torch.from_numpy(p.tokens),
        "has_mask": bool(p.has_mask.any()),
        "mask": torch.from_numpy(p.mask if p.mask is not None else np.zeros(0, bool)),
    }


@pytest.mark.parametrize("algorithm", ["online", "bfd"])
def test_pack_stage_resumes_from_the_earlier_state_format(algorithm):
    docs = make_docs(7, n=120)
    stage = lambda: PackStage(SequenceNode(docs), 64, algorithm=algorithm, buffer_docs=10)  # noqa: E731
    full = stage()
    ref = [(b.input_ids.tolist(), b.labels.tolist(), b.seg_start.tolist()) for b in full]
    for cut in (1, 6, len(ref) // 2):
        first = stage()
        head = [next(first) for _ in range(cut)]
        state = first.state_dict()
        state["pieces"] = old_pack_format(state["pieces"])
        second = stage()
        second.load_state_dict(state)
        got = [(b.input_ids.tolist(), b.labels.tolist(), b.seg_start.tolist()) for b in head + list(second)]
        assert got == ref


@pytest.mark.parametrize("seed", range(6))
def test_arena_keeps_carried_pieces_exactly_over_many_fills(seed):
    """Carried pieces stay in place (same block values, or ``first``'s spare room) or are compacted;
    whichever, every piece reads back its own tokens and mask at every fill."""
    rng = np.random.default_rng(seed)
    arena, live = Arena(), {}  # key -> (tokens, mask)
    values = mask = None
    for fill in range(40):
        if values is None or rng.random() < 0.3:  # a new row group (sometimes with a loss mask)
            values = rng.integers(0, 30000, 5000).astype(np.int32)
            mask = rng.random(5000) < 0.5 if (seed % 2 and fill > 10) else None
        n = int(rng.integers(1, 8))
        starts = rng.integers(0, 4000, n)
        lengths = rng.integers(1, 900, n)
        block = DocBlock(np.arange(n) + 100 * fill, starts, lengths, values, mask)
        offs = np.array([int(rng.integers(0, ln)) for ln in lengths])
        pieces = (np.arange(n), offs, lengths - offs)
        # carry a random part of what is live (the packer emits the rest)
        carried = np.array(sorted(k for k in live if rng.random() < 0.7), np.int64)
        live = {int(k): live[int(k)] for k in carried}
        keys = arena.refill(carried, [block], [pieces])
        for i, k in enumerate(keys):
            a, b = int(starts[i] + offs[i]), int(starts[i] + lengths[i])
            live[int(k)] = (values[a:b].astype(np.int64), None if mask is None else mask[a:b].copy())
        every = np.array(sorted(live), np.int64)
        src, length, _, _ = arena.rows(every)
        tokens = np.empty(int(length.sum()), np.int64)
        got_mask = arena.gather(src, length, tokens)
        want = np.concatenate([live[int(k)][0] for k in every])
        assert np.array_equal(tokens, want), fill
        if got_mask is not None:
            want_mask = np.concatenate(
                [np.ones(len(t), bool) if m is None else m for t, m in (live[int(k)] for k in every)]
            )
            assert np.array_equal(got_mask, want_mask), fill
