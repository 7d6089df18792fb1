"""Which fields of a record hold the text, the pre-tokenized ids or the SFT turns.

A :class:`FieldSpec` turns one row (a dict from JSON, HF datasets or a webdataset ``.json``
member) into a :class:`~seqpack.sources.records.Record`, raising :class:`SourceError` that names
the file, record and field when the row does not have what the spec asks for.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from seqpack.sources.chat import ChatError, ChatRecordError, ChatTemplate
from seqpack.sources.records import Record, SourceError, group_hash


@dataclass(frozen=True)
class FieldSpec:
    """Field names of one source. The first of these that is set decides the record kind:

    - ``input_ids_key``: pre-tokenized ids (list of ints); ``loss_mask_key`` optionally names a
      0/1 (or bool) list of the same length.
    - ``messages_key``: a chat, a list of ``{"role", "content"}``; assistant turns get loss.
    - ``prompt_key`` + ``response_key``: SFT pair; only the response gets loss.
    - ``text_key`` (default ``"text"``): plain text, every token gets loss.

    Chats are rendered with ``chat_template`` (a Jinja string; None: the plain ``<|role|>``
    template) by :class:`seqpack.sources.chat.ChatTemplate`, so their pieces, loss masks and turn
    boundaries are those of :class:`~seqpack.sources.chat.ChatEncoder`; ``chat_template_vars`` are
    the special-token strings the template may use. ``group_key`` names a field whose value becomes
    the record's group (documents of different groups never share a batch).
    """

    text_key: str = "text"
    input_ids_key: str | None = None
    loss_mask_key: str | None = None
    prompt_key: str | None = None
    response_key: str | None = None
    messages_key: str | None = None
    group_key: str | None = None
    chat_template: str | None = None
    chat_template_vars: tuple[tuple[str, str], ...] = ()

    @property
    def kind(self) -> str:
        if self.input_ids_key:
            return "tokens"
        if self.messages_key:
            return "messages"
        if self.prompt_key or self.response_key:
            if not (self.prompt_key and self.response_key):
                raise ValueError("prompt_key and response_key must be given together")
            return "pair"
        return "text"

    def columns(self) -> list[str]:
        """Columns to project when reading a columnar file."""
        return self._data_columns() + ([self.group_key] if self.group_key else [])

    def _data_columns(self) -> list[str]:
        kind = self.kind
        if kind == "tokens":
            return [self.input_ids_key] + ([self.loss_mask_key] if self.loss_mask_key else [])
        if kind == "messages":
            return [self.messages_key]
        if kind == "pair":
            return [self.prompt_key, self.response_key]
        return [self.text_key]

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> FieldSpec:
        keys = (
            "text_key",
            "input_ids_key",
            "loss_mask_key",
            "prompt_key",
            "response_key",
            "messages_key",
            "group_key",
            "chat_template",
        )
        out = {k: cfg[k] for k in keys if cfg.get(k) is not None}
        if cfg.get("chat_template_vars"):
            out["chat_template_vars"] = tuple(sorted(dict(cfg["chat_template_vars"]).items()))
        return cls(**out)

    def extract(self, row: Mapping[str, Any], doc_id: int, source: str, path: str, record: int) -> Record:
        """Build the Record of one row, or raise SourceError naming the offending field."""
        if not isinstance(row, Mapping):
            raise SourceError(path, record, None, f"expected an object, got {type(row).__name__}")
        rec = self._extract(row, doc_id, source, path, record)
        if self.group_key:
            rec.group = group_hash(_get(row, self.group_key, path, record))
        return rec

    def _extract(self, row: Mapping[str, Any], doc_id: int, source: str, path: str, record: int) -> Record:
        kind = self.kind
        if kind == "text":
            return Record(doc_id, source, text=_text(row, self.text_key, path, record))
        if kind == "pair":
            prompt = _text(row, self.prompt_key, path, record)
            response = _text(row, self.response_key, path, record)
            return Record(doc_id, source, turns=[(prompt, False), (response, True)])
        if kind == "messages":
            msgs = _get(row, self.messages_key, path, record)
            if not isinstance(msgs, list):
                raise SourceError(
                    path, record, self.messages_key, f"expected a list, got {type(msgs).__name__}"
                )
            check_messages(msgs, path, record, self.messages_key)
            try:
                texts, trainable, starts = _renderer(self.chat_template, self.chat_template_vars).pieces(
                    msgs, record
                )
            except ChatError as e:
                raise ChatRecordError(path, record, self.messages_key, e.problem) from None
            return Record(doc_id, source, turns=list(zip(texts, trainable)), turn_flags=starts)
        ids = _get(row, self.input_ids_key, path, record)
        tokens = _int_array(ids, path, record, self.input_ids_key)
        mask = None
        if self.loss_mask_key:
            mask = _int_array(_get(row, self.loss_mask_key, path, record), path, record, self.loss_mask_key)
            if len(mask) != len(tokens):
                raise SourceError(
                    path, record, self.loss_mask_key, f"length {len(mask)} != {len(tokens)} input ids"
                )
            mask = mask.astype(bool)
        return Record(doc_id, source, tokens=tokens, loss_mask=mask)


@lru_cache(maxsize=16)
def _renderer(template: str | None, template_vars: tuple[tuple[str, str], ...]) -> ChatTemplate:
    return ChatTemplate(template, dict(template_vars))


def check_messages(msgs: list, path: str, record: int, key: str) -> None:
    """Every message an object with a ``role`` and a string ``content`` of valid UTF-8."""
    for j, m in enumerate(msgs):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise SourceError(path, record, f"{key}[{j}]", "expected an object with 'role' and 'content'")
        if not isinstance(m["content"], str):
            raise SourceError(
                path, record, f"{key}[{j}].content", f"expected a string, got {type(m['content']).__name__}"
            )
        _check_utf8(m["content"], path, record, f"{key}[{j}].content")


def _get(row: Mapping[str, Any], key: str, path: str, record: int) -> Any:
    try:
        value = row[key]
    except KeyError:
        raise SourceError(path, record, key, f"missing (record has fields {sorted(row)[:8]})") from None
    if value is None:
        raise SourceError(path, record, key, "is null")
    return value


def _text(row: Mapping[str, Any], key: str, path: str, record: int) -> str:
    value = _get(row, key, path, record)
    if not isinstance(value, str):
        raise SourceError(path, record, key, f"expected a string, got {type(value).__name__}")
    _check_utf8(value, path, record, key)
    return value


def _check_utf8(value: str, path: str, record: int, key: str) -> None:
    # Readers decode with surrogateescape only after a strict decode failed, so lone surrogates
    # mark bytes that were not UTF-8; the check is a cheap C scan otherwise.
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            bad = value[e.start : e.end].encode("utf-8", "surrogateescape")
            raise SourceError(
                path, record, key, f"not valid UTF-8 (bytes {bad!r} at char {e.start})"
            ) from None


def _int_array(value: Any, path: str, record: int, key: str) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as e:
        raise SourceError(path, record, key, f"not a list of integers ({e})") from None
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iub"):
        raise SourceError(
            path, record, key, f"expected a flat list of integers, got dtype {arr.dtype} shape {arr.shape}"
        )
    return arr.astype(np.int64, copy=False)
