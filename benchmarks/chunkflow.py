"""ChunkFlow: chunk counts and fill on realistic length distributions, and peak activation memory vs
the longest document for a tiny model (memory must track the chunk size C and K, not the longest
document).

Part 1, planning only (no model), per global batch of ``--global-tokens`` tokens (consecutive
documents), three ways to run the same documents:

- pad to max: one sequence per document, padded to the global batch's longest document;
- packing: ``seqpack.pack`` (bfd) into sequences of capacity = the global batch's longest document
  (the only capacity that keeps every document whole);
- ChunkFlow(C): ``plan_chunks`` -- chains of dependent chunks + bfd-packed standalone chunks of C.

Forward passes, fill (real / processed tokens), padding tokens, and tokens per forward pass (the
activation-memory driver). Datasets: the 1M SFT-like lengths (``corpora.sft_like_lengths``:
lognormal median 350, sigma 1.2, clip [8, 16384], seed 0) and a long-tail set (20K documents,
lognormal median 1,500, sigma 1.6, clip [64, 262144], seed 0; max 256K).

Part 2, memory: one document of L tokens (8K..128K) plus 8 short ones, a tiny ``TinyChunkedLM``
(d_model 32, 2 layers, 2 query heads / 1 KV head of dim 16, vocab 64, fp32), one ChunkFlow step
(forward + backward of every chunk) at fixed C and K. Memory is counted by a ``TorchDispatchMode``
that adds the bytes of every tensor storage an op creates and subtracts them when the storage is
freed (weakref), sampled after every op, forward and backward -- so it sees activations, autograd
saved tensors, gradients and temporaries, but not the allocator's slack. (``tracemalloc`` does not
see torch's C++ allocations, and the CPU profiler gives per-op totals, not a timeline.) Reported:
peak total, the state store at that moment (K/V + dK/dV of earlier chunks: O(L) by design, paper's
"+ the sequence's K/V"), and peak activation memory = max over time of (total - state store). Runs
on CPU with real compute for L <= ``--cpu-max`` and on the ``meta`` device (same ops, same shapes,
no arithmetic) for all L; the two agree where both run. Full-sequence training of the same batch
(meta only: its L x L attention does not fit) is the comparison.

    python benchmarks/chunkflow.py           # full
    python benchmarks/chunkflow.py --quick   # 100K SFT docs, L up to 16K, CPU at 4K, no C/K sweep
"""

from __future__ import annotations

import argparse
import platform
import time
import weakref
from dataclasses import replace
from functools import partial

import numpy as np
import torch
from corpora import sft_like_lengths
from report import markdown_table, result_stem, write_results
from seqpack.ops.chunked import TinyChunkedLM
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from seqpack import IGNORE_INDEX, VarlenBatch, build_chunks, pack, plan_chunks
from seqpack.train.chunkflow import ChunkFlowExecutor

MiB = 1 << 20


def long_tail_lengths(n: int = 20_000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(1500), 1.6, n), 64, 262_144).astype(np.int64)


# ============================================================================ part 1: planning
def global_batches(lengths: np.ndarray, global_tokens: int) -> list[np.ndarray]:
    """Consecutive documents until each batch holds at least ``global_tokens`` tokens."""
    ends = np.searchsorted(
        np.cumsum(lengths), np.arange(global_tokens, lengths.sum() + global_tokens, global_tokens)
    )
    ends = np.unique(np.minimum(ends + 1, len(lengths)))
    return np.split(lengths, ends[:-1])


def plan_rows(name: str, lengths: np.ndarray, capacities, global_tokens: int) -> list[dict]:
    batches = global_batches(lengths, global_tokens)
    real = int(lengths.sum())
    agg = {"pad to max": [0, 0, 0], "packing (bfd, capacity = batch max)": [0, 0, 0]}
    t0 = time.perf_counter()
    for b in batches:
        m = int(b.max())
        agg["pad to max"][0] += len(b)
        agg["pad to max"][1] += len(b) * m
        agg["pad to max"][2] = max(agg["pad to max"][2], m)
        p = pack(b, m, algorithm="bfd")
        agg["packing (bfd, capacity = batch max)"][0] += p.n_bins
        agg["packing (bfd, capacity = batch max)"][1] += p.n_bins * m
        agg["packing (bfd, capacity = batch max)"][2] = max(agg["packing (bfd, capacity = batch max)"][2], m)
    base_seconds = time.perf_counter() - t0
    rows = []
    for method, (passes, processed, per_pass) in agg.items():
        rows.append(_plan_row(name, method, len(batches), passes, processed, real, per_pass, base_seconds))
    for C in capacities:
        t0 = time.perf_counter()
        passes = chains = dependent = 0
        max_chain = 0
        for b in batches:
            plan = plan_chunks(b, C)
            passes += plan.n_chunks
            chains += plan.n_chains
            dependent += plan.n_dependent_chunks
            max_chain = max(max_chain, plan.max_chain_len)
        secs = time.perf_counter() - t0
        row = _plan_row(name, f"ChunkFlow C={C}", len(batches), passes, passes * C, real, C, secs)
        row.update(chains=chains, dependent_chunks=dependent, max_chain_len=max_chain)
        rows.append(row)
    return rows


def _plan_row(dataset, method, n_batches, passes, processed, real, per_pass, seconds) -> dict:
    return {
        "dataset": dataset,
        "method": method,
        "global_batches": n_batches,
        "forward_passes": int(passes),
        "tokens_per_pass": int(per_pass),
        "fill": real / processed,
        "padding_tokens": int(processed - real),
        "plan_seconds": seconds,
    }


def plan_markdown(rows: list[dict]) -> str:
    columns = [
        "dataset", "method", "forward passes", "tokens / pass (max)", "fill %", "padding tokens", "chains",
        "dependent chunks", "longest chain", "plan s",
    ]  # fmt: skip
    return markdown_table(
        columns,
        (
            [
                r["dataset"],
                r["method"],
                f"{r['forward_passes']:,}",
                f"{r['tokens_per_pass']:,}",
                f"{100 * r['fill']:.2f}",
                f"{r['padding_tokens']:,}",
                r.get("chains", ""),
                r.get("dependent_chunks", ""),
                r.get("max_chain_len", ""),
                f"{r['plan_seconds']:.2f}",
            ]
            for r in rows
        ),
    )


# ============================================================================ part 2: memory
class StorageMemory(TorchDispatchMode):
    """Live bytes of tensor storages created by ops while active; peak total and peak minus state."""

    def __init__(self, state_bytes=lambda: 0):
        super().__init__()
        self._seen = WeakIdKeyDictionary()
        self._state_bytes = state_bytes
        self.current = self.peak = self.peak_activation = self.state_at_peak = 0

    def _freed(self, nbytes: int, _ref) -> None:
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st not in self._seen:
                    n = st.nbytes()
                    self._seen[st] = weakref.ref(st, partial(self._freed, n))
                    self.current += n
        state = self._state_bytes()
        if self.current > self.peak:
            self.peak, self.state_at_peak = self.current, state
        self.peak_activation = max(self.peak_activation, self.current - state)
        return out


MODEL = {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64}


def memory_docs(L: int, seed: int = 0, n_short: int = 8, short_len: int = 500) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, MODEL["vocab_size"], L)] + [
        rng.integers(0, MODEL["vocab_size"], short_len) for _ in range(n_short)
    ]


def _on(chunk, device):
    b = chunk.batch
    # cu_seqlens stays on the host: chunk_attention reads segment bounds as Python ints
    b = replace(b, input_ids=b.input_ids.to(device), position_ids=b.position_ids.to(device))
    return replace(chunk, batch=b, shift_labels=chunk.shift_labels.to(device))


def measure_chunkflow(L: int, C: int, K: int, device: str) -> dict:
    torch.manual_seed(0)
    model = TinyChunkedLM(**MODEL, attn_backend="blockwise").to(device)
    chunks = [_on(c, device) for c in build_chunks(memory_docs(L), C)]
    ex = ChunkFlowExecutor(model, chunks)
    max_state = [0]

    def state():
        max_state[0] = max(max_state[0], ex.state_bytes)
        return ex.state_bytes

    tracker = StorageMemory(state)
    t0 = time.perf_counter()
    with tracker:
        res = ex.step(K)
    return {
        "mode": "chunkflow",
        "device": device,
        "L": L,
        "C": C,
        "K": K,
        "chunks": len(chunks),
        "recomputed": res.recomputed_chunks,
        "peak_MiB": tracker.peak / MiB,
        "state_at_peak_MiB": tracker.state_at_peak / MiB,
        "max_state_MiB": max_state[0] / MiB,
        "peak_activation_MiB": tracker.peak_activation / MiB,
        "seconds": time.perf_counter() - t0,
        "loss": res.loss,
    }


def measure_full_sequence(L: int, device: str = "meta") -> dict:
    torch.manual_seed(0)
    model = TinyChunkedLM(**MODEL, attn_backend="blockwise").to(device)
    full = VarlenBatch.from_segments(memory_docs(L), np.arange(9))
    tracker = StorageMemory()
    t0 = time.perf_counter()
    with tracker:
        logits, _ = model(
            full.input_ids.to(device), full.position_ids.to(device), full.cu_seqlens, full.max_seqlen
        )
        loss = torch.nn.functional.cross_entropy(
            logits, full.shift_labels.to(device), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        loss.backward()
    return {
        "mode": "full sequence",
        "device": device,
        "L": L,
        "peak_MiB": tracker.peak / MiB,
        "peak_activation_MiB": tracker.peak_activation / MiB,
        "seconds": time.perf_counter() - t0,
    }


def memory_markdown(rows: list[dict]) -> str:
    columns = [
        "mode", "device", "longest doc L", "C", "K", "chunks", "recomputed", "peak MiB",
        "state store at peak MiB", "peak activation MiB", "s",
    ]  # fmt: skip
    return markdown_table(
        columns,
        (
            [
                r["mode"],
                r["device"],
                f"{r['L']:,}",
                r.get("C", ""),
                r.get("K", ""),
                r.get("chunks", ""),
                r.get("recomputed", ""),
                f"{r['peak_MiB']:.1f}",
                f"{r.get('state_at_peak_MiB', 0):.1f}",
                f"{r['peak_activation_MiB']:.1f}",
                f"{r['seconds']:.1f}",
            ]
            for r in rows
        ),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke test")
    ap.add_argument(
        "--capacity", "--chunk-size", type=int, default=2048, help="C (tokens per chunk) for the memory sweep"
    )
    ap.add_argument("--cpu-max", type=int, default=None, help="longest L run on CPU with real compute")
    ap.add_argument("--global-tokens", type=int, default=2_000_000)
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny tensors; a shared machine

    lengths_max = [4096, 8192, 16384] if args.quick else [8192, 16384, 32768, 65536, 131072]
    cpu_max = args.cpu_max if args.cpu_max is not None else (4096 if args.quick else 8192)
    C = args.capacity

    # ---- part 1
    sft = sft_like_lengths(100_000 if args.quick else 1_000_000)
    tail = long_tail_lengths(2_000 if args.quick else 20_000)
    plan = []
    for name, lengths, sizes, gt in (
        ("sft_like_1M" if not args.quick else "sft_like_100K", sft, (2048, 4096, 8192), args.global_tokens),
        ("long_tail_256K", tail, (8192, 16384, 32768), 4 * args.global_tokens),
    ):
        print(f"{name}: {len(lengths):,} docs, {int(lengths.sum()):,} tokens, max {int(lengths.max()):,}")
        plan += plan_rows(name, lengths, sizes, gt)
    plan_md = plan_markdown(plan)
    print(plan_md)

    # ---- part 2
    mem = []
    for L in lengths_max:
        for K in (1, 2):
            for device in ("meta", "cpu") if L <= cpu_max else ("meta",):
                r = measure_chunkflow(L, C, K, device)
                mem.append(r)
                print(
                    f"L={L:>7,} C={C} K={K} {device:4s}: peak {r['peak_MiB']:7.1f} MiB, "
                    f"state {r['state_at_peak_MiB']:5.1f} MiB, "
                    f"activation {r['peak_activation_MiB']:6.1f} MiB ({r['seconds']:.1f}s)"
                )
        mem.append(measure_full_sequence(L))
    if not args.quick:  # memory follows C and K
        sweep_L = lengths_max[2]
        for c in (C // 2, C * 2):
            for K in (1, 2, 4):
                mem.append(measure_chunkflow(sweep_L, c, K, "meta"))
        mem.append(measure_chunkflow(sweep_L, C, 4, "meta"))
    mem_md = memory_markdown(mem)
    print(mem_md)

    flat = {}
    for K in (1, 2):
        act = {
            r["L"]: r["peak_activation_MiB"]
            for r in mem
            if r["mode"] == "chunkflow" and r["device"] == "meta" and r["K"] == K and r["C"] == C
        }
        lo, hi = act[lengths_max[0]], act[lengths_max[-1]]
        flat[f"K={K}"] = {
            "L_min": lengths_max[0],
            "L_max": lengths_max[-1],
            "activation_MiB": [lo, hi],
            "ratio": hi / lo,
            "within_10pct": abs(hi / lo - 1) <= 0.10,
        }
    agree = []
    for r in mem:
        if r["mode"] == "chunkflow" and r["device"] == "cpu":
            m = next(
                x
                for x in mem
                if x["mode"] == "chunkflow"
                and x["device"] == "meta"
                and x["L"] == r["L"]
                and x["K"] == r["K"]
                and x["C"] == r["C"]
            )
            agree.append(
                {"L": r["L"], "K": r["K"], "cpu_peak_MiB": r["peak_MiB"], "meta_peak_MiB": m["peak_MiB"]}
            )
    full = {r["L"]: r["peak_MiB"] for r in mem if r["mode"] == "full sequence"}
    summary = (
        f"Peak activation memory at C={C}, L {lengths_max[0]:,} -> {lengths_max[-1]:,}: "
        + ", ".join(
            f"{k}: {v['activation_MiB'][0]:.1f} -> {v['activation_MiB'][1]:.1f} MiB (x{v['ratio']:.3f})"
            for k, v in flat.items()
        )
        + f". Full-sequence training of the same batch: {full[lengths_max[0]]:,.0f} -> "
        + f"{full[lengths_max[-1]]:,.0f} MiB.\n"
        + "CPU (real compute) vs meta peak: "
        + ", ".join(
            f"L={a['L']:,} K={a['K']}: {a['cpu_peak_MiB']:.2f} vs {a['meta_peak_MiB']:.2f} MiB" for a in agree
        )
        + "\n"
    )
    print(summary)

    meta = {
        "machine": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "model": MODEL,
        "global_tokens": args.global_tokens,
        "long_tail_global_tokens": 4 * args.global_tokens,
    }
    write_results(
        result_stem("chunkflow", args.quick),
        "## Chunk counts and fill\n\n"
        + plan_md
        + "\n## Peak memory, one ChunkFlow step (tiny model)\n\n"
        + mem_md
        + "\n"
        + summary,
        {"meta": meta, "planning": plan, "memory": mem, "flatness": flat, "cpu_vs_meta": agree},
    )


if __name__ == "__main__":
    main()
