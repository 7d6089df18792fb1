"""Decode-ahead of Parquet row groups (seqpack.sources.ahead): the same batches with it on or off,
resume inside a unit, the thread really decoding the next unit, and a unit that fails on the thread
reported by the reader as without it."""

from __future__ import annotations

import copy

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from seqpack import build_loader
from seqpack.sources import ahead, columnar
from seqpack.sources.records import SourceError


def _parquet(tmp_path, n_files=2, rows=90, group=16):
    rng = np.random.default_rng(4)
    for f in range(n_files):
        ids = [rng.integers(5, 900, int(rng.integers(3, 120))).tolist() for _ in range(rows)]
        pq.write_table(pa.table({"input_ids": ids}), tmp_path / f"d{f}.parquet", row_group_size=group)
    return {
        "sources": [{"path": str(tmp_path / "d*.parquet"), "input_ids_key": "input_ids"}],
        "stage": {"type": "pack", "capacity": 256, "pad_to": 256, "buffer_docs": 8},
        "even_batches": "none",
    }


def _ids(loader) -> list[torch.Tensor]:
    return [b.input_ids.clone() for b in loader]


def test_batches_are_the_same_with_and_without_decode_ahead(tmp_path, monkeypatch):
    cfg = _parquet(tmp_path)
    calls = []
    detached = columnar.ParquetReader.detached_unit_block
    monkeypatch.setattr(
        columnar.ParquetReader,
        "detached_unit_block",
        lambda self, shard, unit: calls.append((shard, unit)) or detached(self, shard, unit),
    )
    on = _ids(build_loader(cfg))
    n_units = sum(pq.ParquetFile(tmp_path / f"d{f}.parquet").num_row_groups for f in range(2))
    # every unit but the first was decoded on the thread, each once, in plan order
    assert calls == sorted(set(calls)) and len(calls) == n_units - 1
    monkeypatch.setattr(ahead, "DEPTH", 0)
    off = _ids(build_loader(cfg))
    assert len(on) == len(off) > 5 and all(torch.equal(a, b) for a, b in zip(on, off))
    assert len(calls) == n_units - 1  # off: no thread
    two_off = _ids(build_loader(cfg, num_workers=2))
    monkeypatch.setattr(ahead, "DEPTH", 1)
    two = _ids(build_loader(cfg, num_workers=2))  # decoding ahead inside DataLoader workers
    assert len(two) == len(two_off) and all(torch.equal(a, b) for a, b in zip(two, two_off))


def test_resume_inside_a_unit_with_decode_ahead_is_exact(tmp_path):
    cfg = _parquet(tmp_path)
    loader = build_loader(cfg)
    ref, states = [], []
    for b in loader:
        ref.append(b.input_ids.clone())
        states.append(copy.deepcopy(loader.state_dict()))
    for step in (0, 3, len(ref) // 2, len(ref) - 2):
        resumed = build_loader(cfg)
        resumed.load_state_dict(states[step])
        rest = _ids(resumed)
        assert len(rest) == len(ref) - step - 1 and all(
            torch.equal(a, b) for a, b in zip(rest, ref[step + 1 :])
        )


def test_a_unit_failing_on_the_thread_is_read_and_reported_by_the_reader(tmp_path, monkeypatch):
    cfg = _parquet(tmp_path, n_files=1)
    original = columnar.ParquetReader.detached_unit_block

    def broken(self, shard, unit):
        raise OSError("disk went away")

    monkeypatch.setattr(columnar.ParquetReader, "detached_unit_block", broken)
    got = _ids(build_loader(cfg))  # the reader's own reads succeed: nothing lost
    monkeypatch.setattr(ahead, "DEPTH", 0)
    assert [t.tolist() for t in got] == [t.tolist() for t in _ids(build_loader(cfg))]
    monkeypatch.setattr(ahead, "DEPTH", 1)
    # a row group that really is corrupt: the thread's read fails, the reader's read raises by policy
    path = tmp_path / "d0.parquet"
    meta = pq.ParquetFile(path).metadata
    col = meta.row_group(2).column(0)
    raw = bytearray(path.read_bytes())
    start = col.data_page_offset
    raw[start : start + 64] = bytes(64)
    path.write_bytes(bytes(raw))
    monkeypatch.setattr(columnar.ParquetReader, "detached_unit_block", original)
    with pytest.raises(SourceError, match="d0.parquet"):
        _ids(build_loader(cfg))
