"""build_loader: exact resume (0 and 2 workers), rank x worker accounting, mixtures, config, registry."""

from __future__ import annotations

import copy
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard

from seqpack import build_loader, read, register_stage, tokenize
from seqpack.batch import VarlenBatch
from seqpack.checks import ConfigError
from seqpack.config import load_config
from seqpack.node import Node
from seqpack.stages import STAGES
from seqpack.stages.pack import PackStage


def make_corpus(tmp_path, n_text=240, n_tok=160, seed=0):
    """Two sources: raw text in 3 .jsonl.zst files, pre-tokenized ids in 2 Parquet files."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "ünï", "x"]
    texts = [" ".join(rng.choice(words, int(rng.integers(1, 120)))) for _ in range(n_text)]
    for f in range(3):
        rows = "".join(json.dumps({"text": t}) + "\n" for t in texts[f::3]).encode()
        (tmp_path / f"t{f}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(rows))
    ids = [rng.integers(300, 1000, int(rng.integers(1, 700))).tolist() for _ in range(n_tok)]
    for f in range(2):
        pq.write_table(pa.table({"input_ids": ids[f::2]}), tmp_path / f"p{f}.parquet", row_group_size=16)
    return {
        "sources": [
            {"path": str(tmp_path / "t*.jsonl.zst"), "name": "web", "weight": 2},
            {"path": str(tmp_path / "p*.parquet"), "name": "code", "input_ids_key": "input_ids", "weight": 1},
        ],
        "tokenizer": "byte",
        "stage": {"type": "pack", "capacity": 512, "pad_to": 512, "buffer_docs": 24},
        "shuffle": {"seed": 7, "buffer_docs": 32},
    }


def expected_docs(cfg) -> dict[int, np.ndarray]:
    out = {}
    for i, s in enumerate(cfg["sources"]):
        keys = {k: s[k] for k in ("input_ids_key",) if k in s}
        for d in tokenize(read(s["path"], source_index=i, **keys), cfg["tokenizer"]):
            out[d.doc_id] = d.tokens
    return out


def tokens_by_doc(batches) -> dict[int, list[tuple[int, np.ndarray]]]:
    got: dict[int, list] = {}
    for b in batches:
        cu = b.cu_seqlens.numpy()
        for s in range(b.n_real_segments):
            got.setdefault(int(b.doc_ids[s]), []).append(
                (int(b.seg_start[s]), b.input_ids[cu[s] : cu[s + 1]].numpy())
            )
    return got


def assert_every_token_once(batches, cfg):
    want = expected_docs(cfg)
    got = tokens_by_doc(batches)
    assert set(got) == set(want)
    for doc_id, pieces in got.items():
        pieces.sort(key=lambda p: p[0])
        np.testing.assert_array_equal(np.concatenate([p for _, p in pieces]), want[doc_id])


# ------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_at_random_points_is_token_identical(tmp_path, num_workers):
    # smaller with workers: each resume forks two fresh workers
    cfg = make_corpus(tmp_path, *((240, 160) if num_workers == 0 else (90, 50)))
    loader = build_loader(cfg, num_workers=num_workers)
    rng = np.random.default_rng(num_workers)
    ref, states = [], {}
    # first pass to know the length, then the uninterrupted reference with states at 20 points
    n = build_loader(cfg, num_workers=num_workers).steps_per_epoch()
    points = set(rng.choice(np.arange(1, n), 20, replace=False).tolist())
    for i, b in enumerate(loader):
        b.validate()
        ref.append(b.input_ids.numpy().copy())
        if i + 1 in points:
            states[i + 1] = copy.deepcopy(loader.state_dict())
    assert len(ref) == n and len(states) == 20
    for p, state in sorted(states.items()):
        if p == min(states):  # the state must survive torch.save / torch.load(weights_only=True)
            buf = io.BytesIO()
            torch.save(state, buf)
            buf.seek(0)
            state = torch.load(buf, weights_only=True)
        resumed = build_loader(cfg, num_workers=num_workers)
        resumed.load_state_dict(state)
        rest = [b.input_ids.numpy() for b in resumed]
        assert len(rest) == n - p, f"resume at {p}"
        for j, (a, b) in enumerate(zip(rest, ref[p:])):
            assert np.array_equal(a, b), f"resume at {p}: batch {p + j} differs"


def test_workers_do_not_change_the_token_multiset(tmp_path):
    cfg = make_corpus(tmp_path)
    for nw in (0, 2):
        batches = list(build_loader(cfg, num_workers=nw))
        assert_every_token_once(batches, cfg)


def test_second_epoch_reshuffles_and_resumes(tmp_path):
    cfg = make_corpus(tmp_path, n_text=60, n_tok=30)
    loader = build_loader(cfg)
    e0 = [b.input_ids.numpy() for b in loader]
    e1 = [b.input_ids.numpy() for b in loader]
    assert loader.epoch == 2
    assert len(e0) and any(not np.array_equal(a, b) for a, b in zip(e0, e1))
    again = build_loader(cfg)
    list(again)
    it = iter(again)
    first = [next(it).input_ids.numpy() for _ in range(3)]
    state = copy.deepcopy(again.state_dict())
    resumed = build_loader(cfg)
    resumed.load_state_dict(state)
    assert all(np.array_equal(a, b) for a, b in zip(first + [b.input_ids.numpy() for b in resumed], e1))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_checkpoint_between_epochs_resumes_the_next_epoch(tmp_path, num_workers):
    # a state taken after an epoch's last batch must not restore that epoch's exhausted iterator
    # (it used to, and the resumed run skipped a whole epoch)
    cfg = make_corpus(tmp_path, n_text=60, n_tok=30)
    loader = build_loader(cfg, num_workers=num_workers)
    list(loader)
    state = copy.deepcopy(loader.state_dict())
    e1 = [b.input_ids.numpy() for b in loader]
    resumed = build_loader(cfg, num_workers=num_workers)
    resumed.load_state_dict(state)
    again = [b.input_ids.numpy() for b in resumed]
    assert len(e1) > 0 and len(again) == len(e1)
    assert all(np.array_equal(a, b) for a, b in zip(again, e1))


# ------------------------------------------------------------------------------------------ sharding
def test_rank_x_worker_sharding_accounts_for_every_doc(tmp_path):
    cfg = make_corpus(tmp_path)
    per_rank = []
    for rank in range(2):
        loader = build_loader(cfg, rank=rank, world_size=2, num_workers=2)
        assert loader.even_batches == "precount"
        steps = loader.steps_per_epoch()
        batches = list(loader)
        assert len(batches) == steps == loader.steps_per_epoch(epoch=0)
        per_rank.append(batches)
    assert len(per_rank[0]) == len(per_rank[1])
    all_batches = per_rank[0] + per_rank[1]
    assert_every_token_once(all_batches, cfg)
    ids0 = {int(i) for b in per_rank[0] for i in b.doc_ids[: b.n_real_segments]}
    ids1 = {int(i) for b in per_rank[1] for i in b.doc_ids[: b.n_real_segments]}
    assert not ids0 & ids1
    pads = [b for b in all_batches if b.n_real_segments == 0]
    assert all(b.num_loss_tokens == 0 and b.num_tokens == 512 for b in pads)


def test_uneven_ranks_are_padded_with_zero_loss_batches(tmp_path):
    # 3 one-document files over 2 ranks: rank 0 gets 2 units, rank 1 gets 1
    for f in range(3):
        (tmp_path / f"{f}.jsonl").write_text(json.dumps({"text": "z" * 500}) + "\n")
    cfg = {"sources": [str(tmp_path / "*.jsonl")], "stage": {"type": "pack", "capacity": 512}}
    counts = [len(list(build_loader(cfg, rank=r, world_size=2))) for r in range(2)]
    assert counts == [2, 2]
    last = list(build_loader(cfg, rank=1, world_size=2))[-1]
    assert last.n_real_segments == 0 and last.num_loss_tokens == 0 and int(last.doc_ids[0]) == -1
    last.validate()


# ------------------------------------------------------------------------------------------ packing stage
def test_pack_stage_overflow_policies():
    from seqpack.node import SequenceNode
    from seqpack.sources.records import Document

    docs = [Document(i, np.arange(n, dtype=np.int64) + 1000 * i) for i, n in enumerate([5, 30, 12, 70, 3])]
    for algorithm in ("online", "bfd", "greedy"):
        stage = PackStage(SequenceNode(docs), 32, algorithm=algorithm, buffer_docs=3)
        out = list(stage)
        assert_split_ok = tokens_by_doc(out)
        for d in docs:
            pieces = sorted(assert_split_ok[d.doc_id], key=lambda p: p[0])
            np.testing.assert_array_equal(np.concatenate([p for _, p in pieces]), d.tokens)
        assert all(b.num_tokens <= 32 for b in out)
    stage = PackStage(SequenceNode(docs), 32, overflow="truncate")
    total = sum(b.num_real_tokens for b in stage)
    assert stage.stats()["pack/truncated_tokens"] == 70 - 32 and total == 5 + 30 + 12 + 32 + 3
    stage = PackStage(SequenceNode(docs), 32, overflow="drop")
    list(stage)
    assert stage.stats()["pack/dropped_tokens"] == 70
    with pytest.raises(ValueError, match="document 3 has 70 tokens"):
        list(PackStage(SequenceNode(docs), 32, overflow="error"))


def test_loss_masks_survive_packing(tmp_path):
    rows = [{"p": "question " * 3, "r": "answer " * (i + 1)} for i in range(20)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "sources": [{"path": str(tmp_path / "sft.jsonl"), "prompt_key": "p", "response_key": "r"}],
        "stage": {"type": "pack", "capacity": 64},
    }
    batches = list(build_loader(cfg))
    targets = sum(b.num_loss_tokens for b in batches)
    # per doc: response bytes + EOS are targets; a piece's first token never is
    starts = sum(b.n_real_segments for b in batches)
    want = sum(len(r["r"]) + 1 for r in rows)
    assert want - starts <= targets <= want
    for b in batches:
        for t in b.labels[b.labels != -100].tolist():
            assert t in set(b"answer ") | {257}


def test_mixture_follows_weights(tmp_path):
    cfg = make_corpus(tmp_path)
    cfg["shuffle"] = None
    loader = build_loader(cfg)
    it = iter(loader)
    for _ in range(40):
        next(it)
    st = loader.stats()
    web, code = st["mix/web/tokens"], st["mix/code/tokens"]
    assert 1.6 < web / code < 2.5  # weight 2:1 by tokens (within one document of slack)
    assert st["mix/web/documents"] > 0 and st["mix/code/documents"] > 0


def test_on_error_skip_counts_in_loader_stats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "good one"}\n{oops\n{"nottext": 1}\n{"text": "fine"}\n')
    cfg = {
        "sources": [str(tmp_path / "a.jsonl")],
        "on_error": "skip",
        "stage": {"type": "pack", "capacity": 64},
    }
    loader = build_loader(cfg)
    batches = list(loader)
    assert sum(b.n_real_segments for b in batches) == 2
    st = loader.stats()
    assert st["read/source0/skipped"] == 2 and "malformed JSON" in st["read/source0/reasons"]


# ------------------------------------------------------------------------------------------ config + registry
def test_yaml_and_toml_configs_with_relative_paths(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text('{"text": "hello"}\n{"text": "world"}\n')
    (tmp_path / "c.yaml").write_text(
        "sources:\n  - {path: d/*.jsonl, weight: 1}\ntokenizer: {name: byte, add_bos: true}\n"
        "stage: {type: pack, capacity: 16, pad_to: max}\nshuffle: {seed: 1, buffer_docs: 4}\n"
    )
    (tmp_path / "c.toml").write_text(
        '[[sources]]\npath = "d/*.jsonl"\n[tokenizer]\nname = "byte"\nadd_bos = true\n'
        '[stage]\ntype = "pack"\ncapacity = 16\npad_to = "max"\n[shuffle]\nseed = 1\nbuffer_docs = 4\n'
    )
    a = [b.input_ids.tolist() for b in build_loader(str(tmp_path / "c.yaml"))]
    b = [b.input_ids.tolist() for b in build_loader(str(tmp_path / "c.toml"))]
    assert a == b and len(a[0]) == 16
    assert sorted(x for row in a for x in row if x < 256) == sorted(b"helloworld")


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"sources": []}, "sources: expected a non-empty list"),
        ({"sources": [{"paht": "x.jsonl"}]}, r"sources\[0\]\.paht: unknown key"),
        ({"sources": [{"path": "x.jsonl", "weight": -1}]}, r"sources\[0\].weight"),
        ({"sources": [{"path": "x.bin"}]}, "cannot tell the format"),
        ({"sources": ["x.jsonl"], "stage": {"type": "pack"}}, "stage.capacity"),
        (
            {"sources": ["x.jsonl"], "stage": {"type": "pack", "capacity": 8, "bufer": 1}},
            r"stage\.bufer: unknown key",
        ),
        (
            {"sources": ["x.jsonl"], "stage": {"type": "pack", "capacity": 8}, "shuffle": {"sed": 1}},
            r"shuffle\.sed: unknown key",
        ),
    ],
)
def test_config_errors_name_the_key(bad, match):
    with pytest.raises(ConfigError, match=match):
        load_config(bad)


def test_register_custom_stage(tmp_path):
    class OneDocPerBatch(Node):
        def __init__(self, docs):
            super().__init__()
            self.upstream = docs

        def reset(self, initial_state=None):
            super().reset(initial_state)
            self.upstream.reset(initial_state)

        def next(self):
            d = next(self.upstream)
            return VarlenBatch.from_segments([d.tokens], [d.doc_id])

        def get_state(self):
            return self.upstream.state_dict()

    seen = {}

    def factory(docs, stage_cfg, ctx):
        seen.update(stage_cfg=stage_cfg, consumer=(ctx.consumer, ctx.n_consumers), eos=ctx.eos_id)
        return OneDocPerBatch(docs)

    register_stage("test_one_doc", factory, replace=True)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_stage("test_one_doc", factory)
        (tmp_path / "a.jsonl").write_text('{"text": "ab"}\n{"text": "cde"}\n')
        cfg = {"sources": [str(tmp_path / "a.jsonl")], "stage": {"type": "test_one_doc", "k": 1}}
        out = [b.input_ids.tolist() for b in build_loader(cfg)]
        assert out == [[97, 98, 257], [99, 100, 101, 257]]
        assert seen == {"stage_cfg": {"type": "test_one_doc", "k": 1}, "consumer": (0, 1), "eos": 257}
    finally:
        STAGES.pop("test_one_doc", None)
    with pytest.raises(ValueError, match="not registered"):
        list(build_loader({"sources": [str(tmp_path / "a.jsonl")], "stage": {"type": "nope"}}))


def test_resume_with_other_worker_count_is_refused(tmp_path):
    cfg = make_corpus(tmp_path, n_text=30, n_tok=10)
    loader = build_loader(cfg, num_workers=0)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    other = build_loader(cfg, rank=0, world_size=2)
    # refused when loaded (a ValueError, also under python -O), naming the way out
    with pytest.raises(ValueError, match="same world size and num_workers, or pass the list of EVERY"):
        other.load_state_dict(state)


# ------------------------------------------------------------------------------------------ block fast path
def _reference_batches(docs, capacity, pad_to, continue_positions, buffer_docs):
    """The same stream through the document-at-a-time path (SequenceNode has no next_block)."""
    from seqpack.node import SequenceNode

    class OneByOne(SequenceNode):
        next_block = property(lambda self: None)  # pull_block falls back to next()

    stage = PackStage(OneByOne(docs), capacity, pad_to=pad_to, buffer_docs=buffer_docs,
                      continue_positions=continue_positions, pad_id=258)  # the byte tokenizer's <pad>
    return list(stage)


@pytest.mark.parametrize("with_mask", [False, True])
def test_parquet_blocks_equal_document_path_and_from_segments(tmp_path, with_mask):
    from seqpack.sources.records import make_doc_id

    rng = np.random.default_rng(3)
    ids = [rng.integers(0, 30000, int(rng.integers(1, 300))).astype(np.int32) for _ in range(120)]
    masks = [rng.random(len(t)) < 0.7 for t in ids]
    cols = {"input_ids": [t.tolist() for t in ids]}
    if with_mask:
        cols["mask"] = [m.astype(np.uint8).tolist() for m in masks]
    pq.write_table(pa.table(cols), tmp_path / "a.parquet", row_group_size=37)
    src = {"path": str(tmp_path / "a.parquet"), "input_ids_key": "input_ids"}
    if with_mask:
        src["loss_mask_key"] = "mask"
    stage = {"type": "pack", "capacity": 256, "pad_to": 260, "buffer_docs": 16, "continue_positions": True}
    fast = list(build_loader({"sources": [src], "stage": stage}))
    from seqpack.sources.records import Document

    docs = [
        Document(make_doc_id(0, 0, i), t.astype(np.int64), m if with_mask else None)
        for i, (t, m) in enumerate(zip(ids, masks))
    ]
    slow = _reference_batches(docs, 256, 260, True, 16)
    assert len(fast) == len(slow) > 5
    by_id = {d.doc_id: d for d in docs}
    for a, b in zip(fast, slow):
        a.validate()
        for f in ("input_ids", "labels", "position_ids", "cu_seqlens", "seq_idx", "doc_ids", "seg_start"):
            assert torch.equal(getattr(a, f), getattr(b, f)), f
        assert (a.num_loss_tokens, a.max_seqlen, a.n_real_segments) == (
            b.num_loss_tokens, b.max_seqlen, b.n_real_segments)
        # the numba assembly agrees with VarlenBatch.from_segments on the same segments
        n = a.n_real_segments
        segs = [(by_id[int(a.doc_ids[s])], int(a.seg_start[s]), int(a.seqlens[s])) for s in range(n)]
        ref = VarlenBatch.from_segments(
            [d.tokens[o : o + ln] for d, o, ln in segs], a.doc_ids[:n].numpy(),
            seg_start=a.seg_start[:n].numpy(),
            loss_masks=[None if d.loss_mask is None else d.loss_mask[o : o + ln] for d, o, ln in segs],
            pad_to=260, pad_id=258, continue_positions=True,
        )
        for f in ("input_ids", "labels", "position_ids", "cu_seqlens", "seq_idx", "doc_ids", "seg_start"):
            assert torch.equal(getattr(a, f), getattr(ref, f)), f
        assert a.num_loss_tokens == ref.num_loss_tokens and a.max_seqlen == ref.max_seqlen


def test_reader_next_and_next_block_mix(tmp_path):
    rng = np.random.default_rng(4)
    ids = [rng.integers(0, 999, int(rng.integers(0, 50))).tolist() for _ in range(90)]
    pq.write_table(pa.table({"input_ids": ids}), tmp_path / "a.parquet", row_group_size=20)
    want = [(i, t) for i, t in enumerate(ids)]
    for k, n in ((0, 1), (1, 3), (2, 7)):  # units >= consumers and records split inside units
        r = read(str(tmp_path / "a.parquet"), input_ids_key="input_ids", consumer=(k, n))
        r.reset(None)
        got, step = [], 0
        while True:
            step += 1
            try:
                if step % 3 == 0:
                    rec = next(r)
                    got.append((rec.doc_id & ((1 << 36) - 1), rec.tokens.tolist()))
                else:
                    blk = r.next_block(5)
                    got += [(int(d.doc_id) & ((1 << 36) - 1), d.tokens.tolist()) for d in blk.documents()]
            except StopIteration:
                break
            if step == 4:  # resume mid-unit from the block path's position
                state = r.state_dict()
                r = read(str(tmp_path / "a.parquet"), input_ids_key="input_ids", consumer=(k, n))
                r.load_state_dict(state)
        # the same records, in the same order, as next() alone gives this consumer (its work items)
        plain = read(str(tmp_path / "a.parquet"), input_ids_key="input_ids", consumer=(k, n))
        mine = [(rec.doc_id & ((1 << 36) - 1), rec.tokens.tolist()) for rec in plain]
        assert got == mine and len(mine) > 0
    for n in (3, 7):  # every record with exactly one consumer
        every = [
            (rec.doc_id & ((1 << 36) - 1), rec.tokens.tolist())
            for k in range(n)
            for rec in read(str(tmp_path / "a.parquet"), input_ids_key="input_ids", consumer=(k, n))
        ]
        assert sorted(every) == sorted(want)


def test_arrow_ipc_many_record_batches_keep_record_numbers(tmp_path):
    table = pa.table({"input_ids": [[i, i + 1] for i in range(3000)]})
    with pa.ipc.new_file(str(tmp_path / "a.arrow"), table.schema) as w:
        for b in table.to_batches(max_chunksize=7):
            w.write_batch(b)
    docs = list(tokenize(read(str(tmp_path / "a.arrow"), input_ids_key="input_ids"), "byte"))
    assert [int(d.doc_id) for d in docs] == list(range(3000))
    assert all(d.tokens.tolist() == [i, i + 1] for i, d in enumerate(docs))


# ------------------------------------------------------------------------------------------ seqpack shards
def _write_seqpack_shards(tmp_path, n_docs=150, seed=5):
    """Two shards written with seqpack.shards' writer: rows of 1-3 documents, loss masks, doc ids."""
    from seqpack.shards import (
        MANIFEST,
        MANIFEST_FORMAT,
        MANIFEST_VERSION,
        PackedRows,
        write_json_atomic,
        write_shard,
    )

    rng = np.random.default_rng(seed)
    docs = {}
    infos = []
    doc_id = 1000
    for s in range(2):
        toks, masks, row_off, seg_off, seg_len, seg_ids = [], [], [0], [0], [], []
        while len(seg_len) < n_docs // 2:
            for _ in range(int(rng.integers(1, 4))):
                n = int(rng.integers(1, 90))
                t = rng.integers(0, 5000, n).astype(np.int32)
                m = (rng.random(n) < 0.8).astype(np.uint8)
                docs[doc_id] = (t.astype(np.int64), m.astype(bool))
                toks.append(t)
                masks.append(m)
                seg_len.append(n)
                seg_ids.append(doc_id)
                doc_id += 7
            row_off.append(row_off[-1] + sum(len(t) for t in toks[len(toks) - (len(seg_len) - seg_off[-1]):]))
            seg_off.append(len(seg_len))
        rows = PackedRows(
            np.concatenate(toks), np.concatenate(masks), np.array(row_off, np.int64),
            np.array(seg_off, np.int64), np.array(seg_len, np.int64), np.array(seg_ids, np.int64),
            np.zeros(len(seg_len), np.int64),
        )
        rows.validate()
        infos.append(write_shard(str(tmp_path / f"shard-{s}.parquet"), rows, row_group_rows=8).as_dict())
    write_json_atomic(
        str(tmp_path / MANIFEST), {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "shards": infos}
    )
    return docs


def test_seqpack_shard_source_accounting_and_resume(tmp_path):
    docs = _write_seqpack_shards(tmp_path)
    cfg = {
        "sources": [{"path": str(tmp_path), "format": "seqpack"}],
        "stage": {"type": "pack", "capacity": 128, "pad_to": 128, "buffer_docs": 12},
        "shuffle": {"seed": 1, "buffer_docs": 8},
    }
    batches = list(build_loader(cfg))
    got = tokens_by_doc(batches)
    assert set(got) == set(docs)
    for doc_id, pieces in got.items():
        pieces.sort(key=lambda p: p[0])
        np.testing.assert_array_equal(np.concatenate([p for _, p in pieces]), docs[doc_id][0])
    # stored loss masks survive: a target is a masked-in token that does not start a segment
    want_targets = 0
    for b in batches:
        for s in range(b.n_real_segments):
            tokens, mask = docs[int(b.doc_ids[s])]
            a, ln = int(b.seg_start[s]), int(b.seqlens[s])
            want_targets += int(mask[a + 1 : a + ln].sum())
    assert sum(b.num_loss_tokens for b in batches) == want_targets
    # rank sharding: two ranks see every document once
    seen = [int(i) for r in range(2) for b in build_loader(cfg, rank=r, world_size=2)
            for i in b.doc_ids[: b.n_real_segments]]
    assert sorted(set(seen)) == sorted(docs) and len(seen) == len(set(seen))
    # resume at several points == uninterrupted
    loader = build_loader(cfg)
    ref, states = [], {}
    for i, b in enumerate(loader):
        ref.append(b.input_ids.numpy().copy())
        if i in (0, 3, len(batches) // 2, len(batches) - 2):
            states[i + 1] = copy.deepcopy(loader.state_dict())
    for p, state in states.items():
        resumed = build_loader(cfg)
        resumed.load_state_dict(state)
        rest = [b.input_ids.numpy() for b in resumed]
        assert len(rest) == len(ref) - p and all(np.array_equal(a, b) for a, b in zip(rest, ref[p:]))
