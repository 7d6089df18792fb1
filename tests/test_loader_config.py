"""Loader config checks (errors name the key), deprecated keys, format detection, worker counters."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from seqpack import build_loader, read
from seqpack.checks import ConfigError
from seqpack.config import load_config
from seqpack.node import SequenceNode
from seqpack.sources.formats import guess_format
from seqpack.sources.read import known_formats, reader_class
from seqpack.sources.records import Document
from seqpack.sources.shuffle import ShuffleBuffer


def write_texts(tmp_path, n=60, seed=0, name="a.jsonl"):
    rng = np.random.default_rng(seed)
    rows = ["".join(rng.choice(list("abcdef"), int(rng.integers(1, 90)))) for _ in range(n)]
    (tmp_path / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    return str(tmp_path / name)


def base_config(path, **top):
    return {"sources": [path], "stage": {"type": "pack", "capacity": 64, "pad_to": 64}, **top}


@pytest.mark.parametrize(
    "change, match",
    [
        ({"sources": [{"path": "x.jsonl", "format": "csv"}]}, r"sources\[0\]\.format: must be .*'jsonl'"),
        ({"sources": [{"path": "x.bin"}]}, r"sources\[0\]\.format: cannot tell the format"),
        ({"sources": [{"path": "x.jsonl", "weight": 0}]}, r"sources\[0\]\.weight: must be > 0"),
        ({"sources": [{"path": "x.jsonl", "weight": "2"}]}, r"sources\[0\]\.weight: expected a number"),
        ({"sources": [{"path": "x.jsonl", "on_error": "ignore"}]}, r"sources\[0\]\.on_error"),
        ({"sources": [{"path": "x.txt", "split": "para"}]}, r"sources\[0\]\.split: must be 'file' or 'line'"),
        ({"sources": [{"path": "d", "format": "hf", "chunk_rows": 0}]}, r"sources\[0\]\.chunk_rows"),
        ({"sources": [{"path": "x.jsonl", "prompt_key": "q"}]}, r"sources\[0\]: prompt_key and response_key"),
        ({"sources": [{"path": "x.jsonl"}, {"path": "y.jsonl", "name": "source0"}]}, "names must be unique"),
        ({"on_error": "ignore"}, r"^on_error: must be"),
        ({"mix_by": "bytes"}, r"mix_by: must be 'tokens' or 'documents'"),
        ({"even_batches": "sometimes"}, r"even_batches: must be"),
        ({"tokenize_batch": 0}, r"tokenize_batch: must be >= 1"),
        ({"seed": 1.5}, r"^seed: expected an integer"),
        ({"shuffle": {"buffer_docs": -1}}, r"shuffle\.buffer_docs: must be >= 0"),
        ({"shuffle": {"shards": "yes"}}, r"shuffle\.shards: expected true or false"),
        ({"shuffle": [1]}, r"shuffle: expected a mapping"),
        ({"tokenizer": {"name": "byte", "add_eos": "no"}}, r"tokenizer\.add_eos: expected true or false"),
        ({"tokenizer": {"nme": "byte"}}, r"tokenizer\.nme: unknown key"),
    ],
)
def test_config_errors_name_the_key(change, match):
    cfg = {"sources": ["x.jsonl"], "stage": {"type": "pack", "capacity": 8}}
    cfg.update(change)
    with pytest.raises(ConfigError, match=match):
        load_config(cfg)


def test_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: the config must be a mapping"):
        load_config(str(bad))
    (tmp_path / "c.json").write_text('{"sources": ["a.jsonl"], "stage": {"type": "pack", "capacity": 8}}')
    assert load_config(str(tmp_path / "c.json"))["sources"][0]["path"] == [str(tmp_path / "a.jsonl")]


def _batches(cfg, **kw):
    return [b.input_ids.tolist() for b in build_loader(cfg, **kw)]


def test_deprecated_shuffle_buffer_warns_and_still_works(tmp_path):
    path = write_texts(tmp_path)
    new = _batches(base_config(path, shuffle={"seed": 3, "buffer_docs": 16}))
    with pytest.warns(DeprecationWarning, match=r"shuffle\.buffer is deprecated.*shuffle\.buffer_docs"):
        cfg = load_config(base_config(path, shuffle={"seed": 3, "buffer": 16}))
    assert cfg["shuffle"] == {"seed": 3, "buffer_docs": 16, "shards": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = _batches(base_config(path, shuffle={"seed": 3, "buffer": 16}))
    assert old == new
    assert new != _batches(base_config(path))  # the buffer does shuffle
    with pytest.raises(ConfigError, match=r"shuffle\.buffer: deprecated name of shuffle\.buffer_docs"):
        load_config(base_config(path, shuffle={"buffer": 4, "buffer_docs": 4}))


def test_deprecated_tokenizer_path_warns_and_still_works(tmp_path):
    path = write_texts(tmp_path)
    with pytest.warns(DeprecationWarning, match=r"tokenizer\.path is deprecated.*tokenizer\.name"):
        cfg = load_config(base_config(path, tokenizer={"path": "byte", "add_bos": True}))
    assert cfg["tokenizer"] == {"name": "byte", "add_bos": True}
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # validated once: no warning per worker
        got = _batches(cfg)
    assert got == _batches(base_config(path, tokenizer={"name": "byte", "add_bos": True}))
    assert got[0][0] == 256  # <bos>


def test_shuffle_buffer_keyword_is_deprecated():
    docs = [Document(i, np.arange(i + 1)) for i in range(20)]
    with pytest.warns(DeprecationWarning, match="buffer_docs"):
        old = ShuffleBuffer(SequenceNode(docs), buffer=5, seed=1)
    new = ShuffleBuffer(SequenceNode(docs), buffer_docs=5, seed=1)
    old.reset()
    new.reset()
    assert [d.doc_id for d in old] == [d.doc_id for d in new]
    with pytest.raises(ConfigError, match="buffer_docs: must be >= 1"):
        ShuffleBuffer(SequenceNode(docs), 0)


def test_guess_format_and_known_formats(tmp_path):
    assert guess_format("a/b.jsonl.zst") == "jsonl" and guess_format("x.PQ") == "parquet"
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "state.json").write_text("{}")
    assert guess_format(str(tmp_path / "ds")) == "hf"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.json").write_text("{}")
    assert guess_format(str(tmp_path / "out")) == "seqpack"
    with pytest.raises(ConfigError, match="cannot tell the format"):
        guess_format("x.bin")
    # the preprocessed-shard reader is found by its declared format, not by a lazy import table
    assert {"jsonl", "parquet", "arrow", "hf", "webdataset", "text", "seqpack"} <= set(known_formats())
    assert reader_class("seqpack").format == "seqpack"
    with pytest.raises(ValueError, match="format must be one of"):
        reader_class("csv")


def test_read_takes_a_pathlike(tmp_path):
    path = write_texts(tmp_path, n=3)
    assert [r.doc_id for r in read(tmp_path / "a.jsonl")] == [r.doc_id for r in read(path)]


def test_worker_stats_match_the_in_process_counts_and_survive_resume(tmp_path):
    write_texts(tmp_path, n=50, seed=1, name="a.jsonl")
    write_texts(tmp_path, n=30, seed=2, name="b.jsonl")
    cfg = {
        "sources": [str(tmp_path / "*.jsonl")],
        "stage": {"type": "pack", "capacity": 64, "pad_to": 64},
    }
    ref = build_loader(cfg)
    list(ref)
    want = ref.stats()
    loader = build_loader(cfg, num_workers=2)
    n = len(list(loader))  # each worker packs its own share: one more batch than in one process here
    got = loader.stats()
    assert got["pack/batches"] == n
    same = ("records", "documents", "tokens", "tokens_in", "packed_tokens", "truncated_tokens", "empty")
    keys = [k for k in want if k.rsplit("/", 1)[-1] in same]
    assert len(keys) == 10 and {k: got[k] for k in keys} == {k: want[k] for k in keys}
    assert got["read/source0/records"] == 80 and got["pack/packed_tokens"] == 3406
    # mid-epoch: the counters are in the loader state and come back with it
    loader = build_loader(cfg, num_workers=2)
    it = iter(loader)
    for _ in range(n // 2):
        next(it)
    state, mid = loader.state_dict(), loader.stats()
    assert 0 < mid["read/source0/records"] <= 80
    resumed = build_loader(cfg, num_workers=2)
    resumed.load_state_dict(state)
    assert resumed.stats() == mid
    rest = list(resumed)
    assert len(rest) == n - n // 2
    assert resumed.stats()["read/source0/records"] == 80


def test_user_collate_fn_sees_batches_with_workers(tmp_path):
    path = write_texts(tmp_path, n=20)
    cfg = base_config(path)
    got = list(build_loader(cfg, num_workers=2, collate_fn=lambda b: b.num_real_tokens))
    want = [b.num_real_tokens for b in build_loader(cfg, num_workers=2)]
    assert got == want and all(isinstance(x, int) for x in got)
