"""The tokenizer classes: the built-in ``byte`` tokenizer and a ``tokenizers.Tokenizer`` wrapper
(both return int64 numpy arrays). Loading and special tokens are in :mod:`seqpack.sources.tokenize`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BYTE_SPECIALS = {"<bos>": 256, "<eos>": 257, "<pad>": 258}


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, plus ``<bos>``=256, ``<eos>``=257, ``<pad>``=258.

    Needs no files; encoding is one numpy view per text. :meth:`to_tokenizers` builds the same
    mapping as a real ``tokenizers.Tokenizer`` (saved as ``tokenizer.json`` for other tools).
    """

    name = "byte"
    vocab_size = 259

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.int64) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        ids = np.asarray(ids)
        return bytes(ids[ids < 256].astype(np.uint8)).decode("utf-8", "replace")

    def token_to_id(self, token: str) -> int | None:
        return BYTE_SPECIALS.get(token)

    @staticmethod
    def to_tokenizers():
        """The equivalent ``tokenizers.Tokenizer`` (byte-level BPE with no merges)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from tokenizers.pre_tokenizers import ByteLevel

        alphabet = ByteLevel.alphabet()  # 256 printable stand-ins, one per byte
        byte_char = {b: c for b, c in zip(range(256), _bytes_to_unicode())}
        assert set(byte_char.values()) == set(alphabet)
        vocab = {byte_char[b]: b for b in range(256)}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(list(BYTE_SPECIALS))
        return tok


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable character table, in byte order."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` returning int64 numpy arrays (special tokens not added)."""

    def __init__(self, tok, name: str):
        self.tok, self.name = tok, name
        self.vocab_size = tok.get_vocab_size()
        self._fast = getattr(tok, "encode_batch_fast", None)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        enc = (self._fast or self.tok.encode_batch)(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, np.int64) for e in enc]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids])

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)
