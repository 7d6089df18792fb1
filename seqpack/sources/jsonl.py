"""JSON lines (plain, ``.zst``, ``.gz``): one record per line, one unit per file.

A unit is addressed by byte offsets of its decompressed stream, so a big file is split into byte
ranges over consumers (:mod:`seqpack.sources.lines` gives the rule); records keep their line
numbers (doc ids and messages count lines).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from seqpack.sources.lines import content_size, fetch_lines, iter_line_range
from seqpack.sources.reader import Reader
from seqpack.sources.records import Record, SourceError


def line_unit_size(path: str) -> list[tuple[float, int | None]]:
    """``[(size, extent)]`` of a line file's single unit: its decompressed bytes, splittable."""
    size, _ = content_size(path)
    return [(float(size), size if size >= 2 else None)]


class JsonlReader(Reader):
    """Records from JSON-lines files; blank lines are records too (so numbering matches line numbers)
    and count as malformed."""

    format = "jsonl"

    def unit_sizes(self, shard: int, path: str, n_units: int) -> list[tuple[float, int | None]]:
        return line_unit_size(path)

    def read_unit(
        self, shard: int, path: str, unit: int, first: int, step: int = 1, stop: int = -1
    ) -> Iterator[tuple[int, Any]]:
        for offset, line_no, line in iter_line_range(path, first, stop):
            yield offset, self._parse(line, shard, path, line_no)

    def fetch_records(self, shard: int, path: str, records: list[int]) -> dict[int, Record | SourceError]:
        return {n: self._parse(line, shard, path, n) for n, line in fetch_lines(path, records).items()}

    def _parse(self, line: bytes, shard: int, path: str, raw: int) -> Record | SourceError:
        try:
            try:
                obj = json.loads(line)
            except UnicodeDecodeError:
                # keep the undecodable bytes as lone surrogates so the field check names the field
                obj = json.loads(line.decode("utf-8", "surrogateescape"))
        except ValueError as e:
            return SourceError(path, raw, None, f"malformed JSON: {e}")
        try:
            return self.fields.extract(obj, self.doc_id(shard, raw), self.name, path, raw)
        except SourceError as e:
            return e
