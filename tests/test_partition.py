"""Reader partition and references: fetch by doc id (every format), the size-balanced partition of
work items, elastic re-partition of reader states, bad files counted once, empty/lost sources."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from seqpack import read
from seqpack.shards import SeqpackShardReader
from seqpack.sources.records import SourceError
from tests.test_shards import random_rows, write_dir

RNG = np.random.default_rng(0)
TEXTS = [f"doc {i} " + "xyz" * int(RNG.integers(0, 40)) for i in range(90)]
TOKENS = [RNG.integers(0, 1000, int(RNG.integers(1, 60))) for _ in range(90)]


def _quiet():
    """The reader warns when a source has fewer units than consumers (expected in these tests)."""
    return warnings.catch_warnings(action="ignore", category=UserWarning)


def write_lines(path, lines: list[bytes]):
    data = b"".join(line + b"\n" for line in lines)
    if str(path).endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    elif str(path).endswith(".gz"):
        data = gzip.compress(data)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def write_tar(path, samples):
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return str(path)


def npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(a))
    return buf.getvalue()


def make_source(tmp_path, kind: str) -> tuple[str, dict]:
    """Two files (uneven) of one format; returns (path spec, reader kwargs)."""
    a, b = slice(0, 70), slice(70, 90)
    if kind in ("jsonl", "jsonl.zst", "jsonl.gz"):
        for name, sl in (("a", a), ("b", b)):
            write_lines(tmp_path / f"{name}.{kind}", [json.dumps({"text": t}).encode() for t in TEXTS[sl]])
        return str(tmp_path / f"*.{kind}"), {"format": "jsonl"}
    if kind == "text-line":
        for name, sl in (("a", a), ("b", b)):
            write_lines(tmp_path / f"{name}.txt", [t.encode() for t in TEXTS[sl]] + [b""])
        return str(tmp_path / "*.txt"), {"format": "text", "split": "line"}
    if kind == "text-file":
        for i, t in enumerate(TEXTS[:12]):
            (tmp_path / f"f{i:02d}.txt").write_text(t)
        return str(tmp_path / "*.txt"), {"format": "text"}
    if kind in ("parquet", "parquet-tokens"):
        for name, sl in (("a", a), ("b", b)):
            cols = (
                {"text": TEXTS[sl]} if kind == "parquet" else {"input_ids": [t.tolist() for t in TOKENS[sl]]}
            )
            pq.write_table(pa.table(cols), tmp_path / f"{name}.parquet", row_group_size=16)
        extra = {} if kind == "parquet" else {"input_ids_key": "input_ids"}
        return str(tmp_path / "*.parquet"), {"format": "parquet", **extra}
    if kind in ("arrow", "arrow-stream"):
        table = pa.table({"text": TEXTS})
        with pa.OSFile(str(tmp_path / "a.arrow"), "wb") as f:
            opener = pa.ipc.new_file if kind == "arrow" else pa.ipc.new_stream
            with opener(f, table.schema) as w:
                for batch in table.to_batches(max_chunksize=25):
                    w.write_batch(batch)
        return str(tmp_path / "a.arrow"), {"format": "arrow"}
    if kind == "hf":
        import datasets

        datasets.Dataset.from_dict({"input_ids": [t.tolist() for t in TOKENS]}).save_to_disk(
            str(tmp_path / "ds")
        )
        return str(tmp_path / "ds"), {"format": "hf", "chunk_rows": 32, "input_ids_key": "input_ids"}
    if kind == "webdataset":
        write_tar(tmp_path / "a.tar", [(f"s{i:03d}", {"txt": t.encode()}) for i, t in enumerate(TEXTS[:50])])
        write_tar(
            tmp_path / "b.tar", [(f"s{i:03d}", {"input_ids.npy": npy(TOKENS[i])}) for i in range(50, 60)]
        )
        return str(tmp_path / "a.tar"), {"format": "webdataset"}
    raise ValueError(kind)


def key(rec):
    if rec.text is not None:
        return rec.text
    return tuple(int(v) for v in rec.tokens)


KINDS = [
    "jsonl",
    "jsonl.zst",
    "jsonl.gz",
    "text-line",
    "text-file",
    "parquet",
    "parquet-tokens",
    "arrow",
    "arrow-stream",
    "hf",
    "webdataset",
]


# ------------------------------------------------------------------------------------------ fetch
@pytest.mark.parametrize("kind", KINDS)
def test_fetch_returns_the_streamed_records(tmp_path, kind):
    spec, kw = make_source(tmp_path, kind)
    fmt = kw.pop("format")
    streamed = {}
    with _quiet():
        for k in range(3):
            for rec in read(spec, format=fmt, consumer=(k, 3), source_index=5, **kw):
                assert rec.doc_id not in streamed
                streamed[rec.doc_id] = key(rec)
    assert len(streamed) >= 10
    ids = sorted(streamed)
    order = list(np.random.default_rng(1).permutation(ids)) + ids[:2]  # any order, repeats allowed
    rd = read(spec, format=fmt, source_index=5, **kw)
    got = rd.fetch([int(d) for d in order])
    assert [g.doc_id for g in got] == [int(d) for d in order]
    assert [key(g) for g in got] == [streamed[int(d)] for d in order]


def test_fetch_missing_record_names_it(tmp_path):
    spec, kw = make_source(tmp_path, "jsonl")
    rd = read(spec, **kw)
    last = max(r.doc_id for r in read(spec, **kw))
    with pytest.raises(SourceError, match=r"b\.jsonl: record 20: no such record"):
        rd.fetch([last + 1])
    with pytest.raises(ValueError, match="of source 3"):
        rd.fetch([last + (3 << 56)])


def test_fetch_parquet_reads_only_needed_row_groups(tmp_path, monkeypatch):
    spec, kw = make_source(tmp_path, "parquet")
    rd = read(spec, **kw)
    seen = []
    orig = pq.ParquetFile.read_row_group

    def spy(self, i, *a, **k):
        seen.append(i)
        return orig(self, i, *a, **k)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    recs = rd.fetch([rd.doc_id(0, 40), rd.doc_id(0, 33), rd.doc_id(1, 3)])
    assert [r.text for r in recs] == [TEXTS[40], TEXTS[33], TEXTS[73]]
    assert seen == [2, 0]  # rows 33 and 40 both live in row group 2 of a; row 3 in group 0 of b


def test_fetch_seqpack_shards(tmp_path):
    d = write_dir(tmp_path, [random_rows(3, n_rows=9), random_rows(4, n_rows=6)], row_group_rows=4)
    streamed = {}
    with _quiet():
        for k in range(3):
            for rec in SeqpackShardReader(d, consumer=(k, 3)):
                streamed.setdefault(rec.doc_id, []).append(rec.tokens.copy())
    single = [d_ for d_, v in streamed.items() if len(v) == 1]
    rd = SeqpackShardReader(d)
    got = rd.fetch(single[:20])
    for g, d_ in zip(got, single[:20]):
        np.testing.assert_array_equal(g.tokens[-len(streamed[d_][0]) :], streamed[d_][0])
