"""Reading pre-tokenized Parquet from a local S3 server vs local disk, with and without prefetch, and
the bytes a projected read fetches vs the bytes it needs.

Data: ``--files`` Parquet files of ``--groups`` row groups each; every row holds ``input_ids``
(``list<int32>``, log-normal lengths, mean ~600 tokens, Zipf-distributed ids) and a ``text`` column
(words of a fixed vocabulary, ~4 bytes per token) that the loader never reads (so projection matters);
zstd-compressed by default, as ``seqpack preprocess`` writes. The S3 server is moto's (``moto_server``,
its own process on localhost, so it does not share this process's interpreter lock); the loader is
``build_loader`` with a ``pack`` stage (capacity 8192), ``num_workers=0``, in this process.

Every remote run starts cold: a fresh in-memory cache, no disk cache and no cached footers or object
sizes, so each byte comes over HTTP. ``prefetch`` is ``SEQPACK_PREFETCH`` (row groups fetched ahead
on 4 threads, footers of all files fetched in parallel when the reader lists its units); 0 reads
each row group's column chunks only when the reader gets to it. Each setting runs ``--repeats``
times, the settings taking turns within each repeat (after one warm-up read of the local files); the
table shows the best (the machine is shared and noisy; the JSON has every time). Remote reads
overlap with decoding (the server and the prefetch threads use the other core), which is why they
can beat the single-threaded local read. ``fetched / needed``: bytes received from the server over
the bytes of the ``input_ids`` column chunks plus the footers; ``fetched / file``: over the whole
files.

Row groups: moto's server spends ~13 ms on every request whatever its size (measured here: a 1 KB
range and a 0.5 MiB range of a 1-16 MiB object cost 12-16 ms, on one core), and copies the whole object
for each range (a 1.4 MiB range costs 22 ms from a 4 MiB object, 58 ms from a 32 MiB one). Real object
stores have per-request latency too but serve requests concurrently, and real Parquet row groups are
64-128 MiB. The default data is 8 files of 2 row groups of 3072 rows (~10 MiB files, ~2.6 MiB of
``input_ids`` per row group): still far smaller than production row groups, but large enough that the
numbers measure the reader rather than moto's per-request cost. With 24 files of 2 x 1024 rows the same
code reaches 0.62x local (72 requests at ~15 ms each, serialized by the server), with 4 x 512 rows 0.47x.

    python benchmarks/remote.py [--quick] [--files N] [--groups N] [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import s3fs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import markdown_table, result_stem, write_results  # noqa: E402

from seqpack.loader import build_loader  # noqa: E402
from seqpack.sources import cache, rowgroups  # noqa: E402


def make_data(d: Path, files: int, groups: int, rows: int, compression: str) -> tuple[int, int]:
    """Write the Parquet files; returns (tokens, bytes on disk).

    Token ids follow a Zipf law over a 50K vocabulary (as real BPE ids do: uniform ids would not
    compress at all), written with ``compression`` (``zstd`` is what ``seqpack preprocess`` writes).
    """
    rng = np.random.default_rng(0)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)
    words = np.array(
        [letters[rng.integers(0, 26, rng.integers(1, 7))].tobytes() for _ in range(20_000)], object
    )
    tokens = 0
    for f in range(files):
        lens = np.clip(rng.lognormal(6.0, 0.9, groups * rows).astype(np.int64), 1, 8192)
        ids = (np.minimum(rng.zipf(1.1, int(lens.sum())), 50_000) - 1).astype(np.int32)
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        col = pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids))
        # the document's text, as a real dataset keeps beside its ids: words of a fixed vocabulary in
        # Zipf order, about 4 bytes per token (it compresses as text does, unlike random bytes)
        word_ids = np.minimum(rng.zipf(1.1, int(lens.sum())), len(words)) - 1
        bounds = np.concatenate([[0], np.cumsum(lens)])
        text = pa.array(
            [b" ".join(words[word_ids[a:b]].tolist()) for a, b in zip(bounds[:-1], bounds[1:])], pa.binary()
        )
        pq.write_table(
            pa.table({"input_ids": col, "text": text}),
            d / f"part-{f:03d}.parquet",
            row_group_size=rows,
            compression=compression,
        )
        tokens += int(lens.sum())
    return tokens, sum(p.stat().st_size for p in d.iterdir())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def run_loader(path: str) -> tuple[float, int]:
    cfg = {
        "sources": [{"path": path, "format": "parquet", "input_ids_key": "input_ids"}],
        "stage": {"type": "pack", "capacity": 8192},
    }
    t0 = time.perf_counter()
    n = 0
    for b in build_loader(cfg):
        n += int(b.seqlens[: b.n_real_segments].sum())
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small data, one repeat")
    ap.add_argument("--files", type=int, default=None)
    ap.add_argument("--groups", type=int, default=None)
    ap.add_argument("--rows", type=int, default=3072)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument(
        "--compression", default="zstd", help="Parquet codec: zstd (as preprocess writes), snappy, none"
    )
    args = ap.parse_args()
    files = args.files or (2 if args.quick else 8)
    groups = args.groups or 2
    repeats = args.repeats or (1 if args.quick else 5)

    proc, endpoint = start_s3()
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            tokens, file_bytes = make_data(d, files, groups, args.rows, args.compression)
            fs = s3fs.S3FileSystem()
            fs.mkdir("bench")
            for p in sorted(d.iterdir()):
                fs.put_file(str(p), f"bench/data/{p.name}")
            needed = 0
            for p in sorted(d.iterdir()):
                meta = pq.ParquetFile(p).metadata
                needed += meta.serialized_size + sum(
                    b - a
                    for g in range(meta.num_row_groups)
                    for a, b in rowgroups.column_ranges(meta, g, ["input_ids"])
                )
            settings = [
                ("local disk", str(d / "*.parquet"), None),
                ("s3, no prefetch", "s3://bench/data/*.parquet", 0),
            ]
            settings.append(("s3, prefetch 2", "s3://bench/data/*.parquet", 2))
            settings.append(("s3, prefetch 4", "s3://bench/data/*.parquet", 4))
            # settings take turns within each repeat, so load from other jobs on the machine hits
            # them alike; the best time of each is kept
            runs: dict[str, list[tuple[float, int, int]]] = {name: [] for name, _, _ in settings}
            run_loader(str(d / "*.parquet"))  # warm-up: imports, numba kernels, the page cache
            for _ in range(repeats):
                for name, path, prefetch in settings:
                    cache.configure(disk_dir=None, prefetch=prefetch or 0, block_bytes=1 << 20)
                    rowgroups.forget()  # cold: footers and sizes asked again, as in a new process
                    dt, got = run_loader(path)
                    runs[name].append((dt, got, cache.store().stats.fetched_bytes))
            results = []
            for name, _, prefetch in settings:
                best, got, fetched = min(runs[name])
                results.append(
                    {
                        "setting": name,
                        "prefetch": prefetch,
                        "seconds": best,
                        "seconds_all": [r[0] for r in runs[name]],
                        "tokens": got,
                        "tokens_per_s": got / best,
                        "fetched_bytes": fetched if prefetch is not None else None,
                    }
                )
    finally:
        proc.terminate()
        proc.wait()
    local = results[0]["tokens_per_s"]
    rows = []
    for r in results:
        r["vs_local"] = r["tokens_per_s"] / local
        fetched = r["fetched_bytes"]
        rows.append(
            [
                r["setting"],
                f"{r['tokens_per_s']:,.0f}",
                f"{r['vs_local']:.2f}x",
                f"{r['seconds']:.2f}",
                "-" if fetched is None else f"{fetched / needed:.3f}",
                "-" if fetched is None else f"{fetched / file_bytes:.3f}",
            ]
        )
        assert r["tokens"] == results[0]["tokens"], "remote and local runs delivered different token counts"
    table = markdown_table(
        ["setting", "tokens/s", "vs local disk", "seconds", "fetched / needed", "fetched / file"],
        rows,
        ["---", "---:", "---:", "---:", "---:", "---:"],
    )
    head = (
        f"{files} files x {groups} row groups x {args.rows} rows ({args.compression}), {tokens:,} tokens, "
        f"{file_bytes / 2**20:.1f} MiB on disk, input_ids column chunks + footers {needed / 2**20:.1f} MiB; "
        f"best of {repeats}\n\n"
    )
    print(head + table)
    payload = {
        "files": files,
        "groups": groups,
        "rows": args.rows,
        "tokens": tokens,
        "file_bytes": file_bytes,
        "needed_bytes": needed,
        "repeats": repeats,
        "results": results,
    }
    write_results(result_stem("remote", args.quick), head + table, payload)


if __name__ == "__main__":
    main()
