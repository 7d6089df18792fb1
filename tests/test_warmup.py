"""Warm-up of the online packer and the pack stage: the first batch of a stream does not wait for a
full buffer, warm-up bins are full ones, nothing is lost, and resume inside the warm-up is exact."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from seqpack import OnlinePacker, build_loader
from seqpack.sources import tokenize as tokenize_module
from tests.test_loader_state import make_corpus


def _lengths(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 200, n)


def _count_encodes(monkeypatch) -> list[int]:
    """Records per byte-tokenizer ``encode_batch`` call, from now on (a list that fills as calls come)."""
    encoded: list[int] = []
    original = tokenize_module.ByteTokenizer.encode_batch
    monkeypatch.setattr(
        tokenize_module.ByteTokenizer,
        "encode_batch",
        lambda self, texts: encoded.append(len(texts)) or original(self, texts),
    )
    return encoded


def _run(packer: OnlinePacker, lengths: np.ndarray, chunk: int) -> list[tuple[int, np.ndarray]]:
    """(items added so far, bin) for every bin, adding ``chunk`` items at a time, then the flush."""
    out = []
    for lo in range(0, len(lengths), chunk):
        keys = np.arange(lo, min(lo + chunk, len(lengths)))
        out += [(keys[-1] + 1, b) for b in packer.add_many(keys, lengths[keys])]
    out += [(len(lengths), b) for b in packer.flush()]
    return out


def test_warmup_bins_come_early_are_full_and_lose_nothing():
    cap, buf = 8192, 1000
    lengths = np.clip(np.random.default_rng(0).lognormal(6, 1, 5000).astype(np.int64), 1, cap)
    warm = _run(OnlinePacker(cap, buffer_docs=buf, warmup=64), lengths, 64)
    cold = _run(OnlinePacker(cap, buffer_docs=buf), lengths, 64)
    assert warm[0][0] <= 192 and cold[0][0] >= buf  # the first bin after a few items, not a full buffer
    early = [b for seen, b in warm if seen < buf]
    assert early and all(lengths[b].sum() >= np.ceil(0.99 * cap) for b in early)
    for bins in (warm, cold):
        keys = np.concatenate([b for _, b in bins])
        assert sorted(keys.tolist()) == list(range(len(lengths)))  # every item exactly once
        assert all(lengths[b].sum() <= cap for _, b in bins)
    assert len(warm) <= len(cold) + 1  # the stream packs as well (measured: 401 bins vs 402)


def test_warmup_windows_do_not_age_items_and_stop_once_the_buffer_fills():
    packer = OnlinePacker(100, buffer_docs=10, min_fill=1.0, max_age=1, warmup=2)
    assert packer.warming
    for k in range(9):  # no bin is ever exactly full: warm-up emits nothing, and ages stay 0
        assert packer.add(k, 30) == []
    assert packer.state_dict()["ages"] == [0] * 9 and packer.warming
    bins = packer.add(9, 30)  # the buffer fills: a real window (forced bin, ages + 1)
    assert bins and not packer.warming
    assert set(packer.state_dict()["ages"]) == {1}
    assert "warmup_since" not in packer.state_dict()


def test_packer_state_inside_the_warmup_resumes_exactly():
    lengths = _lengths(300, seed=3)
    ref = _run(OnlinePacker(256, buffer_docs=200, warmup=8), lengths, 5)
    first = OnlinePacker(256, buffer_docs=200, warmup=8)
    head = []
    for lo in range(0, 45, 5):
        keys = np.arange(lo, lo + 5)
        head += [b.tolist() for b in first.add_many(keys, lengths[keys])]
    state = copy.deepcopy(first.state_dict())
    assert "warmup_since" in state
    second = OnlinePacker(256, buffer_docs=200, warmup=8)
    second.load_state_dict(state)
    tail = []
    for lo in range(45, len(lengths), 5):
        keys = np.arange(lo, min(lo + 5, len(lengths)))
        tail += [b.tolist() for b in second.add_many(keys, lengths[keys])]
    tail += [b.tolist() for b in second.flush()]
    assert head + tail == [b.tolist() for _, b in ref]


def test_first_batch_of_a_loader_needs_only_warmup_documents(tmp_path, monkeypatch):
    cfg = make_corpus(tmp_path, 400, 0)
    cfg["sources"] = cfg["sources"][:1]
    cfg["shuffle"] = None
    cfg["stage"] = {"type": "pack", "capacity": 256, "pad_to": 256, "buffer_docs": 300, "warmup_docs": 16}
    cfg["tokenize_batch"] = 8
    encoded = _count_encodes(monkeypatch)
    it = iter(build_loader(cfg))
    next(it)
    assert sum(encoded) <= 64  # not the 300 of a full buffer
    cold = {**cfg, "stage": {**cfg["stage"], "warmup_docs": 0}}
    encoded.clear()
    next(iter(build_loader(cold)))
    assert sum(encoded) >= 300


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_during_the_warmup_is_exact(tmp_path, workers):
    cfg = make_corpus(tmp_path, 200, 60)
    cfg["stage"] = {"type": "pack", "capacity": 256, "pad_to": 256, "buffer_docs": 120, "warmup_docs": 8}
    loader = build_loader(cfg, num_workers=workers)
    ref, states = [], []
    for b in loader:
        ref.append(b.input_ids.clone())
        states.append(copy.deepcopy(loader.state_dict()))
    for step in (0, 1, 2, 5):
        resumed = build_loader(cfg, num_workers=workers)
        resumed.load_state_dict(states[step])
        rest = [b.input_ids for b in resumed]
        assert len(rest) == len(ref) - step - 1
        assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(rest, ref[step + 1 :])), step


def test_a_fresh_tokenizer_stream_starts_with_small_batches(tmp_path, monkeypatch):
    cfg = make_corpus(tmp_path, 600, 0, tokenize_batch=128)
    cfg["sources"] = cfg["sources"][:1]
    encoded = _count_encodes(monkeypatch)
    list(build_loader(cfg))
    first = tokenize_module.FIRST_BATCH
    # (a length index may be built first, in calls of its own size)
    at = encoded.index(first)
    assert encoded[at : at + 4] == [first, 2 * first, 4 * first, 128] and set(encoded[at + 4 : -1]) == {128}


def test_resume_inside_the_small_first_tokenizer_batches_is_exact(tmp_path):
    """A state taken while the tokenizer's batches are still small resumes at full batch size:
    the documents (and so the batches) are the same, batch bounds never change the output."""
    cfg = make_corpus(tmp_path, 300, 0, tokenize_batch=128)
    cfg["sources"] = cfg["sources"][:1]
    cfg["stage"] = {"type": "pack", "capacity": 128, "pad_to": 128, "buffer_docs": 40, "warmup_docs": 8}
    loader = build_loader(cfg)
    ref, states = [], []
    for b in loader:
        ref.append(b.input_ids.clone())
        states.append(copy.deepcopy(loader.state_dict()))
    for step in range(0, 6):
        resumed = build_loader(cfg)
        resumed.load_state_dict(states[step])
        rest = [b.input_ids for b in resumed]
        assert len(rest) == len(ref) - step - 1
        assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(rest, ref[step + 1 :])), step
