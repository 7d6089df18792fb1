"""Data-parallel cost balancing: per-step max/mean rank cost for round-robin, sorted, LPT and KK.

Setup (simulated ranks, no processes): documents are packed once with ``seqpack.pack`` (BFD,
capacity 16384, split overflow, seeded bin order = the training stream). The stream is cut into
optimizer steps of ``world_size * micro_batches_per_rank`` micro-batches; each step's micro-batches
are assigned to ranks by each method with equal counts per rank. The cost of a micro-batch is
``a*sum(l) + b*sum(l^2)`` with the dense-transformer FLOP ratio ``b/a = 1/(12*4096)`` (a 7B-like
hidden size; attention is 1/3 of the linear cost for a 16K document). Imbalance of a step is
``max(rank cost) / mean(rank cost)``; the table gives the mean over full steps (the last, partial
step is padded with empty micro-batches and reported separately in the JSON).

Corpora: the byte lengths of every ``.py`` file of the local Python install (stdlib and
site-packages), and 1M SFT-like lognormal lengths (median 350, sigma 1.2, clipped [8, 16384], seed 0).

    python benchmarks/balance.py           # 8..1024 ranks, both corpora
    python benchmarks/balance.py --quick   # 100K SFT-like docs, 8..64 ranks
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from corpora import python_source_lengths, sft_like_lengths
from report import markdown_table, result_stem, write_results
from seqpack.ops import balance as kernels

from seqpack import pack
from seqpack.plan.balance import CostModel, assign_ranks

METHODS = ("round_robin", "sorted", "lpt", "kk")
CAPACITY = 16384
HIDDEN = 4096


def step_imbalances(costs: np.ndarray, world: int, per_rank: int, method: str) -> tuple[np.ndarray, float]:
    """Imbalance of every full step, and of the padded last step (nan when the stream divides)."""
    step = world * per_rank
    full = len(costs) // step
    out = np.array(
        [
            assign_ranks(costs[s * step : (s + 1) * step], world, method=method, per_rank=per_rank).imbalance
            for s in range(full)
        ]
    )
    tail = costs[full * step :]
    last = (
        assign_ranks(tail, world, method=method, per_rank=per_rank).imbalance if len(tail) else float("nan")
    )
    return out, last


def step_lower_bound(costs: np.ndarray, world: int, per_rank: int) -> float:
    """Mean over full steps of a simple lower bound on max/mean: some rank holds the heaviest
    micro-batch plus at least ``per_rank - 1`` others (at best the lightest ones)."""
    step = world * per_rank
    out = []
    for s in range(len(costs) // step):
        x = np.sort(costs[s * step : (s + 1) * step])
        out.append(max(1.0, (x[-1] + x[: per_rank - 1].sum()) / (x.sum() / world)))
    return float(np.mean(out)) if out else float("nan")


def assignment_speed(n: int = 1_000_000, world: int = 64) -> dict:
    """Seconds to assign ``n`` document costs to ``world`` ranks (equal counts), kernels warm."""
    kernels.warmup()
    costs = CostModel.transformer(HIDDEN).document_costs(sft_like_lengths(n))
    out = {}
    for method in ("lpt", "kk", "best"):
        t0 = time.perf_counter()
        got = assign_ranks(costs, world, method=method)
        out[method] = {"seconds": time.perf_counter() - t0, "imbalance": got.imbalance}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100K SFT-like docs, 8..64 ranks")
    ap.add_argument("--micro-batches-per-rank", type=int, default=4, help="gradient accumulation steps")
    args = ap.parse_args()
    per_rank = args.micro_batches_per_rank
    worlds = [8, 16, 32, 64] if args.quick else [8, 16, 32, 64, 128, 256, 512, 1024]
    corpora = {"sft_like_1M": sft_like_lengths(100_000 if args.quick else 1_000_000)}
    if not args.quick:
        corpora["python_source_bytes"] = python_source_lengths("bytes")
    cost = CostModel.transformer(HIDDEN)
    kernels.warmup()

    rows = []
    bounds = {}
    for name, lengths in corpora.items():
        plan = pack(lengths, CAPACITY, algorithm="bfd", seed=0)
        costs = cost.plan_costs(plan)
        print(f"{name}: {len(lengths)} docs, {int(lengths.sum())} tokens, {plan.n_bins} micro-batches")
        for world in worlds:
            bounds[(name, world)] = step_lower_bound(costs, world, per_rank)
            for method in METHODS:
                t0 = time.perf_counter()
                imb, last = step_imbalances(costs, world, per_rank, method)
                rows.append(
                    {
                        "corpus": name,
                        "world_size": world,
                        "method": method,
                        "steps": len(imb),
                        "mean_imbalance": float(imb.mean()) if len(imb) else float("nan"),
                        "worst_step": float(imb.max()) if len(imb) else float("nan"),
                        "last_partial_step": last,
                        "seconds": time.perf_counter() - t0,
                    }
                )

    speed = assignment_speed(200_000 if args.quick else 1_000_000)
    cells = []
    for name in corpora:
        for world in worlds:
            sel = {r["method"]: r for r in rows if r["corpus"] == name and r["world_size"] == world}
            cells.append(
                [name, world, sel[METHODS[0]]["steps"]]
                + [f"{sel[m]['mean_imbalance']:.4f} ({sel[m]['worst_step']:.3f})" for m in METHODS]
                + [f"{bounds[(name, world)]:.4f}"]
            )
    n_speed = 200_000 if args.quick else 1_000_000
    lines = [
        f"Per-step max/mean rank cost (mean over full steps; worst step in parentheses); "
        f"{per_rank} micro-batches of {CAPACITY} tokens per rank per step, cost l + l^2/(12*{HIDDEN}).",
        "",
        markdown_table(
            ["corpus", "ranks", "steps", *METHODS, "lower bound"],
            cells,
            align=["---", "---:", "---:"] + ["---:"] * (len(METHODS) + 1),
        ),
        f"Assigning {n_speed} document costs to 64 ranks (equal counts):",
        "",
    ]
    lines += [f"- {m}: {v['seconds']:.2f} s, imbalance {v['imbalance']:.6f}" for m, v in speed.items()]
    table = "\n".join(lines)
    print(table)

    stem = result_stem("balance", args.quick)
    meta = {"capacity": CAPACITY, "hidden": HIDDEN, "micro_batches_per_rank": per_rank, "cost": vars(cost)}
    written = write_results(
        stem,
        table + "\n",
        {
            "meta": meta,
            "rows": rows,
            "lower_bound": [{"corpus": c, "world_size": w, "bound": b} for (c, w), b in bounds.items()],
            "assign_speed": speed,
        },
    )
    plot(rows, list(corpora), worlds, written.with_suffix(".png"))


def plot(rows, corpora, worlds, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(corpora), figsize=(6 * len(corpora), 4.2), squeeze=False)
    for ax, name in zip(axes[0], corpora):
        for method in METHODS:
            ys = [
                next(
                    r["mean_imbalance"]
                    for r in rows
                    if r["corpus"] == name and r["world_size"] == w and r["method"] == method
                )
                for w in worlds
            ]
            ax.plot(worlds, ys, marker="o", label=method)
        ax.axhline(1.05, color="gray", ls="--", lw=1, label="1.05 target")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("data-parallel ranks")
        ax.set_ylabel("max / mean rank cost per step")
        ax.set_title(name)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
