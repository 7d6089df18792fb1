"""PackMIL inside real loaders: DataLoader workers, torchdata StatefulDataLoader resume, and
torch.distributed (gloo, 2 processes) with DDP training steps that never hang."""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from seqpack.mil import InMemoryBags, LabelTable, PackMIL, mil_stage_from_config


def _source(n=23, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 700, n).tolist()
    return InMemoryBags([rng.standard_normal((k, 4)).astype(np.float32) for k in lengths])


def _stage(src, **kw):
    lab = LabelTable(list(src.slide_ids), np.arange(len(src)) % 2, ["a", "b"], False)
    kw.setdefault("capacity", 400)
    kw.setdefault("max_instances", 200)
    return PackMIL(src, lab, **kw)


def _key(b):
    return (tuple(b.slide_ids.tolist()), tuple(b.instance_idx.tolist()))


def test_dataloader_workers_cover_the_epoch_once():
    src = _source()
    single = [_key(b) for b in _stage(src)]
    got = list(DataLoader(_stage(src), batch_size=None, num_workers=2))
    real = [_key(b) for b in got if b.loss_scale]
    assert sorted(real) == sorted(single)
    assert len(got) % 2 == 0  # each worker yields the same number of batches


def test_stateful_dataloader_resume_matches_uninterrupted():
    src = _source()
    kw = dict(num_epochs=2)
    full = [_key(b) for b in StatefulDataLoader(_stage(src, **kw), batch_size=None, num_workers=2)]
    loader = StatefulDataLoader(_stage(src, **kw), batch_size=None, num_workers=2)
    head = []
    for b in loader:
        head.append(_key(b))
        if len(head) == 5:
            state = loader.state_dict()
            break
    resumed = StatefulDataLoader(_stage(src, **kw), batch_size=None, num_workers=2)
    resumed.load_state_dict(state)
    tail = [_key(b) for b in resumed]
    assert head + tail == full


def _ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist
    from seqpack.ops.mil import ABMIL

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    stage = _stage(_source(n=31), seed=3)  # rank and world size come from torch.distributed
    model = torch.nn.parallel.DistributedDataParallel(ABMIL(4, 2, hidden=8, attn_dim=4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps, keys = 0, []
    for b in stage:
        logits = model(b.features, b.bag_ids, b.n_bags)
        loss = torch.nn.functional.cross_entropy(logits, b.labels, reduction="sum") * b.loss_scale
        opt.zero_grad()
        loss.backward()  # all-reduce: a rank with fewer steps would hang here
        opt.step()
        steps += 1
        if b.loss_scale:
            keys.append([b.slide_ids.tolist(), b.instance_idx.tolist()])
    gathered = [None] * world
    dist.all_gather_object(gathered, {"steps": steps, "keys": keys, "rank": stage.rank})
    w = torch.cat([p.detach().flatten() for p in model.parameters()])
    ws = [torch.zeros_like(w) for _ in range(world)]
    dist.all_gather(ws, w)
    if rank == 0:
        same = all(torch.equal(ws[0], x) for x in ws)
        with open(out, "w") as f:
            json.dump({"ranks": gathered, "weights_in_sync": same}, f)
    dist.barrier()  # gloo aborts a rank whose peer tears down while it is still in a collective
    dist.destroy_process_group()


def test_torch_distributed_gloo_equal_steps_and_partition(tmp_path):
    out = tmp_path / "out.json"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    res = json.loads(out.read_text())
    ranks = res["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["steps"] == ranks[1]["steps"] > 0
    assert res["weights_in_sync"]
    single = sorted(_key(b) for b in _stage(_source(n=31), seed=3, rank=0, world_size=1))
    both = sorted((tuple(s), tuple(i)) for r in ranks for s, i in r["keys"])
    assert both == single


def test_stage_from_yaml_config(tmp_path):
    import pytest
    import yaml

    rng = np.random.default_rng(0)
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    rows = ["slide_id,label"]
    for i in range(9):
        np.save(
            tmp_path / ("a" if i < 5 else "b") / f"s{i}.npy",
            rng.standard_normal((20 + 37 * i, 4)).astype(np.float16),
        )
        rows.append(f"s{i},{'tumor' if i % 2 else 'normal'}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    text = f"""
sources: [{{path: {tmp_path / "a"}}}, {{path: {tmp_path / "b"}}}]
labels: {{path: {tmp_path / "labels.csv"}}}
stage: {{type: mil, capacity: 128, packs_per_batch: 2, main_fraction: 0.4, algorithm: bfd}}
shuffle: {{seed: 7}}
"""
    cfg = yaml.safe_load(text)
    stage = PackMIL.from_config(cfg, rank=0, world_size=1)
    assert stage.seed == 7 and len(stage.source) == 9 and stage.labels.classes == ["normal", "tumor"]
    batches = list(stage)
    assert sum(b.n_bags for b in batches) == 9
    assert all(b.features.dtype == torch.float32 and b.features.shape[0] == 256 for b in batches)
    cfg["stage"]["pack_length"] = 5
    with pytest.raises(ValueError, match=r"stage.pack_length: unknown key \(allowed: .*capacity"):
        mil_stage_from_config(cfg)
