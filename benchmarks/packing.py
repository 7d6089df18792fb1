"""Packing planners side by side: seqpack (bfd, ffd, greedy, online) vs TRL ``pack_dataset``, naive
padding and greedy concatenation, on the Python-source corpus and 1M SFT-like lengths.

Prints a markdown table and writes ``benchmarks/results/packing.{md,json}``.

    python benchmarks/packing.py            # full run (TRL included when installed)
    python benchmarks/packing.py --quick    # 100K SFT-like docs, byte lengths, no TRL
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
from corpora import python_source_lengths, sft_like_lengths
from report import markdown_table, result_stem, write_results
from seqpack.ops import packing as kernels

from seqpack import pack

CAPACITIES = (2048, 4096, 8192)


def row(method, name, capacity, n_docs, seconds, fill, lost, bins, cross_doc=False):
    return {
        "dataset": name,
        "capacity": capacity,
        "method": method,
        "fill": fill,
        "tokens_lost": int(lost),
        "rows": int(bins),
        "seconds": seconds,
        "docs_per_s": n_docs / seconds if seconds > 0 else float("inf"),
        "cross_document_attention": cross_doc,
    }


def bench_seqpack(lengths, name, capacity, repeats):
    out = []
    for algorithm in ("bfd", "ffd", "greedy", "online"):
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            plan = pack(lengths, capacity, algorithm=algorithm, buffer_docs=10_000)
            best = min(best, time.perf_counter() - t0)
        plan.validate(lengths)
        lost = plan.dropped_tokens + plan.truncated_tokens
        out.append(
            row(f"seqpack {algorithm}", name, capacity, len(lengths), best, plan.fill, lost, plan.n_bins)
        )
    return out


def bench_baselines(lengths, name, capacity):
    total = int(lengths.sum())
    kept = np.minimum(lengths, capacity)
    n = len(lengths)
    return [
        # one document per row, padded to capacity, longer ones truncated
        row("naive padding", name, capacity, n, 0.0, kept.sum() / (n * capacity), total - kept.sum(), n),
        # concatenate everything and cut rows of capacity: full rows, but attention crosses documents
        row(
            "greedy concat",
            name,
            capacity,
            n,
            0.0,
            total / (-(-total // capacity) * capacity),
            0,
            -(-total // capacity),
            cross_doc=True,
        ),
    ]


def trl_dataset(lengths):
    """A datasets.Dataset with an ``input_ids`` list<int32> column of the given lengths (zeros).

    Zero-length documents are left out: TRL 1.16 ``pack_dataset`` crashes (pyarrow ``array_take``
    on a null-typed index list) on a map batch whose rows are all empty, which the Python-source
    corpus has (runs of empty ``__init__.py``). They hold no tokens, so fill and loss are unchanged.
    """
    import datasets
    import pyarrow as pa

    datasets.disable_progress_bars()
    lengths = lengths[lengths > 0]

    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = pa.array(np.zeros(int(offsets[-1]), np.int32))
    col = pa.LargeListArray.from_arrays(pa.array(offsets), values).cast(pa.list_(pa.int32()))
    return datasets.Dataset(pa.table({"input_ids": col}))


def bench_trl(lengths, name, capacity, dataset):
    from trl import pack_dataset

    out = []
    total = int(lengths.sum())
    for strategy in ("bfd", "bfd_split"):
        t0 = time.perf_counter()
        packed = pack_dataset(dataset, capacity, strategy=strategy, map_kwargs={"keep_in_memory": True})
        seconds = time.perf_counter() - t0
        seq_lengths = packed.data.column("seq_lengths").combine_chunks()
        kept = int(np.asarray(seq_lengths.flatten()).sum())
        rows = len(packed)
        out.append(
            row(
                f"TRL {strategy}",
                name,
                capacity,
                len(lengths),
                seconds,
                kept / (rows * capacity),
                total - kept,
                rows,
            )
        )
    return out


def to_markdown(rows):
    return markdown_table(
        ["dataset", "capacity", "method", "fill %", "tokens lost", "rows", "plan s", "docs/s", "cross-doc"],
        (
            [
                r["dataset"],
                r["capacity"],
                r["method"],
                f"{100 * r['fill']:.3f}",
                f"{r['tokens_lost']:,}",
                f"{r['rows']:,}",
                f"{r['seconds']:.3f}",
                f"{r['docs_per_s']:,.0f}",
                "yes" if r["cross_document_attention"] else "no",
            ]
            for r in rows
        ),
        align=["---", "---:", "---", "---:", "---:", "---:", "---:", "---:", "---"],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes, byte lengths, no TRL")
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    jit_seconds = kernels.warmup()
    datasets_ = {
        "sft_like_1M": sft_like_lengths(100_000 if args.quick else 1_000_000),
        "python_source": python_source_lengths("bytes" if args.quick else "bpe"),
    }
    use_trl = not (args.quick or args.no_trl)
    if use_trl:
        try:
            import trl  # noqa: F401
        except ImportError:
            print("TRL not installed (pip install '.[bench]'): skipping the TRL columns")
            use_trl = False
    rows = []
    for name, lengths in datasets_.items():
        print(f"{name}: {len(lengths):,} docs, {int(lengths.sum()):,} tokens, max {int(lengths.max()):,}")
        dataset = trl_dataset(lengths) if use_trl else None
        for capacity in CAPACITIES:
            rows += bench_seqpack(lengths, name, capacity, args.repeats)
            rows += bench_baselines(lengths, name, capacity)
            if use_trl:
                rows += bench_trl(lengths, name, capacity, dataset)
        del dataset

    ratios = {}
    for r in rows:
        if r["method"] == "seqpack bfd":
            peer = next(
                (
                    p
                    for p in rows
                    if p["method"] == "TRL bfd_split"
                    and p["dataset"] == r["dataset"]
                    and p["capacity"] == r["capacity"]
                ),
                None,
            )
            if peer:
                ratios[f"{r['dataset']}@{r['capacity']}"] = peer["seconds"] / r["seconds"]
    table = to_markdown(rows)
    summary = f"numba first-call JIT/cache load: {jit_seconds:.2f}s (paid once, outside the timings)\n"
    if ratios:
        summary += (
            "seqpack bfd speed-up over TRL bfd_split: "
            + ", ".join(f"{k} {v:.0f}x" for k, v in ratios.items())
            + "\n"
        )
    print(table)
    print(summary)
    meta = {
        "machine": platform.platform(),
        "python": platform.python_version(),
        "jit_seconds": jit_seconds,
        "speedup_vs_trl_bfd_split": ratios,
    }
    write_results(result_stem("packing", args.quick), table + "\n" + summary, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
