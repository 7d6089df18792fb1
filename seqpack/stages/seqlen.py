"""Sequence-length curriculum: a max-length schedule applied to a document stream (the ``seqlen`` stage).

At step ``s`` the length is ``L = schedule(t)`` (:class:`~seqpack.curriculum.SeqlenSchedule`, ``t`` =
steps done or tokens emitted); the step holds ``rows = tokens_per_step // L`` rows of at most ``L``
tokens, or ``batch_size`` rows (DeepSpeed style: tokens per step grow with ``L``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from seqpack.arena import documents_from_state, documents_to_state, refetcher
from seqpack.batch import VarlenBatch
from seqpack.checks import ConfigError, check_choice, check_int, check_pad_to, pad_to_kwarg, upgrade_pad_flag
from seqpack.curriculum import LENGTH_MODES, PROGRESS_UNITS, CurriculumConfig, SeqlenSchedule
from seqpack.node import Node
from seqpack.sources.records import Document
from seqpack.stages.context import StageContext
from seqpack.stages.length_stage import (
    DocumentsIn,
    as_document_node,
    checked_document,
    curriculum_of,
    documents_batch,
    fullest_bins,
    length_stage_setup,
    piece,
    planned_bins,
    validated_config,
)

STAGE_KEYS = ("type", "tokens_per_step", "batch_size", "pad_to", "buffer_docs")
COUNTERS = ("input_tokens", "emitted_tokens", "truncated_tokens")


class SeqlenCurriculum(Node[VarlenBatch]):
    """Apply a max-length schedule to a document stream, one VarlenBatch per optimizer step (a Node).

    Modes:
        ``pack``: documents are split into pieces of at most ``L`` and packed best-fit-decreasing
            (:func:`seqpack.plan.pack`) into rows of capacity ``L`` with document masks over a window
            of at least ``buffer_docs`` pieces; the ``rows`` fullest rows are the step, the rest waits.
            No token is lost and no token attends across documents.
        ``truncate``: each row is one document cut to ``L``; the cut tokens are counted in
            ``counts["truncated_tokens"]``.
        ``reshape``: the documents are concatenated and regrouped into rows of exactly ``L``
            (concat-and-chunk: a row may span documents and attends across them); the tail carries
            over to the next step.

    Args:
        upstream: a node of Documents (without loss masks; they should carry their EOT), or a
            sequence / iterable of 1-D integer token arrays (``doc_id`` = index).
        schedule: the max-length schedule.
        tokens_per_step, batch_size: exactly one: constant tokens per step, or constant rows.
        progress: ``steps`` or ``tokens`` (the unit of the schedule's ``t``).
        pad_to: ``None``; ``"max"``: pad each step to its largest possible batch, ``rows * L``;
            or an int: pad every step to that many tokens (at least ``tokens_per_step``, or
            ``batch_size * schedule.peak``). ``pad=True/False`` is the deprecated spelling of
            ``"max"``/``None``.
        step_stride, step_offset: a stage serving every ``step_stride``-th step of a rank (a loader
            worker) follows the rank's step ``step * step_stride + step_offset``.

    State: the upstream's under ``"upstream"``, counters, and the pieces waiting for a row in the
    buffered-documents format; ``reset(state)`` resumes token for token.
    """

    def __init__(
        self,
        upstream: DocumentsIn,
        schedule: SeqlenSchedule,
        *,
        tokens_per_step: int | None = None,
        batch_size: int | None = None,
        mode: str = "pack",
        progress: str = "steps",
        pad_to: int | str | None = None,
        pad_id: int = 0,
        buffer_docs: int = 256,
        step_stride: int = 1,
        step_offset: int = 0,
        **deprecated: Any,
    ):
        super().__init__()
        pad_to = pad_to_kwarg(pad_to, deprecated, "pad", "SeqlenCurriculum")
        self.mode = check_choice(mode, "curriculum.seqlen.mode", LENGTH_MODES)
        self.progress = check_choice(progress, "curriculum.progress", PROGRESS_UNITS)
        if (tokens_per_step is None) == (batch_size is None):
            raise ValueError("give exactly one of tokens_per_step (constant tokens per step) or batch_size")
        if tokens_per_step is not None and tokens_per_step < schedule.peak:
            raise ValueError(
                f"tokens_per_step={tokens_per_step} is below the schedule's longest length {schedule.peak}"
            )
        # "max" pads each step to its own largest batch, rows * L (L changes with the schedule)
        largest = tokens_per_step if tokens_per_step is not None else batch_size * schedule.peak
        self.pad_to = "max" if pad_to == "max" else check_pad_to(pad_to, "pad_to", largest)
        self.upstream = as_document_node(upstream)
        self.schedule, self.tokens_per_step, self.batch_size = schedule, tokens_per_step, batch_size
        self.pad_id, self.buffer_docs = pad_id, int(buffer_docs)
        self.step_stride, self.step_offset = int(step_stride), int(step_offset)
        self.step = self.tokens_seen = 0  # progress, readable before the first step
        self.counts = dict.fromkeys(COUNTERS, 0)

    # ---------------------------------------------------------------- state
    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        s = initial_state or {}
        self.upstream.reset(s.get("upstream"))
        self.step, self.tokens_seen = int(s.get("step", 0)), int(s.get("tokens_seen", 0))
        # pieces waiting for a row (not yet emitted)
        self._refetch = refetcher(self.upstream)
        self._pending: list[Document] = documents_from_state(s["pending"], self._refetch) if s else []
        self.counts = (
            dict(s["counts"]) if s else {"truncated_tokens": 0, "emitted_tokens": 0, "input_tokens": 0}
        )

    def get_state(self) -> dict:
        return {
            "upstream": self.upstream.state_dict(),
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "pending": documents_to_state(self._pending, self._refetch is not None),
            "counts": dict(self.counts),
        }

    def own_stats(self) -> dict:
        return {f"seqlen/{k}": v for k, v in self.counts.items()}

    # ---------------------------------------------------------------- source
    def _pull(self) -> Document | None:
        try:
            doc = checked_document(next(self.upstream))
        except StopIteration:
            return None
        if doc.loss_mask is not None and not doc.loss_mask.all():
            raise ValueError(
                f"document {doc.doc_id}: has a loss mask, which the seqlen curriculum does not carry "
                "(rows may be cut or reshaped); use stage type 'pack' or 'bucket' for masked data"
            )
        self.counts["input_tokens"] += len(doc.tokens)
        return Document(doc.doc_id, doc.tokens, None, doc.source, start=doc.start)

    def current_length(self) -> int:
        stride = self.step_stride
        t = self.step * stride + self.step_offset if self.progress == "steps" else self.tokens_seen * stride
        return self.schedule(t)

    def _rows(self, L: int) -> int:
        return self.batch_size if self.batch_size is not None else max(1, self.tokens_per_step // L)

    # ---------------------------------------------------------------- steps
    def next(self) -> VarlenBatch:
        L = self.current_length()
        rows = self._rows(L)
        segs = {"truncate": self._truncate_rows, "reshape": self._reshape_rows, "pack": self._packed_rows}[
            self.mode
        ](L, rows)
        if not segs:
            raise StopIteration
        n_tok = sum(len(d.tokens) for d in segs)
        target = rows * L if self.pad_to == "max" else self.pad_to
        batch = documents_batch(segs, target if target is not None and n_tok < target else None, self.pad_id)
        self.step += 1
        self.tokens_seen += n_tok
        self.counts["emitted_tokens"] += n_tok
        return batch

    def _truncate_rows(self, L: int, rows: int) -> list[Document]:
        segs = []
        while len(segs) < rows:
            doc = self._pending.pop(0) if self._pending else self._pull()
            if doc is None:
                break
            if len(doc.tokens) == 0:
                continue
            self.counts["truncated_tokens"] += max(0, len(doc.tokens) - L)
            segs.append(piece(doc, 0, L))
        return segs

    def _reshape_rows(self, L: int, rows: int) -> list[Document]:
        segs = []
        need = rows * L
        # the row is one segment that may span documents; it takes the id/offset of its first token
        parts: list[Document] = []
        row_len = 0
        while need > 0:
            if not self._pending:
                doc = self._pull()
                if doc is None:
                    break
                if len(doc.tokens):
                    self._pending.append(doc)
                continue
            head = self._pending[0]
            take = min(len(head.tokens), L - row_len, need)
            parts.append(piece(head, 0, take))
            row_len += take
            need -= take
            if take == len(head.tokens):
                self._pending.pop(0)
            else:
                self._pending[0] = piece(head, take, len(head.tokens) - take)
            if row_len == L:
                segs.append(_joined(parts))
                parts, row_len = [], 0
        if parts:  # end of stream: a short last row
            segs.append(_joined(parts))
        return segs

    def _packed_rows(self, L: int, rows: int) -> list[Document]:
        # Pieces longer than the current L (left from a longer earlier L) are re-split first.
        items: list[Document] = []
        for d in self._pending:
            if len(d.tokens) <= L:
                items.append(d)
            else:
                items.extend(piece(d, o, L) for o in range(0, len(d.tokens), L))
        have = sum(len(d.tokens) for d in items)
        while have < rows * L or len(items) < self.buffer_docs:
            doc = self._pull()
            if doc is None:
                break
            items.extend(piece(doc, o, L) for o in range(0, len(doc.tokens), L))
            have += len(doc.tokens)
        if not items:
            self._pending = []
            return []
        # Best-fit over the whole window, then keep the fullest `rows` bins (oldest items break ties);
        # the rest wait for the next step.
        bins, loads = planned_bins(np.array([len(d.tokens) for d in items], np.int64), L)
        used = np.zeros(len(items), bool)
        segs = []
        for b in fullest_bins(bins, loads, rows):
            segs.extend(items[k] for k in bins[b].tolist())
            used[bins[b]] = True
        self._pending = [d for d, u in zip(items, used) if not u]
        return segs


def _joined(parts: list[Document]) -> Document:
    """One row of consecutive parts (maybe of several documents), named after its first part."""
    first = parts[0]
    return Document(
        first.doc_id, np.concatenate([p.tokens for p in parts]), None, first.source, start=first.start
    )


# ------------------------------------------------------------------------------------------ loader stage
def validate(cfg: dict, base_dir: str | None = None) -> dict:
    """Check ``stage: {type: seqlen}``: the schedule is ``curriculum.seqlen`` (with ``mode``).

    ``pad: true/false`` is the deprecated spelling of ``pad_to: max / null``.
    """
    cfg = {**cfg, "stage": upgrade_pad_flag(dict(cfg["stage"]), "pad", "stage")}
    stage, raw_cur, cur = length_stage_setup(cfg, STAGE_KEYS)
    if cur.seqlen is None:
        raise ConfigError("curriculum.seqlen: the 'seqlen' stage needs a max-length schedule there")
    tps = stage.get("tokens_per_step")
    if tps is not None and cur.tokens_per_step is not None and tps != cur.tokens_per_step:
        raise ConfigError(
            f"stage.tokens_per_step ({tps}) and curriculum.tokens_per_step ({cur.tokens_per_step}) disagree"
        )
    out: dict[str, Any] = {
        "type": "seqlen",
        "tokens_per_step": tps if tps is not None else cur.tokens_per_step,
    }
    out["batch_size"] = check_int(stage.get("batch_size"), "stage.batch_size", 1, allow_none=True)
    out["buffer_docs"] = check_int(stage.get("buffer_docs", 256), "stage.buffer_docs", 1)
    out["pad_to"] = stage.get("pad_to")
    largest = out["tokens_per_step"] or (out["batch_size"] or 0) * cur.seqlen.peak
    check_pad_to(out["pad_to"], "stage.pad_to", max(largest, 1))
    build([], out, cur)  # every remaining check (one of tokens_per_step / batch_size, peak length)
    return validated_config(cfg, out, raw_cur)


def build(
    docs: DocumentsIn, stage: dict, cur: CurriculumConfig, ctx: StageContext | None = None
) -> SeqlenCurriculum:
    """The stage of a validated ``stage`` section; ``ctx`` places it (worker, pad id)."""
    stride, offset, pad_id = (1, 0, 0) if ctx is None else (ctx.num_workers, ctx.worker_id, ctx.pad_id)
    return SeqlenCurriculum(
        docs,
        cur.seqlen,
        tokens_per_step=stage["tokens_per_step"],
        batch_size=stage["batch_size"],
        mode=cur.seqlen_mode,
        progress=cur.progress,
        pad_to=stage["pad_to"],
        pad_id=pad_id,
        buffer_docs=stage["buffer_docs"],
        step_stride=stride,
        step_offset=offset,
    )


def factory(docs, stage: dict, ctx: StageContext) -> SeqlenCurriculum:
    """Loader factory: :class:`SeqlenCurriculum` over this consumer's documents (state nested)."""
    return build(docs, stage, curriculum_of(ctx), ctx)


__all__ = ["SeqlenCurriculum", "build", "factory", "validate"]
