"""The loader's ``balance:`` section: equal counts, nothing lost, lower step imbalance, exact resume."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from seqpack.checks import ConfigError
from seqpack.loader import build_loader
from seqpack.plan.balance import CostModel

WORLD, PER_RANK, CAPACITY = 2, 3, 96


def _config(tmp_path, balance):
    rng = np.random.default_rng(0)
    path = tmp_path / "docs.jsonl"
    with path.open("w") as f:
        for i in range(160):
            n = int(np.clip(rng.lognormal(np.log(25), 1.0), 2, 200))
            f.write(
                json.dumps({"text": "".join(chr(97 + int(c)) for c in rng.integers(0, 26, n)), "id": i})
                + "\n"
            )
    cfg = {
        "sources": [{"path": str(path), "format": "jsonl"}],
        "tokenizer": "byte",
        "stage": {
            "type": "pack",
            "capacity": CAPACITY,
            "algorithm": "bfd",
            "buffer_docs": 40,
            "pad_to": CAPACITY,
        },
        "even_batches": "precount",
    }
    if balance is not None:
        cfg["balance"] = balance
    return cfg


def _pieces(batches):
    return sorted(
        (int(d), int(s), int(n))
        for b in batches
        for d, s, n in zip(b.doc_ids[: b.n_real_segments], b.seg_start, b.seqlens[: b.n_real_segments])
    )


def test_balance_section_equal_counts_nothing_lost_and_better_steps(tmp_path):
    section = {"world_size": WORLD, "a": 1.0, "b": 0.05, "micro_batches_per_rank": PER_RANK}
    balanced = [
        list(build_loader(_config(tmp_path, section), rank=r, world_size=WORLD)) for r in range(WORLD)
    ]
    plain = [list(build_loader(_config(tmp_path, None), rank=r, world_size=WORLD)) for r in range(WORLD)]
    assert len(balanced[0]) == len(balanced[1]) and len(balanced[0]) % PER_RANK == 0
    # same pieces of the same documents, each exactly once, with or without balancing
    assert _pieces(balanced[0] + balanced[1]) == _pieces(plain[0] + plain[1])
    assert sum(b.num_loss_tokens for o in balanced for b in o) == sum(
        b.num_loss_tokens for o in plain for b in o
    )

    cost = CostModel(a=1.0, b=0.05)

    def step_costs(rank_lists):
        n = min(len(o) for o in rank_lists) // PER_RANK * PER_RANK
        c = np.array([[cost.varlen_cost(b) for b in o[:n]] for o in rank_lists])
        return c.reshape(WORLD, -1, PER_RANK).sum(2)  # [world, steps]

    bal, pl = step_costs(balanced), step_costs(plain)
    # over the whole run, the slowest rank's time per step (what a synchronous step waits for)
    assert bal.max(0).sum() < pl.max(0).sum()


def test_balance_section_resumes_exactly(tmp_path):
    cfg = _config(tmp_path, {"world_size": WORLD, "b": 0.05, "micro_batches_per_rank": PER_RANK})
    full = list(build_loader(cfg, rank=1, world_size=WORLD))
    loader = build_loader(cfg, rank=1, world_size=WORLD)
    it = iter(loader)
    head = [next(it) for _ in range(4)]  # stops inside a step (4 % 3 != 0)
    state = loader.state_dict()
    again = build_loader(cfg, rank=1, world_size=WORLD)
    again.load_state_dict(state)
    tail = list(again)
    assert _pieces(head + tail) == _pieces(full)
    assert [b.doc_ids.tolist() for b in head + tail] == [b.doc_ids.tolist() for b in full]


@pytest.mark.parametrize(
    "section,match",
    [
        ({"world_size": 3}, "balance.world_size: 3 but the loader runs with world_size=2"),
        ({"world_size": 0}, "balance.world_size: must be >= 1"),
        ({"a": -1.0}, "balance.a: must be >= 0"),
        ({"b": float("inf")}, "balance.b: must be finite"),
        ({"c": "x"}, "balance.c: expected a number"),
        ({"method": "magic"}, "balance.method: must be"),
        ({"micro_batches_per_rank": 0}, "balance.micro_batches_per_rank: must be >= 1"),
        ({"wrld_size": 2}, "balance.wrld_size: unknown key"),
    ],
)
def test_balance_section_errors(tmp_path, section, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        list(build_loader(_config(tmp_path, section), rank=0, world_size=WORLD))


def test_balance_state_holds_only_this_ranks_chain_and_no_batches(tmp_path):
    cfg = _config(tmp_path, {"world_size": WORLD, "b": 0.05, "micro_batches_per_rank": PER_RANK})
    full = list(build_loader(cfg, rank=0, world_size=WORLD))
    loader = build_loader(cfg, rank=0, world_size=WORLD)
    it = iter(loader)
    head = [next(it) for _ in range(5)]
    state = loader.state_dict()
    balance_states = list(_find_balance_states(state))
    # the rank's own chain state at the window's start and a position: nothing of other ranks, no batches
    assert len(balance_states) == 1 and isinstance(balance_states[0]["upstream"], dict)
    assert balance_states[0]["pos"] == 5
    again = build_loader(cfg, rank=0, world_size=WORLD)
    again.load_state_dict(state)
    assert [b.doc_ids.tolist() for b in head + list(again)] == [b.doc_ids.tolist() for b in full]


def _find_balance_states(state):
    """Every RankBalance state (a dict with "window", "pos" and "counts") inside a loader state."""
    if isinstance(state, dict):
        if "window" in state and "pos" in state and "counts" in state:
            yield state
        for v in state.values():
            yield from _find_balance_states(v)
    elif isinstance(state, (list, tuple)):
        for v in state:
            yield from _find_balance_states(v)
