"""Shard format: round trips (Parquet and webdataset tars), atomic writes, manifest checks, and the
two shard readers (packed rows, documents for the loader) with partition and exact resume."""

from __future__ import annotations

import json
import os
import tempfile

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

from seqpack.batch import IGNORE_INDEX
from seqpack.shards import (
    MANIFEST,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    PackedRowReader,
    PackedRows,
    SeqpackShardReader,
    ShardError,
    ShardFile,
    atomic_write,
    max_row_tokens,
    read_manifest,
    verify_shard,
    write_json_atomic,
    write_shard,
)


def random_rows(seed: int, n_rows: int = 20, max_segs: int = 5) -> PackedRows:
    rng = np.random.default_rng(seed)
    segs = rng.integers(1, max_segs + 1, n_rows)
    seg_offsets = np.concatenate([[0], np.cumsum(segs)])
    seg_len = rng.integers(1, 50, seg_offsets[-1])
    row_tokens = np.add.reduceat(seg_len, seg_offsets[:-1])
    row_offsets = np.concatenate([[0], np.cumsum(row_tokens)])
    t = int(row_offsets[-1])
    return PackedRows(
        input_ids=rng.integers(0, 50_000, t).astype(np.int32),
        loss_mask=(rng.random(t) < 0.8).astype(np.uint8),
        row_offsets=row_offsets,
        seg_offsets=seg_offsets,
        seg_len=seg_len,
        seg_doc_id=rng.integers(0, 1 << 40, len(seg_len)),
        seg_start=rng.integers(0, 1000, len(seg_len)),
    )


def expected_rows(rows: PackedRows):
    for r in range(rows.n_rows):
        a, b = rows.row_offsets[r], rows.row_offsets[r + 1]
        s0, s1 = rows.seg_offsets[r], rows.seg_offsets[r + 1]
        yield (
            rows.input_ids[a:b],
            rows.loss_mask[a:b],
            np.concatenate([[0], np.cumsum(rows.seg_len[s0:s1])]),
            rows.seg_doc_id[s0:s1],
            rows.seg_start[s0:s1],
        )


def write_dir(tmp_path, parts: list[PackedRows], fmt="parquet", row_group_rows=4) -> str:
    d = str(tmp_path / "shards")
    os.makedirs(d, exist_ok=True)
    infos = []
    for i, rows in enumerate(parts):
        suffix = ".parquet" if fmt == "parquet" else ".tar"
        infos.append(
            write_shard(
                os.path.join(d, f"part-{i:05d}-0000{suffix}"), rows, fmt=fmt, row_group_rows=row_group_rows
            ).as_dict()
        )
    write_json_atomic(
        os.path.join(d, MANIFEST),
        {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "shards": infos,
            "config": {"capacity": 256},
        },
    )
    return d


@pytest.mark.parametrize("fmt", ["parquet", "wds"])
def test_round_trip_every_column(tmp_path, fmt):
    rows = random_rows(0)
    rows.validate()
    path = str(tmp_path / ("s.parquet" if fmt == "parquet" else "s.tar"))
    info = write_shard(path, rows, fmt=fmt, row_group_rows=3)
    assert (info.rows, info.tokens, info.segments) == (rows.n_rows, rows.n_tokens, rows.n_segments)
    assert verify_shard(str(tmp_path), info)
    got = list(ShardFile(path).rows())
    assert len(got) == rows.n_rows
    for row, exp in zip(got, expected_rows(rows)):
        for a, b in zip((row.input_ids, row.loss_mask, row.cu_seqlens, row.doc_ids, row.seg_start), exp):
            np.testing.assert_array_equal(a, b)
    # same rows, same bytes (no timestamps or run-dependent metadata)
    path2 = str(tmp_path / ("t.parquet" if fmt == "parquet" else "t.tar"))
    assert write_shard(path2, rows, fmt=fmt, row_group_rows=3).sha256 == info.sha256


def test_parquet_rows_are_views_not_copies(tmp_path):
    rows = random_rows(1, n_rows=8)
    path = str(tmp_path / "s.parquet")
    write_shard(path, rows, row_group_rows=8)
    f = ShardFile(path)
    assert f.num_groups == 1
    cols = f.group_columns(0)
    r0, r1 = list(ShardFile(path).rows())[:2]
    assert r0.input_ids.dtype == np.int32 and r0.loss_mask.dtype == np.uint8
    # a row is a slice of the row group's single value buffer
    assert not r0.input_ids.flags.owndata and not r0.loss_mask.flags.owndata
    vals = cols["input_ids"][1]
    assert not vals.flags.owndata  # numpy over the Arrow buffer
    assert np.shares_memory(vals[: len(r0)], vals)


def test_segments_and_batch_labels(tmp_path):
    rows = random_rows(2, n_rows=4)
    path = str(tmp_path / "s.parquet")
    write_shard(path, rows)
    row = next(ShardFile(path).rows())
    segs = list(row.segments())
    assert sum(len(s[2]) for s in segs) == len(row)
    b = row.to_batch(pad_to=len(row) + 7)
    b.validate()
    assert b.input_ids.shape[-1] == len(row) + 7
    labels = b.labels.reshape(-1).numpy()
    starts = row.cu_seqlens[:-1]
    assert (labels[starts] == IGNORE_INDEX).all()  # a segment's first token is never a target
    m = row.loss_mask.astype(bool)
    inner = np.ones(len(row), bool)
    inner[starts] = False
    np.testing.assert_array_equal(labels[: len(row)][inner & m], row.input_ids[inner & m])
    assert (labels[: len(row)][~m] == IGNORE_INDEX).all()


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    path = str(tmp_path / "x.parquet")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half a shard")
            raise RuntimeError("disk full")
    assert os.listdir(tmp_path) == []
    # an existing file survives a failed replacement untouched
    with open(path, "wb") as f:
        f.write(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(path) as tmp:
            open(tmp, "wb").close()
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["x.parquet"] and open(path, "rb").read() == b"old"


def test_manifest_errors(tmp_path):
    with pytest.raises(ShardError, match="no manifest.json"):
        read_manifest(str(tmp_path))
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ShardError, match="not a seqpack manifest"):
        read_manifest(str(tmp_path))
    (tmp_path / MANIFEST).write_text("{truncated")
    with pytest.raises(ShardError, match="unreadable manifest"):
        read_manifest(str(tmp_path))


def test_version_1_manifest_reads_seq_len_as_capacity(tmp_path):
    """Manifests written before the rename say ``config.seq_len``: read as ``capacity``."""
    d = write_dir(tmp_path, [random_rows(4, n_rows=3)])
    path = os.path.join(d, MANIFEST)
    man = json.load(open(path))
    man["version"], man["config"] = 1, {"seq_len": 300, "strategy": "pack"}
    write_json_atomic(path, man)
    got = read_manifest(d)
    assert got["config"] == {"capacity": 300, "strategy": "pack"} and max_row_tokens(got) == 300
    assert len(list(PackedRowReader(d, as_batch=False))) == 3
    man["config"] = {"seq_len": 300, "strategy": "decompose"}
    write_json_atomic(path, man)
    assert max_row_tokens(read_manifest(d)) == 257  # bucket 2^8, one extra token for the shifted target
    man["version"] = MANIFEST_VERSION + 1
    write_json_atomic(path, man)
    with pytest.raises(ShardError, match=f"manifest version {MANIFEST_VERSION + 1} unsupported"):
        read_manifest(d)


def test_verify_detects_corruption(tmp_path):
    rows = random_rows(3)
    path = str(tmp_path / "s.parquet")
    info = write_shard(path, rows)
    data = bytearray(open(path, "rb").read())
    data[100] ^= 0xFF
    open(path, "wb").write(bytes(data))
    assert not verify_shard(str(tmp_path), info)


@pytest.mark.parametrize("fmt", ["parquet", "wds"])
def test_packed_row_reader_partition_and_resume(tmp_path, fmt):
    parts = [random_rows(10 + i, n_rows=n) for i, n in enumerate([7, 1, 12])]
    d = write_dir(tmp_path, parts, fmt=fmt)
    all_rows = [e for p in parts for e in expected_rows(p)]
    seen = []
    for k in range(3):
        rd = PackedRowReader(d, consumer=(k, 3), as_batch=False)
        got = list(rd)
        assert len(got) == len(rd) == len(range(k, len(all_rows), 3))
        for row, j in zip(got, range(k, len(all_rows), 3)):
            np.testing.assert_array_equal(row.input_ids, all_rows[j][0])
            seen.append(j)
    assert sorted(seen) == list(range(len(all_rows)))
    # exact resume from any point
    full = [r.input_ids.copy() for r in PackedRowReader(d, consumer=(1, 2), as_batch=False)]
    for cut in range(len(full) + 1):
        rd = PackedRowReader(d, consumer=(1, 2), as_batch=False)
        it = iter(rd)
        for _ in range(cut):
            next(it)
        state = rd.state_dict()
        rd2 = PackedRowReader(d, consumer=(1, 2), as_batch=False)
        rd2.load_state_dict(state)
        rest = [r.input_ids.copy() for r in rd2]
        assert len(rest) == len(full) - cut
        for a, b in zip(rest, full[cut:]):
            np.testing.assert_array_equal(a, b)


def test_document_reader_for_the_loader(tmp_path):
    parts = [random_rows(20 + i, n_rows=n) for i, n in enumerate([9, 5])]
    d = write_dir(tmp_path, parts, row_group_rows=4)
    want = {}
    for p in parts:
        for ids, mask, cu, docs, starts in expected_rows(p):
            for i in range(len(docs)):
                a, b = cu[i], cu[i + 1]
                want[(int(docs[i]), int(starts[i]))] = (ids[a:b], mask[a:b].astype(bool))
    for n in (1, 3, 7):  # 7 > 5 row groups: segments are split inside row groups
        got = []
        for k in range(n):
            for rec in SeqpackShardReader(d, consumer=(k, n)):
                assert rec.tokens.dtype == np.int32 and not rec.tokens.flags.owndata
                got.append((rec.doc_id, rec.tokens.tobytes()))
        # every segment exactly once over the consumers
        assert sorted(got) == sorted((k[0], v[0].tobytes()) for k, v in want.items())
    # full content, in order, with one consumer
    recs = list(SeqpackShardReader(d))
    assert len(recs) == len(want)
    order = [
        (int(docs[i]), int(starts[i]))
        for p in parts
        for _, _, _, docs, starts in expected_rows(p)
        for i in range(len(docs))
    ]
    for rec, key in zip(recs, order):
        ids, mask = want[key]
        assert rec.doc_id == key[0]
        np.testing.assert_array_equal(rec.tokens, ids)
        got_mask = np.ones(len(ids), bool) if rec.loss_mask is None else rec.loss_mask
        np.testing.assert_array_equal(got_mask, mask)
    # resume mid-way, mid-row-group
    rd = SeqpackShardReader(d, consumer=(0, 2))
    it = iter(rd)
    first = [next(it).tokens.copy() for _ in range(11)]
    state = rd.state_dict()
    rest = [r.tokens.copy() for r in it]
    rd2 = SeqpackShardReader(d, consumer=(0, 2))
    rd2.load_state_dict(state)
    rest2 = [r.tokens.copy() for r in rd2]
    assert len(first) == 11 and len(rest) == len(rest2) > 0
    for a, b in zip(rest, rest2):
        np.testing.assert_array_equal(a, b)


@settings(max_examples=25, deadline=None)
@given(
    seg_lens=st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=6), min_size=1, max_size=12),
    fmt=st.sampled_from(["parquet", "wds"]),
    row_group_rows=st.integers(1, 5),
)
def test_any_rows_round_trip(seg_lens, fmt, row_group_rows):
    """Property: whatever the row/segment structure, the shard gives back the same rows."""
    counts = [len(r) for r in seg_lens]
    flat = np.array([n for r in seg_lens for n in r], np.int64)
    seg_offsets = np.concatenate([[0], np.cumsum(counts)])
    row_offsets = np.concatenate([[0], np.cumsum([sum(r) for r in seg_lens])])
    t = int(row_offsets[-1])
    rows = PackedRows(
        np.arange(t, dtype=np.int32) * 7 % 50021,
        (np.arange(t) % 3 > 0).astype(np.uint8),
        row_offsets,
        seg_offsets,
        flat,
        np.arange(len(flat), dtype=np.int64) + (1 << 33),
        np.arange(len(flat)) * 5,
    )
    rows.validate()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "s.parquet" if fmt == "parquet" else "s.tar")
        write_shard(path, rows, fmt=fmt, row_group_rows=row_group_rows)
        got = list(ShardFile(path).rows())
        assert len(got) == rows.n_rows
        for row, exp in zip(got, expected_rows(rows)):
            for a, b in zip((row.input_ids, row.loss_mask, row.cu_seqlens, row.doc_ids, row.seg_start), exp):
                np.testing.assert_array_equal(a, b)
