"""Dataset decomposition under real torch.distributed (gloo): ranks agree on every step's bucket."""

from __future__ import annotations

import numpy as np
import torch

from seqpack.curriculum import BucketCurriculum
from seqpack.stages.decompose import DecomposedDataset


def corpus(n, median, seed=0, vocab=1000, hi=3000):
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(median), 1.2, n), 1, hi).astype(np.int64)
    return [rng.integers(1, vocab, int(n_)) for n_ in lengths]


def _pieces_of(batches):
    return [(int(d), int(s), int(n)) for b in batches for d, s, n in zip(b.doc_ids, b.seg_start, b.seqlens)]


def _rank_dataset(rank, world):
    return DecomposedDataset(
        corpus(300, median=200),
        tokens_per_step=1024,
        min_log2=4,
        max_log2=8,
        seed=11,
        rank=rank,
        world_size=world,
        curriculum=BucketCurriculum("grow_p2", n_cycles=2),
    )


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ds = _rank_dataset(rank, world)
        steps = 0
        for batch in ds:
            # what a DDP step needs: every rank has a batch of the same bucket and the same target count
            info = torch.tensor([ds.bucket_history[-1], batch.num_loss_tokens, int(batch.seqlens[0])])
            gathered = [torch.zeros_like(info) for _ in range(world)]
            dist.all_gather(gathered, info)
            assert all(torch.equal(g, gathered[0]) for g in gathered), gathered
            loss_tokens = torch.tensor([batch.num_loss_tokens])
            dist.all_reduce(loss_tokens)
            assert int(loss_tokens) == world * 1024
            steps += 1
        n = torch.tensor([steps])
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        assert int(n) == steps == len(ds)
        torch.save(_pieces_of(list(_rank_dataset(rank, world))), f"{out_dir}/{rank}.pt")
        dist.barrier()  # tear down together: gloo aborts a rank whose peer left first
    finally:
        dist.destroy_process_group()


def test_gloo_ranks_agree_on_every_step(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    a, b = torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")
    assert a and b and not set(a) & set(b)  # disjoint pieces across ranks
