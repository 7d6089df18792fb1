"""The worker transport: shared-memory rings (seqpack.ring), lists of batches per DataLoader item
(seqpack.wire.grouped), and the loader over them: same batches with or without rings, under fork
and spawn, exact resume in the middle of a worker's list, counters exact at the end."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

from seqpack import build_loader, ring
from seqpack.batch import VarlenBatch
from seqpack.wire import GROUP_BYTES, GROUP_ITEMS, decode_batch, encode_batch, grouped
from tests.test_loader_state import make_corpus


def _bytes(n: int, fill: int) -> np.ndarray:
    return np.full(n, fill, np.uint8)


def test_ring_puts_and_takes_in_order_wraps_and_refuses_when_full():
    r = ring.Ring(100)
    a = r.put(_bytes(40, 1))
    b = r.put(_bytes(40, 2))
    assert a == (0, 40) and b == (40, 40)
    assert r.put(_bytes(30, 3)) is None  # 80 of 100 bytes in use, and an item never wraps
    assert r.take(*a).tolist() == [1] * 40
    c = r.put(_bytes(30, 3))
    assert c == (100, 30)  # skipped the ring's last 20 bytes, starts over at offset 0
    assert r.take(*b).tolist() == [2] * 40 and r.take(*c).tolist() == [3] * 30
    assert r.put(_bytes(101, 4)) is None and r.put(_bytes(0, 4)) is None  # too big; nothing to send
    assert r.put(_bytes(100, 5)) == (200, 100)  # a whole ring once it is empty


def test_taken_bytes_are_a_private_copy():
    r = ring.Ring(64)
    where = r.put(_bytes(64, 7))
    out = r.take(*where)
    r.put(_bytes(64, 9))
    assert out.tolist() == [7] * 64


def test_ship_and_receive_move_a_batch_through_a_ring_intact():
    lens = np.array([3, 5], np.int64)
    batch = VarlenBatch.from_arrays(np.arange(8, dtype=np.int64) + 40, lens, np.array([4, 9]), lens * 0)
    rings = ring.make_rings(2, 1 << 16)
    item = ring.ship(encode_batch(batch, None, 1, None, 0), rings[1], 1)
    assert type(item.buffer) is tuple and item.buffer[0] == 1
    got = decode_batch(ring.receive(item, rings))
    assert torch.equal(got.input_ids, batch.input_ids) and torch.equal(got.doc_ids, batch.doc_ids)
    assert torch.equal(got.labels, batch.labels) and got.max_seqlen == batch.max_seqlen
    small = ring.make_rings(1, 64)  # too small for this batch: it travels as it is
    kept = ring.ship(encode_batch(batch, None, 0, None, 0), small[0], 0)
    assert type(kept.buffer) is np.ndarray and ring.receive(kept, small) is kept
    assert ring.make_rings(2, 0) is None


def test_grouped_cuts_by_bytes_and_count_and_honours_a_first_size():
    def items(sizes):
        return [encode_batch({"x": torch.zeros(n, dtype=torch.uint8)}, None, 0, None, 0) for n in sizes]

    big = GROUP_BYTES // 2
    groups = list(grouped(iter(items([big, big, 10, big, big + 1, 5]))))
    assert [len(g) for g in groups] == [2, 3, 1]
    groups = list(grouped(iter(items([1] * (GROUP_ITEMS + 3)))))
    assert [len(g) for g in groups] == [GROUP_ITEMS, 3]
    groups = list(grouped(iter(items([big, big, big, big])), first=1))
    assert [len(g) for g in groups] == [1, 2, 1]
    assert list(grouped(iter([]))) == []


def _ids(loader) -> list[torch.Tensor]:
    return [b.input_ids.clone() for b in loader]


def test_loader_batches_are_the_same_with_rings_without_them_and_under_spawn(tmp_path, monkeypatch):
    cfg = make_corpus(tmp_path, 60, 30)
    taken = []
    take = ring.Ring.take
    monkeypatch.setattr(
        ring.Ring, "take", lambda self, start, n, alloc=None: taken.append(n) or take(self, start, n, alloc)
    )
    ref = _ids(build_loader(cfg, num_workers=2))
    assert len(ref) > 4 and len(taken) == len(ref)  # every batch came through a ring
    spawned = _ids(build_loader(cfg, num_workers=2, multiprocessing_context="spawn"))
    assert len(taken) == 2 * len(ref)
    monkeypatch.setattr(ring, "RING_BYTES", 0)
    monkeypatch.setattr("seqpack.loader.RING_BYTES", 0)
    piped = _ids(build_loader(cfg, num_workers=2))
    assert len(taken) == 2 * len(ref)  # none did
    for got in (spawned, piped):
        assert len(got) == len(ref) and all(torch.equal(a, b) for a, b in zip(got, ref))


def test_resume_inside_a_workers_list_is_exact_at_every_step(tmp_path, monkeypatch):
    """Lists of several batches per DataLoader item: a checkpoint between two batches of one list
    resumes with the rest of that list first, then the same worker order as the uninterrupted run."""
    monkeypatch.setattr("seqpack.wire.GROUP_ITEMS", 3)
    cfg = make_corpus(tmp_path, 60, 30)
    loader = build_loader(cfg, num_workers=2)
    ref, states = [], []
    for b in loader:
        ref.append(b.input_ids.clone())
        states.append(copy.deepcopy(loader.state_dict()))
    # each worker's first list is its first batch alone (no wait for a whole list), then lists of 3
    assert [s["group_left"] for s in states[:6]] == [0, 0, 2, 1, 0, 2]
    assert [s["next_worker"] for s in states[:6]] == [1, 0, 0, 0, 1, 1]
    for step in range(0, len(ref) - 1):
        resumed = build_loader(cfg, num_workers=2)
        resumed.load_state_dict(states[step])
        rest = _ids(resumed)
        assert len(rest) == len(ref) - step - 1, step
        assert all(torch.equal(a, b) for a, b in zip(rest, ref[step + 1 :])), step


def test_worker_counters_are_exact_at_the_end_of_an_epoch(tmp_path):
    """Counters ride with states and with each worker's last batch: at the end they equal in-process."""
    cfg = make_corpus(tmp_path, 60, 30)
    inproc = build_loader(cfg)
    list(inproc)
    workers = build_loader(cfg, num_workers=2)
    list(workers)
    want, got = inproc.stats(), workers.stats()
    keys = [k for k, v in want.items() if isinstance(v, int) and "tokens" in k]
    assert keys and all(got[k] == want[k] for k in keys), {k: (got.get(k), want[k]) for k in keys}


def test_a_bad_group_left_is_a_value_error(tmp_path):
    cfg = make_corpus(tmp_path, 30, 10)
    loader = build_loader(cfg, num_workers=2)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    del it
    with pytest.raises(ValueError, match="group_left"):
        build_loader(cfg, num_workers=2).load_state_dict({**state, "group_left": -1})


def test_no_shared_memory_warns_once_and_batches_go_through_the_pipe(tmp_path, monkeypatch):
    """A full /dev/shm (torch raises "No space left on device" at allocation): one warning, then the
    pipe for the rest of the loader's life, with the same batches."""
    cfg = make_corpus(tmp_path, 30, 10)
    with_rings = build_loader(cfg, num_workers=2)
    ref = [_ids(with_rings), _ids(with_rings)]  # two epochs

    def no_space(self, nbytes):
        raise RuntimeError("unable to allocate shared memory: No space left on device")

    monkeypatch.setattr(ring.Ring, "__init__", no_space)
    loader = build_loader(cfg, num_workers=2)
    with pytest.warns(RuntimeWarning, match="no shared memory for the worker rings"):
        first = _ids(loader)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        second = _ids(loader)  # the next epoch: no second warning
    for got, want in zip((first, second), ref):
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))


def test_pinned_loading_takes_each_batch_into_one_pinned_buffer(tmp_path, monkeypatch):
    """With ``pin_memory=True`` and an accelerator, a batch comes out of its ring straight into ONE
    page-locked buffer (all its tensors are views of it), never through ``batch.pin_memory()``'s
    one allocation per tensor. Here the allocator is a stand-in (no accelerator on CI)."""
    cfg = make_corpus(tmp_path, 40, 10)
    ref = _ids(build_loader(cfg, num_workers=2))
    sizes = []

    def fake_pinned(n):
        sizes.append(n)
        return np.empty(n, np.uint8)

    def no_per_tensor_pinning(self):
        raise AssertionError("batch.pin_memory() called")

    monkeypatch.setattr("seqpack.loader.accelerator_available", lambda: True)
    monkeypatch.setattr("seqpack.loader.pinned_bytes", fake_pinned)
    monkeypatch.setattr(VarlenBatch, "pin_memory", no_per_tensor_pinning)
    got = _ids(build_loader(cfg, num_workers=2, pin_memory=True))
    assert len(got) == len(ref) and all(torch.equal(a, b) for a, b in zip(got, ref))
    assert len(sizes) == len(ref)  # one allocation per batch
    monkeypatch.setattr(ring, "RING_BYTES", 0)  # through the pipe: copied into the pinned buffer too
    monkeypatch.setattr("seqpack.loader.RING_BYTES", 0)
    got = _ids(build_loader(cfg, num_workers=2, pin_memory=True))
    assert all(torch.equal(a, b) for a, b in zip(got, ref)) and len(sizes) == 2 * len(ref)
