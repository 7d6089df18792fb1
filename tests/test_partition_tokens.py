"""``partition: tokens``: consumers cut by exact token counts from the length index (fewer padding
steps than by bytes), every record read once, exact resume, and config checks."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from seqpack import build_loader
from seqpack.checks import ConfigError
from seqpack.sources.lengths import LengthIndex
from seqpack.sources.partition import UnitSize, split_by_lengths
from tests.test_loader_state import assert_each_document_once, make_corpus, run_old, segments


def _index(units: list[tuple[int, int, list[int], list[int]]]) -> LengthIndex:
    """An index of ``(shard, unit, raws, lengths)`` units."""
    cols = {k: [] for k in ("shard", "unit", "raw", "doc_id", "length", "group")}
    for shard, unit, raws, lens in units:
        for r, n in zip(raws, lens):
            for k, v in zip(cols, (shard, unit, r, len(cols["doc_id"]), n, -1)):
                cols[k].append(v)
    return LengthIndex(**{k: np.asarray(v, np.int64) for k, v in cols.items()})


def test_split_by_lengths_balances_tokens_and_tiles_every_unit():
    rng = np.random.default_rng(0)
    spec = []
    for shard in range(3):
        n = [400, 60, 25][shard]
        raws = np.cumsum(rng.integers(10, 500, n)) - 10  # byte offsets of lines
        spec.append((shard, 0, raws.tolist(), rng.integers(1, 900, n).tolist()))
    index = _index(spec)
    units = [UnitSize(s, 0, 1.0, 10**9) for s in range(3)]
    for n in (2, 3, 8):
        plans = split_by_lengths(units, index, n)
        tokens = []
        for plan in plans:
            t = 0
            for shard, _unit, first, stop in plan:
                raws, lens = np.asarray(spec[shard][2]), np.asarray(spec[shard][3])
                t += int(lens[(raws >= first) & ((raws < stop) if stop >= 0 else True)].sum())
            tokens.append(t)
        assert sum(tokens) == int(index.length.sum())
        assert max(tokens) - min(tokens) <= 2 * int(index.length.max())  # within a record or two
        for shard in range(3):  # the ranges of a unit tile it: 0 .. stop, stop .. stop, ... -1
            items = [it for plan in plans for it in plan if it[0] == shard]
            items.sort(key=lambda it: it[2])
            assert items[0][2] == 0 and items[-1][3] == -1
            assert all(a[3] == b[2] for a, b in zip(items, items[1:]))


def test_a_unit_without_indexed_records_goes_whole_to_one_consumer():
    index = _index([(0, 0, [0, 5, 9], [10, 10, 10]), (1, 0, [0, 3], [10, 10])])
    units = [UnitSize(0, 0, 1.0, 20), UnitSize(2, 0, 1.0, 20), UnitSize(1, 0, 1.0, 20)]
    plans = split_by_lengths(units, index, 2)
    assert sorted(it for plan in plans for it in plan if it[0] == 2) == [(2, 0, 0, -1)]


def _corpus(tmp_path) -> dict:
    rng = np.random.default_rng(1)
    for f, n in enumerate((300, 60, 60, 30, 15)):  # uneven files, uneven documents
        lines = []
        for _ in range(n):
            k = int(rng.integers(1, 6))
            word = "".join(rng.choice(list("abcdefgh"), int(rng.integers(2, 9))))
            lines.append(json.dumps({"text": " ".join([word] * int(rng.integers(5, 120)) * k)}))
        (tmp_path / f"s{f}.jsonl").write_text("\n".join(lines) + "\n")
    return {
        "sources": [{"path": str(tmp_path / "s*.jsonl")}],
        "stage": {"type": "pack", "capacity": 512, "pad_to": 512},
        "even_batches": "precount",
        "partition": "tokens",
    }


def _rank_tokens(cfg, world, workers=0):
    out = []
    for r in range(world):
        loader = build_loader(cfg, rank=r, world_size=world, num_workers=workers)
        out.append([(b.num_real_tokens, b.doc_ids[: b.n_real_segments].tolist()) for b in loader])
    return out


def test_token_partition_equalizes_ranks_and_reads_every_document_once(tmp_path):
    cfg = _corpus(tmp_path)
    by_tokens = _rank_tokens(cfg, 3)
    by_bytes = _rank_tokens({**cfg, "partition": "bytes"}, 3)
    per_rank = []
    for runs in (by_tokens, by_bytes):
        docs = {d for rank in runs for _, ids in rank for d in ids}
        assert len(docs) == 465  # every document, once (long ones in several segments)
        per_rank.append([sum(n for n, _ in rank) for rank in runs])
    assert sum(per_rank[0]) == sum(per_rank[1])
    spread = [max(t) - min(t) for t in per_rank]
    assert spread[0] <= 2 * 512 and spread[0] < spread[1], per_rank
    assert _rank_tokens(cfg, 3, workers=2)[0]  # with workers too (each worker builds or loads the index)


def test_resume_with_the_token_partition_is_exact(tmp_path):
    cfg = _corpus(tmp_path)
    loader = build_loader(cfg, rank=1, world_size=2)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = copy.deepcopy(loader.state_dict())
    ref = [b.input_ids.clone() for b in it]
    resumed = build_loader(cfg, rank=1, world_size=2)
    resumed.load_state_dict(state)
    got = [b.input_ids for b in resumed]
    assert len(got) == len(ref) and all(torch.equal(a, b) for a, b in zip(got, ref))


def test_partition_must_be_bytes_or_tokens(tmp_path):
    cfg = _corpus(tmp_path)
    with pytest.raises(ConfigError, match="partition"):
        build_loader({**cfg, "partition": "rows"})


def test_elastic_resume_with_the_token_partition_delivers_each_document_once(tmp_path):
    cfg = {**make_corpus(tmp_path), "partition": "tokens"}
    delivered, states = run_old(cfg, 2, 1, [3, 2])
    for r in range(3):
        new = build_loader(cfg, rank=r, world_size=3)
        new.load_state_dict(states)
        for b in new:
            delivered += segments(b)
    assert_each_document_once(delivered, cfg)
