"""Tokenization: the built-in ``byte`` tokenizer, ``tokenizers`` files and hub names, and the
:class:`Tokenize` stage (records -> documents, batched ``encode_batch``, BOS/EOS, SFT loss masks).

Fork safety and threads: the stage holds only the tokenizer *spec* and loads the tokenizer in
``reset``, which runs inside each DataLoader worker; tokenizers are cached per process. With
``num_workers=0``, ``TOKENIZERS_PARALLELISM`` is left alone (``encode_batch`` then uses all cores).
Each worker gets a budget (``seqpack.loader._WorkerInit``): with the variable unset,
``cpus // (workers * LOCAL_WORLD_SIZE)`` threads (``RAYON_NUM_THREADS`` unless the user set it;
``LOCAL_WORLD_SIZE``: ranks on this machine, from torchrun), so the workers tokenize on the cores
that 0 workers would; at one core per worker or less, one thread (``TOKENIZERS_PARALLELISM=false``:
more busy threads than cores only add the pool's spin-waiting and cache misses; measured, 2 workers
x 2 threads on 2 cores are slower than 2 x 1). The Rust pool does not survive a fork, but a worker
starts its own on its first parallel call, and if the parent had already run one, tokenizers' fork
handler switches the worker to one thread. That handler acts only while the variable is unset, so
an explicit value means one thread in workers: ``false`` is the user's choice, and with ``true`` a
pool the parent had run would hang the worker.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from torchdata.nodes import BaseNode

from seqpack.checks import check_bool, check_int, check_keys, check_mapping, rename_keys
from seqpack.node import Node
from seqpack.sources.blocks import DocBlock, collect_block
from seqpack.sources.records import Document, Record
from seqpack.sources.vocab import ByteTokenizer, HFTokenizer

EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>", "<|im_end|>", "[SEP]")
# keys of a ``tokenizer:`` mapping (``path``: deprecated name of ``name``)
TOKENIZER_KEYS = ("name", "add_bos", "add_eos", "bos_token", "eos_token", "pad_token")
# records in a fresh stream's first encode_batch call (then doubling up to the batch size)
FIRST_BATCH = 16
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "[CLS]")


@dataclass(frozen=True)
class TokenizerSpec:
    """How to build a tokenizer and which special tokens to add.

    ``name``: ``"byte"`` (default), a ``tokenizer.json`` path, or a hub name (read from the local
    Hugging Face cache when it is there, else downloaded).
    ``add_bos``/``add_eos``: prepend/append the BOS/EOS id to every document (EOS gets loss; BOS,
    a document's first token, is never a target). ``bos_token``/``eos_token``/``pad_token``:
    override the special-token strings (otherwise common names are tried).
    """

    name: str = "byte"
    add_bos: bool = False
    add_eos: bool = True
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None

    @classmethod
    def parse(cls, cfg: str | Mapping[str, Any] | None | TokenizerSpec) -> TokenizerSpec:
        if isinstance(cfg, TokenizerSpec):
            return cfg
        if cfg is None:
            return cls()
        if isinstance(cfg, (str, os.PathLike)):
            return cls(name=os.fspath(cfg))
        d = rename_keys(dict(check_mapping(cfg, "tokenizer")), {"path": "name"}, "tokenizer")
        check_keys(d, TOKENIZER_KEYS, "tokenizer")
        for key in ("add_bos", "add_eos"):
            if key in d:
                check_bool(d[key], f"tokenizer.{key}")
        for key in ("bos_token", "eos_token", "pad_token"):
            if d.get(key) is not None and (not isinstance(d[key], str) or not d[key]):
                raise ValueError(f"tokenizer.{key}: expected a token string, got {d[key]!r}")
        d["name"] = os.fspath(d.get("name", "byte"))
        return cls(**d)


def hub_cache_dir() -> str:
    """The local Hugging Face hub cache, read from the environment now (``HF_HUB_CACHE``, else
    ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``), so a changed environment is honoured."""
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]
    cache = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(env.get("HF_HOME") or os.path.join(cache, "huggingface"), "hub")


def tokenizer_file(name: str) -> str | None:
    """The ``tokenizer.json`` behind ``name`` without the network: the file (or a folder's
    ``tokenizer.json``) when ``name`` is a path, else a hub name's cached copy; None if neither."""
    if name == "byte":
        return None
    if os.path.exists(name):
        return os.path.join(name, "tokenizer.json") if os.path.isdir(name) else name
    try:
        from huggingface_hub import try_to_load_from_cache  # installed with `tokenizers`
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(name, "tokenizer.json", cache_dir=hub_cache_dir())
    except Exception:  # not a valid repo id (a mistyped path): not in the cache
        return None
    return found if isinstance(found, str) and os.path.isfile(found) else None


@lru_cache(maxsize=8)
def load_tokenizer(name: str = "byte"):
    """``"byte"`` -> :class:`ByteTokenizer`; a ``tokenizer.json`` path (or a folder holding one), or
    a hub name found in the local hub cache (no network) -> ``Tokenizer.from_file``; else the hub."""
    if name == "byte":
        return ByteTokenizer()
    from tokenizers import Tokenizer

    path = tokenizer_file(name)
    if path is not None:
        return HFTokenizer(Tokenizer.from_file(path), name)
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ValueError(_not_found(name, "HF_HUB_OFFLINE is set, so the hub was not asked"))
    try:
        return HFTokenizer(Tokenizer.from_pretrained(name), name)
    except Exception as e:
        raise ValueError(_not_found(name, f"the hub could not provide it: {e}")) from e


def _not_found(name: str, why: str) -> str:
    return (
        f"tokenizer {name!r}: not 'byte', not an existing tokenizer.json path, not in the local Hugging "
        f"Face cache ({hub_cache_dir()}), and {why}; pass a tokenizer.json path, or download it while "
        f"online (huggingface-cli download {name} tokenizer.json)"
    )


def special_ids(tok, spec: TokenizerSpec) -> tuple[int | None, int | None, int]:
    """(bos_id, eos_id, pad_id) of ``tok`` under ``spec``; raises if a named token is not in the
    vocabulary, or if ``add_bos``/``add_eos`` needs a token none of the common names give."""

    def find(explicit: str | None, candidates: Sequence[str], what: str, needed: bool) -> int | None:
        if explicit:
            i = tok.token_to_id(explicit)
            if i is None:
                raise ValueError(
                    f"tokenizer {spec.name!r}: {what}_token {explicit!r} is not in its vocabulary "
                    f"({tok.vocab_size:,} tokens); name a token it has"
                )
            return int(i)
        for n in candidates:
            i = tok.token_to_id(n)
            if i is not None:
                return int(i)
        if needed:
            raise ValueError(
                f"tokenizer {spec.name!r} has no {what} token among {list(candidates)}; name it with "
                + ("--eos-token TOKEN (seqpack preprocess) or " if what == "eos" else "")
                + f"tokenizer: {{name, {what}_token}} in a config, or set tokenizer.add_{what}: false"
            )
        return None

    bos = find(spec.bos_token, ("<bos>",) + BOS_CANDIDATES, "bos", spec.add_bos)
    eos = find(spec.eos_token, ("<eos>",) + EOS_CANDIDATES, "eos", spec.add_eos)
    pad = find(spec.pad_token, ("<pad>", "[PAD]", "<|pad|>"), "pad", False)
    return bos, eos, pad if pad is not None else (eos if eos is not None else 0)


class Tokenize(Node[Document]):
    """Records -> Documents, ``batch_size`` records per ``encode_batch`` call.

    Plain text: ``[bos] + ids + [eos]``, every token a target. SFT turns: each turn
    encoded separately and concatenated; loss only on trainable turns (and on EOS when the last
    turn is trainable). Pre-tokenized records pass through unchanged. Records that encode to no
    tokens are counted (``tokenize/empty``), not emitted.

    State: the upstream state *before* the current batch plus how many of its documents were
    emitted; resume re-reads and re-encodes that one batch (exact, and no token arrays in state).

    :meth:`next_block` passes blocks of pre-tokenized records straight through when the upstream
    serves them (no per-document objects), and otherwise hands out the encoded batch as a block.
    """

    def __init__(
        self,
        upstream: BaseNode,
        tokenizer: str | Mapping | TokenizerSpec | None = None,
        *,
        batch_size: int = 256,
    ):
        super().__init__()
        self.upstream = upstream
        self.spec = TokenizerSpec.parse(tokenizer)
        self.batch_size = check_int(batch_size, "batch_size", minimum=1)
        self.tok = None

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self._load_tokenizer()
        self._docs: list[Document] = []
        self._emitted = 0
        # a fresh stream starts with small batches (doubling up to batch_size), so its first
        # documents are not held back for a whole batch; batch bounds never change the output
        # (documents come in record order), and a resume re-reads its batch at full size, which
        # covers any batch the state was taken in
        self._fill_size = min(FIRST_BATCH, self.batch_size) if initial_state is None else self.batch_size
        if initial_state is None:
            self.upstream.reset(None)
            self._batch_state = self.upstream.state_dict()
            self._counts = {"documents": 0, "tokens": 0, "empty": 0}
        else:
            self.upstream.reset(initial_state["upstream"])
            self._batch_state = initial_state["upstream"]
            self._counts = dict(initial_state["counts"])
            skip = int(initial_state["emitted"])
            if skip:
                self._fill()
                self._emitted = skip

    def _load_tokenizer(self) -> None:
        if self.tok is None:
            self.tok = load_tokenizer(self.spec.name)
            self.bos_id, self.eos_id, self.pad_id = special_ids(self.tok, self.spec)

    def get_state(self) -> dict:
        # None: the last pull was a pass-through block, nothing is pending in this stage
        upstream = self.upstream.state_dict() if self._batch_state is None else self._batch_state
        return {"upstream": upstream, "emitted": self._emitted, "counts": dict(self._counts)}

    def next_block(self, max_docs: int) -> DocBlock:
        """Up to ``max_docs`` documents: the rest of the encoded batch, or an upstream token block."""
        if self._emitted < len(self._docs):
            docs = self._docs[self._emitted : self._emitted + max_docs]
            self._emitted += len(docs)
            self._counts["documents"] += len(docs)
            self._counts["tokens"] += sum(len(d.tokens) for d in docs)
            return DocBlock.from_documents(docs)
        if not getattr(self.upstream, "yields_tokens", False):
            return collect_block(self, max_docs)
        block = self.upstream.next_block(max_docs)
        self._docs, self._emitted, self._batch_state = [], 0, None
        keep = block.lengths > 0
        if not keep.all():
            self._counts["empty"] += int((~keep).sum())
            block = block.take(np.flatnonzero(keep))
        self._counts["documents"] += len(block)
        self._counts["tokens"] += block.num_tokens
        return block

    def own_stats(self) -> dict:
        return {f"tokenize/{k}": v for k, v in self._counts.items()}

    @property
    def can_refetch(self) -> bool:
        return callable(getattr(self.upstream, "fetch", None))

    def refetch(self, doc_ids: Sequence[int]) -> list[Document]:
        """Re-read records ``doc_ids`` through the reader's ``fetch`` and encode them again."""
        if not self.can_refetch:
            return super().refetch(doc_ids)
        self._load_tokenizer()
        docs = self.encode(self.upstream.fetch(list(doc_ids)))
        if len(docs) != len(doc_ids):
            have = {d.doc_id for d in docs}
            gone = [i for i in doc_ids if i not in have]
            raise ValueError(f"documents {gone[:5]} encode to no tokens now: the data or tokenizer changed")
        return docs

    def next(self) -> Document:
        while self._emitted >= len(self._docs):
            self._batch_state = self.upstream.state_dict()
            self._emitted = 0
            if not self._fill():
                raise StopIteration
        doc = self._docs[self._emitted]
        self._emitted += 1
        self._counts["documents"] += 1
        self._counts["tokens"] += len(doc.tokens)
        return doc

    def _fill(self) -> bool:
        records: list[Record] = []
        n, self._fill_size = self._fill_size, min(self.batch_size, 2 * self._fill_size)
        for _ in range(n):
            try:
                records.append(next(self.upstream))
            except StopIteration:
                break
        docs = self.encode(records)
        self._counts["empty"] += len(records) - len(docs)
        self._docs = docs
        return bool(records)

    def encode(self, records: Sequence[Record]) -> list[Document]:
        """Tokenize a list of records (one ``encode_batch`` call over all their texts)."""
        texts: list[str] = []
        for r in records:
            if r.text is not None:
                texts.append(r.text)
            elif r.turns is not None:
                texts.extend(t for t, _ in r.turns)
        ids = iter(self.tok.encode_batch(texts) if texts else [])
        bos = np.array([self.bos_id], np.int64) if self.spec.add_bos else None
        eos = np.array([self.eos_id], np.int64) if self.spec.add_eos else None
        out: list[Document] = []
        for r in records:
            if r.tokens is not None:
                if len(r.tokens):
                    out.append(Document(r.doc_id, r.tokens, r.loss_mask, r.source, group=r.group))
                continue
            if r.text is not None:
                pieces, trainable = [next(ids)], [True]
            else:
                pieces = [next(ids) for _ in r.turns]
                trainable = [t for _, t in r.turns]
            if sum(len(p) for p in pieces) == 0:
                continue
            if bos is not None:
                # the first token of a document is never a target (labels mask it), so BOS
                # inherits the first turn's flag and plain text needs no mask at all
                pieces.insert(0, bos)
                trainable.insert(0, trainable[0])
            if eos is not None:
                pieces.append(eos)
                trainable.append(trainable[-1])
            tokens = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
            mask = None
            if not all(trainable):
                mask = np.repeat(np.array(trainable), [len(p) for p in pieces])
            turn_starts = None
            if r.turn_flags is not None:
                # offsets of the turns that start an exchange (BOS, if any, shifts them by one)
                lens = np.array([len(p) for p in pieces], np.int64)
                offsets = np.cumsum(lens) - lens
                flags = ([False] if bos is not None else []) + list(r.turn_flags)
                flags += [False] * (len(pieces) - len(flags))
                turn_starts = np.unique(np.concatenate([[0], offsets[np.array(flags, bool)]]))
            out.append(Document(r.doc_id, tokens, mask, r.source, turn_starts, r.group))
        return out


def tokenize(
    records: BaseNode,
    tokenizer: str | Mapping | TokenizerSpec | None = "byte",
    *,
    batch_size: int = 256,
    **spec: Any,
) -> Tokenize:
    """Wrap a record node (e.g. :func:`seqpack.read`) in a :class:`Tokenize` stage.

    ``tokenizer``: ``"byte"``, a ``tokenizer.json`` path, a hub name or a spec mapping; extra
    keywords (``add_bos``, ``add_eos``, ``eos_token``, ...) override spec fields.
    """
    base = TokenizerSpec.parse(tokenizer)
    if spec:
        base = TokenizerSpec(**{**base.__dict__, **spec})
    return Tokenize(records, base, batch_size=batch_size)
