"""Ranks at training scale: padding steps for uneven shards, bytes read per rank with ``balance:``,
and the precount from length indexes against the old dry run.

Data: real text (``.py`` files of the local Python install, seeded sample, each cut to
``--max-chars``) in 5 uneven ``jsonl.zst`` shards of 1000/200/200/100/50 documents, tokenized with
a byte-level BPE trained on the same files (vocab 16384), packed to 4096 tokens (``pad_to``), a
shuffle buffer of 256 documents. Ranks run one after another in this process (``even_batches:
precount``, which is what a job without a process group uses).

- padding: steps in which at least one rank yields a zero-loss padding batch / all steps, for world
  sizes 3 and 8, 0 and 2 DataLoader workers per rank, with and without ``balance:``, with the
  partition by bytes (file metadata) and by tokens (``partition: tokens``, the length index): the
  partition decides it (``balance:`` keeps each rank's own documents, so it cannot move data
  between ranks).
- bytes read per rank, world size 4: ``rchar`` of ``/proc/self/io`` (bytes returned by read
  syscalls) over one epoch of one rank, with and without ``balance:``, and the old ``balance:``
  (every rank built and read every rank's chain), measured as one rank reading all 4 chains.
- precount: ``steps_per_epoch()`` of one rank from length indexes (cold: the index is built, one
  tokenizing pass over the source; warm: cached on disk) against the old dry run (every rank's
  chain run once: tokenizing the whole source in every rank's process).

    python benchmarks/loader_ranks.py           # 1550 documents of <= 4000 characters
    python benchmarks/loader_ranks.py --quick   # <= 800 characters, smaller BPE sample
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpora import python_source_files, train_byte_bpe  # noqa: E402
from report import markdown_table, result_stem, write_results  # noqa: E402

from seqpack.loader import build_loader  # noqa: E402
from seqpack.pipeline import build_chain  # noqa: E402

SHARD_DOCS = (1000, 200, 200, 100, 50)
CAPACITY = 4096


def write_shards(out: Path, max_chars: int) -> str:
    """5 uneven jsonl.zst shards of real text; returns their glob."""
    files = python_source_files()
    order = np.random.default_rng(0).permutation(len(files))
    texts: list[str] = []
    for i in order:
        t = files[i].read_text(errors="replace")[:max_chars]
        if t.strip():
            texts.append(t)
        if len(texts) == sum(SHARD_DOCS):
            break
    start = 0
    for s, n in enumerate(SHARD_DOCS):
        data = "".join(json.dumps({"text": t}) + "\n" for t in texts[start : start + n]).encode()
        (out / f"shard-{s}.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(data))
        start += n
    return str(out / "shard-*.jsonl.zst")


def config(glob: str, tokenizer: str, balance: bool, partition: str = "bytes") -> dict:
    cfg = {
        "partition": partition,
        "sources": [{"path": glob, "format": "jsonl"}],
        "tokenizer": {"name": tokenizer, "eos_token": "<|endoftext|>"},
        "stage": {"type": "pack", "capacity": CAPACITY, "pad_to": CAPACITY},
        "shuffle": {"seed": 1, "buffer_docs": 256},
        "even_batches": "precount",
    }
    if balance:
        cfg["balance"] = {"a": 1.0, "b": 1.0 / (12 * 4096)}
    return cfg


def rchar() -> int:
    """Bytes this process got from read syscalls so far (Linux ``/proc/self/io``)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def padding(
    glob: str, tok: str, world: int, balance: bool, workers: int = 0, partition: str = "bytes"
) -> dict:
    pads = []
    for r in range(world):
        cfg = config(glob, tok, balance, partition)
        loader = build_loader(cfg, rank=r, world_size=world, num_workers=workers)
        pads.append([b.n_real_segments == 0 for b in loader])
    pad = np.array(pads)  # [world, steps]
    return {
        "world_size": world,
        "balance": balance,
        "workers": workers,
        "partition": partition,
        "steps": int(pad.shape[1]),
        "padding_steps": int(pad.any(0).sum()),
        "padding_fraction": float(pad.any(0).mean()),
        "worst_rank_padding_fraction": float(pad.mean(1).max()),
    }


def bytes_read(glob: str, tok: str, world: int) -> list[dict]:
    rows = []
    for balance in (False, True):
        cfg = config(glob, tok, balance)
        per_rank, records = [], []
        for r in range(world):
            loader = build_loader(cfg, rank=r, world_size=world)
            loader.steps_per_epoch()  # the count (index cached already): not part of the epoch's reads
            before = rchar()
            for _ in loader:
                pass
            per_rank.append(rchar() - before)
            records.append(
                sum(v for k, v in loader.stats().items() if k.startswith("read/") and k.endswith("/records"))
            )
        rows.append(
            {"mode": "balance" if balance else "plain", "bytes_per_rank": per_rank, "records": records}
        )
    # the old balance: every rank pulled every rank's chain (one rank's cost, measured)
    ds = build_loader(config(glob, tok, False), rank=0, world_size=world).dataset
    before = rchar()
    for r in range(world):
        node = build_chain(ds.cfg, ds.context(r, 0, 0))
        node.reset(None)
        for _ in node:
            pass
    old = rchar() - before
    rows.append(
        {"mode": "old balance (every chain)", "bytes_per_rank": [old] * world, "records": [None] * world}
    )
    return rows


def precount(glob: str, tok: str, world: int, cache: str) -> dict:
    cfg = config(glob, tok, False)
    os.environ["SEQPACK_CACHE_DIR"] = tempfile.mkdtemp(dir=cache)  # cold: no index yet
    t0 = time.perf_counter()
    n_cold = build_loader(cfg, rank=0, world_size=world).steps_per_epoch()
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_warm = build_loader(cfg, rank=0, world_size=world).steps_per_epoch()
    warm = time.perf_counter() - t0
    # the old count: run every rank's chain (what each rank's process did before length indexes)
    ds = build_loader(cfg, rank=0, world_size=world).dataset
    t0 = time.perf_counter()
    counts = []
    for r in range(world):
        node = build_chain(ds.cfg, ds.context(r, 0, 0))
        node.reset(None)
        counts.append(sum(1 for _ in node))
    dry = time.perf_counter() - t0
    if not n_cold == n_warm == max(counts):
        raise RuntimeError(f"counts differ: index {n_cold}/{n_warm}, dry run {max(counts)}")
    return {
        "world_size": world,
        "steps": n_warm,
        "index_cold_s": cold,
        "index_warm_s": warm,
        "dry_run_s": dry,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short documents, small BPE sample")
    ap.add_argument("--max-chars", type=int, default=None)
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # the few-units warning of world size 8 is expected here
    max_chars = args.max_chars or (800 if args.quick else 4000)
    tmp = Path(tempfile.mkdtemp(prefix="seqpack_bench_ranks_"))
    os.environ["SEQPACK_CACHE_DIR"] = str(tmp / "cache")
    tok = train_byte_bpe(
        python_source_files(), vocab_size=16384, sample_bytes=(2 << 20) if args.quick else (8 << 20)
    )
    if tok.token_to_id("<|endoftext|>") is None:
        tok.add_special_tokens(["<|endoftext|>"])
    tok_path = str(tmp / "tokenizer.json")
    tok.save(tok_path)
    glob = write_shards(tmp, max_chars)

    pad_rows = [
        padding(glob, tok_path, w, b, k, p)
        for w in (3, 8)
        for p in ("bytes", "tokens")
        for k in (0, 2)
        for b in (False, True)
    ]
    read_rows = bytes_read(glob, tok_path, 4)
    count_rows = [precount(glob, tok_path, w, str(tmp)) for w in (4, 8)]

    md = "Padding steps, 5 uneven shards (1000/200/200/100/50 documents)\n\n"
    md += markdown_table(
        [
            "world",
            "partition",
            "workers per rank",
            "balance",
            "steps",
            "padding steps",
            "padding fraction",
            "worst rank",
        ],
        [
            [
                r["world_size"],
                r["partition"],
                r["workers"],
                r["balance"],
                r["steps"],
                r["padding_steps"],
                f"{r['padding_fraction']:.1%}",
                f"{r['worst_rank_padding_fraction']:.1%}",
            ]
            for r in pad_rows
        ],
        ["---:", "---", "---:", "---", "---:", "---:", "---:", "---:"],
    )
    plain_max = max(read_rows[0]["bytes_per_rank"])
    md += "\nBytes read per rank in one epoch, world size 4 (rchar)\n\n"
    md += markdown_table(
        ["mode", "MB per rank", "max / plain max", "records per rank"],
        [
            [
                r["mode"],
                " / ".join(f"{b / 1e6:.2f}" for b in r["bytes_per_rank"]),
                f"{max(r['bytes_per_rank']) / plain_max:.2f}x",
                r["records"],
            ]
            for r in read_rows
        ],
        ["---", "---", "---:", "---"],
    )
    md += "\nPrecount of one rank: length index vs the old dry run of every rank's chain\n\n"
    md += markdown_table(
        ["world", "steps", "index cold (build) s", "index warm s", "old dry run s", "dry / warm"],
        [
            [
                r["world_size"],
                r["steps"],
                f"{r['index_cold_s']:.2f}",
                f"{r['index_warm_s']:.3f}",
                f"{r['dry_run_s']:.2f}",
                f"{r['dry_run_s'] / r['index_warm_s']:.0f}x",
            ]
            for r in count_rows
        ],
        ["---:", "---:", "---:", "---:", "---:", "---:"],
    )
    print(md)
    payload = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "max_chars": max_chars,
        "padding": pad_rows,
        "bytes_read": read_rows,
        "precount": count_rows,
    }
    print("wrote", write_results(result_stem("loader_ranks", args.quick), md, payload))


if __name__ == "__main__":
    main()
