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
