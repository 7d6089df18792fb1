"""Readers on small files the tests write: every format, field kinds, partition, resume, bad input."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from seqpack import read, tokenize
from seqpack.sources.records import SourceError, split_doc_id
from seqpack.sources.tokenize import ByteTokenizer

TEXTS = [f"document {i} " + "abc" * (i % 7) for i in range(57)]


def write_jsonl(path, rows, zst=False):
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    if zst:
        data = zstandard.ZstdCompressor().compress(data)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def write_parquet(path, table, row_group_size=10):
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


def write_tar(path, samples):
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return str(path)


def texts_of(node):
    return [r.text for r in node]


# ------------------------------------------------------------------------------------------ formats
@pytest.mark.parametrize("zst", [False, True])
def test_jsonl_reads_every_record_in_order(tmp_path, zst):
    ext = ".jsonl.zst" if zst else ".jsonl"
    write_jsonl(tmp_path / f"a{ext}", [{"text": t} for t in TEXTS[:30]], zst)
    write_jsonl(tmp_path / f"b{ext}", [{"text": t} for t in TEXTS[30:]], zst)
    recs = list(read(str(tmp_path / f"*{ext}")))
    assert [r.text for r in recs] == TEXTS
    assert [split_doc_id(r.doc_id) for r in recs[:2]] == [(0, 0, 0), (0, 0, 1)]
    assert split_doc_id(recs[30].doc_id) == (0, 1, 0)


def test_multi_frame_zst(tmp_path):
    c = zstandard.ZstdCompressor()
    a = "".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:20]).encode()
    b = "".join(json.dumps({"text": t}) + "\n" for t in TEXTS[20:]).encode()
    (tmp_path / "m.jsonl.zst").write_bytes(c.compress(a) + c.compress(b))
    assert texts_of(read(str(tmp_path / "m.jsonl.zst"))) == TEXTS


def test_parquet_text_and_projection(tmp_path):
    t = pa.table({"text": TEXTS, "other": list(range(len(TEXTS)))})
    path = write_parquet(tmp_path / "a.parquet", t, row_group_size=8)
    r = read(path)
    assert r.units() == [(0, g) for g in range(8)]
    assert texts_of(r) == TEXTS


def test_parquet_pretokenized_with_mask(tmp_path):
    rng = np.random.default_rng(0)
    ids = [rng.integers(0, 1000, int(n)).astype(np.int32) for n in rng.integers(1, 50, 40)]
    masks = [(rng.random(len(x)) < 0.5).astype(np.int8) for x in ids]
    t = pa.table({"input_ids": [x.tolist() for x in ids], "loss_mask": [m.tolist() for m in masks]})
    path = write_parquet(tmp_path / "tok.parquet", t, row_group_size=7)
    recs = list(read(path, input_ids_key="input_ids", loss_mask_key="loss_mask"))
    assert len(recs) == 40
    for r, x, m in zip(recs, ids, masks):
        np.testing.assert_array_equal(r.tokens, x)
        assert r.tokens.dtype == np.int64
        np.testing.assert_array_equal(r.loss_mask, m.astype(bool))
    docs = list(tokenize(read(path, input_ids_key="input_ids")))
    np.testing.assert_array_equal(docs[3].tokens, ids[3])  # pre-tokenized: no EOS added


def test_arrow_file_and_stream(tmp_path):
    t = pa.table({"text": TEXTS})
    batches = t.to_batches(max_chunksize=10)
    with pa.OSFile(str(tmp_path / "f.arrow"), "wb") as f, pa.ipc.new_file(f, t.schema) as w:
        for b in batches:
            w.write_batch(b)
    with pa.OSFile(str(tmp_path / "s.arrow"), "wb") as f, pa.ipc.new_stream(f, t.schema) as w:
        for b in batches:
            w.write_batch(b)
    rf = read(str(tmp_path / "f.arrow"))
    assert len(rf.units()) == 6
    assert texts_of(rf) == TEXTS
    assert texts_of(read(str(tmp_path / "s.arrow"))) == TEXTS
    # stream format, split across 3 consumers: disjoint and complete
    got = sorted(t for k in range(3) for t in texts_of(read(str(tmp_path / "s.arrow"), consumer=(k, 3))))
    assert got == sorted(TEXTS)


def test_hf_saved_dataset_and_streaming(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": TEXTS, "n": list(range(len(TEXTS)))})
    ds.save_to_disk(str(tmp_path / "ds"))
    r = read(str(tmp_path / "ds"), format="hf", chunk_rows=16)
    assert len(r.units()) == 4
    assert texts_of(r) == TEXTS
    path = write_jsonl(tmp_path / "s.jsonl", [{"text": t} for t in TEXTS])
    streamed = read("json", format="hf", streaming=True, hf_kwargs={"data_files": path})
    assert texts_of(streamed) == TEXTS
    parts = [
        texts_of(read("json", format="hf", streaming=True, hf_kwargs={"data_files": path}, consumer=(k, 2)))
        for k in range(2)
    ]
    assert sorted(parts[0] + parts[1]) == sorted(TEXTS) and not set(parts[0]) & set(parts[1])


def test_webdataset_text_json_and_npy(tmp_path):
    samples = []
    for i, t in enumerate(TEXTS[:12]):
        members = {"txt": t.encode()} if i % 2 else {"json": json.dumps({"text": t}).encode()}
        samples.append((f"{i:05d}", members))
    path = write_tar(tmp_path / "shard-0.tar", samples)
    assert texts_of(read(path)) == TEXTS[:12]
    buf = io.BytesIO()
    np.save(buf, np.arange(5, dtype=np.int32))
    tpath = write_tar(tmp_path / "tok.tar", [("k0", {"input_ids.npy": buf.getvalue()})])
    (rec,) = list(read(tpath, input_ids_key="input_ids"))
    np.testing.assert_array_equal(rec.tokens, np.arange(5))


def test_text_files_by_file_and_line(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text("\n".join(TEXTS[i * 5 : i * 5 + 5]) + "\n")
    whole = texts_of(read(str(tmp_path / "*.txt")))
    assert len(whole) == 3 and whole[1] == "\n".join(TEXTS[5:10]) + "\n"
    lines = texts_of(read(str(tmp_path / "*.txt"), split="line"))
    assert lines == TEXTS[:15]


# ------------------------------------------------------------------------------------------ fields
def test_sft_pair_and_messages_loss_masks(tmp_path):
    rows = [{"p": "Q?", "r": "A!"}]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    (doc,) = list(tokenize(read(path, prompt_key="p", response_key="r"), "byte"))
    assert ByteTokenizer().decode(doc.tokens) == "Q?A!"
    np.testing.assert_array_equal(doc.loss_mask, [False, False, True, True, True])  # EOS is a target
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", chat)
    (doc,) = list(tokenize(read(path, messages_key="messages"), "byte", add_eos=False))
    text = ByteTokenizer().decode(doc.tokens)
    assert text == "<|user|>\nhi\n<|assistant|>\nyo\n"
    trained = ByteTokenizer().decode(doc.tokens[doc.loss_mask])
    assert trained == "yo\n"


def test_bos_eos_handling(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "ab"}, {"text": ""}])
    node = tokenize(read(path), "byte", add_bos=True, add_eos=True)
    docs = list(node)
    assert len(docs) == 1 and docs[0].tokens.tolist() == [256, 97, 98, 257]
    assert node.stats()["tokenize/empty"] == 1


# ---------------------------------------------------------------------------------- partition + resume
@pytest.mark.parametrize("n", [2, 3, 7, 40])
def test_partition_is_disjoint_and_complete(tmp_path, n):
    # 3 parquet files x 2 row groups = 6 units: n=2,3 split units; n=7,40 split records inside units
    for f in range(3):
        write_parquet(
            tmp_path / f"{f}.parquet", pa.table({"text": TEXTS[f * 19 : (f + 1) * 19]}), row_group_size=10
        )
    ids = [r.doc_id for k in range(n) for r in read(str(tmp_path / "*.parquet"), consumer=(k, n))]
    assert len(ids) == len(set(ids)) == len(TEXTS)


def test_shard_shuffle_is_seeded_permutation(tmp_path):
    for f in range(4):
        write_jsonl(tmp_path / f"{f}.jsonl", [{"text": t} for t in TEXTS[f * 10 : f * 10 + 10]])
    a = texts_of(read(str(tmp_path / "*.jsonl"), shuffle_seed=3, epoch=0))
    b = texts_of(read(str(tmp_path / "*.jsonl"), shuffle_seed=3, epoch=0))
    c = texts_of(read(str(tmp_path / "*.jsonl"), shuffle_seed=3, epoch=1))
    assert a == b and sorted(a) == sorted(TEXTS[:40]) and a != TEXTS[:40]
    assert a != c  # new epoch, new shard order (4! orders; seeds chosen to differ)


@pytest.mark.parametrize("fmt", ["jsonl.zst", "parquet", "tar"])
def test_reader_resume_every_position(tmp_path, fmt):
    if fmt == "jsonl.zst":
        path = write_jsonl(tmp_path / "a.jsonl.zst", [{"text": t} for t in TEXTS], zst=True)
    elif fmt == "parquet":
        path = write_parquet(tmp_path / "a.parquet", pa.table({"text": TEXTS}), row_group_size=9)
    else:
        path = write_tar(tmp_path / "a.tar", [(f"{i:04d}", {"txt": t.encode()}) for i, t in enumerate(TEXTS)])
    for consumer in [(0, 1), (1, 3)]:
        ref = read(path, consumer=consumer)
        ref.reset()
        states, items = [], []
        while True:
            states.append(ref.state_dict())
            try:
                items.append(next(ref).text)
            except StopIteration:
                break
        for i in range(0, len(items), 3):
            r = read(path, consumer=consumer)
            r.load_state_dict(states[i])
            assert texts_of(r) == items[i:]


# ------------------------------------------------------------------------------------------ bad input
def test_malformed_json_line_names_file_and_record(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "broken\n{"text": "fine"}\n')
    with pytest.raises(SourceError, match=r"bad\.jsonl: record 1: malformed JSON"):
        list(read(str(path)))
    r = read(str(path), on_error="skip")
    assert texts_of(r) == ["ok", "fine"]
    assert r.stats()["read/source0/skipped"] == 1


def test_missing_text_key_names_field(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"text": "a"}, {"body": "b"}, {"text": None}])
    with pytest.raises(SourceError, match=r"m\.jsonl: record 1: field 'text': missing"):
        list(read(path))
    r = read(path, on_error="skip")
    assert texts_of(r) == ["a"] and r.stats()["read/source0/skipped"] == 2


def test_truncated_zst_is_an_error_not_a_short_file(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"text": rng.bytes(60).hex()} for i in range(5000)]  # incompressible: many zstd blocks
    full = write_jsonl(tmp_path / "full.jsonl.zst", rows, zst=True)
    data = open(full, "rb").read()
    (tmp_path / "cut.jsonl.zst").write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match=r"cut\.jsonl\.zst: record \d+: truncated zstd stream"):
        list(read(str(tmp_path / "cut.jsonl.zst")))
    r = read(str(tmp_path / "cut.jsonl.zst"), on_error="skip")
    n = len(list(r))
    assert 0 < n < 5000
    assert r.stats()["read/source0/skipped_files"] == 1


def test_corrupt_parquet_footer(tmp_path):
    good = write_parquet(tmp_path / "a.parquet", pa.table({"text": TEXTS}))
    data = open(good, "rb").read()
    (tmp_path / "b.parquet").write_bytes(data[:-12] + b"\0" * 12)
    with pytest.raises(SourceError, match=r"b\.parquet: corrupt or unreadable Parquet"):
        list(read(str(tmp_path / "*.parquet")))
    r = read(str(tmp_path / "*.parquet"), on_error="skip")
    assert texts_of(r) == TEXTS and r.stats()["read/source0/skipped_files"] == 1


def test_missing_parquet_column(tmp_path):
    path = write_parquet(tmp_path / "a.parquet", pa.table({"body": TEXTS}))
    with pytest.raises(SourceError, match=r"a\.parquet: field 'text': column missing"):
        list(read(path))


def test_non_utf8_text(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "bad \xff\xfe here", "id": 1}\n')
    with pytest.raises(SourceError, match=r"u\.jsonl: record 1: field 'text': not valid UTF-8"):
        list(read(str(path)))
    assert texts_of(read(str(path), on_error="skip")) == ["fine"]
    (tmp_path / "t.txt").write_bytes(b"ok\n\xc3\x28 bad\n")
    with pytest.raises(SourceError, match=r"t\.txt: record 1: field 'text': not valid UTF-8"):
        list(read(str(tmp_path / "t.txt"), split="line"))
    pq.write_table(pa.table({"text": pa.array([b"ok", b"\xff"], pa.binary())}), tmp_path / "b.parquet")
    with pytest.raises(SourceError, match=r"b\.parquet: record 1: field 'text': not valid UTF-8"):
        list(read(str(tmp_path / "b.parquet")))


def test_missing_paths_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="matched no files"):
        read(str(tmp_path / "*.jsonl"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        read(str(tmp_path / "nope.jsonl"))


def test_byte_tokenizer_matches_tokenizers_version(tmp_path):
    bt = ByteTokenizer()
    tok = bt.to_tokenizers()
    texts = ["hello world", "  spaces  and\ttabs\n", "ünïcødé ✓ 漢字", ""]
    for t in texts:
        assert tok.encode(t).ids == bt.encode_batch([t])[0].tolist()
        assert tok.decode(tok.encode(t).ids) == t
    assert tok.token_to_id("<eos>") == 257
    tok.save(str(tmp_path / "tokenizer.json"))
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts[:3]])
    via_file = [d.tokens.tolist() for d in tokenize(read(path), str(tmp_path / "tokenizer.json"))]
    builtin = [d.tokens.tolist() for d in tokenize(read(path), "byte")]
    assert via_file == builtin


def test_doc_ids_are_positional_and_stable(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXTS[:5]])
    write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in TEXTS[5:9]])
    ids = {r.text: r.doc_id for r in read(str(tmp_path / "*.jsonl"), source_index=2)}
    ids_sharded = {
        r.text: r.doc_id
        for k in range(3)
        for r in read(str(tmp_path / "*.jsonl"), source_index=2, consumer=(k, 3))
    }
    assert ids == ids_sharded
    assert split_doc_id(ids[TEXTS[6]]) == (2, 1, 1)
    assert os.path.basename(read(str(tmp_path / "*.jsonl")).paths[1]) == "b.jsonl"
