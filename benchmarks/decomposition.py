"""Dataset decomposition vs concat-and-chunk vs bin-packing with document masks, at context 8192.

On the 1M SFT-like lengths and the Python-source corpus, per method:
attention cost per step (sum of l^2 over the step's attended sequences, ``tokens_per_step`` tokens
per step), padding, tokens dropped/left over (counted, never silent), and the average context
length ``sum l(l-1)/2 / sum l``. Methods:

- ``concat-and-chunk 8192``: documents concatenated and cut into rows of 8192; every row attends
  across document boundaries (the usual baseline, zero padding).
- ``bin-pack bfd 8192 + doc masks``: ``seqpack.pack`` best-fit decreasing, overflow split, attention
  restricted to each document piece.
- ``length buckets (pad)``: power-of-two boundaries 256..8192, every document padded to its bucket's
  boundary (padded compute counted).
- ``DD 2^8..2^13`` (paper setting) and ``DD 2^3..2^13`` (keeps short SFT documents): one bucket per
  step, ``b_i = tokens_per_step / 2^i`` sequences of input length ``2^i``.

Prints a markdown table, writes ``benchmarks/results/decomposition{_quick}.{md,json,png}``.

    python benchmarks/decomposition.py           # full: 1M SFT-like + Python source (BPE tokens)
    python benchmarks/decomposition.py --quick   # 100K SFT-like + Python source (cached lengths)
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
from corpora import RESULTS, python_source_lengths, sft_like_lengths
from report import markdown_table, result_stem, write_results

from seqpack import decompose_lengths, pack
from seqpack.plan import expand_overflow
from seqpack.plan.decompose import bucket_of

CONTEXT = 8192
TOKENS_PER_STEP = 64 * CONTEXT  # a 0.5M-token global batch


def _avg_context(seq_lens: np.ndarray, weights: np.ndarray | None = None) -> float:
    lens = seq_lens.astype(np.float64)
    w = np.ones_like(lens) if weights is None else weights.astype(np.float64)
    return float((w * lens * (lens - 1) / 2).sum() / (w * lens).sum())


def concat_and_chunk(lengths: np.ndarray) -> dict:
    total = int(lengths.sum())
    rows = -(-total // CONTEXT)
    pad = rows * CONTEXT - total  # only the last row
    steps = rows * CONTEXT / TOKENS_PER_STEP
    return {
        "method": f"concat-and-chunk {CONTEXT}",
        "steps": steps,
        "attn_cost_per_step": float(rows) * CONTEXT**2 / steps,
        "padding_fraction": pad / (rows * CONTEXT),
        "dropped_fraction": 0.0,
        "avg_context_length": _avg_context(np.array([CONTEXT])),
        "cross_document_attention": True,
        "unaccounted_tokens": 0,
        "seconds": 0.0,
        "_seq_hist": (np.array([CONTEXT]), np.array([total], np.float64)),
    }


def binpack(lengths: np.ndarray) -> dict:
    t0 = time.perf_counter()
    plan = pack(lengths, CONTEXT, algorithm="bfd", overflow="split")
    sec = time.perf_counter() - t0
    plan.validate(lengths)
    seg = plan.seg_len.astype(np.float64)
    steps = plan.n_bins * CONTEXT / TOKENS_PER_STEP
    return {
        "method": f"bin-pack bfd {CONTEXT} + doc masks",
        "steps": steps,
        "attn_cost_per_step": float((seg**2).sum()) / steps,
        "padding_fraction": 1.0 - plan.fill,
        "dropped_fraction": (plan.dropped_tokens + plan.truncated_tokens) / plan.input_tokens,
        "avg_context_length": _avg_context(plan.seg_len),
        "cross_document_attention": False,
        "unaccounted_tokens": int(
            plan.input_tokens - plan.packed_tokens - plan.dropped_tokens - plan.truncated_tokens
        ),
        "seconds": sec,
        "_seq_hist": (plan.seg_len, plan.seg_len.astype(np.float64)),
    }


def bucket_pad(lengths: np.ndarray) -> dict:
    bounds = [2**k for k in range(8, 14)]
    doc, start, item_len, _ = expand_overflow(lengths, CONTEXT, "split")
    padded_len = np.asarray(bounds, np.int64)[bucket_of(item_len, bounds)]
    padded = int(padded_len.sum())
    steps = padded / TOKENS_PER_STEP
    return {
        "method": "length buckets 2^8..2^13 (pad)",
        "steps": steps,
        "attn_cost_per_step": float((padded_len.astype(np.float64) ** 2).sum()) / steps,
        "padding_fraction": (padded - int(item_len.sum())) / padded,
        "dropped_fraction": 0.0,
        "avg_context_length": _avg_context(item_len),
        "cross_document_attention": False,
        "unaccounted_tokens": int(lengths.sum() - item_len.sum()),
        "seconds": 0.0,
        "_seq_hist": (item_len, item_len.astype(np.float64)),
    }


def dataset_decomposition(lengths: np.ndarray, min_log2: int, max_log2: int = 13) -> dict:
    t0 = time.perf_counter()
    dec = decompose_lengths(lengths, min_log2=min_log2, max_log2=max_log2, seed=0)
    sec = time.perf_counter() - t0
    dec.validate(lengths)
    log2s = np.arange(min_log2, max_log2 + 1)
    pieces = dec.bucket_pieces()
    per_step = TOKENS_PER_STEP >> log2s  # b_i
    full = pieces // per_step  # steps each bucket supplies
    emitted = int((full * per_step * ((1 << log2s) + 1)).sum())
    leftover = int(((pieces - full * per_step) * ((1 << log2s) + 1)).sum())
    unaccounted = dec.input_tokens - emitted - leftover - dec.dropped_tokens
    steps = int(full.sum())
    cost = float((full * TOKENS_PER_STEP * (2.0**log2s)).sum())  # a step of bucket i costs b_i * (2^i)^2
    return {
        "method": f"DD 2^{min_log2}..2^{max_log2}",
        "steps": steps,
        "attn_cost_per_step": cost / steps,
        "padding_fraction": 0.0,
        "dropped_fraction": dec.dropped_tokens / dec.input_tokens,
        "leftover_fraction": leftover / dec.input_tokens,
        "avg_context_length": _avg_context(2.0**log2s, full * per_step),
        "cross_document_attention": False,
        "unaccounted_tokens": int(unaccounted),
        "seconds": sec,
        "bucket_steps": {f"D{k}": int(s) for k, s in zip(log2s, full)},
        "_seq_hist": (2**log2s, (full * per_step * (2**log2s)).astype(np.float64)),
    }


def run_corpus(name: str, lengths: np.ndarray) -> list[dict]:
    rows = [concat_and_chunk(lengths), binpack(lengths), bucket_pad(lengths)]
    rows += [dataset_decomposition(lengths, 8), dataset_decomposition(lengths, 3)]
    base = rows[0]["attn_cost_per_step"]
    for r in rows:
        r["dataset"] = name
        r["attn_cost_vs_concat_chunk"] = r["attn_cost_per_step"] / base
    return rows


def markdown(rows: list[dict]) -> str:
    columns = [
        "dataset", "method", "attn cost / step (x1e9)", "vs concat-chunk", "padding", "dropped", "left over",
        "avg context", "cross-doc attn", "unaccounted", "time (s)",
    ]  # fmt: skip
    return markdown_table(
        columns,
        (
            [
                r["dataset"],
                r["method"],
                f"{r['attn_cost_per_step'] / 1e9:.2f}",
                f"{r['attn_cost_vs_concat_chunk']:.3f}",
                f"{r['padding_fraction']:.2%}",
                f"{r['dropped_fraction']:.2%}",
                f"{r.get('leftover_fraction', 0.0):.3%}",
                f"{r['avg_context_length']:.0f}",
                "yes" if r["cross_document_attention"] else "no",
                r["unaccounted_tokens"],
                f"{r['seconds']:.2f}",
            ]
            for r in rows
        ),
    )


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(2, len(datasets), figsize=(6 * len(datasets), 8), squeeze=False)
    for c, ds in enumerate(datasets):
        sub = [r for r in rows if r["dataset"] == ds]
        ax = axes[0, c]
        names = [r["method"] for r in sub]
        vals = [r["attn_cost_vs_concat_chunk"] for r in sub]
        bars = ax.barh(names, vals, color=["#999", "#4c72b0", "#dd8452", "#55a868", "#2e7d32"][: len(sub)])
        for b, r in zip(bars, sub):
            ax.text(
                b.get_width(),
                b.get_y() + b.get_height() / 2,
                f" {b.get_width():.2f} (pad {r['padding_fraction']:.1%}, drop {r['dropped_fraction']:.1%})",
                va="center",
                fontsize=8,
            )
        ax.axvline(1 / 3, ls="--", c="r", lw=1)
        ax.set_xlim(0, 1.9)
        ax.set_xlabel(f"attention cost per step / concat-and-chunk {CONTEXT}")
        ax.set_title(ds)
        ax.invert_yaxis()
        ax = axes[1, c]
        bins = 2.0 ** np.arange(0, 14.5, 0.5)
        for r in sub:
            lens, mass = r["_seq_hist"]
            ax.hist(lens, bins=bins, weights=mass / mass.sum(), histtype="step", label=r["method"], lw=1.5)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("attended sequence length (tokens)")
        ax.set_ylabel("share of tokens")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100K SFT-like documents")
    ap.add_argument("--pysrc-tokenizer", default="bpe", choices=("bpe", "bytes"))
    args = ap.parse_args()
    n = 100_000 if args.quick else 1_000_000
    corpora = {
        f"SFT-like ({n // 1000}K docs)": sft_like_lengths(n),
        f"Python source ({args.pysrc_tokenizer})": python_source_lengths(args.pysrc_tokenizer),
    }
    rows = []
    for name, lengths in corpora.items():
        rows += run_corpus(name, lengths)
    md = markdown(rows)
    print(md)
    stem = result_stem("decomposition", args.quick)
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(rows, RESULTS / f"{stem}.png")
    sft_dd = next(r for r in rows if r["dataset"].startswith("SFT") and r["method"] == "DD 2^8..2^13")
    verdict = {
        "dd_vs_concat_chunk_sft": sft_dd["attn_cost_vs_concat_chunk"],
        "target": "<= 1/3",
        "met": sft_dd["attn_cost_vs_concat_chunk"] <= 1 / 3,
        "unaccounted_tokens_all": sum(r["unaccounted_tokens"] for r in rows),
    }
    print(
        f"DD 2^8..2^13 vs concat-and-chunk on SFT-like: {verdict['dd_vs_concat_chunk_sft']:.3f} "
        f"(target <= 0.333, met={verdict['met']}); unaccounted tokens: {verdict['unaccounted_tokens_all']}"
    )
    out = {
        "context": CONTEXT,
        "tokens_per_step": TOKENS_PER_STEP,
        "machine": platform.platform(),
        "verdict": verdict,
        "rows": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
    }
    write_results(stem, md, out, indent=2)


if __name__ == "__main__":
    main()
