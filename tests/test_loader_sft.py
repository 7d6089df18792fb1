"""SFT through ``build_loader``: chat sources rendered by the chat template (masks equal to
``pack_chats``), ``overflow="split_turns"``, segment cap, group separation, fixed shapes, exact
resume with all of them on, and config errors that name the key."""

from __future__ import annotations

import json

import numpy as np
import pytest

from seqpack.checks import ConfigError
from seqpack.loader import build_loader
from seqpack.node import SequenceNode
from seqpack.plan import split_at_turns
from seqpack.sources.chat import ChatEncoder, ChatError
from seqpack.sources.records import Document, SourceError, split_doc_id
from seqpack.sources.tokenize import ByteTokenizer, load_tokenizer
from seqpack.stages.pack import PackStage
from seqpack.stages.pack_offline import pack_chats

LANGS = ("en", "de", "fr")
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def conversations(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        msgs = [{"role": "system", "content": "be brief"}] if i % 4 == 0 else []
        for t in range(int(rng.integers(1, 5))):
            msgs.append({"role": "user", "content": f"q{i}.{t} " + "x" * int(rng.integers(3, 40))})
            msgs.append({"role": "assistant", "content": f"a{i}.{t} " + "y" * int(rng.integers(3, 70))})
        rows.append({"messages": msgs, "lang": LANGS[i % 3]})
    return rows


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def config(path, **stage) -> dict:
    return {
        "sources": [{"path": path, "messages_key": "messages"}],
        "tokenizer": {"name": "byte", "add_eos": False},
        "stage": {"type": "pack", "capacity": 200, "buffer_docs": 16, **stage},
    }


def record_of(doc_id) -> int:
    return split_doc_id(int(doc_id))[2]  # pack_chats' ids are record indices, the same low bits


def real_records(batch) -> list[int]:
    return [record_of(d) for d in batch.doc_ids[: batch.n_real_segments]]


def segments(batches) -> dict:
    """(record, offset in document) -> (input_ids, labels) of every real segment."""
    out = {}
    for b in batches:
        b.validate()
        cu = b.cu_seqlens.tolist()
        for j in range(b.n_real_segments):
            key = (record_of(b.doc_ids[j]), int(b.seg_start[j]))
            assert key not in out, f"segment {key} emitted twice"
            out[key] = (b.input_ids[cu[j] : cu[j + 1]].numpy(), b.labels[cu[j] : cu[j + 1]].numpy())
    return out


def assert_same_segments(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, (ids, labels) in want.items():
        np.testing.assert_array_equal(got[key][0], ids, err_msg=f"tokens of segment {key}")
        np.testing.assert_array_equal(got[key][1], labels, err_msg=f"labels of segment {key}")


@pytest.fixture
def chats(tmp_path):
    rows = conversations(60)
    return rows, write_jsonl(tmp_path / "chat.jsonl", rows)


@pytest.mark.parametrize("algorithm", ["online", "bfd"])
def test_assistant_masks_and_split_turns_equal_pack_chats(chats, algorithm):
    rows, path = chats
    cap = 120
    batches = list(build_loader(config(path, capacity=cap, overflow="split_turns", algorithm=algorithm)))
    docs = ChatEncoder("byte").encode_records(rows)
    plan, ref = pack_chats(docs, cap, overflow="split_turns")
    got = segments(batches)
    assert_same_segments(got, segments(ref))
    # labels are the tokens exactly on the assistant replies (content + newline), nowhere else
    tok = ByteTokenizer()
    for (record, _), (ids, labels) in got.items():
        text = tok.decode(ids[labels != -100])
        replies = "".join(m["content"] + "\n" for m in rows[record]["messages"] if m["role"] == "assistant")
        assert text in replies and "<|" not in text
    # split only at turn starts; a reply never loses its prompt
    for d in docs:
        starts = sorted(s for r, s in got if r == d.doc_id)
        assert set(starts) <= set(d.turn_starts.tolist())
    assert any(len([k for k in got if k[0] == d.doc_id]) > 1 for d in docs)


def test_single_overlong_turn_is_truncated_and_counted(tmp_path):
    rows = conversations(20, seed=1)
    rows[3] = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "z" * 500}]}
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    cap = 150
    loader = build_loader(config(path, capacity=cap, overflow="split_turns"))
    batches = list(loader)
    stats = loader.stats()
    docs = ChatEncoder("byte").encode_records(rows)
    want = sum(split_at_turns(len(d), d.turn_starts, cap)[2] for d in docs)
    assert want > 0
    assert stats["pack/truncated_tokens"] == want
    cut_docs = sum(split_at_turns(len(d), d.turn_starts, cap)[2] > 0 for d in docs)
    assert stats["pack/truncated_docs"] == cut_docs
    assert stats["pack/tokens_in"] == stats["pack/packed_tokens"] + want
    assert sum(b.num_real_tokens for b in batches) == stats["pack/packed_tokens"]


def test_tokenizer_chat_template_is_used(tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    ByteTokenizer.to_tokenizers().save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "<eos>"}))
    rows = conversations(12, seed=2)
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    cfg = config(path, capacity=4096)
    cfg["tokenizer"] = {"name": str(folder), "add_eos": False}
    got = segments(build_loader(cfg))
    docs = ChatEncoder(load_tokenizer(str(folder)), CHATML).encode_records(rows)
    assert_same_segments(got, segments(pack_chats(docs, 4096)[1]))
    assert b"<|im_start|>" in bytes(next(iter(got.values()))[0][:12].astype(np.uint8))


def test_chat_without_assistant_turn_raises_or_is_skipped(chats, tmp_path):
    rows, _ = chats
    rows = list(rows)
    rows[5] = {"messages": [{"role": "user", "content": "anyone?"}], "lang": "en"}
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ChatError) as e:
        list(build_loader(config(path)))
    assert isinstance(e.value, SourceError) and e.value.record == 5
    assert "bad.jsonl: record 5: field 'messages'" in str(e.value) and "no assistant turn" in str(e.value)
    cfg = config(path)
    cfg["on_error"] = "skip"
    loader = build_loader(cfg)
    got = segments(loader)
    assert {r for r, _ in got} == set(range(len(rows))) - {5}
    assert loader.stats()["read/source0/skipped"] == 1


@pytest.mark.parametrize("algorithm", ["online", "bfd"])
def test_segment_cap(chats, algorithm):
    rows, path = chats
    batches = list(build_loader(config(path, max_segments_per_bin=2, algorithm=algorithm)))
    assert max(b.n_real_segments for b in batches) == 2
    docs = ChatEncoder("byte").encode_records(rows)
    assert sum(b.num_real_tokens for b in batches) == sum(len(d) for d in docs)
    loose = list(build_loader(config(path, algorithm=algorithm)))
    assert max(b.n_real_segments for b in loose) > 2


@pytest.mark.parametrize("algorithm", ["online", "bfd"])
def test_group_key_keeps_groups_apart(chats, algorithm):
    rows, path = chats
    batches = list(build_loader(config(path, group_key="lang", algorithm=algorithm, capacity=400)))
    for b in batches:
        langs = {rows[r]["lang"] for r in real_records(b)}
        assert len(langs) == 1, langs
    assert {r for b in batches for r in real_records(b)} == set(range(60))
    mixed = list(build_loader(config(path, algorithm=algorithm, capacity=400)))
    assert any(len({rows[r]["lang"] for r in real_records(b)}) > 1 for b in mixed)


def test_missing_group_key_names_record_or_is_counted(chats, tmp_path):
    rows, _ = chats
    rows = list(rows)
    del rows[7]["lang"]
    path = write_jsonl(tmp_path / "nolang.jsonl", rows)
    with pytest.raises(SourceError, match=r"nolang.jsonl: record 7: field 'lang': missing"):
        list(build_loader(config(path, group_key="lang")))
    cfg = config(path, group_key="lang")
    cfg["on_error"] = "skip"
    loader = build_loader(cfg)
    assert 7 not in {r for r, _ in segments(loader)}
    assert loader.stats()["read/source0/skipped"] == 1


@pytest.mark.parametrize("algorithm", ["online", "bfd"])
def test_fixed_shape_every_batch_identical(chats, algorithm):
    rows, path = chats
    T, S = 256, 6
    cfg = config(path, capacity=T - S + 1, overflow="split_turns", algorithm=algorithm,
                 pad_to={"tokens": T, "segments": S})
    loader = build_loader(cfg, rank=0, world_size=2)  # precount: the short rank pads, same shape
    batches = list(loader)
    assert len(batches) == loader.steps_per_epoch()
    for b in batches:
        assert tuple(b.input_ids.shape) == (T,) and tuple(b.cu_seqlens.shape) == (S + 1,)
        assert (b.cu_seqlens[1:] > b.cu_seqlens[:-1]).all()
        assert tuple(b.position_ids.shape) == (T,) and tuple(b.seq_idx.shape) == (T,)
        b.validate()
    assert sum(b.num_real_tokens for b in batches) == loader.stats()["pack/packed_tokens"]


@pytest.mark.parametrize("algorithm", ["online", "bfd"])
def test_exact_resume_with_sft_options(chats, algorithm):
    _, path = chats
    cfg = config(path, capacity=121, overflow="split_turns", group_key="lang", algorithm=algorithm,
                 pad_to={"tokens": 128, "segments": 4})
    cfg["shuffle"] = {"seed": 3, "buffer_docs": 8}
    full = [b.input_ids.tolist() + b.labels.tolist() + b.cu_seqlens.tolist() for b in build_loader(cfg)]
    for cut in (1, len(full) // 2):
        first = build_loader(cfg)
        it = iter(first)
        head = [next(it) for _ in range(cut)]
        state = first.state_dict()
        second = build_loader(cfg)
        second.load_state_dict(state)
        rest = list(second)
        got = [b.input_ids.tolist() + b.labels.tolist() + b.cu_seqlens.tolist() for b in head + rest]
        assert got == full


@pytest.mark.parametrize(
    ("stage", "key"),
    [
        ({"bin_count_multiple": 4}, "stage.bin_count_multiple"),
        ({"overflow": "split_turn"}, "stage.overflow"),
        ({"max_segments_per_bin": 0}, "stage.max_segments_per_bin"),
        ({"capacity": 250, "pad_to": {"tokens": 256, "segments": 8}}, "stage.capacity"),
        ({"capacity": 100, "pad_to": {"tokens": 256}}, "stage.pad_to"),
        ({"capacity": 100, "pad_to": {"tokens": 256, "segments": 0}}, "stage.pad_to.segments"),
        ({"capacity": 9, "pad_to": [256, 8], "max_segments_per_bin": 8}, "stage.max_segments_per_bin"),
        ({"capacity": 100, "pad_to_shape": [256, 8], "pad_to": 256}, "stage.pad_to_shape: deprecated name"),
        ({"capacity": 100, "pad_to": 99}, "stage.pad_to"),
        ({"capacity": 100, "pad_to": "min"}, "stage.pad_to"),
        ({"group_key": 3}, "stage.group_key"),
    ],
)
def test_config_errors_name_the_key(chats, stage, key):
    _, path = chats
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_loader(config(path, **stage))


def test_bin_count_multiple_error_says_offline(chats):
    _, path = chats
    with pytest.raises(ConfigError, match="offline"):
        build_loader(config(path, bin_count_multiple=2))


def test_deprecated_pad_to_shape_still_works(chats):
    """The old key and keyword warn, name the new one, and give the same batches."""
    _, path = chats
    new = config(path, capacity=121, overflow="split_turns", pad_to={"tokens": 128, "segments": 4})
    old = config(path, capacity=121, overflow="split_turns", pad_to_shape={"tokens": 128, "segments": 4})
    with pytest.warns(DeprecationWarning, match=r"stage\.pad_to_shape .* use stage\.pad_to"):
        got = [b.input_ids.tolist() + b.cu_seqlens.tolist() for b in build_loader(old)]
    assert got == [b.input_ids.tolist() + b.cu_seqlens.tolist() for b in build_loader(new)]
    assert {len(b) for b in got} == {128 + 5}


def test_pad_to_max_and_deprecated_capacity(chats):
    _, path = chats
    batches = list(build_loader(config(path, pad_to="max")))
    assert {b.num_tokens for b in batches} == {200}
    with pytest.warns(DeprecationWarning, match="'max'"):
        old = list(build_loader(config(path, pad_to="capacity")))
    assert [b.input_ids.tolist() for b in old] == [b.input_ids.tolist() for b in batches]


def test_pack_stage_pad_to_shape_keyword_warns():
    docs = [ByteTokenizer().encode_batch(["abcdefgh" * (i + 1)])[0] for i in range(6)]
    node_docs = [Document(i, np.asarray(d, np.int64)) for i, d in enumerate(docs)]
    with pytest.warns(DeprecationWarning, match="pad_to="):
        old = PackStage(SequenceNode(node_docs), 60, pad_to_shape=(64, 3))
    new = PackStage(SequenceNode(node_docs), 60, pad_to={"tokens": 64, "segments": 3})
    a, b = list(old), list(new)
    assert [x.input_ids.tolist() for x in a] == [x.input_ids.tolist() for x in b]
    assert all(x.num_tokens == 64 and len(x.cu_seqlens) == 4 for x in a)
