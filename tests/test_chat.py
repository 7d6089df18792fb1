"""Chat records: assistant-only loss masks (plain and real HF chat templates), masks surviving
packing and turn-boundary splitting, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from seqpack import IGNORE_INDEX
from seqpack.sources.chat import ChatEncoder, ChatError
from seqpack.sources.tokenize import ByteTokenizer
from seqpack.stages.pack_offline import pack_chats

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def conversation(rng, n_exchanges, system=True):
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    msgs = [{"role": "system", "content": "Be brief."}] if system else []
    for _ in range(n_exchanges):
        msgs.append({"role": "user", "content": " ".join(rng.choice(words, int(rng.integers(1, 6))))})
        msgs.append({"role": "assistant", "content": " ".join(rng.choice(words, int(rng.integers(1, 9))))})
    return msgs


def masked_text(doc, decode):
    """The trained spans of a document, decoded, one string per contiguous run."""
    runs, cur = [], []
    for t, m in zip(doc.tokens, doc.loss_mask):
        if m:
            cur.append(t)
        elif cur:
            runs.append(decode(cur))
            cur = []
    if cur:
        runs.append(decode(cur))
    return runs


def test_plain_template_masks_exactly_the_replies():
    enc = ChatEncoder("byte")
    msgs = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "bye"},
    ]
    doc = enc.encode(msgs, doc_id=7)
    tok = ByteTokenizer()
    assert (
        tok.decode(doc.tokens)
        == "<|system|>\nsys\n<|user|>\nhi there\n<|assistant|>\nhello\n<|user|>\nand?\n"
        "<|assistant|>\nbye\n"
    )
    assert masked_text(doc, tok.decode) == ["hello\n", "bye\n"]
    # exchanges start at 0 and at the second user message
    assert doc.turn_starts.tolist() == [0, tok.decode(doc.tokens).index("<|user|>\nand?")]
    assert doc.doc_id == 7 and doc.tokens.dtype == np.int64


def test_hf_tokenizer_with_its_own_chat_template():
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=ByteTokenizer.to_tokenizers())
    hf.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    hf.chat_template = CHATML
    im_end = hf.convert_tokens_to_ids("<|im_end|>")
    rng = np.random.default_rng(0)
    msgs = conversation(rng, 3)
    doc = ChatEncoder(hf).encode(msgs)
    # the whole rendering tokenizes to the same ids, special tokens as single ids
    whole = hf.apply_chat_template(msgs, tokenize=False)
    assert hf.decode(doc.tokens) == whole
    assert int((doc.tokens == im_end).sum()) == len(msgs)
    replies = [m["content"] + "<|im_end|>\n" for m in msgs if m["role"] == "assistant"]
    assert masked_text(doc, hf.decode) == replies
    assert len(doc.turn_starts) == 3


def test_bad_conversations_raise_naming_the_record_or_are_counted():
    enc = ChatEncoder("byte")
    with pytest.raises(ChatError, match="record 3: field 'messages': no assistant turn"):
        enc.encode([{"role": "user", "content": "hi"}], doc_id=3)
    with pytest.raises(ChatError, match="record 0: field 'messages': message 1 needs 'role'"):
        enc.encode([{"role": "user", "content": "hi"}, {"content": "x"}])
    with pytest.raises(ChatError, match="non-empty list"):
        enc.encode("hello")
    bad_template = ChatEncoder(
        "byte",
        "{% if messages|length > 1 %}{{ raise_exception('one turn only') }}{% endif %}"
        "{{ messages[0]['content'] }}",
    )
    with pytest.raises(ChatError, match="record 5: .*cannot be applied.*one turn only"):
        bad_template.encode(
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], doc_id=5
        )
    unstable = ChatEncoder(
        "byte", "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(ChatError, match="not prefix-stable at message 1"):
        unstable.encode([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    records = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"text": "no chat"},
        {"messages": [{"role": "user", "content": "only a question"}]},
    ]
    with pytest.raises(ChatError, match="record 1: field 'messages': missing"):
        ChatEncoder("byte").encode_records(records)
    skipping = ChatEncoder("byte", on_error="skip")
    docs = skipping.encode_records(records)
    assert [d.doc_id for d in docs] == [0]
    assert skipping.stats.skipped == 2 and skipping.stats.conversations == 3
    assert skipping.stats.reasons == {"missing": 1, "no assistant turn": 1}


@pytest.mark.parametrize("algorithm", ["bfd", "greedy", "online"])
def test_masks_survive_packing_and_turn_splitting(algorithm):
    rng = np.random.default_rng(1)
    enc = ChatEncoder("byte")
    docs = [enc.encode(conversation(rng, int(rng.integers(1, 9))), doc_id=i) for i in range(40)]
    capacity = 256
    assert max(len(d) for d in docs) > capacity  # some conversations must be split
    plan, batches = pack_chats(docs, capacity, algorithm=algorithm, pad_to=capacity)
    plan.validate([len(d) for d in docs])
    by_id = {d.doc_id: d for d in docs}
    trained = {d.doc_id: np.zeros(len(d), bool) for d in docs}
    n_batches = 0
    for b in batches:
        b.validate()
        n_batches += 1
        for s in range(b.n_real_segments):
            lo, hi = int(b.cu_seqlens[s]), int(b.cu_seqlens[s + 1])
            d, start = by_id[int(b.doc_ids[s])], int(b.seg_start[s])
            assert start in d.turn_starts.tolist()  # cut only where an exchange starts
            assert np.array_equal(b.input_ids[lo:hi].numpy(), d.tokens[start : start + hi - lo])
            labels = b.labels[lo:hi].numpy()
            expect = d.loss_mask[start : start + hi - lo].copy()
            expect[0] = False  # a segment's first token is never a target
            assert np.array_equal(labels != IGNORE_INDEX, expect)
            trained[d.doc_id][start : start + hi - lo] |= labels != IGNORE_INDEX
    assert n_batches == plan.n_bins
    # every assistant token is a target somewhere (exchanges start with a user turn, never trained)
    kept = {d: np.arange(len(by_id[d])) < len(by_id[d]) for d in by_id}
    for d, t in trained.items():
        assert np.array_equal(t, by_id[d].loss_mask & kept[d])
    assert plan.truncated_tokens == 0


def test_a_turn_longer_than_capacity_truncates_and_is_reported():
    enc = ChatEncoder("byte")
    long_reply = "x" * 300
    docs = [
        enc.encode(
            [
                {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "q2"},
                {"role": "assistant", "content": long_reply},
            ]
        ),
        enc.encode([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], doc_id=1),
    ]
    plan, batches = pack_chats(docs, 128)
    plan.validate([len(d) for d in docs])
    assert plan.truncated_docs == 1
    assert plan.truncated_tokens == len(docs[0]) - int(docs[0].turn_starts[1]) - 128
    assert plan.packed_tokens + plan.truncated_tokens == sum(len(d) for d in docs)
    assert sum(b.num_real_tokens for b in batches) == plan.packed_tokens
