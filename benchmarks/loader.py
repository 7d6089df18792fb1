"""Loader throughput and memory: seqpack vs bare tokenizers and HF datasets, same data, same run.

Rows (tokens emitted per second, wall clock and per CPU-second of this process):

- ``seqpack parquet (pre-tokenized)``: ``build_loader`` over local Parquet shards with an
  ``input_ids`` column, online packing to 8192, ``num_workers=0``. The tokenized corpus is
  repeated (``--parquet-tokens``, default 20M) so the ~10 ms of loader start-up does not dominate.
- ``HF datasets streaming + DataCollatorWithFlattening``: the same shards through
  ``load_dataset("parquet", streaming=True)``, rows gathered to 8192 tokens per batch and flattened.
- ``bare encode_batch``: ``tokenizers`` over the raw texts (batches of 256), nothing else.
- ``seqpack raw text (jsonl.zst -> BPE -> pack)``: ``build_loader`` with the same tokenizer.json.
- ``HF datasets streaming json + map(tokenize) + flattening``.

Peak RSS: a fresh process runs the pre-tokenized loader over 1x, 10x (and 100x unless
``--quick``) the data; its ``ru_maxrss`` should stay flat (streaming, bounded buffers). The files
keep one row-group size (1024 documents, ~0.7M tokens) at every dataset size: the peak working set
is one decoded row group, a property of how the files were written, not of how many there are.

Workers, the transfer ceiling, state bytes and resume latency: :mod:`loader_scale` (section 2 of
the table; ``--scale-only`` runs just it and writes ``loader_scale[_quick].{md,json}``).

Text is the local Python install's ``.py`` files (real text); the BPE is trained here on a sample
(``corpora.train_byte_bpe``). Writes ``benchmarks/results/loader[_quick].{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loader_scale  # noqa: E402
from corpora import RESULTS, python_source_files, sft_like_lengths, train_byte_bpe  # noqa: E402

CAPACITY = 8192


def timed(fn):
    """(result, wall seconds, CPU seconds of this process incl. its threads)."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def load_texts(max_bytes: int) -> list[str]:
    rng = np.random.default_rng(0)
    files = python_source_files()
    texts, seen = [], 0
    for i in rng.permutation(len(files)):
        t = files[i].read_text(errors="replace")
        if not t.strip():
            continue
        # surrogates from errors="replace" are not possible; keep texts UTF-8 clean
        texts.append(t)
        seen += len(t)
        if seen >= max_bytes:
            break
    return texts


def write_jsonl_zst(texts: list[str], out: Path, n_shards: int = 4) -> str:
    for s in range(n_shards):
        data = "".join(json.dumps({"text": t}) + "\n" for t in texts[s::n_shards]).encode()
        (out / f"text-{s}.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(data))
    return str(out / "text-*.jsonl.zst")


def write_token_parquet(
    docs: list[np.ndarray], out: Path, prefix: str, n_shards: int = 4, repeat: int = 1
) -> str:
    """Shards of an ``input_ids`` list<int32> column (zstd), shard ``s`` holding docs ``s::n_shards``
    (``repeat`` times over)."""
    for s in range(n_shards):
        part = docs[s::n_shards] * repeat
        lens = np.array([len(d) for d in part], np.int64)
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        values = np.concatenate(part).astype(np.int32)
        arr = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
        pq.write_table(
            pa.table({"input_ids": arr}),
            out / f"{prefix}-{s}.parquet",
            row_group_size=4096,
            compression="zstd",
        )
    return str(out / f"{prefix}-*.parquet")


def write_random_token_parquet(target_tokens: int, out: Path, n_shards: int = 4) -> int:
    """About ``target_tokens`` random ids in SFT-like documents, written shard by shard with
    1024-document row groups (bounded memory while writing); returns the token count."""
    lens = sft_like_lengths(n=int(target_tokens / 700) + 1, seed=1)
    lens = lens[: np.searchsorted(np.cumsum(lens), target_tokens) + 1]
    rng = np.random.default_rng(2)
    for s, part in enumerate(np.array_split(lens, n_shards)):
        offsets = np.concatenate([[0], np.cumsum(part)]).astype(np.int32)
        values = rng.integers(0, 16384, int(part.sum()), dtype=np.int32)
        arr = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
        table = pa.table({"input_ids": arr})
        pq.write_table(table, out / f"r-{s}.parquet", row_group_size=1024, compression="zstd")
    return int(lens.sum())


def seqpack_tokens(cfg: dict) -> int:
    from seqpack import build_loader

    # the tokens each batch holds, read from cu_seqlens without a torch scalar op per batch
    return sum(int(b.cu_seqlens.numpy()[b.n_real_segments]) for b in build_loader(cfg))


def hf_flatten_tokens(data_files: str, fmt: str, tokenizer=None) -> int:
    import datasets
    from transformers import DataCollatorWithFlattening

    datasets.disable_progress_bars()
    ds = datasets.load_dataset(fmt, data_files=data_files, split="train", streaming=True)
    if tokenizer is not None:

        def enc(batch):
            return {"input_ids": [e.ids for e in tokenizer.encode_batch(batch["text"])]}

        ds = ds.map(enc, batched=True, batch_size=256, remove_columns=["text"])
    collate = DataCollatorWithFlattening(return_tensors="pt")
    total, rows, n = 0, [], 0
    for row in ds:
        full = row["input_ids"]
        for lo in range(0, len(full), CAPACITY):  # split long documents like seqpack does
            ids = full[lo : lo + CAPACITY]
            if n + len(ids) > CAPACITY and rows:
                total += int(collate(rows)["input_ids"].numel())
                rows, n = [], 0
            rows.append({"input_ids": ids})
            n += len(ids)
    if rows:
        total += int(collate(rows)["input_ids"].numel())
    return total


def rss_child(pattern: str) -> None:
    from seqpack import build_loader

    cfg = {
        "sources": [{"path": pattern, "input_ids_key": "input_ids"}],
        "stage": {"type": "pack", "capacity": CAPACITY, "pad_to": CAPACITY, "buffer_docs": 1000},
    }
    n = sum(b.num_real_tokens for b in build_loader(cfg))
    print(json.dumps({"tokens": n, "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--parquet-tokens", type=float, default=None, help="pre-tokenized Parquet size (tokens)")
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    ap.add_argument(
        "--scale-only", action="store_true", help="only the workers / state / resume rows (loader_scale.py)"
    )
    args = ap.parse_args()
    if args.rss_child:
        rss_child(args.rss_child)
        return
    text_bytes = (4 << 20) if args.quick else (16 << 20)
    rss_tokens = (2_000_000, 20_000_000) if args.quick else (2_000_000, 20_000_000, 200_000_000)
    parquet_tokens = args.parquet_tokens or (2e6 if args.quick else 2e7)
    tmp = Path(tempfile.mkdtemp(prefix="seqpack_bench_loader_"))
    rows: list[dict] = []

    texts = load_texts(text_bytes)
    print(f"[loader] {len(texts)} texts, {sum(map(len, texts)) / 1e6:.1f} MB", flush=True)
    tok = train_byte_bpe(
        python_source_files(), vocab_size=16384, sample_bytes=(4 << 20) if args.quick else (16 << 20)
    )
    tok_path = str(tmp / "tokenizer.json")
    tok.save(tok_path)
    text_glob = write_jsonl_zst(texts, tmp)
    eos = tok.token_to_id("<|endoftext|>")
    if eos is None:
        tok.add_special_tokens(["<|endoftext|>"])
        tok.save(tok_path)

    # bare encode_batch over the same texts (the bound the raw-text path is compared with); the
    # same call seqpack makes: encode_batch_fast (no offsets) where tokenizers has it
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)

    def bare():
        n = 0
        for lo in range(0, len(texts), 256):
            n += sum(len(e.ids) for e in encode(texts[lo : lo + 256], add_special_tokens=False))
        return n

    if args.scale_only:
        scale_only(args, tmp, texts, tok, tok_path, text_glob, parquet_tokens)
        return
    bare()  # warm caches the same way the loader run gets them
    n_bare, w, c = timed(bare)
    rows.append(
        {"pipeline": "bare tokenizers encode_batch (text -> ids)", "tokens": n_bare, "wall_s": w, "cpu_s": c}
    )

    raw_cfg = {
        "sources": [{"path": text_glob}],
        "tokenizer": {"name": tok_path, "eos_token": "<|endoftext|>"},
        "stage": {"type": "pack", "capacity": CAPACITY, "pad_to": CAPACITY, "buffer_docs": 1000},
    }
    seqpack_tokens(raw_cfg)  # same warm BPE word cache as the bare run (tokenizers are cached per process)
    n_raw, w, c = timed(lambda: seqpack_tokens(raw_cfg))
    rows.append(
        {
            "pipeline": "seqpack raw text (jsonl.zst -> BPE -> pack 8192)",
            "tokens": n_raw,
            "wall_s": w,
            "cpu_s": c,
        }
    )
    n_hf_raw, w, c = timed(lambda: hf_flatten_tokens(text_glob, "json", tok))
    rows.append(
        {
            "pipeline": "HF datasets streaming json + map(encode_batch) + DataCollatorWithFlattening",
            "tokens": n_hf_raw,
            "wall_s": w,
            "cpu_s": c,
        }
    )

    # pre-tokenized shards of the same corpus
    docs = token_docs(tok, texts)
    repeat = max(1, round(parquet_tokens / sum(len(d) for d in docs)))
    pq_glob = write_token_parquet(docs, tmp, "tok", repeat=repeat)
    pq_cfg = {
        "sources": [{"path": pq_glob, "input_ids_key": "input_ids"}],
        "stage": {"type": "pack", "capacity": CAPACITY, "pad_to": CAPACITY, "buffer_docs": 1000},
    }
    seqpack_tokens(pq_cfg)  # numba / page cache warm-up
    n_pq, w, c = timed(lambda: seqpack_tokens(pq_cfg))
    rows.append(
        {"pipeline": "seqpack parquet pre-tokenized (-> pack 8192)", "tokens": n_pq, "wall_s": w, "cpu_s": c}
    )
    n_hf_pq, w, c = timed(lambda: hf_flatten_tokens(pq_glob, "parquet"))
    rows.append(
        {
            "pipeline": "HF datasets streaming parquet + DataCollatorWithFlattening",
            "tokens": n_hf_pq,
            "wall_s": w,
            "cpu_s": c,
        }
    )
    scale_rows, scale_summary, scale_md = loader_scale.run(tmp, pq_glob, text_glob, tok_path, args.quick)
    for r in rows:
        r["Mtok_per_s"] = r["tokens"] / r["wall_s"] / 1e6
        r["Mtok_per_cpu_s"] = r["tokens"] / r["cpu_s"] / 1e6

    # peak RSS vs dataset size (fresh process each)
    rss = []
    for target in rss_tokens:
        sub = tmp / f"rss{target}"
        sub.mkdir()
        n_tokens = write_random_token_parquet(target, sub)
        pattern = str(sub / "r-*.parquet")
        out = subprocess.run(
            [sys.executable, __file__, "--rss-child", pattern],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        rss.append({"dataset_tokens": n_tokens, **json.loads(out.stdout.strip().splitlines()[-1])})
        shutil.rmtree(sub)

    ratio_raw = (n_raw / rows[1]["wall_s"]) / (n_bare / rows[0]["wall_s"])
    summary = {
        "raw_text_vs_bare_encode_batch": ratio_raw,
        "parquet_Mtok_per_cpu_s": rows[3]["Mtok_per_cpu_s"],
        "parquet_vs_hf_flattening": rows[3]["Mtok_per_s"] / rows[4]["Mtok_per_s"],
        "raw_vs_hf_flattening": rows[1]["Mtok_per_s"] / rows[2]["Mtok_per_s"],
        "rss_growth_10x_data": rss[1]["max_rss_mb"] / rss[0]["max_rss_mb"],
        "rss_growth_100x_data": rss[-1]["max_rss_mb"] / rss[0]["max_rss_mb"] if len(rss) > 2 else None,
        "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
    }
    lines = ["| pipeline | tokens | wall s | Mtok/s | Mtok/CPU-s |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['pipeline']} | {r['tokens']:,} | {r['wall_s']:.2f} | {r['Mtok_per_s']:.2f} | "
            f"{r['Mtok_per_cpu_s']:.2f} |"
        )
    lines += ["", "| dataset tokens | tokens emitted | peak RSS MB |", "|---:|---:|---:|"]
    lines += [f"| {r['dataset_tokens']:,} | {r['tokens']:,} | {r['max_rss_mb']:.0f} |" for r in rss]
    lines += [
        "",
        f"raw text / bare encode_batch (wall tokens/s): {ratio_raw:.3f}; "
        f"pre-tokenized Parquet: {summary['parquet_Mtok_per_cpu_s']:.1f} Mtok per CPU-second; "
        f"vs HF flattening: parquet x{summary['parquet_vs_hf_flattening']:.1f}, "
        f"raw x{summary['raw_vs_hf_flattening']:.2f}; RSS growth at 10x data: "
        f"x{summary['rss_growth_10x_data']:.2f}"
        + (f", at 100x: x{summary['rss_growth_100x_data']:.2f}" if len(rss) > 2 else "")
        + f" (load avg {summary['load_avg_1m']:.1f} on "
        f"{summary['cpu_count']} cores)",
    ]
    table = "\n".join(lines) + "\n\n## Workers, state, resume (loader_scale.py)\n\n" + scale_md
    print(table)
    name = "loader_quick" if args.quick else "loader"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(table + "\n")
    (RESULTS / f"{name}.json").write_text(
        json.dumps(
            {
                "rows": rows,
                "rss": rss,
                "summary": summary,
                "scale": {"rows": scale_rows, "summary": scale_summary},
            },
            indent=1,
        )
    )
    # the scale section on its own too (what --scale-only writes), from this same run
    scale_name = "loader_scale_quick" if args.quick else "loader_scale"
    (RESULTS / f"{scale_name}.md").write_text(scale_md + "\n")
    scale_json = {"rows": scale_rows, "summary": scale_summary}
    (RESULTS / f"{scale_name}.json").write_text(json.dumps(scale_json, indent=1))


def token_docs(tok, texts: list[str]) -> list[np.ndarray]:
    docs = [
        np.asarray(e.ids, np.int32)
        for lo in range(0, len(texts), 256)
        for e in tok.encode_batch(texts[lo : lo + 256], add_special_tokens=False)
    ]
    return [d for d in docs if len(d)]


def scale_only(args, tmp: Path, texts, tok, tok_path: str, text_glob: str, parquet_tokens: float) -> None:
    """Just :mod:`loader_scale`'s rows; writes ``loader_scale[_quick].{md,json}``."""
    docs = token_docs(tok, texts)
    repeat = max(1, round(parquet_tokens / sum(len(d) for d in docs)))
    pq_glob = write_token_parquet(docs, tmp, "tok", repeat=repeat)
    rows, summary, md = loader_scale.run(tmp, pq_glob, text_glob, tok_path, args.quick)
    print(md)
    name = "loader_scale_quick" if args.quick else "loader_scale"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(md + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
