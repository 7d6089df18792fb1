"""seqpack.runahead: a chain made ahead on a thread, in order, bounded by bytes, errors raised where
consumed, stopped when the consumer stops; and the loader's tokenizing chains use it."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from seqpack import runahead
from seqpack.config import load_config
from seqpack.pipeline import PipelineDataset


def test_items_come_in_order_and_the_bound_holds():
    made = []

    def produce():
        for i in range(50):
            made.append(i)
            yield i

    out = []
    gen = runahead.run_ahead(produce(), size=lambda i: 10, max_bytes=30)
    for item in gen:
        time.sleep(0.001)
        ahead = len(made) - len(out) - 1  # made, not yet taken (the one just taken excluded)
        assert ahead <= 3 + 1  # 30 bytes of 10-byte items, plus the one the thread holds
        out.append(item)
    assert out == list(range(50))


def test_an_oversized_item_still_passes_and_errors_come_after_the_items_before_them():
    def produce():
        yield "a" * 100
        yield "b"
        raise ValueError("bad record 7 in shard.jsonl")

    got = []
    with pytest.raises(ValueError, match="bad record 7"):
        for item in runahead.run_ahead(produce(), size=len, max_bytes=10):
            got.append(item)
    assert got == ["a" * 100, "b"]


def test_a_consumer_that_stops_early_stops_the_thread():
    started = threading.Event()

    def produce():
        started.set()
        i = 0
        while True:
            yield i
            i += 1

    gen = runahead.run_ahead(produce(), size=lambda i: 1, max_bytes=5)
    assert next(gen) == 0
    gen.close()
    deadline = time.monotonic() + 5
    while any(t.name == "seqpack-chain" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.name == "seqpack-chain" for t in threading.enumerate())


def test_zero_bytes_means_no_thread():
    assert list(runahead.run_ahead(iter([1, 2, 3]), size=lambda i: 1, max_bytes=0)) == [1, 2, 3]


def test_only_tokenizing_chains_run_ahead(tmp_path):
    text = {"sources": [{"path": str(tmp_path / "a.jsonl")}], "stage": {"type": "pack", "capacity": 64}}
    ids = {
        "sources": [{"path": str(tmp_path / "a.parquet"), "input_ids_key": "input_ids"}],
        "stage": {"type": "pack", "capacity": 64},
    }
    (tmp_path / "a.jsonl").write_text('{"text": "hello"}\n')
    pq.write_table(pa.table({"input_ids": [[1, 2, 3]]}), tmp_path / "a.parquet")
    assert PipelineDataset(load_config(text), 0, 1, 2, wire=True).tokenizes
    assert not PipelineDataset(load_config(ids), 0, 1, 2, wire=True).tokenizes
