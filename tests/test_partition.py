"""Reader partition and references: fetch by doc id (every format), the size-balanced partition of
work items, elastic re-partition of reader states, bad files counted once, empty/lost sources."""

from __future__ import annotations

import gzip
import io
import json
import os
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from seqpack import build_loader, read
from seqpack.shards import SeqpackShardReader
from seqpack.sources.lines import iter_line_range
from seqpack.sources.partition import UnitSize, split_work
from seqpack.sources.records import SourceError, split_doc_id
from tests.test_shards import random_rows, write_dir
from tests.test_sources import write_tar

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
    assert {split_doc_id(d)[0] for d in ids} == {5}
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


# ------------------------------------------------------------------------------------------ partition
def all_consumers(spec, n, **kw):
    """{consumer: [records]} over n consumers."""
    with _quiet():
        return {k: list(read(spec, consumer=(k, n), **kw)) for k in range(n)}


def write_uneven_parquet(tmp_path, counts=(1000, 200, 200, 100, 50), seed=0):
    rng = np.random.default_rng(seed)
    total = {}
    for i, c in enumerate(counts):
        lens = rng.integers(20, 400, c)
        ids = [rng.integers(0, 30000, n).tolist() for n in lens]
        pq.write_table(pa.table({"input_ids": ids}), tmp_path / f"part{i}.parquet", row_group_size=128)
        total[i] = int(lens.sum())
    return str(tmp_path / "*.parquet"), total


@pytest.mark.parametrize("n", [3, 8])
def test_five_uneven_shards_give_equal_tokens(tmp_path, n):
    spec, total = write_uneven_parquet(tmp_path)
    per = all_consumers(spec, n, input_ids_key="input_ids")
    tokens = np.array([sum(len(r.tokens) for r in recs) for recs in per.values()])
    assert tokens.sum() == sum(total.values())
    assert tokens.max() / tokens.mean() < 1.03, tokens  # count-based striding: 2.5x at n=3
    ids = [r.doc_id for recs in per.values() for r in recs]
    assert len(ids) == len(set(ids)) == 1550


def test_uneven_jsonl_files_by_bytes(tmp_path):
    rng = np.random.default_rng(3)
    for i, c in enumerate((400, 60, 30)):
        write_lines(
            tmp_path / f"t{i}.jsonl",
            [json.dumps({"text": "w" * int(rng.integers(5, 500))}).encode() for _ in range(c)],
        )
    per = all_consumers(str(tmp_path / "*.jsonl"), 4)
    chars = np.array([sum(len(r.text) for r in recs) for recs in per.values()])
    assert chars.max() / chars.mean() < 1.03, chars


def random_source(tmp_path, rng, kind):
    """A source of a random number of files of random sizes (some empty-ish) of one format."""
    files = int(rng.integers(1, 5))
    n_recs = [int(rng.integers(1, 40)) for _ in range(files)]
    docs = [f"r{i}-{j}-" + "q" * int(rng.integers(0, 30)) for i, c in enumerate(n_recs) for j in range(c)]
    it = iter(docs)
    for i, c in enumerate(n_recs):
        mine = [next(it) for _ in range(c)]
        if kind == "parquet":
            pq.write_table(
                pa.table({"text": mine}), tmp_path / f"f{i}.parquet", row_group_size=int(rng.integers(1, 12))
            )
        elif kind == "tar":
            write_tar(
                tmp_path / f"f{i}.tar", [(f"k{j:03d}", {"txt": t.encode()}) for j, t in enumerate(mine)]
            )
        else:
            write_lines(tmp_path / f"f{i}.{kind}", [json.dumps({"text": t}).encode() for t in mine])
    ext = {"parquet": "parquet", "tar": "tar"}.get(kind, kind)
    return str(tmp_path / f"*.{ext}"), docs


@pytest.mark.parametrize("seed", range(4))
def test_every_record_owned_exactly_once(tmp_path, seed):
    """Property (seeded): any files, any (world, workers) -> each record read by one consumer."""
    rng = np.random.default_rng(seed)
    for kind in ("parquet", "jsonl", "jsonl.zst", "tar"):
        d = tmp_path / f"{kind}-{seed}"
        d.mkdir()
        spec, docs = random_source(d, rng, kind)
        for world, workers in (
            (1, 0),
            (2, 1),
            (3, 2),
            (4, 3),
            (int(rng.integers(1, 9)), int(rng.integers(0, 5))),
        ):
            n = world * max(workers, 1)
            shuffle = int(rng.integers(0, 3)) if rng.random() < 0.5 else None
            got = [
                r.text
                for recs in all_consumers(spec, n, shuffle_seed=shuffle, epoch=1).values()
                for r in recs
            ]
            assert sorted(got) == sorted(docs), (kind, world, workers)


def test_split_work_tiles_units():
    rng = np.random.default_rng(7)
    for _ in range(200):
        units = [
            UnitSize(
                i, 0, float(rng.integers(0, 100)), int(rng.integers(0, 50)) if rng.random() < 0.8 else None
            )
            for i in range(int(rng.integers(1, 8)))
        ]
        n = int(rng.integers(1, 12))
        plans = split_work(units, n)
        for u in units:
            pieces = sorted((it[2], it[3]) for p in plans for it in p if it[0] == u.shard)
            assert pieces[0][0] == 0 and pieces[-1][1] == -1  # starts at 0, last runs to the end
            assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))  # contiguous, no overlap


@pytest.mark.parametrize("ext", ["txt", "txt.zst", "txt.gz"])
def test_line_ranges_give_each_line_to_one_range(tmp_path, ext):
    lines = [b"", b"a", b"bb", b"", b"ccc" * 9, b"d", b"", b""] + [b"x" * i for i in range(30)]
    path = write_lines(tmp_path / f"l.{ext}", lines)
    size = sum(len(x) + 1 for x in lines)
    rng = np.random.default_rng(0)
    for _ in range(30):
        cuts = sorted(set(rng.integers(0, size + 5, int(rng.integers(0, 6))).tolist()) - {0})
        bounds = [0, *cuts, -1]
        got = [(n, line) for a, b in zip(bounds, bounds[1:]) for _, n, line in iter_line_range(path, a, b)]
        assert got == list(enumerate(lines)), cuts


# ------------------------------------------------------------------------------------------ elastic
def read_some(rd, count):
    it = iter(rd)
    return [next(it).doc_id for _ in range(count)]


@pytest.mark.parametrize("kind", ["parquet", "jsonl.zst", "jsonl"])
def test_remaining_work_repartitioned_delivers_each_record_once(tmp_path, kind):
    spec, kw = make_source(tmp_path, kind)
    fmt = kw.pop("format")
    everything = {r.doc_id for r in read(spec, format=fmt, **kw)}
    delivered, items = [], []
    with _quiet():
        for k in range(3):  # three old consumers, each stopped somewhere mid-stream
            rd = read(spec, format=fmt, consumer=(k, 3), **kw)
            delivered += read_some(rd, [5, 0, 17][k])
            items += rd.remaining_work(rd.state_dict())
        for k in range(2):  # two new consumers share the rest
            rd = read(spec, format=fmt, consumer=(k, 2), **kw)
            state = rd.state_for_work(items[k::2])
            assert state["plan"] and "digest" in state
            rd.load_state_dict(state)
            first = read_some(rd, 2)  # resume again mid-way from the explicit plan's state
            again = read(spec, format=fmt, consumer=(k, 2), **kw)
            again.load_state_dict(rd.state_dict())
            delivered += first + [r.doc_id for r in again]
    assert sorted(delivered) == sorted(everything)


def test_same_topology_resume_is_exact_and_mismatches_are_value_errors(tmp_path):
    spec, kw = make_source(tmp_path, "jsonl")
    rd = read(spec, consumer=(1, 3), **kw)
    head = read_some(rd, 4)
    state = rd.state_dict()
    rest = [r.doc_id for r in rd]
    again = read(spec, consumer=(1, 3), **kw)
    again.load_state_dict(state)
    assert [r.doc_id for r in again] == rest and head
    other = read(spec, consumer=(0, 2), **kw)
    with pytest.raises(ValueError, match="consumer 1 of 3, this reader is consumer 0 of 2"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="epoch 0, this reader reads epoch 1"):
        read(spec, consumer=(1, 3), epoch=1, **kw).load_state_dict(state)
    with pytest.raises(ValueError, match="work item 0 names unit 0 of shard 9"):
        read(spec, **kw).state_for_work([(9, 0, 0, -1)])
    with open(tmp_path / "b.jsonl", "ab") as f:  # same unit count, other sizes: another partition
        f.write(b'{"text": "appended"}\n' * 40)
    with pytest.raises(ValueError, match="partition differs"):
        read(spec, consumer=(1, 3), **kw).load_state_dict(state)
    os.remove(tmp_path / "b.jsonl")
    with pytest.raises(ValueError, match="saved state has 2 units, the files now have 1"):
        read(spec, consumer=(1, 3), **kw).load_state_dict(state)


# ------------------------------------------------------------------------------------------ bad files
def sum_stats(spec, world, workers, **kw):
    n = world * max(workers, 1)
    total = {"records": 0, "skipped": 0, "skipped_files": 0}
    with _quiet():
        for k in range(n):  # rank r, worker w is consumer r * W + w
            rd = read(spec, consumer=(k, n), on_error="skip", **kw)
            list(rd)
            for key in total:
                total[key] += rd.stats()[f"read/{rd.name}/{key}"]
    return total


def test_bad_file_counted_once_across_ranks_and_workers(tmp_path):
    good = [json.dumps({"text": t}).encode() for t in TEXTS]
    write_lines(tmp_path / "a.jsonl.zst", good[:40])
    data = zstandard.ZstdCompressor().compress(b"".join(x + b"\n" for x in good[40:]))
    (tmp_path / "b.jsonl.zst").write_bytes(data[: len(data) * 2 // 3])  # fails mid-read
    (tmp_path / "c.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd garbage")  # fails on open
    for world, workers in ((3, 2), (1, 0), (2, 3), (5, 1)):
        got = sum_stats(str(tmp_path / "*.jsonl.zst"), world, workers)
        assert got["skipped_files"] == 2, (world, workers, got)
        assert 40 <= got["records"] < 90
    pq.write_table(pa.table({"text": TEXTS}), tmp_path / "a.parquet", row_group_size=7)
    (tmp_path / "b.parquet").write_bytes(b"PAR1 not parquet")
    assert sum_stats(str(tmp_path / "*.parquet"), 3, 2) == {"records": 90, "skipped": 0, "skipped_files": 1}


# ------------------------------------------------------------------------------------------ empty / lost
def test_source_without_data_is_an_error_unless_allowed(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "dirs" / "x.jsonl").mkdir(parents=True)
    (tmp_path / "e.jsonl").write_bytes(b"")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "e.parquet")
    cases = [
        (str(tmp_path / "empty"), "jsonl"),
        (str(tmp_path / "dirs" / "*.jsonl"), "jsonl"),
        (str(tmp_path / "e.jsonl"), "jsonl"),
        (str(tmp_path / "e.jsonl"), "text"),
        (str(tmp_path / "e.parquet"), "parquet"),
        (str(tmp_path / "nothing-*.jsonl"), "jsonl"),
    ]
    for spec, fmt in cases:
        with pytest.raises((SourceError, FileNotFoundError), match=r"src.*(no data|no files)|no files"):
            list(read(spec, format=fmt, name="src"))
        with pytest.warns(UserWarning, match="'src'.*has no data"):
            rds = [read(spec, format=fmt, name="src", allow_empty=True, consumer=(k, 3)) for k in range(3)]
            assert [list(rd) for rd in rds] == [[], [], []]
        assert sum(rd.stats()["read/src/empty_sources"] for rd in rds) == 1


def test_lost_file_at_a_later_epoch_raises_naming_it(tmp_path):
    spec, kw = make_source(tmp_path, "jsonl")
    files = read(spec, **kw).paths
    os.remove(files[1])
    with pytest.raises(SourceError, match=r"lost 1 file\(s\) since epoch 0: \[.*b\.jsonl"):
        read(spec, expect_files=files, epoch=1, **kw)


def test_loader_raises_for_a_file_lost_between_epochs_and_allows_empty_sources(tmp_path):
    (tmp_path / "data").mkdir()
    for i in range(3):
        write_lines(
            tmp_path / "data" / f"p{i}.jsonl", [json.dumps({"text": t}).encode() for t in TEXTS[i::3]]
        )
    (tmp_path / "none").mkdir()
    cfg = {
        "sources": [
            {"path": str(tmp_path / "data" / "*.jsonl")},
            {"path": str(tmp_path / "none"), "format": "jsonl", "allow_empty": True},
        ],
        "stage": {"type": "pack", "capacity": 256},
    }
    loader = build_loader(cfg)
    with pytest.warns(UserWarning, match="'source1'.*has no data"):
        docs = {int(d) for b in loader for d in b.doc_ids[: b.n_real_segments]}
    assert len(docs) == len(TEXTS)
    assert loader.stats()["read/source1/empty_sources"] == 1
    os.remove(tmp_path / "data" / "p1.jsonl")
    with pytest.raises(SourceError, match=r"'source0' lost 1 file\(s\) since epoch 0: \[.*p1\.jsonl"):
        list(loader)  # epoch 1 re-resolves the glob
    with pytest.raises(SourceError, match="none: source 'source0' resolves to no data"):
        list(build_loader({**cfg, "sources": [cfg["sources"][1] | {"allow_empty": False}]}))


def test_seqpack_row_groups_split_over_more_consumers(tmp_path):
    d = write_dir(tmp_path, [random_rows(3, n_rows=9), random_rows(4, n_rows=6)], row_group_rows=4)
    whole = [(r.doc_id, r.tokens.tobytes()) for r in SeqpackShardReader(d)]
    with _quiet():
        per = [
            [(r.doc_id, r.tokens.tobytes()) for r in SeqpackShardReader(d, consumer=(k, 7))] for k in range(7)
        ]
    assert all(per)  # 5 row groups, 7 consumers: groups are split by segments, nobody idles
    assert [x for p in per for x in p] == whole  # contiguous ranges in canonical order


def test_few_units_warn_and_a_lone_compressed_file_feeds_every_consumer(tmp_path):
    write_lines(tmp_path / "one.jsonl.zst", [json.dumps({"text": t}).encode() for t in TEXTS])
    spec = str(tmp_path / "one.jsonl.zst")
    with pytest.warns(UserWarning, match=r"source 'big': 1 unit\(s\) in 1 file\(s\) for 4 consumers"):
        per = [[r.text for r in read(spec, name="big", consumer=(k, 4))] for k in range(4)]
    assert all(per) and [t for p in per for t in p] == TEXTS  # contiguous ranges, canonical order
