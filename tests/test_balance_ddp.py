"""Rank balancing and CP sharding under real torch.distributed (gloo, 4 local processes).

Every rank builds the same global plan, keeps its balanced share, and trains a tiny DDP model one
micro-batch at a time: a rank with one step fewer would hang the all-reduce, so finishing at all is
part of the test. The all-reduced ``num_loss_tokens`` must equal the global count, for 4-way data
parallelism and for 2 (DP) x 2 (CP) ranks sharded with ``shard_for_cp``.
"""

from __future__ import annotations

import socket

import numpy as np
import torch
import torch.multiprocessing as mp

from seqpack import IGNORE_INDEX, pack
from seqpack.plan.balance import num_steps, split_ranks
from seqpack.stages.balance import balance_batches
from seqpack.stages.pack_offline import batches_from_plan

WORLD = 4
CAPACITY = 128
PER_RANK = 2
VOCAB = 97


def _global_stream():
    rng = np.random.default_rng(5)
    lengths = np.clip(rng.lognormal(np.log(30), 1.0, 250), 2, 300).astype(np.int64)
    docs = [rng.integers(1, VOCAB, n) for n in lengths]
    plan = pack(lengths, CAPACITY, seed=1)
    return list(batches_from_plan(plan, docs, pad_to=CAPACITY)), int(lengths.sum())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        batches, n_tokens = _global_stream()
        global_loss_tokens = sum(b.num_loss_tokens for b in batches)

        # 4-way data parallel: balanced micro-batches, a DDP step every PER_RANK micro-batches
        mine = list(balance_batches(batches, WORLD, rank, 1.0, 0.01, micro_batches_per_rank=PER_RANK))
        model = DistributedDataParallel(
            torch.nn.Sequential(torch.nn.Embedding(VOCAB, 8), torch.nn.Linear(8, VOCAB))
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        steps = 0
        for i in range(0, len(mine), PER_RANK):
            micro = mine[i : i + PER_RANK]
            # loss normalized by the global target count of the step, summed over ranks
            count = torch.tensor([sum(b.num_loss_tokens for b in micro)])
            dist.all_reduce(count)
            for b in micro:
                logits = model(b.input_ids)
                loss = torch.nn.functional.cross_entropy(
                    logits, b.shift_labels, ignore_index=IGNORE_INDEX, reduction="sum"
                )
                (loss * WORLD / count.clamp(min=1)).backward()  # DDP averages over ranks
            opt.step()
            opt.zero_grad()
            steps += 1
        got = torch.tensor(
            [steps, sum(b.num_loss_tokens for b in mine), sum(b.num_real_tokens for b in mine)]
        )
        gathered = [torch.zeros_like(got) for _ in range(WORLD)]
        dist.all_gather(gathered, got)
        assert all(int(g[0]) == num_steps(len(batches), WORLD, PER_RANK) for g in gathered), gathered
        assert sum(int(g[1]) for g in gathered) == global_loss_tokens
        assert sum(int(g[2]) for g in gathered) == n_tokens  # every token on exactly one rank

        # 2 data-parallel groups x 2 context-parallel ranks
        dp_rank, dp_size, cp_rank = split_ranks(WORLD, 2, rank)
        cp_loss_tokens, cp_steps = 0, 0
        for b in balance_batches(batches, dp_size, dp_rank, 1.0, 0.01, micro_batches_per_rank=PER_RANK):
            shard = b.shard_for_cp(2, cp_rank)
            cp_loss_tokens += shard["num_loss_tokens"]
            cp_steps += 1
        total = torch.tensor([cp_loss_tokens])
        dist.all_reduce(total)
        assert int(total) == global_loss_tokens, (int(total), global_loss_tokens)
        n = torch.tensor([cp_steps, -cp_steps])
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        assert int(n[0]) == -int(n[1]) == cp_steps  # all four ranks ran the same micro-batch count
        dist.barrier()  # tear down together: gloo aborts a rank whose peer left first
    finally:
        dist.destroy_process_group()


def test_four_rank_gloo_balance_and_cp():
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=True)
