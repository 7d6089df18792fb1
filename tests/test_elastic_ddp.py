"""Elastic resume under real torch.distributed (gloo): 3 ranks x 2 workers checkpoint mid-epoch,
2 ranks x 1 worker load every old rank's state and finish the epoch; each document exactly once."""

from __future__ import annotations

import datetime
import json
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from seqpack import build_loader
from tests.test_loader_state import assert_each_document_once, make_corpus, segments


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _old(rank: int, world: int, port: int, cfg: dict, out: str, steps: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        loader = build_loader(cfg, num_workers=2)  # rank / world size from torch.distributed
        it = iter(loader)
        delivered = []
        for _ in range(steps):
            delivered += segments(next(it))
        torch.save(loader.state_dict(), os.path.join(out, f"state{rank}.pt"))
        with open(os.path.join(out, f"old{rank}.json"), "w") as f:
            json.dump(delivered, f)
        del it
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _new(rank: int, world: int, port: int, cfg: dict, out: str, old_world: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        loader = build_loader(cfg, num_workers=1)
        states = [torch.load(os.path.join(out, f"state{r}.pt"), weights_only=True) for r in range(old_world)]
        loader.load_state_dict(states)
        delivered, steps = [], 0
        for batch in loader:  # allreduce: ranks that run out pad, so both take the same steps
            delivered += segments(batch)
            steps += 1
        with open(os.path.join(out, f"new{rank}.json"), "w") as f:
            json.dump({"docs": delivered, "steps": steps}, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_gloo_elastic_3x2_to_2x1(tmp_path):
    cfg = make_corpus(tmp_path, 90, 40)
    cfg.pop("even_batches")  # the default under torch.distributed: allreduce
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_old, args=(3, _free_port(), cfg, str(out), 2), nprocs=3, join=True)
    mp.spawn(_new, args=(2, _free_port(), cfg, str(out), 3), nprocs=2, join=True)
    delivered = []
    for r in range(3):
        delivered += [tuple(x) for x in json.loads((out / f"old{r}.json").read_text())]
    assert delivered
    res = [json.loads((out / f"new{r}.json").read_text()) for r in range(2)]
    assert res[0]["steps"] == res[1]["steps"] > 0
    for r in res:
        delivered += [tuple(x) for x in r["docs"]]
    assert_each_document_once(delivered, cfg)
