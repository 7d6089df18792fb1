"""Two real gloo processes: rank sharding, equal step counts (a DDP model never hangs), no doc lost."""

from __future__ import annotations

import datetime
import json
import os
import socket

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg: dict, out_dir: str, num_workers: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        from seqpack import build_loader

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(300, 8), torch.nn.Linear(8, 300))
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        loader = build_loader(cfg, num_workers=num_workers)  # rank / world size from torch.distributed
        assert loader.even_batches == "allreduce"
        steps, docs, loss_tokens, pads = 0, [], 0, 0
        for batch in loader:
            logits = ddp(batch.input_ids)
            labels = batch.shift_labels
            # sum-reduced loss over real targets; padding batches have none but still run backward
            loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
            opt.zero_grad()
            loss.backward()  # gradient all-reduce: hangs if the ranks disagree on the step count
            opt.step()
            steps += 1
            pads += batch.n_real_segments == 0
            loss_tokens += batch.num_loss_tokens
            cu = batch.cu_seqlens.tolist()
            for s in range(batch.n_real_segments):
                docs.append([int(batch.doc_ids[s]), int(batch.seg_start[s]), cu[s + 1] - cu[s]])
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"steps": steps, "docs": docs, "pads": pads, "loss_tokens": loss_tokens}, f)
        dist.barrier()  # tear down together: gloo aborts a rank whose peer left first
    finally:
        dist.destroy_process_group()


def test_gloo_ranks_shard_docs_and_take_equal_steps(tmp_path, num_workers=2):
    """2 ranks x 2 DataLoader workers (the 0-worker path is covered in test_loader.py)."""
    rng = np.random.default_rng(1)
    # 5 files of uneven sizes: ranks get different amounts of data
    lens = []
    for f, n in enumerate([30, 3, 17, 1, 9]):
        rows = []
        for _ in range(n):
            k = int(rng.integers(1, 400))
            lens.append(k + 1)  # + EOS
            rows.append(json.dumps({"text": "".join(rng.choice(list("abcdefgh"), k))}))
        (tmp_path / f"{f}.jsonl").write_text("\n".join(rows) + "\n")
    cfg = {
        "sources": [{"path": str(tmp_path / "*.jsonl")}],
        "stage": {"type": "pack", "capacity": 256, "pad_to": 256, "buffer_docs": 8},
        "shuffle": {"seed": 3, "buffer_docs": 8},
    }
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), cfg, str(out), num_workers), nprocs=2, join=True)
    res = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert res[0]["steps"] == res[1]["steps"] > 0
    assert res[0]["pads"] + res[1]["pads"] > 0  # the data was uneven, so someone padded
    by_doc: dict[int, int] = {}
    owners: dict[int, set] = {}
    for r in range(2):
        for doc_id, _start, n in res[r]["docs"]:
            by_doc[doc_id] = by_doc.get(doc_id, 0) + n
            owners.setdefault(doc_id, set()).add(r)
    assert all(len(o) == 1 for o in owners.values())  # no document on both ranks
    assert sorted(by_doc.values()) == sorted(lens)  # every token of every document, once
    # same counts as the communication-free policy
    from seqpack import build_loader

    pre = [build_loader(cfg, rank=r, world_size=2, num_workers=num_workers) for r in range(2)]
    assert [p.steps_per_epoch() for p in pre] == [res[0]["steps"]] * 2
