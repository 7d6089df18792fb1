"""How a source is shared over ``n = world_size x workers`` consumers: balance and read cost.

Real text (the ``.py`` files of this Python's stdlib and site-packages, one document per file) is
written as JSON lines (zstd), then every consumer's reader is run to its end and measured:

- ``tokens max/mean``: the most loaded consumer's characters over the mean (1.00 = even; the
  slowest consumer sets the epoch's length, the others pad);
- ``decompressed``: bytes decompressed by all consumers together over the data's size (1.0 =
  each byte once);
- ``fetch``: seconds to re-read 1000 random records by doc id (state by reference).

``--old PATH`` also runs another checkout of seqpack (e.g. ``git archive main`` unpacked) in a
subprocess for comparison (count-based unit striding, per-record striding when units are few).

    python benchmarks/partition.py [--quick] [--old /tmp/seqpack-main]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import zstandard
from corpora import python_source_files
from report import markdown_table, result_stem, write_results

# runs in a subprocess (this checkout or --old): every consumer's reader to its end
MEASURE = r"""
import json, sys, time
import seqpack.sources.streams as streams
spec, n = sys.argv[1], int(sys.argv[2])
count = [0]
orig = streams.iter_chunks
def counting(path):
    for chunk in orig(path):
        count[0] += len(chunk)
        yield chunk
streams.iter_chunks = counting
try:
    import seqpack.sources.lines as lines
    lines.iter_chunks = counting
except ImportError:
    pass
import warnings
warnings.simplefilter("ignore")
from seqpack import read
chars, decomp, secs = [], [], []
for k in range(n):
    count[0] = 0
    t = time.perf_counter()
    chars.append(sum(len(r.text) for r in read(spec, consumer=(k, n))))
    secs.append(time.perf_counter() - t)
    decomp.append(count[0])
out = {"chars": chars, "decompressed": decomp, "seconds": secs}
rd = read(spec)
if hasattr(rd, "fetch"):
    ids = [r.doc_id for r in rd]
    rng = __import__("numpy").random.default_rng(0)
    pick = [ids[i] for i in rng.choice(len(ids), min(1000, len(ids)), replace=False)]
    t = time.perf_counter()
    rd.fetch(pick)
    out["fetch_s"] = time.perf_counter() - t
print(json.dumps(out))
"""


def write_shards(folder: str, docs: list[str], counts: list[int]) -> int:
    """``counts[i]`` documents into ``part{i}.jsonl.zst``; returns the uncompressed bytes."""
    os.makedirs(folder, exist_ok=True)
    it, total = iter(docs), 0
    for i, c in enumerate(counts):
        data = "".join(json.dumps({"text": next(it)}) + "\n" for _ in range(c)).encode()
        total += len(data)
        with open(os.path.join(folder, f"part{i}.jsonl.zst"), "wb") as f:
            f.write(zstandard.ZstdCompressor(level=3).compress(data))
    return total


def measure(root: str, spec: str, n: int) -> dict:
    env = {**os.environ, "PYTHONPATH": root}
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, spec, str(n)], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer documents and topologies")
    ap.add_argument("--old", help="another seqpack checkout to compare with")
    args = ap.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = python_source_files()
    rng = np.random.default_rng(0)
    scale = 0.4 if args.quick else 1.0
    counts = [int(c * scale) for c in (1000, 200, 200, 100, 50)]
    pick = rng.choice(len(files), sum(counts), replace=False)
    docs = [files[i].read_text(errors="replace") for i in pick]
    cases = [("5 uneven shards", counts, (3, 8) if args.quick else (3, 8, 16))]
    cases.append(("1 big file", [sum(counts)], (2, 8) if args.quick else (2, 4, 8)))
    rows, payload = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cnt, ns in cases:
            folder = os.path.join(tmp, name.replace(" ", "_"))
            size = write_shards(folder, docs, cnt)
            spec = os.path.join(folder, "*.jsonl.zst")
            for n in ns:
                for label, root in [("this", here)] + ([("old", args.old)] if args.old else []):
                    t = time.perf_counter()
                    m = measure(root, spec, n)
                    chars = np.array(m["chars"])
                    row = {
                        "case": name,
                        "consumers": n,
                        "code": label,
                        "tokens_max_over_mean": float(chars.max() / chars.mean()),
                        "idle_consumers": int((chars == 0).sum()),
                        "decompressed_over_size": sum(m["decompressed"]) / size,
                        "slowest_consumer_s": max(m["seconds"]),
                        "fetch_1000_s": m.get("fetch_s"),
                        "wall_s": time.perf_counter() - t,
                    }
                    payload.append(row)
                    rows.append(
                        [
                            name,
                            n,
                            label,
                            f"{row['tokens_max_over_mean']:.3f}",
                            row["idle_consumers"],
                            f"{row['decompressed_over_size']:.2f}",
                            f"{row['slowest_consumer_s']:.2f}",
                            "-" if row["fetch_1000_s"] is None else f"{row['fetch_1000_s']:.2f}",
                        ]
                    )
    table = markdown_table(
        ["data", "consumers", "code", "tokens max/mean", "idle", "decompressed / size", "slowest s"]
        + ["fetch 1000 s"],
        rows,
        ["---", "---:", "---", "---:", "---:", "---:", "---:", "---:"],
    )
    print(table)
    write_results(result_stem("partition", args.quick), table, {"docs": sum(counts), "rows": payload})


if __name__ == "__main__":
    main()
