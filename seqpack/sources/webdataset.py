"""webdataset tar shards: one record per sample (members grouped by key), one unit per tar.

Text comes from the member whose extension is ``text_key`` (default ``txt``) or, when the sample
has a ``json`` member, from that JSON object through the :class:`FieldSpec`; pre-tokenized ids from
an ``input_ids.npy``-style member named by ``input_ids_key``.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np
from webdataset.tariterators import group_by_keys, tar_file_iterator

from seqpack.sources.reader import Reader
from seqpack.sources.records import Record, SourceError
from seqpack.sources.remote import info as remote_info
from seqpack.sources.remote import open_input
from seqpack.sources.urls import is_url


class WebDatasetReader(Reader):
    """Samples of webdataset ``.tar`` shards (``.tar.gz`` too), in tar order."""

    format = "webdataset"

    def unit_sizes(self, shard: int, path: str, n_units: int) -> list[tuple[float, int | None]]:
        if is_url(path):  # remote: its size (as locally), but no headers walked; one consumer reads it
            return [(float(remote_info(path)["size"]), None)]
        size = os.path.getsize(path)
        # an uncompressed tar lists its samples by headers alone (data is seeked over), which makes
        # it splittable; walking the headers costs a read per member, so only when there are too
        # few files to share out whole (fewer than two per consumer)
        few = len(self.paths) < 2 * self.consumer[1]
        return [(float(size), _count_samples(path) if few and path.endswith(".tar") else None)]

    def read_unit(
        self, shard: int, path: str, unit: int, first: int, step: int = 1, stop: int = -1
    ) -> Iterator[tuple[int, Any]]:
        with open_input(path) as f:
            files = ({**m, "__url__": path} for m in tar_file_iterator(f))
            samples = group_by_keys(files)
            raw = -1
            while stop < 0 or raw + 1 < stop:
                try:
                    sample = next(samples)
                except StopIteration:
                    return
                except (tarfile.TarError, OSError, EOFError, ValueError) as e:
                    err = SourceError(path, raw + 1, None, f"corrupt or truncated tar: {e}")
                    err.raw = raw + 1
                    raise err from None
                raw += 1
                if raw < first:
                    continue
                try:
                    yield raw, self._record(sample, shard, path, raw)
                except SourceError as e:
                    yield raw, e

    def _record(self, sample: dict, shard: int, path: str, raw: int) -> Record:
        f, doc_id = self.fields, self.doc_id(shard, raw)
        if f.kind == "tokens" and f.input_ids_key in _members(sample):
            tokens = self._npy(sample, f.input_ids_key, path, raw)
            mask = self._npy(sample, f.loss_mask_key, path, raw).astype(bool) if f.loss_mask_key else None
            if mask is not None and len(mask) != len(tokens):
                raise SourceError(
                    path, raw, f.loss_mask_key, f"length {len(mask)} != {len(tokens)} input ids"
                )
            return Record(doc_id, self.name, tokens=tokens.astype(np.int64), loss_mask=mask)
        text_member = next((k for k in (f.text_key, "txt") if k in sample), None)
        if f.kind == "text" and text_member is not None:
            try:
                return Record(doc_id, self.name, text=sample[text_member].decode("utf-8"))
            except UnicodeDecodeError as e:
                raise SourceError(
                    path, raw, text_member, f"not valid UTF-8 (byte offset {e.start})"
                ) from None
        if "json" in sample:
            try:
                obj = json.loads(sample["json"].decode("utf-8", "surrogateescape"))
            except ValueError as e:
                raise SourceError(path, raw, "json", f"malformed JSON: {e}") from None
            return f.extract(obj, doc_id, self.name, path, raw)
        want = f.columns()[0]
        raise SourceError(
            path, raw, want, f"missing (sample {sample['__key__']!r} has {sorted(_members(sample))})"
        )

    def _npy(self, sample: dict, key: str, path: str, raw: int) -> np.ndarray:
        for name in (key, key + ".npy"):
            if name in sample:
                try:
                    return np.load(io.BytesIO(sample[name]), allow_pickle=False).reshape(-1)
                except ValueError as e:
                    raise SourceError(path, raw, name, f"not a .npy array: {e}") from None
        raise SourceError(path, raw, key, f"missing (sample has {sorted(_members(sample))})")


def _members(sample: dict) -> set[str]:
    out = set()
    for k in sample:
        if not k.startswith("__"):
            out.add(k)
            out.add(k.removesuffix(".npy"))
    return out


_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's sample key: path up to the first dot


def _count_samples(path: str) -> int | None:
    """Samples of an uncompressed tar from its member headers (consecutive members sharing a key
    make one sample), or None when the headers cannot be walked (the read reports why)."""
    try:
        n, last = 0, None
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                match = _KEY.match(m.name) if m.isreg() and not m.name.startswith("__") else None
                if match is None:
                    continue
                if match.group(1) != last:
                    n, last = n + 1, match.group(1)
        return n
    except (tarfile.TarError, OSError, EOFError):
        return None
