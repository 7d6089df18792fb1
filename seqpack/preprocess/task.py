"""One preprocess task: read -> tokenize -> plan rows -> write shards, window by window, resumable.

Task ``k`` of ``T`` reads consumer ``(k, T)`` of every source (the readers' own partition). It takes
documents in windows of about ``window_tokens`` tokens; per window it

1. plans rows from the document lengths (``pack``: :func:`seqpack.plan.pack`; ``decompose``:
   dataset decomposition; ``none``: one row per document, cut by the overflow policy),
2. gathers the rows' tokens in one vectorized copy and writes them as shards (atomic),
3. writes the window's lengths, then its marker holding the readers' resume state.

With ``pack``, a window's part-filled rows are held back and planned again with the next window;
the last window's are the task's tail, planned with every other task's tail by :func:`merge_tails`
(see :mod:`seqpack.preprocess.tails`). A task killed mid-way restarts after its last complete
window; a finished task writes its tail and its task marker (all its shards, summed counts), which
a rerun checks by hash and then skips.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from seqpack.plan import expand_overflow, pack
from seqpack.plan.decompose import decompose_lengths
from seqpack.preprocess.config import PreprocessConfig, PreprocessError
from seqpack.preprocess.lock import fault_delay
from seqpack.preprocess.output import (
    finished_windows,
    lengths_path,
    shard_path,
    tail_path,
    task_marker,
    timing_path,
    window_dir,
    window_lengths,
    window_marker,
)
from seqpack.preprocess.tails import held_rows, load_pieces, pieces_arrays, pieces_of
from seqpack.shards import (
    SHARD_SUFFIX,
    PackedRows,
    save_npz_atomic,
    write_json_atomic,
    write_shard,
)
from seqpack.sources.read import read
from seqpack.sources.records import Document
from seqpack.sources.tokenize import Tokenize

COUNT_KEYS = ("skipped_records", "skipped_files", "empty_documents")
LOST_KEYS = ("truncated_tokens", "truncated_docs", "dropped_tokens", "dropped_docs")


@dataclass
class TaskSpec:
    """What one task needs (picklable, sent to a worker process or Ray task)."""

    config: dict
    out_dir: str
    task: int
    fingerprint: str
    quiet: bool = True


class TaskDocuments:
    """The tokenized documents of task ``task``: its share of every source, source after source.

    Resumable with the stages' own state: ``state()`` is ``(source index, Tokenize state)`` plus
    the counters of finished sources, so a task restarts after its last written window.
    """

    def __init__(self, cfg: PreprocessConfig, task: int, state: dict | None = None):
        self.cfg, self.task = cfg, task
        self._source = 0 if state is None else int(state["source"])
        self._done_counts = dict.fromkeys(COUNT_KEYS, 0) if state is None else dict(state["done_counts"])
        self._node: Tokenize | None = None
        self._open(None if state is None else state["node"])

    def _open(self, node_state: dict | None) -> None:
        self._node = None
        if self._source >= len(self.cfg.sources):
            return
        s = self.cfg.sources[self._source]
        opts = {k: v for k, v in s.items() if k not in ("path", "format", "weight")}
        reader = read(
            s["path"],
            format=s["format"],
            source_index=self._source,
            consumer=(self.task, self.cfg.tasks),
            **opts,
        )
        self._name = reader.name
        self._node = Tokenize(reader, self.cfg.tokenizer, batch_size=self.cfg.tokenize_batch)
        self._node.reset(node_state)

    def _node_counts(self) -> dict:
        if self._node is None:
            return dict.fromkeys(COUNT_KEYS, 0)
        st = self._node.stats()
        return {
            "skipped_records": int(st.get(f"read/{self._name}/skipped", 0)),
            "skipped_files": int(st.get(f"read/{self._name}/skipped_files", 0)),
            "empty_documents": int(st.get("tokenize/empty", 0)),
        }

    def counts(self) -> dict:
        """Records skipped or empty so far (cumulative over the task)."""
        cur = self._node_counts()
        return {k: self._done_counts[k] + cur[k] for k in COUNT_KEYS}

    @property
    def exhausted(self) -> bool:
        return self._node is None

    def state(self) -> dict:
        return {
            "source": self._source,
            "node": None if self._node is None else self._node.state_dict(),
            "done_counts": dict(self._done_counts),
        }

    def take(self, max_tokens: int) -> list[Document]:
        """The next documents, until they hold at least ``max_tokens`` tokens or the input ends."""
        docs, n = [], 0
        while self._node is not None and n < max_tokens:
            try:
                d = next(self._node)
            except StopIteration:
                self._done_counts = self.counts()
                self._source += 1
                self._open(None)
                continue
            docs.append(d)
            n += len(d.tokens)
        return docs


@dataclass
class RowPlan:
    """Rows as segments of documents: CSR ``row_offsets`` over ``seg_doc``/``seg_start``/``seg_len``
    (document *indices* in the window's list), each row's capacity, plus lost-token counters."""

    row_offsets: np.ndarray
    seg_doc: np.ndarray
    seg_start: np.ndarray
    seg_len: np.ndarray
    row_capacity: np.ndarray
    counts: dict


def plan_rows(
    lengths: np.ndarray, doc_ids: np.ndarray, cfg: PreprocessConfig, task: int, window: int = 0
) -> RowPlan:
    """Plan the rows of one window of a task's documents (``lengths`` int64 ``[n_docs]`` tokens)."""
    zero = dict.fromkeys(LOST_KEYS, 0)
    if cfg.strategy == "pack":
        try:
            plan = pack(
                lengths,
                cfg.capacity,
                algorithm=cfg.algorithm,
                overflow=cfg.overflow,
                seed=cfg.seed + task + 1_000_003 * window,
            )
        except ValueError as e:
            raise PreprocessError(f"task {task}: {e}") from None
        counts = {k: int(getattr(plan, k)) for k in zero}
        cap = np.full(plan.n_bins, cfg.capacity, np.int64)
        return RowPlan(plan.bin_offsets, plan.seg_doc, plan.seg_start, plan.seg_len, cap, counts)
    if cfg.strategy == "none":
        try:
            doc, start, ln, counts = expand_overflow(lengths, cfg.capacity, cfg.overflow)
        except ValueError as e:
            raise PreprocessError(f"task {task}: {e}") from None
        offsets = np.arange(len(doc) + 1, dtype=np.int64)
        return RowPlan(offsets, doc, start, ln, np.full(len(doc), cfg.capacity, np.int64), counts)
    dec = decompose_lengths(
        lengths,
        min_log2=cfg.min_log2,
        max_log2=cfg.max_log2,
        overlong="random",
        seed=cfg.seed,
        doc_keys=doc_ids,
    )
    # rows grouped by bucket (smallest first), document order inside a bucket
    order = np.lexsort((np.arange(dec.n_pieces), dec.piece_log2))
    ln = dec.piece_len[order]
    counts = dict(zero, dropped_tokens=dec.dropped_tokens, dropped_docs=int((dec.dropped_per_doc > 0).sum()))
    offsets = np.arange(len(order) + 1, dtype=np.int64)
    return RowPlan(offsets, dec.piece_doc[order], dec.piece_start[order], ln, ln.copy(), counts)


def gather_rows(docs: list[Document], plan: RowPlan) -> PackedRows:
    """Materialize planned rows: one vectorized gather from the concatenated documents."""
    lengths = np.fromiter((len(d.tokens) for d in docs), np.int64, len(docs))
    doc_off = np.zeros(len(docs) + 1, np.int64)
    np.cumsum(lengths, out=doc_off[1:])
    flat = np.concatenate([d.tokens for d in docs]).astype(np.int32) if docs else np.zeros(0, np.int32)
    mask = np.ones(len(flat), np.uint8)
    for i, d in enumerate(docs):
        if d.loss_mask is not None:
            mask[doc_off[i] : doc_off[i + 1]] = d.loss_mask
    seg_len = plan.seg_len
    n = int(seg_len.sum())
    seg_first = np.zeros(len(seg_len), np.int64)
    np.cumsum(seg_len[:-1], out=seg_first[1:])
    # token j of segment s comes from flat[doc_off[doc] + start + j]
    idx = np.repeat(doc_off[plan.seg_doc] + plan.seg_start - seg_first, seg_len)
    idx += np.arange(n, dtype=np.int64)
    doc_ids = np.array([d.doc_id for d in docs], np.int64)
    # a piece held back from an earlier plan starts inside its document
    doc_start = np.array([d.start for d in docs], np.int64)
    row_tokens = np.add.reduceat(seg_len, plan.row_offsets[:-1]) if len(seg_len) else np.zeros(0, np.int64)
    row_offsets = np.zeros(len(plan.row_offsets), np.int64)
    np.cumsum(row_tokens, out=row_offsets[1:])
    return PackedRows(
        input_ids=flat[idx],
        loss_mask=mask[idx],
        row_offsets=row_offsets,
        seg_offsets=plan.row_offsets.astype(np.int64),
        seg_len=seg_len.astype(np.int64),
        seg_doc_id=doc_ids[plan.seg_doc],
        seg_start=(doc_start[plan.seg_doc] + plan.seg_start).astype(np.int64),
    )


def target_tokens(loss_mask: np.ndarray, seg_len: np.ndarray) -> int:
    """Tokens that are loss targets after the shift: loss-masked tokens except each segment's first,
    which nothing before it in its segment predicts (``loss_mask`` flat over rows, ``seg_len`` per
    segment, segments tiling the rows in order)."""
    firsts = (np.cumsum(seg_len) - seg_len)[seg_len > 0]
    return int(np.count_nonzero(loss_mask)) - int(np.count_nonzero(loss_mask[firsts]))


def hold_back(docs: list[Document], plan: RowPlan) -> tuple[RowPlan, list[Document]]:
    """Split off the part-filled rows chosen by :func:`seqpack.preprocess.tails.held_rows`:
    the plan of the other rows, and the held rows' segments as pieces (row order)."""
    seg_len = plan.seg_len
    row_tokens = np.add.reduceat(seg_len, plan.row_offsets[:-1]) if len(seg_len) else np.zeros(0, np.int64)
    held = held_rows(row_tokens, plan.row_capacity)
    if not len(held):
        return plan, []
    keep = np.ones(len(row_tokens), bool)
    keep[held] = False
    per_row = np.diff(plan.row_offsets)
    seg_keep = np.repeat(keep, per_row)
    offsets = np.zeros(int(keep.sum()) + 1, np.int64)
    np.cumsum(per_row[keep], out=offsets[1:])
    kept = RowPlan(
        offsets,
        plan.seg_doc[seg_keep],
        plan.seg_start[seg_keep],
        seg_len[seg_keep],
        plan.row_capacity[keep],
        plan.counts,
    )
    out = ~seg_keep
    return kept, pieces_of(docs, plan.seg_doc[out], plan.seg_start[out], seg_len[out])


def write_rows(out: str, task: int, first_shard: int, rows: PackedRows, cfg: PreprocessConfig) -> list[dict]:
    """Write ``rows`` as shards ``part-<task>-<first_shard>...`` of ``rows_per_shard`` rows each."""
    shards: list[dict] = []
    for j, r0 in enumerate(range(0, rows.n_rows, cfg.rows_per_shard)):
        part = rows.slice(r0, min(r0 + cfg.rows_per_shard, rows.n_rows))
        path = shard_path(out, task, first_shard + j, SHARD_SUFFIX[cfg.format])
        info = write_shard(
            path,
            part,
            fmt=cfg.format,
            row_group_rows=cfg.row_group_rows,
            compression_level=cfg.compression_level,
        )
        shards.append(info.as_dict())
    return shards


def row_stats(rows: PackedRows, plan: RowPlan) -> dict:
    """The row counters of written rows (summed into the manifest totals)."""
    return {
        "tokens_out": rows.n_tokens,
        "rows": rows.n_rows,
        "segments": rows.n_segments,
        "target_tokens": target_tokens(rows.loss_mask, rows.seg_len),
        "capacity_tokens": int(plan.row_capacity.sum()),
    }


def _write_window(
    spec: TaskSpec, cfg: PreprocessConfig, window: int, docs: list, first_shard: int, held: list[Document]
) -> tuple[dict, list[Document]]:
    """Plan, gather and write one window's rows (the pieces ``held`` back by the previous window
    first); returns its stats, shards and timings, and the pieces it holds back in turn."""
    k, out = spec.task, spec.out_dir
    t0 = time.perf_counter()
    lengths = np.fromiter((len(d.tokens) for d in docs), np.int64, len(docs))
    todo = held + docs
    plan_lengths = np.fromiter((len(d.tokens) for d in todo), np.int64, len(todo))
    doc_ids = np.fromiter((d.doc_id for d in todo), np.int64, len(todo))
    plan = plan_rows(plan_lengths, doc_ids, cfg, k, window)
    plan, held = hold_back(todo, plan) if cfg.strategy == "pack" else (plan, [])
    rows = gather_rows(todo, plan)
    t1 = time.perf_counter()
    shards = write_rows(out, k, first_shard, rows, cfg)
    save_npz_atomic(
        window_lengths(out, k, window),
        doc_lengths=lengths,
        row_lengths=rows.row_lengths(),
        row_capacity=plan.row_capacity,
        **pieces_arrays(held),
    )
    # documents and tokens count where they enter; rows where they are written
    stats = {"documents": len(lengths), "tokens_in": int(lengths.sum()), **row_stats(rows, plan)}
    stats.update(plan.counts)
    res = {"stats": stats, "shards": shards, "plan_s": t1 - t0, "write_s": time.perf_counter() - t1}
    return res, held


def run_task(spec: TaskSpec, on_window: Callable[[dict], None] | None = None) -> dict:
    """Run (or resume) one task and return its marker (also written to ``.seqpack/task-K.json``).

    The task reads its documents in windows of ``window_tokens``; each window's shards are written,
    then a window marker holding the readers' resume state. A task killed mid-way restarts after
    its last complete window; a finished task's marker lists all its shards.
    """
    cfg = PreprocessConfig(**spec.config)
    k, out = spec.task, spec.out_dir
    os.makedirs(window_dir(out, k), exist_ok=True)
    windows = finished_windows(out, k, spec.fingerprint)
    last = windows[-1] if windows else None
    stream = TaskDocuments(cfg, k, None if last is None else last["resume"])
    held = [] if last is None else load_pieces(window_lengths(out, k, len(windows) - 1))
    timing = {"read_tokenize_s": 0.0, "plan_gather_s": 0.0, "write_s": 0.0, "resumed_windows": len(windows)}
    cpu0 = time.process_time()
    while not (last is not None and last["exhausted"]):
        fault_delay("WINDOW")
        t0 = time.perf_counter()
        docs = stream.take(cfg.window_tokens)
        timing["read_tokenize_s"] += time.perf_counter() - t0
        if not docs and windows:  # the input ended exactly at the previous window's edge
            break
        w = len(windows)
        first_shard = sum(len(m["shards"]) for m in windows)
        res, held = _write_window(spec, cfg, w, docs, first_shard, held)
        del docs
        timing["plan_gather_s"] += res.pop("plan_s")
        timing["write_s"] += res.pop("write_s")
        last = dict(
            res,
            fingerprint=spec.fingerprint,
            window=w,
            resume=stream.state(),
            exhausted=stream.exhausted,
            counts=stream.counts(),
        )
        write_json_atomic(window_marker(out, k, w), last)
        windows.append(last)
        if on_window is not None:
            on_window(last)
    stats: dict[str, int] = {}
    for m in windows:
        for key, v in m["stats"].items():
            stats[key] = stats.get(key, 0) + int(v)
    stats.update(windows[-1]["counts"])
    arrays: dict[str, list] = {"doc_lengths": [], "row_lengths": [], "row_capacity": []}
    for w in range(len(windows)):
        with np.load(window_lengths(out, k, w)) as z:
            for key in arrays:
                arrays[key].append(z[key])
    save_npz_atomic(lengths_path(out, k), **{key: np.concatenate(v) for key, v in arrays.items()})
    save_npz_atomic(tail_path(out, k), **pieces_arrays(held))
    marker = {
        "task": k,
        "fingerprint": spec.fingerprint,
        "shards": [s for m in windows for s in m["shards"]],
        "stats": stats,
        "tail": {"pieces": len(held), "tokens": sum(len(d.tokens) for d in held)},
    }
    timing["cpu_s"] = time.process_time() - cpu0
    # timings vary run to run, so they live beside the marker, never in it or in the manifest
    write_json_atomic(timing_path(out, k), timing)
    write_json_atomic(task_marker(out, k), marker)
    return marker
