"""Reading preprocess outputs back: as documents for the loader, or as the packed rows themselves.

:class:`SeqpackShardReader` is a source reader (``format: "seqpack"``): its records are the stored
segments, re-packed by whatever stage the loader runs. :class:`PackedRowReader` is a Node that
yields the stored rows as batches, exactly as they were packed offline (the ``packed_rows`` stage).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from seqpack.batch import VarlenBatch
from seqpack.node import Node
from seqpack.shards.format import PackedRow, ShardFile, read_manifest, rows_of_columns, shard_entries
from seqpack.shards.verify import ShardError
from seqpack.sources.reader import Reader
from seqpack.sources.records import Record, SourceError
from seqpack.sources.rowgroups import unit_ranges


def iter_rows(directory: str, *, verify: bool = False) -> Iterator[PackedRow]:
    """Every row of a preprocess output directory, shard by shard in manifest order (sizes checked
    against the manifest, page checksums verified; ``verify``: each shard's sha256 too)."""
    for path, entry in shard_entries(directory):
        yield from ShardFile(path, entry, verify=verify).rows()


def _source_error(path: str, e: ShardError) -> SourceError:
    """``e`` as the SourceError readers raise or count (the path named once, not twice)."""
    msg = str(e)
    return SourceError(path, None, None, msg[len(path) + 2 :] if msg.startswith(f"{path}: ") else msg)


def _list_dirs(paths) -> list[str]:
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    return [os.fspath(p) for p in items]


class SeqpackShardReader(Reader):
    """Documents back out of preprocessed shards, as a source of the loader (``format: "seqpack"``).

    ``paths``: one or more preprocess output directories (each with its ``manifest.json``). Units are
    Parquet row groups; a unit's raw records are its segments in row order, so the reader's
    rank x worker partition and ``(unit, record)`` resume work unchanged. Each record is
    pre-tokenized: ``tokens`` is an int32 view over the decoded shard (no copy), ``loss_mask`` a
    bool view, ``doc_id`` the id stored at preprocessing (not a new positional id; two outputs
    preprocessed from different inputs can therefore share ids). A document split over several
    rows comes back as several records (one per stored segment) with the same id.

    Every shard's size is checked against its manifest entry when it is opened and every page's
    checksum when a row group is decoded; ``verify=True`` (``verify: true`` in the source config)
    also checks each shard's sha256 before this consumer reads its first row group. Damage raises
    :class:`~seqpack.sources.records.SourceError` naming the shard (and row group); with
    ``on_error="skip"`` the unit is skipped whole and counted (``read/<name>/skipped_files``),
    never served as different tokens.
    """

    format = "seqpack"

    def __init__(self, paths, *, verify: bool = False, **kwargs):
        kwargs.setdefault("input_ids_key", "input_ids")
        if not isinstance(verify, bool):
            raise ValueError(f"verify: expected true or false, got {verify!r}")
        self.verify = verify
        self._entries: list[dict] = []
        super().__init__(paths, **kwargs)
        self._files: dict[int, ShardFile] = {}
        self._hashed: set[int] = set()  # shards whose sha256 this reader checked

    def resolve(self, paths) -> list[str]:
        out, self._entries = [], []
        for d in _list_dirs(paths):
            for path, entry in shard_entries(d):
                out.append(path)
                self._entries.append(entry)
        return out

    def _file(self, shard: int, path: str, hashed: bool = False) -> ShardFile:
        f = self._files.get(shard)
        if f is None or (hashed and shard not in self._hashed):
            try:
                f = ShardFile(path, self._entries[shard], verify=hashed)
            except ShardError as e:
                raise _source_error(path, e) from None
            self._files = {shard: f}  # one open file at a time
            if hashed:
                self._hashed.add(shard)
        return f

    def shard_units(self, shard: int, path: str) -> int:
        return self._file(shard, path).num_groups

    def unit_ranges(self, shard: int, path: str, unit: int) -> list[tuple[int, int]] | None:
        # a shard on a URL: prefetch the row group's column chunks (what ShardFile reads)
        return unit_ranges(path, unit) if path.endswith(".parquet") else None

    def unit_sizes(self, shard: int, path: str, n_units: int) -> list[tuple[float, int | None]]:
        """Tokens of each row group as its size and its segments (raw records) as its extent, both
        from the Parquet metadata (value counts of the list columns), so groups split over
        consumers; a tar shard is one group of its file size, not split."""
        f = self._file(shard, path)
        if f.fmt != "parquet":
            return [(float(os.path.getsize(path)) if os.path.isfile(path) else 1.0, None)] * n_units
        out = []
        for g in range(n_units):
            try:
                counts = f.group_value_counts(g)  # checked against the decoded group when it is read
            except ShardError as e:
                raise _source_error(path, e) from None
            out.append((float(counts["input_ids"]), counts["doc_ids"]))
        return out

    def read_unit(
        self, shard: int, path: str, unit: int, first: int, step: int = 1, stop: int = -1
    ) -> Iterator[tuple[int, Any]]:
        try:
            # the whole group is decoded and checked before its first record is yielded, so a bad
            # group is skipped whole (or raises) and never half-served
            cols = self._file(shard, path, hashed=self.verify).group_columns(unit)
        except ShardError as e:
            raise _source_error(path, e) from None
        ids_off, ids = cols["input_ids"]
        mask = cols["loss_mask"][1].view(bool)
        cu_off, cu = cols["cu_seqlens"]
        _, doc_ids = cols["doc_ids"]
        n_rows = len(ids_off) - 1
        # segment s of the group lives in row seg_row[s]; its tokens start at ids_off[row] + cu[...]
        n_seg_per_row = np.diff(cu_off) - 1
        seg_row = np.repeat(np.arange(n_rows), n_seg_per_row)
        seg_cu = np.delete(np.arange(len(cu)), cu_off[1:] - 1)  # index of each segment's start in cu
        for s in range(first, len(seg_row) if stop < 0 else min(stop, len(seg_row))):
            r = seg_row[s]
            a = int(ids_off[r] + cu[seg_cu[s]])
            b = int(ids_off[r] + cu[seg_cu[s] + 1])
            m = mask[a:b]
            yield s, Record(int(doc_ids[s]), self.name, tokens=ids[a:b], loss_mask=None if m.all() else m)

    def fetch(self, doc_ids) -> list[Record]:
        """Records by their *stored* doc ids (see the class docstring), in the order given.

        A document stored as several segments comes back whole: its segments placed at their
        ``seg_start`` offsets (so a piece ``[start, start + len)`` of the original document is
        ``tokens[start : start + len]``). Every shard with a wanted id is read once.
        """
        want = {int(d) for d in doc_ids}
        parts: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {}
        for shard, path in enumerate(self.paths):
            f = self._file(shard, path)
            for g in range(f.num_groups):
                try:
                    cols = f.group_columns(g)
                except ShardError as e:
                    raise SourceError(path, None, None, str(e)) from None
                ids_off, ids = cols["input_ids"]
                cu_off, cu = cols["cu_seqlens"]
                _, seg_ids = cols["doc_ids"]
                _, seg_start = cols["seg_start"]
                hits = np.flatnonzero(np.isin(seg_ids, list(want)))
                if not len(hits):
                    continue
                seg_row = np.repeat(np.arange(len(ids_off) - 1), np.diff(cu_off) - 1)
                seg_cu = np.delete(np.arange(len(cu)), cu_off[1:] - 1)
                mask = cols["loss_mask"][1].view(bool)
                for s in hits:
                    a = int(ids_off[seg_row[s]] + cu[seg_cu[s]])
                    b = int(ids_off[seg_row[s]] + cu[seg_cu[s] + 1])
                    parts.setdefault(int(seg_ids[s]), []).append((int(seg_start[s]), ids[a:b], mask[a:b]))
        out = []
        for d in doc_ids:
            segs = parts.get(int(d))
            if not segs:
                raise SourceError(", ".join(self.paths[:3]), None, None, f"no segment of doc id {int(d)}")
            end = max(st + len(t) for st, t, _ in segs)
            tokens, mask = np.zeros(end, segs[0][1].dtype), np.ones(end, bool)
            for st, t, m in segs:
                tokens[st : st + len(t)], mask[st : st + len(t)] = t, m
            out.append(Record(int(d), self.name, tokens=tokens, loss_mask=None if mask.all() else mask))
        return out


class PackedRowReader(Node):
    """Packed rows of preprocessed shards as :class:`~seqpack.batch.VarlenBatch` es, resumable.

    Consumer ``k`` of ``n`` takes rows ``k, k+n, ...`` of the canonical order (shards in manifest
    order, rows in file order), so every consumer gets the same number of rows within one. State:
    ``{"shard": i, "row": j}``, the next row to read.

    Args:
        paths: preprocess output directory or directories.
        consumer: ``(k, n)``.
        pad_to: pad every batch to this many tokens (e.g. the manifest's ``capacity``).
        as_batch: yield VarlenBatch (default) or :class:`PackedRow` views.
        verify: check each shard's sha256 when it is opened (sizes and page checksums always are);
            damage raises :class:`~seqpack.shards.ShardError` naming the shard and row group.
    """

    def __init__(
        self,
        paths,
        *,
        consumer: tuple[int, int] = (0, 1),
        pad_to: int | None = None,
        as_batch: bool = True,
        verify: bool = False,
    ):
        super().__init__()
        self.paths, self.entries, self.rows_per_shard = [], [], []
        for d in _list_dirs(paths):
            for path, entry in shard_entries(d, read_manifest(d)):
                self.paths.append(path)
                self.entries.append(entry)
                self.rows_per_shard.append(int(entry["rows"]))
        self.consumer, self.pad_to, self.as_batch, self.verify = consumer, pad_to, as_batch, verify
        self.row0 = np.concatenate([[0], np.cumsum(self.rows_per_shard)]).astype(np.int64)

    def __len__(self) -> int:
        k, n = self.consumer
        total = int(self.row0[-1])
        return max(0, -(-(total - k) // n))

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        k, n = self.consumer
        self._shard = 0 if initial_state is None else int(initial_state["shard"])
        self._row = k if initial_state is None else int(initial_state["row"])
        self._it: Iterator | None = None

    def get_state(self) -> dict:
        return {"shard": self._shard, "row": self._row}

    def next(self) -> VarlenBatch | PackedRow:
        k, n = self.consumer
        while True:
            if self._shard >= len(self.paths):
                raise StopIteration
            if self._it is None:
                self._it = self._shard_rows(self._shard, self._row)
            try:
                row_idx, row = next(self._it)
            except StopIteration:
                # first row of the next shard owned by k in the global order
                nxt = self._shard + 1
                if nxt < len(self.paths):
                    g = int(self.row0[nxt])
                    self._row = (k - g) % n
                self._shard, self._it = nxt, None
                continue
            self._row = row_idx + n
            return row.to_batch(pad_to=self.pad_to) if self.as_batch else row

    def _shard_rows(self, shard: int, first: int) -> Iterator[tuple[int, PackedRow]]:
        f = ShardFile(self.paths[shard], self.entries[shard], verify=self.verify)
        g0 = 0
        for g in range(f.num_groups):
            nrows = f.group_rows(g)
            if first < g0 + nrows:
                cols = f.group_columns(g)
                lo = first - g0
                for r, row in rows_of_columns(cols, lo, self.consumer[1]):
                    yield g0 + r, row
                    first = g0 + r + self.consumer[1]
            g0 += nrows
