"""``balance:`` without read amplification, and exact step counts from length indexes.

Each rank keeps and reads only its own records; the step count (``precount``, ``balance:``'s
equal steps) comes from per-source length indexes, built once (one tokenizing pass) and cached.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from glob import glob as glob_files

import numpy as np
import pytest

from seqpack import preprocess
from seqpack.loader import build_loader
from seqpack.node import SequenceNode
from seqpack.plan import pack
from seqpack.plan.balance import CostModel
from seqpack.shards import PackedRowReader
from seqpack.sources import lengths as lengths_module
from seqpack.sources import tokenize as tokenize_module
from seqpack.sources.jsonl import JsonlReader
from seqpack.sources.lengths import IndexedDocuments, cache_dir, index_key, length_index
from seqpack.sources.tokenize import Tokenize, TokenizerSpec
from seqpack.stages.balance import CountedRanks, RankBalance
from seqpack.stages.pack_offline import batches_from_plan

UNEVEN = (500, 100, 100, 50, 25)  # documents per shard: 5 uneven shards
CAPACITY = 1024


def write_shards(folder, sizes=UNEVEN, seed=0, mean=200) -> str:
    """jsonl shards of random lowercase text; returns their glob."""
    rng = np.random.default_rng(seed)
    for i, n in enumerate(sizes):
        with open(os.path.join(folder, f"part{i}.jsonl"), "w") as f:
            for _ in range(n):
                k = int(np.clip(rng.lognormal(np.log(mean), 0.9), 3, 3 * CAPACITY))
                f.write(
                    json.dumps({"text": "".join(chr(97 + int(c)) for c in rng.integers(0, 26, k))}) + "\n"
                )
    return os.path.join(folder, "part*.jsonl")


def config(glob, balance=None, *, shuffle=True):
    cfg = {
        "sources": [{"path": glob, "format": "jsonl"}],
        "tokenizer": "byte",
        "stage": {"type": "pack", "capacity": CAPACITY, "pad_to": CAPACITY, "buffer_docs": 32},
        "even_batches": "precount",
    }
    if shuffle:
        cfg["shuffle"] = {"seed": 7, "buffer_docs": 64}
    if balance is not None:
        cfg["balance"] = balance
    return cfg


def step_waste(costs: np.ndarray) -> float:
    """Of the cost of ``costs`` ``[world, steps]``, the fraction a synchronous step waits for its
    slowest rank, over the steps in which no rank pads (padding comes from uneven shares, which
    balancing within a rank's own data cannot change)."""
    c = costs[:, (costs > 0).all(0)]
    return float((c.max(0) - c.mean(0)).sum() / c.sum())


def records_read(loader) -> int:
    return sum(v for k, v in loader.stats().items() if k.startswith("read/") and k.endswith("/records"))


@pytest.fixture
def encode_calls(monkeypatch):
    """Counts the byte tokenizer's encode_batch calls (tokenizing work) in this process."""
    calls = {"texts": 0}
    original = tokenize_module.ByteTokenizer.encode_batch

    def counting(self, texts):
        calls["texts"] += len(texts)
        return original(self, texts)

    monkeypatch.setattr(tokenize_module.ByteTokenizer, "encode_batch", counting)
    return calls


@pytest.mark.parametrize(
    "world,workers,balance",
    [
        (3, 0, None),
        (3, 0, {"b": 0.001, "micro_batches_per_rank": 2, "window_steps": 4}),
        (2, 2, {"b": 0.001}),
    ],
)
def test_precount_equals_the_actual_count(tmp_path, encode_calls, world, workers, balance):
    cfg = config(write_shards(tmp_path), balance)
    loaders = [build_loader(cfg, rank=r, world_size=world, num_workers=workers) for r in range(world)]
    counted = [lo.steps_per_epoch() for lo in loaders]
    assert encode_calls["texts"] == sum(UNEVEN)  # the index build: every record tokenized once in all
    got = [sum(1 for _ in lo) for lo in loaders]
    assert got == counted == [counted[0]] * world
    # a new loader (another process would do the same) counts from the cached index: no tokenizing
    encode_calls["texts"] = 0
    again = build_loader(cfg, rank=world - 1, world_size=world, num_workers=workers)
    assert again.steps_per_epoch() == counted[0] and again.steps_per_epoch(epoch=1) > 0
    assert encode_calls["texts"] == 0


def test_balance_reads_only_the_ranks_share(tmp_path):
    glob = write_shards(tmp_path)
    world = 4
    plain = [build_loader(config(glob), rank=r, world_size=world) for r in range(world)]
    bal = [build_loader(config(glob, {"b": 0.001}), rank=r, world_size=world) for r in range(world)]
    plain_docs, bal_docs = [], []
    for p, b in zip(plain, bal):
        plain_docs.append(sorted(int(d) for x in p for d in x.doc_ids[: x.n_real_segments]))
        bal_docs.append(sorted(int(d) for x in b for d in x.doc_ids[: x.n_real_segments]))
    # every rank read exactly its own records, as without balance:, and kept exactly its documents
    assert [records_read(b) for b in bal] == [records_read(p) for p in plain]
    assert sum(records_read(b) for b in bal) == sum(UNEVEN)
    assert bal_docs == plain_docs
    assert len({b.stats()["balance/steps"] for b in bal}) == 1


def test_balance_steps_pair_similar_costs(tmp_path):
    """Ranks of one step carry their window's j-th heaviest micro-batches: lower step imbalance."""
    glob = write_shards(tmp_path, sizes=(120, 120, 120, 120), seed=3)
    cost = CostModel(a=1.0, b=0.01)
    world = 2
    section = {"a": 1.0, "b": 0.01}  # window_steps: 16 (default)
    runs = {}
    for name, bal in (("plain", None), ("balanced", section)):
        outs = [list(build_loader(config(glob, bal), rank=r, world_size=world)) for r in range(world)]
        n = min(len(o) for o in outs)
        runs[name] = np.array([[cost.varlen_cost(b) for b in o[:n]] for o in outs])  # [world, steps]
    assert step_waste(runs["balanced"]) < 0.5 * step_waste(runs["plain"])


def test_old_balance_checkpoint_is_refused(tmp_path):
    cfg = config(write_shards(tmp_path, sizes=(40, 40)), {"b": 0.001}, shuffle=False)
    loader = build_loader(cfg, rank=0, world_size=2)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    found = []

    def visit(s):
        if isinstance(s, dict):
            if "window" in s and "pos" in s and "counts" in s:
                found.append(s)
            for v in s.values():
                visit(v)
        elif isinstance(s, (list, tuple)):
            for v in s:
                visit(v)

    visit(state)
    assert len(found) == 1 and isinstance(found[0]["upstream"], dict)  # this rank's chain only
    found[0]["queue"] = []  # the old layout held every rank's chain state and queued batches
    again = build_loader(cfg, rank=0, world_size=2)
    again.load_state_dict(state)
    with pytest.raises(ValueError, match="old balance"):
        next(iter(again))


@pytest.mark.parametrize("n_consumers,shuffle_seed", [(1, None), (3, None), (7, 5), (12, None)])
def test_indexed_documents_match_the_tokenized_stream(tmp_path, n_consumers, shuffle_seed):
    """Same doc_ids and lengths as reader + tokenizer, for unit striding (units >= consumers) and
    record striding (units < consumers), with and without shard shuffling."""
    glob = write_shards(tmp_path, sizes=(30, 0, 7, 19, 3), seed=1)
    spec = TokenizerSpec.parse({"name": "byte", "add_bos": True})
    for k in range(n_consumers):
        options = {"consumer": (k, n_consumers), "shuffle_seed": shuffle_seed, "epoch": 1}
        real = Tokenize(JsonlReader(glob, **options), spec)
        real.reset(None)
        expected = [(d.doc_id, len(d.tokens)) for d in real]
        node = IndexedDocuments(JsonlReader(glob, **options), length_index(JsonlReader(glob), spec))
        node.reset(None)
        assert [(d.doc_id, len(d.tokens)) for d in node] == expected


def test_length_index_is_cached_per_file_identity_and_tokenizer(tmp_path):
    glob = write_shards(tmp_path, sizes=(10, 5))
    byte = TokenizerSpec.parse("byte")
    first = index_key(JsonlReader(glob), byte)
    length_index(JsonlReader(glob), byte)
    assert os.path.exists(os.path.join(cache_dir(), f"{first}.npz"))
    assert index_key(JsonlReader(glob), byte) == first
    assert index_key(JsonlReader(glob), TokenizerSpec.parse({"name": "byte", "add_bos": True})) != first
    with open(os.path.join(tmp_path, "part1.jsonl"), "a") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    changed = index_key(JsonlReader(glob), byte)
    assert changed != first
    assert len(length_index(JsonlReader(glob), byte)) == 16
    assert not [f for f in os.listdir(cache_dir()) if f.startswith(".lengths-")]  # no temporary left


@pytest.mark.parametrize("balance", [None, {"b": 0.001}])
def test_padding_steps_for_uneven_shards_at_world_3(tmp_path, balance):
    """5 shards of 1000/200/200/100/50 documents: the size-balanced partition leaves <= 5% of the
    steps with a padding batch on some rank (whole shards per rank gave 57-64%)."""
    glob = write_shards(tmp_path, sizes=(1000, 200, 200, 100, 50), mean=100)
    world = 3
    pads = np.array(
        [
            [b.n_real_segments == 0 for b in build_loader(config(glob, balance), rank=r, world_size=world)]
            for r in range(world)
        ]
    )
    assert pads.shape[1] >= 40
    assert pads.any(0).mean() <= 0.05


def _ask_for_index(glob: str, built) -> None:
    """In a forked process: ask for the index, counting the builds this process does."""
    original = lengths_module.build_index

    def counted(*args):
        with built.get_lock():
            built.value += 1
        return original(*args)

    lengths_module.build_index = counted
    length_index(JsonlReader(glob), TokenizerSpec.parse("byte"))


def test_processes_asking_at_once_build_the_index_once(tmp_path):
    glob = write_shards(tmp_path, sizes=(300, 300))
    ctx = multiprocessing.get_context("fork")
    built = ctx.Value("i", 0)
    procs = [ctx.Process(target=_ask_for_index, args=(glob, built)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert built.value == 1
    assert len(length_index(JsonlReader(glob), TokenizerSpec.parse("byte"))) == 600


def test_preprocessed_shards_are_counted_from_the_manifest(tmp_path, monkeypatch):
    """Stage ``packed_rows``: steps per epoch from the manifests' row counts, no shard read."""
    glob = write_shards(tmp_path, sizes=(80, 40), mean=150)
    out = tmp_path / "out"
    preprocess.preprocess(
        preprocess.build_config(sorted(glob_files(glob)), capacity=256, tasks=2), str(out), progress=False
    )
    cfg = {"sources": [str(out)], "stage": {"type": "packed_rows", "pad_to": "max"}}
    world = 3
    actual = [sum(1 for _ in build_loader(cfg, rank=r, world_size=world)) for r in range(world)]

    def no_reads(*args, **kwargs):
        raise AssertionError("counting read a shard")

    monkeypatch.setattr(PackedRowReader, "_shard_rows", no_reads)
    counted = build_loader(cfg, rank=0, world_size=world).steps_per_epoch()
    assert actual == [counted] * world


def _batches(n: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(40), 1.0, 12 * n), 2, 200).astype(np.int64)
    plan = pack(lengths, 256, seed=1)
    docs = [rng.integers(1, 50, k) for k in lengths]
    return list(batches_from_plan(plan, docs, pad_to=256))[:n]


@pytest.mark.parametrize("rank", [0, 1])
def test_rank_balance_resumes_at_every_position(rank):
    """A rank short of batches pads whole windows (same padding shape after a resume); resuming from
    the state taken after any number of batches continues the uninterrupted stream exactly."""
    own = _batches([13, 3][rank], seed=rank)
    exchange = CountedRanks([13, 3])

    def node():
        return RankBalance(
            SequenceNode(own),
            rank,
            2,
            cost=CostModel(b=0.01),
            exchange=exchange,
            micro_batches_per_rank=2,
            window_steps=2,
            seed=(5,),
            pad_tokens=7,
        )

    full = node()
    full.reset(None)
    states, stream = [full.state_dict()], []
    for b in full:
        stream.append(b)
        states.append(full.state_dict())
    assert len(stream) == 14  # 13 batches, rounded up to whole steps of 2 micro-batches
    assert sorted(int(d) for b in stream for d in b.doc_ids[: b.n_real_segments]) == sorted(
        int(d) for b in own for d in b.doc_ids[: b.n_real_segments]
    )
    for k, state in enumerate(states):
        again = node()
        again.reset(state)
        tail = list(again)
        assert [(b.input_ids.shape, b.doc_ids.tolist()) for b in tail] == [
            (b.input_ids.shape, b.doc_ids.tolist()) for b in stream[k:]
        ]
