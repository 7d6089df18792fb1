"""The main job in one command (``make demo``): preprocess the bundled corpus into packed shards,
then summarize them, plot them and show the first packed row.

Equivalent shell commands (what this script runs, in-process)::

    seqpack preprocess seqpack/data/corpus.jsonl.zst --output build/demo/packed --seq-len 2048
    seqpack stats build/demo/packed --plot build/demo/packed_stats.png
    seqpack inspect build/demo/packed --n 1

For comparison it also writes the same documents one per row (``--strategy none``), the padded
layout a plain ``DataLoader`` would give, and prints both fills.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time

from seqpack.cli import main as seqpack
from seqpack.preprocess import DEMO_CORPUS
from seqpack.shards.stats import shard_stats


def run(argv: list[str]) -> str:
    """Run a ``seqpack`` command in this process and return what it printed."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = seqpack(argv)
    if rc:
        sys.exit(f"seqpack {' '.join(argv)} failed with exit code {rc}")
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="build/demo", help="output directory (default build/demo)")
    ap.add_argument(
        "--seq-len",
        "--capacity",
        dest="capacity",
        type=int,
        default=2048,
        help="tokens per packed row, the config's capacity (byte tokenizer)",
    )
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    packed, padded = os.path.join(out, "packed"), os.path.join(out, "padded")
    plot = os.path.join(out, "packed_stats.png")
    common = ["--seq-len", str(args.capacity), "--tokenizer", "byte", "--quiet", "--overwrite"]

    print(f"seqpack demo: pack the bundled corpus ({DEMO_CORPUS}) into rows of {args.capacity} tokens\n")
    t0 = time.perf_counter()
    run(["preprocess", DEMO_CORPUS, "--output", packed, *common])
    t_pack = time.perf_counter() - t0
    run(["preprocess", DEMO_CORPUS, "--output", padded, "--strategy", "none", *common])
    print(run(["stats", packed, "--plot", plot]).rstrip())

    st, pad = shard_stats(packed), shard_stats(padded)
    print("\nresult:")
    print(
        f"  {st['documents']:,} documents, {st['tokens_in']:,} tokens in, {st['tokens_out']:,} tokens out, "
        f"{st['lost_tokens']:,} lost (dropped {st['dropped_tokens']:,}, "
        f"truncated {st['truncated_tokens']:,})"
    )
    print(
        f"  packed:  {st['rows']:,} rows of {args.capacity}, fill {st['fill']:.2%} "
        f"(documents longer than a row are split, not cut)"
    )
    print(
        f"  padded:  {pad['rows']:,} rows of {args.capacity}, fill {pad['fill']:.2%} "
        f"(one document per row, the rest is padding)"
    )
    ratio = pad["rows"] / max(st["rows"], 1)
    print(f"  -> {ratio:.1f}x fewer rows, same tokens; preprocessing took {t_pack:.1f} s")
    print(f"  shards + manifest.json: {packed}")
    print(f"  plot (document lengths, per-row fill): {plot}")
    print("\nfirst packed row, one line per segment")
    print("(token range in the row, document source/file/record, offset in the document, targets, text):")
    print(run(["inspect", packed, "--n", "1"]).rstrip())


if __name__ == "__main__":
    main()
