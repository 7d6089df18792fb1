"""Hugging Face ``datasets`` as a source: saved datasets (Arrow chunks) or streaming datasets."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from seqpack.checks import check_bool, check_int, check_mapping
from seqpack.sources.blocks import DocBlock
from seqpack.sources.columnar import ColumnarReader
from seqpack.sources.paths import resolve_paths
from seqpack.sources.records import SourceError


class HFDatasetReader(ColumnarReader):
    """Hugging Face ``datasets``.

    - A local directory written by ``Dataset.save_to_disk`` (or a ``DatasetDict`` directory with
      ``split``): Arrow-backed, read by units of ``chunk_rows`` rows with the columnar fast path.
    - ``streaming=True`` (hub names, or local data files via ``hf_kwargs``): ``load_dataset(...,
      streaming=True)``; one unit walked in order, records split across consumers by index, resume
      skips to the saved index (``IterableDataset.skip``). Needs a reachable hub for hub names.

    Args:
        paths: dataset directory (or list of them), or a hub name / builder (``"json"``) when streaming.
        split: split to read (default ``"train"``).
        chunk_rows: rows per unit for local datasets.
        streaming: use ``load_dataset(..., streaming=True)``.
        hf_kwargs: extra ``load_dataset`` kwargs (``name``, ``data_files``, ...).
    """

    format = "hf"

    def __init__(
        self,
        paths,
        *,
        split: str = "train",
        chunk_rows: int = 4096,
        streaming: bool = False,
        hf_kwargs: dict | None = None,
        **kwargs,
    ):
        self.split = split
        self.chunk_rows = check_int(chunk_rows, "chunk_rows", minimum=1)
        self.streaming = check_bool(streaming, "streaming")
        self.hf_kwargs = dict(check_mapping(hf_kwargs or {}, "hf_kwargs"))
        self._ds_cache: dict[int, Any] = {}
        super().__init__(paths, **kwargs)

    def resolve(self, paths) -> list[str]:
        items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if self.streaming:
            return [os.fspath(p) for p in items]
        out = []
        for p in items:
            p = os.fspath(p)
            out.extend(resolve_paths(p) if any(ch in p for ch in "*?[") and not os.path.isdir(p) else [p])
        for p in out:
            if not os.path.isdir(p):
                raise FileNotFoundError(
                    f"not a saved datasets directory: {p!r} (use streaming=True for hub names)"
                )
        return out

    def _dataset(self, shard: int, path: str):
        if shard not in self._ds_cache:
            import datasets

            if self.streaming:
                ds = datasets.load_dataset(path, split=self.split, streaming=True, **self.hf_kwargs)
            else:
                try:
                    ds = datasets.load_from_disk(path)
                except Exception as e:  # datasets raises several unrelated types for bad dirs
                    raise SourceError(path, None, None, f"cannot load dataset: {e}") from None
                if isinstance(ds, datasets.DatasetDict):
                    ds = ds[self.split]
                if len(ds) != ds.data.num_rows:
                    # units slice the Arrow table (ds.data) directly: rows must be those of the dataset
                    ds = ds.flatten_indices()
            self._ds_cache[shard] = ds
        return self._ds_cache[shard]

    def shard_units(self, shard: int, path: str) -> int:
        ds = self._dataset(shard, path)
        if self.streaming:
            return 1
        names = set(ds.column_names)
        for key in self.fields.columns():
            if key not in names:
                raise SourceError(path, None, key, f"column missing (dataset has {sorted(names)[:8]})")
        return max(1, -(-len(ds) // self.chunk_rows))

    def unit_sizes(self, shard: int, path: str, n_units: int) -> list[tuple[float, int | None]]:
        if self.streaming:
            return [(1.0, None)]  # length unknown: one consumer walks it
        table = self._dataset(shard, path).data.table.select(self.fields.columns())
        out = []
        for u in range(n_units):
            part = table.slice(u * self.chunk_rows, self.chunk_rows)
            out.append((float(part.nbytes), part.num_rows))
        return out

    def fetch_records(self, shard: int, path: str, records: list[int]) -> dict[int, Any]:
        if self.streaming:
            return super().fetch_records(shard, path, records)
        table = self._dataset(shard, path).data.table.select(self.fields.columns())
        recs = np.asarray([r for r in records if r < table.num_rows], np.int64)
        taken = table.take(pa.array(recs))
        return {int(recs[r]): item for r, item in self.table_records(taken, shard, path, 0, recs=recs)}

    def read_unit(
        self, shard: int, path: str, unit: int, first: int, step: int = 1, stop: int = -1
    ) -> Iterator[tuple[int, Any]]:
        ds = self._dataset(shard, path)
        if self.streaming:
            for j, row in enumerate(ds.skip(first) if first else ds):
                raw = first + j
                if stop >= 0 and raw >= stop:
                    return
                try:
                    yield raw, self.fields.extract(row, self.doc_id(shard, raw), self.name, path, raw)
                except SourceError as e:
                    yield raw, e
            return
        row0 = unit * self.chunk_rows
        table = ds.data.table.slice(row0, self.chunk_rows).select(self.fields.columns())
        yield from self.table_records(table, shard, path, row0, first, stop)

    def unit_block(self, shard: int, path: str, unit: int) -> DocBlock | None:
        if self.streaming or self.fields.kind != "tokens":
            return None
        ds = self._dataset(shard, path)
        row0 = unit * self.chunk_rows
        table = ds.data.table.slice(row0, self.chunk_rows).select(self.fields.columns())
        return self.table_block(table, shard, path, row0)
