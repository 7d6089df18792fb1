"""Sources and preprocess outputs on a real S3 API (moto's server on localhost, behind a proxy that can
inject faults) and on a local HTTP server: the same batches as the local files, with and without 503s
and bodies cut mid-way; clear errors for a missing and a denied object; exact resume; column
projection fetching only the needed row-group bytes; preprocess to s3, then train from s3."""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
import zstandard
from remote_servers import S3, Faults, file_server

import seqpack.preprocess as pp
import seqpack.preprocess.task as pp_task
from seqpack.cli import main
from seqpack.loader import build_loader
from seqpack.shards import MANIFEST, PackedRowReader, read_manifest
from seqpack.sources import cache, remote, rowgroups
from seqpack.sources.read import read
from seqpack.sources.records import SourceError


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def s3():
    saved = dict(os.environ)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's access log
    server = S3()
    os.environ.update(server.env())
    s3fs.S3FileSystem.clear_instance_cache()  # an instance cached by another module knows another port
    yield server
    server.stop()
    os.environ.clear()
    os.environ.update(saved)
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQPACK_STAGING_DIR", str(tmp_path / "staging"))
    cache.configure(block_bytes=64 << 10, disk_dir=None, prefetch=2)
    yield
    cache.configure()


def _docs(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    return [rng.integers(0, 50_000, int(rng.integers(1, 400)), dtype=np.int32) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Pre-tokenized Parquet (4 row groups per file, a bulky unused column), JSON lines (zstd) and a
    webdataset tar, locally."""
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(3):
        docs = _docs(rng, 160)
        table = pa.table(
            {
                "input_ids": pa.array([x.tolist() for x in docs], pa.list_(pa.int32())),
                "junk": pa.array([rng.bytes(4000) for _ in docs], pa.binary()),
            }
        )
        pq.write_table(table, d / f"part-{i}.parquet", row_group_size=40, compression="none")
    with pa.ipc.new_file(str(d / "x.arrow"), table.schema) as w:  # 4 record batches (units)
        for k in range(0, table.num_rows, 40):
            w.write_batch(table.slice(k, 40).combine_chunks().to_batches()[0])
    lines = [json.dumps({"text": f"doc {k} " + "word " * int(rng.integers(1, 60))}) for k in range(300)]
    (d / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress("\n".join(lines).encode()))
    (d / "b.jsonl.gz").write_bytes(gzip.compress("\n".join(lines[:100]).encode(), mtime=0))
    with tarfile.open(d / "w.tar", "w") as tar:
        for k in range(50):
            data = (f"sample {k} " + "x" * k).encode()
            info = tarfile.TarInfo(f"{k:05d}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return d


def upload(s3, corpus, bucket: str) -> str:
    fs = s3fs.S3FileSystem()
    fs.mkdir(bucket)
    for name in sorted(os.listdir(corpus)):
        fs.put_file(str(corpus / name), f"{bucket}/data/{name}")
    return f"s3://{bucket}/data"


def tokens_of(reader) -> list[tuple[int, list]]:
    out = []
    for r in reader:
        out.append((r.doc_id, r.tokens.tolist() if r.tokens is not None else r.text))
    return out


def packed(cfg: dict) -> list[np.ndarray]:
    return [b.input_ids.numpy().copy() for b in build_loader(cfg)]


def _cfg(path: str) -> dict:
    return {
        "sources": [{"path": path, "format": "parquet", "input_ids_key": "input_ids"}],
        "stage": {"type": "pack", "capacity": 1024},
    }


# ------------------------------------------------------------------------------ reading
def test_s3_batches_equal_local_with_and_without_faults(s3, corpus):
    url = upload(s3, corpus, "batches")
    want = packed(_cfg(str(corpus / "*.parquet")))
    got = packed(_cfg(url + "/*.parquet"))
    assert len(got) == len(want) > 5 and all((a == b).all() for a, b in zip(got, want))
    streams = (("a.jsonl.zst", "jsonl"), ("w.tar", "webdataset"), ("x.arrow", "arrow"))
    kw = {"input_ids_key": "input_ids"}
    want_docs = [
        tokens_of(read(str(corpus / n), format=f, **(kw if f == "arrow" else {}))) for n, f in streams
    ]
    s3.faults.every_503, s3.faults.every_cut = 4, 5
    try:
        cache.configure(block_bytes=32 << 10)  # cold cache: every block fetched again, through faults
        faulty = packed(_cfg(url + "/*.parquet"))
        got_docs = [
            tokens_of(read(f"{url}/{n}", format=f, **(kw if f == "arrow" else {}))) for n, f in streams
        ]
    finally:
        s3.faults.every_503 = s3.faults.every_cut = 0
    assert s3.faults.counts.get("503", 0) > 0 and s3.faults.counts.get("cut", 0) > 0
    assert len(faulty) == len(want) and all((a == b).all() for a, b in zip(faulty, want))
    assert got_docs == want_docs and all(want_docs)


def test_storage_options_endpoint_and_dataloader_workers(s3, corpus, monkeypatch):
    """The endpoint as a source's ``storage_options`` (no AWS_ENDPOINT_URL), read by 2 DataLoader
    worker processes: the same batches as the local files."""
    url = upload(s3, corpus, "workers") + "/*.parquet"
    want = [b.input_ids.numpy().copy() for b in build_loader(_cfg(str(corpus / "*.parquet")), num_workers=2)]
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    cfg = _cfg(url)
    cfg["sources"][0]["storage_options"] = {"endpoint_url": s3.endpoint}
    try:
        got = [b.input_ids.numpy().copy() for b in build_loader(cfg, num_workers=2)]
    finally:  # an instance made without the variable would point at the real AWS in later tests
        s3fs.S3FileSystem.clear_instance_cache()
    assert len(got) == len(want) and all((a == b).all() for a, b in zip(got, want))


def test_http_source_retries_503_and_cut_bodies(corpus):
    faults = Faults(every_503=4, every_cut=3)
    server = file_server(str(corpus), faults)
    try:
        for name, fmt in (
            ("part-1.parquet", "parquet"),
            ("a.jsonl.zst", "jsonl"),
            ("b.jsonl.gz", "jsonl"),
            ("w.tar", "webdataset"),
        ):
            kw = {"input_ids_key": "input_ids"} if fmt == "parquet" else {}
            got = tokens_of(read(f"{server.url}/{name}", format=fmt, **kw))
            assert got == tokens_of(read(str(corpus / name), format=fmt, **kw))
    finally:
        server.stop()
    assert faults.counts["503"] > 0 and faults.counts["cut"] > 0
    assert cache.store().stats.retries > 0  # fsspec's HTTP backend does not retry: these were ours


def test_missing_and_denied_objects_name_the_url(s3, corpus):
    url = upload(s3, corpus, "errors")
    with pytest.raises(FileNotFoundError, match="s3://errors/data/nope.parquet"):
        read(f"{url}/nope.parquet", format="parquet", input_ids_key="input_ids")
    with pytest.raises(FileNotFoundError, match="matched no files"):
        read(f"{url}/*.feather", format="arrow", input_ids_key="input_ids")
    s3.faults.deny = ("part-2",)
    try:
        with pytest.raises(SourceError, match=r"s3://errors/data/part-2.parquet.*access denied \(403\)"):
            list(read(f"{url}/part-2.parquet", format="parquet", input_ids_key="input_ids"))
    finally:
        s3.faults.deny = ()
    # an object deleted after listing: 404 while reading names the URL too
    f = remote.RemoteFile(f"{url}/a.jsonl.zst")
    s3fs.S3FileSystem().rm_file("errors/data/a.jsonl.zst")
    with pytest.raises(SourceError, match=r"s3://errors/data/a.jsonl.zst.*\(404\)"):
        f.read()


def test_resume_mid_epoch_is_exact(s3, corpus):
    url = upload(s3, corpus, "resume") + "/*.parquet"
    cfg = _cfg(url)
    full = packed(cfg)
    loader = build_loader(cfg)
    it = iter(loader)
    head = [next(it).input_ids.numpy().copy() for _ in range(4)]
    state = loader.state_dict()
    again = build_loader(cfg)
    again.load_state_dict(state)
    rest = [b.input_ids.numpy().copy() for b in again]
    assert len(head) + len(rest) == len(full)
    assert all((a == b).all() for a, b in zip(head + rest, full))
    # the reader level, with shard shuffling and two consumers
    kw = {"input_ids_key": "input_ids", "shuffle_seed": 3, "consumer": (1, 2)}
    whole = tokens_of(read(url, format="parquet", **kw))
    r = read(url, format="parquet", **kw)
    r.reset()
    first = [(x.doc_id, x.tokens.tolist()) for x in (r.next() for _ in range(37))]
    r2 = read(url, format="parquet", **kw)
    r2.reset(r.get_state())
    assert first + tokens_of(r2) == whole


def test_parquet_projection_fetches_only_the_column_chunks(s3, corpus):
    url = upload(s3, corpus, "projection") + "/part-0.parquet"
    cache.configure(prefetch=0)
    before = cache.store().stats.fetched_bytes
    docs = tokens_of(read(url, format="parquet", input_ids_key="input_ids"))
    fetched = cache.store().stats.fetched_bytes - before
    meta = pq.ParquetFile(corpus / "part-0.parquet").metadata
    needed = sum(
        b - a for g in range(meta.num_row_groups) for a, b in rowgroups.column_ranges(meta, g, ["input_ids"])
    )
    size = os.path.getsize(corpus / "part-0.parquet")
    assert len(docs) == 160
    # the junk column (4 kB a row) is most of the file and is never fetched: exactly the column
    # chunks plus the footer (pyarrow reads the last 64 kB first, then the rest of a longer footer)
    assert needed < fetched <= needed + (64 << 10) + meta.serialized_size
    assert fetched < 0.4 * size


def test_second_epoch_is_served_by_the_disk_cache(s3, corpus, tmp_path):
    url = upload(s3, corpus, "diskcache") + "/part-1.parquet"
    cache.configure(disk_dir=str(tmp_path / "blocks"), prefetch=0)
    first = tokens_of(read(url, format="parquet", input_ids_key="input_ids"))
    cache.configure()  # a new process's memory: empty, the disk cache stays
    gets = s3.faults.counts.get("ok", 0)
    again = tokens_of(read(url, format="parquet", input_ids_key="input_ids"))
    assert again == first and len(first) == 160
    stats = cache.store().stats
    assert stats.disk_hits > 0 and stats.requests == 0 and stats.fetched_bytes == 0
    assert s3.faults.counts["ok"] - gets <= 2  # the listing only (no range request)


def test_disk_cache_is_bounded_lru_and_atomic(tmp_path):
    disk = cache.DiskCache(str(tmp_path / "c"), limit=10_000)
    for k in range(8):
        disk.put(f"k{k}", bytes([k]) * 2000)
        os.utime(disk._path(f"k{k}"), ns=(k * 10**9, k * 10**9))
    assert disk.get("k7") == bytes([7]) * 2000
    names = os.listdir(tmp_path / "c")
    assert all(n.endswith(".blk") for n in names)  # no temporaries left
    assert sum(os.path.getsize(tmp_path / "c" / n) for n in names) <= 10_000
    assert disk.get("k0") is None and disk.get("k7") is not None  # oldest evicted first


# ------------------------------------------------------------------------------ writing
def _text_corpus(d) -> list[str]:
    rng = np.random.default_rng(5)
    paths = []
    for i in range(2):
        lines = [json.dumps({"text": "w " * int(rng.integers(1, 200))}) for _ in range(120)]
        p = d / f"t{i}.jsonl"
        p.write_text("\n".join(lines) + "\n")
        paths.append(p)
    return paths


def run_pp(inputs, out, **kw):
    cfg = pp.build_config([str(p) for p in inputs], capacity=256, tasks=3, **kw.pop("cfg", {}))
    return pp.preprocess(cfg, str(out), progress=False, **kw)


def s3_bytes(prefix: str) -> dict[str, bytes]:
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    return {p.rsplit("/", 1)[1]: fs.cat_file(p) for p in sorted(fs.ls(prefix)) if "/part-" in p}


def local_bytes(d) -> dict[str, bytes]:
    return {n: (d / n).read_bytes() for n in sorted(os.listdir(d)) if n.startswith("part-")}


def rows(reader) -> list[tuple[list, list]]:
    return [(r.doc_ids.tolist(), r.input_ids.tolist()) for r in reader]


def test_preprocess_to_s3_then_train_from_s3(s3, tmp_path):
    inputs = _text_corpus(tmp_path)
    local = run_pp(inputs, tmp_path / "local")
    fs = s3fs.S3FileSystem()
    fs.mkdir("ppout")
    for p in inputs:
        fs.put_file(str(p), f"ppout/in/{p.name}")
    man = run_pp(["s3://ppout/in/*.jsonl"], "s3://ppout/out")
    assert man["totals"] == local["totals"]
    assert s3_bytes("ppout/out") == local_bytes(tmp_path / "local")
    assert fs.exists("ppout/out/" + MANIFEST) and not [p for p in fs.find("ppout/out") if ".tmp-" in p]
    assert rows(PackedRowReader("s3://ppout/out", as_batch=False)) == rows(
        PackedRowReader(str(tmp_path / "local"), as_batch=False)
    )
    cfg = {
        "sources": [{"path": "s3://ppout/out", "format": "seqpack"}],
        "stage": {"type": "pack", "capacity": 300},
    }
    local_cfg = {**cfg, "sources": [{"path": str(tmp_path / "local"), "format": "seqpack"}]}
    assert all((a == b).all() for a, b in zip(packed(cfg), packed(local_cfg)))
    # a second run finds everything done (pulled from s3, verified) and rewrites nothing
    again = run_pp(["s3://ppout/in/*.jsonl"], "s3://ppout/out")
    assert again["totals"] == man["totals"]


def test_preprocess_to_s3_resumes_after_a_kill_on_another_machine(s3, tmp_path, monkeypatch):
    inputs = _text_corpus(tmp_path)
    clean = run_pp(inputs, tmp_path / "clean")
    fs = s3fs.S3FileSystem()
    fs.mkdir("kill")
    real_write = pp_task.write_shard
    calls = {"n": 0}

    def dying_write(path, rows, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_write(path, rows, **kw)

    monkeypatch.setattr(pp_task, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run_pp(inputs, "s3://kill/out")
    fs.invalidate_cache()
    assert not fs.exists("kill/out/" + MANIFEST)  # a reader never sees the unfinished output
    assert sorted(s3_bytes("kill/out")) == ["part-00000-0000.parquet"]
    monkeypatch.setattr(pp_task, "write_shard", real_write)
    monkeypatch.setenv("SEQPACK_STAGING_DIR", str(tmp_path / "other-machine"))
    man = run_pp(inputs, "s3://kill/out")
    assert man["totals"] == clean["totals"]
    assert s3_bytes("kill/out") == local_bytes(tmp_path / "clean")


def test_cli_preprocess_from_and_to_urls(s3, tmp_path, capsys):
    fs = s3fs.S3FileSystem()
    fs.mkdir("clibkt")
    for p in _text_corpus(tmp_path):
        fs.put_file(str(p), f"clibkt/in/{p.name}")
    argv = ["preprocess", "s3://clibkt/in/*.jsonl", "-o", "s3://clibkt/out", "--capacity", "256", "--quiet"]
    assert main(argv) == 0
    assert "-> s3://clibkt/out/manifest.json" in capsys.readouterr().out
    man = read_manifest("s3://clibkt/out")
    assert man["totals"]["tokens_out"] > 0
    assert [i["path"] for i in man["inputs"]] == ["s3://clibkt/in/t0.jsonl", "s3://clibkt/in/t1.jsonl"]
    assert main(["preprocess", "s3://clibkt/in/*.parquet", "-o", "s3://clibkt/x", "--quiet"]) == 2
    assert "s3://clibkt/in/*.parquet" in capsys.readouterr().err
