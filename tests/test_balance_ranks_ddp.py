"""``balance:`` under real torch.distributed (gloo, 3 local processes).

In the main process (``num_workers=0``) ranks agree on each window's steps by an ``all_gather`` of
counts and costs; in DataLoader workers (no process group there) from counts taken from length
indexes. Either way: equal step counts (a DDP step per micro-batch never hangs), every document
exactly once, each rank reading only its own records, and steps whose ranks carry similar costs.
"""

from __future__ import annotations

import datetime
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_balance_ranks import config, records_read, step_waste, write_shards

from seqpack.loader import build_loader
from seqpack.pipeline import build_chain
from seqpack.plan.balance import CostModel

WORLD = 3
COST = CostModel(a=1.0, b=0.01)
SECTION = {"a": 1.0, "b": 0.01}  # window_steps: 16 (default)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, glob: str, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Embedding(300, 4))
        result = {}
        for workers in (0, 2):
            cfg = dict(config(glob, SECTION), even_batches="allreduce")
            loader = build_loader(cfg, num_workers=workers)  # rank and world size from the process group
            costs, docs = [], []
            for batch in loader:
                model(batch.input_ids).sum().backward()  # a gradient all-reduce per micro-batch
                costs.append(COST.varlen_cost(batch))
                n = batch.n_real_segments
                docs += [[int(d), int(s)] for d, s in zip(batch.doc_ids[:n], batch.seg_start[:n])]
            result[workers] = {
                "costs": costs,
                "docs": docs,
                "records": records_read(loader),
                "counted": loader.steps_per_epoch(epoch=0),
                "stats": {k: v for k, v in loader.stats().items() if k.startswith("balance/")},
            }
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _plain_rank(glob: str, rank: int, workers: int) -> tuple[list, int]:
    """Rank ``rank``'s batches without ``balance:`` (its workers' chains run here, interleaved as the
    DataLoader does: round robin, a finished worker dropped) and the records they read."""
    dataset = build_loader(config(glob), rank=rank, world_size=WORLD, num_workers=workers).dataset
    chains = []
    for w in range(max(workers, 1)):
        chain = build_chain(dataset.cfg, dataset.context(rank, w, 0))
        chain.reset(None)
        chains.append(chain)
    batches, live = [], list(chains)
    while live:
        for chain in list(live):
            try:
                batches.append(next(chain))
            except StopIteration:
                live.remove(chain)
    records = sum(
        v for c in chains for k, v in c.stats().items() if k.startswith("read/") and k.endswith("/records")
    )
    return batches, records


def test_gloo_balance_equal_steps_own_records_balanced_costs(tmp_path):
    glob = write_shards(tmp_path, sizes=(60,) * 6, seed=4)
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_rank, args=(_free_port(), glob, str(out)), nprocs=WORLD, join=True)
    res = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for workers in ("0", "2"):
        runs = [r[workers] for r in res]
        plain_batches, plain_records = zip(*(_plain_rank(glob, r, int(workers)) for r in range(WORLD)))
        steps = {len(r["costs"]) for r in runs}
        assert len(steps) == 1 and steps == {runs[0]["counted"]}  # equal, and as counted
        pieces = sorted(tuple(p) for r in runs for p in r["docs"])
        plain_pieces = sorted(
            (int(d), int(s))
            for o in plain_batches
            for b in o
            for d, s in zip(b.doc_ids[: b.n_real_segments], b.seg_start[: b.n_real_segments])
        )
        # every piece of every document exactly once: the same pieces as without balance:
        assert pieces == plain_pieces and len(set(pieces)) == len(pieces)
        assert len({d for d, _ in pieces}) == 6 * 60
        # each rank read exactly the records it reads without balance:
        assert [r["records"] for r in runs] == list(plain_records)
        costs = np.array([r["costs"] for r in runs])  # [world, steps]
        n = min(len(o) for o in plain_batches)
        plain_costs = np.array([[COST.varlen_cost(b) for b in o[:n]] for o in plain_batches])
        assert step_waste(costs) < 0.5 * step_waste(plain_costs), (
            workers,
            step_waste(costs),
            step_waste(plain_costs),
        )
        if workers == "0":  # the all_gather exchange knows every rank's costs: its counters say the same
            for r in runs:
                assert r["stats"]["balance/steps"] == costs.shape[1]
                assert r["stats"]["balance/cost_max"] == pytest.approx(costs.max(0).sum())
                assert r["stats"]["balance/cost_mean"] == pytest.approx(costs.mean(0).sum())
