"""Chat (``messages``) records -> tokens, assistant-only loss masks and turn boundaries.

A conversation is rendered with a chat template (the tokenizer's, a Jinja string, or a plain
built-in one) and cut into pieces by rendering growing prefixes of the conversation: the text
message ``i`` adds is ``render(messages[:i+1])`` minus ``render(messages[:i])``, and for an
assistant message the part after ``render(messages[:i], add_generation_prompt=True)`` (the reply
itself, its end-of-turn marker included, without the ``<|assistant|>`` header). That works with any
template whose renderings of prefixes are prefixes of each other, which is checked; templates that
rewrite earlier turns (e.g. strip reasoning from old replies) get a clear error.

Each piece is tokenized separately and concatenated, so the loss mask is exact at piece edges.
:attr:`ChatDocument.turn_starts` holds the token offsets where an exchange starts (a non-assistant
message right after an assistant one): ``pack(..., overflow="split_turns", turn_starts=...)``
splits long conversations only there, so a reply never loses its prompt to a cut
(:func:`seqpack.stages.pack_offline.pack_chats` plans and packs conversations in memory).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from seqpack.sources.records import SourceError
from seqpack.sources.tokenize import load_tokenizer

# the plain rendering used when neither the tokenizer nor the config gives a template
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ON_ERROR = ("raise", "skip")


class ChatError(ValueError):
    """Bad chat record; the message names the record (index or id) and the field."""

    def __init__(self, record: Any, field_name: str, problem: str):
        self.record, self.field, self.problem = record, field_name, problem
        super().__init__(f"record {record}: field {field_name!r}: {problem}")


class ChatRecordError(SourceError, ChatError):
    """A bad chat record read from a file: both a :class:`SourceError` (readers skip or raise it
    under their ``on_error`` policy) and a :class:`ChatError`; names the file, record and field."""

    def __init__(
        self, path: str, record: int | None = None, field_name: str | None = None, problem: str | None = None
    ):
        if problem is None and record is None and field_name is None:
            SourceError.__init__(self, path)  # rebuilt from its message (a DataLoader worker's error)
            return
        self._message_only = False
        self.path, self.record, self.field, self.problem = path, record, field_name, problem
        where = f"{path}: record {record}" if record is not None else str(path)
        if field_name is not None:
            where += f": field {field_name!r}"
        ValueError.__init__(self, f"{where}: {problem}")


@dataclass
class ChatDocument:
    """A tokenized conversation.

    Attributes:
        doc_id: the record's id (its index unless given).
        tokens: int64 ``[L]``.
        loss_mask: bool ``[L]``, True on assistant replies (and their end-of-turn markers).
        turn_starts: int64 ``[k]``, token offsets where an exchange (prompt + reply) starts; always
            begins with 0.
    """

    doc_id: int
    tokens: np.ndarray
    loss_mask: np.ndarray
    turn_starts: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class ChatStats:
    """Counters of a :class:`ChatEncoder` (what ``on_error="skip"`` skipped, and why)."""

    conversations: int = 0
    skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


TEMPLATE_VARS = ("bos_token", "eos_token", "pad_token", "unk_token")


class ChatTemplate:
    """A chat template cut into text pieces, without a tokenizer (readers render, the tokenizer
    stage encodes the pieces one by one, exactly as :class:`ChatEncoder` does).

    Args:
        template: a Jinja chat template; None for :data:`PLAIN_CHAT_TEMPLATE`.
        template_vars: special-token strings the template may use (``bos_token``, ``eos_token``...).
        train_roles: roles whose content gets loss.
    """

    def __init__(
        self,
        template: str | None = None,
        template_vars: Mapping[str, str] | None = None,
        *,
        train_roles: Sequence[str] = ("assistant",),
    ):
        self.template = template or PLAIN_CHAT_TEMPLATE
        self.template_vars = dict(template_vars or {})
        self.train_roles = tuple(train_roles)

    def pieces(self, messages: Any, record: Any) -> tuple[list[str], list[bool], list[bool]]:
        """Text pieces of a conversation, their trainable flags, and whether each starts an exchange
        (a non-assistant message right after an assistant one). Raises :class:`ChatError` naming
        ``record`` for a malformed conversation, one without a trainable turn, or a template that
        fails or is not prefix-stable."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ChatError(
                record, "messages", f"expected a non-empty list of messages, got {messages!r:.60}"
            )
        for j, m in enumerate(messages):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or "content" not in m:
                raise ChatError(record, "messages", f"message {j} needs 'role' (str) and 'content'")
        messages = [dict(m) for m in messages]
        if not any(m["role"] in self.train_roles for m in messages):
            raise ChatError(
                record, "messages", f"no assistant turn: no message with role in {self.train_roles}"
            )
        texts, trainable, starts = [], [], []
        prev = ""
        prev_role = None
        for i, msg in enumerate(messages):
            role = msg["role"]
            full = self._render(messages[: i + 1], False, record)
            if not full.startswith(prev):
                raise ChatError(
                    record,
                    "messages",
                    f"chat template is not prefix-stable at message {i} "
                    "(rendering a longer conversation changed earlier text)",
                )
            if role in self.train_roles:
                header = self._render(messages[:i], True, record) if i else ""
                if not (header.startswith(prev) and full.startswith(header)):
                    header = prev  # template without a generation prompt for this role
                texts += [header[len(prev) :], full[len(header) :]]
                trainable += [False, True]
                starts += [False, False]
            else:
                texts.append(full[len(prev) :])
                trainable.append(False)
                starts.append(prev_role in self.train_roles)
            prev, prev_role = full, role
        if not any(t and x for t, x in zip(texts, trainable)):
            raise ChatError(record, "messages", "no assistant turn: the replies render to no text")
        return texts, trainable, starts

    def _render(self, messages: list, add_generation_prompt: bool, record: Any) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            rendered, _ = render_jinja_template(
                conversations=[messages],
                chat_template=self.template,
                add_generation_prompt=add_generation_prompt,
                **self.template_vars,
            )
        except Exception as e:  # jinja errors, raise_exception() in templates, bad message shapes
            raise ChatError(
                record, "messages", f"chat template cannot be applied: {type(e).__name__}: {e}"
            ) from e
        return rendered[0]


def tokenizer_chat_template(name: str) -> tuple[str | None, dict[str, str]]:
    """The chat template and special-token strings saved next to a local tokenizer (``name``: a
    directory or a ``tokenizer.json`` path): ``chat_template.jinja`` or ``tokenizer_config.json``'s
    ``chat_template``; ``(None, {})`` when there is none (``"byte"``, hub names, bare files)."""
    if not isinstance(name, str) or name == "byte" or not os.path.exists(name):
        return None, {}
    folder = name if os.path.isdir(name) else os.path.dirname(os.path.abspath(name))
    template, tvars = None, {}
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        for k in TEMPLATE_VARS:
            v = cfg.get(k)
            v = v.get("content") if isinstance(v, Mapping) else v
            if isinstance(v, str):
                tvars[k] = v
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja, encoding="utf-8") as f:
            template = f.read()
    return (template if isinstance(template, str) else None), tvars


class ChatEncoder:
    """Turns ``messages`` lists (``[{"role", "content"}, ...]``) into :class:`ChatDocument`.

    Args:
        tokenizer: a transformers tokenizer (its ``chat_template`` and special tokens are used),
            a seqpack tokenizer (``encode_batch``), or a name for
            :func:`seqpack.sources.tokenize.load_tokenizer` (``"byte"``, a ``tokenizer.json`` path).
        chat_template: a Jinja template overriding the tokenizer's; with neither, the plain
            ``<|role|>\\ncontent\\n`` rendering.
        train_roles: roles whose content gets loss (default assistant only).
        on_error: ``"raise"`` (:class:`ChatError` naming the record) or ``"skip"`` (counted in
            :attr:`stats`): a conversation without a trainable turn, a malformed message, or a
            template that fails or is not prefix-stable.
    """

    def __init__(
        self,
        tokenizer: Any = "byte",
        chat_template: str | None = None,
        *,
        train_roles: Sequence[str] = ("assistant",),
        on_error: str = "raise",
    ):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if isinstance(tokenizer, str):
            tokenizer = load_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.renderer = ChatTemplate(
            chat_template or getattr(tokenizer, "chat_template", None),
            {
                name: getattr(tokenizer, name)
                for name in TEMPLATE_VARS
                if isinstance(getattr(tokenizer, name, None), str)
            },
            train_roles=train_roles,
        )
        self.template = self.renderer.template
        self.train_roles = self.renderer.train_roles
        self.on_error = on_error
        self.stats = ChatStats()

    # ------------------------------------------------------------------ public
    def encode(self, messages: Any, doc_id: int = 0, record: Any = None) -> ChatDocument | None:
        """One conversation; ``None`` when skipped under ``on_error="skip"``."""
        record = doc_id if record is None else record
        self.stats.conversations += 1
        try:
            return self._encode(messages, doc_id, record)
        except ChatError as err:
            if self.on_error == "raise":
                raise
            self.stats.skipped += 1
            key = err.problem.split(":")[0][:60]
            self.stats.reasons[key] = self.stats.reasons.get(key, 0) + 1
            return None

    def encode_records(self, records: Sequence[Mapping[str, Any]], messages_key: str = "messages") -> list:
        """``encode`` each record's ``messages_key`` field; ``doc_id`` is the record index."""
        out = []
        for i, rec in enumerate(records):
            if not isinstance(rec, Mapping) or messages_key not in rec:
                err = ChatError(i, messages_key, "missing")
                if self.on_error == "raise":
                    raise err
                self.stats.conversations += 1
                self.stats.skipped += 1
                self.stats.reasons["missing"] = self.stats.reasons.get("missing", 0) + 1
                continue
            doc = self.encode(rec[messages_key], doc_id=i)
            if doc is not None:
                out.append(doc)
        return out

    # ------------------------------------------------------------------ internals
    def _encode(self, messages: Any, doc_id: int, record: Any) -> ChatDocument:
        texts, trainable, starts = self.renderer.pieces(messages, record)
        ids = self._tokenize(texts)
        lens = np.array([len(x) for x in ids], np.int64)
        offsets = np.concatenate([[0], np.cumsum(lens)[:-1]])
        tokens = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        mask = np.repeat(np.array(trainable, bool), lens)
        if not mask.any():
            raise ChatError(record, "messages", "no assistant turn: the replies encode to no tokens")
        turn_starts = np.unique(np.concatenate([[0], offsets[np.array(starts, bool)]])).astype(np.int64)
        return ChatDocument(int(doc_id), tokens.astype(np.int64), mask, turn_starts)

    def _tokenize(self, texts: list[str]) -> list[np.ndarray]:
        if hasattr(self.tokenizer, "encode_batch") and not hasattr(self.tokenizer, "apply_chat_template"):
            return [np.asarray(x, np.int64) for x in self.tokenizer.encode_batch(texts)]
        enc = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [np.asarray(x, np.int64) for x in enc]
