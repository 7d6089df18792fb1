"""JSON lines (plain, ``.zst``, ``.gz``): one record per line, one unit per file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from seqpack.sources.reader import Reader
from seqpack.sources.records import SourceError
from seqpack.sources.streams import iter_lines


class JsonlReader(Reader):
    """Records from JSON-lines files; blank lines are records too (so numbering matches line numbers)
    and count as malformed. Unowned lines are counted, not parsed."""

    format = "jsonl"

    def read_unit(self, shard: int, path: str, unit: int, first: int, step: int) -> Iterator[tuple[int, Any]]:
        fields, name = self.fields, self.name
        want = first
        for raw, line in enumerate(iter_lines(path)):
            if raw != want:
                continue
            want += step
            try:
                try:
                    obj = json.loads(line)
                except UnicodeDecodeError:
                    # keep the undecodable bytes as lone surrogates so the field check names the field
                    obj = json.loads(line.decode("utf-8", "surrogateescape"))
            except ValueError as e:
                yield raw, SourceError(path, raw, None, f"malformed JSON: {e}")
                continue
            try:
                yield raw, fields.extract(obj, self.doc_id(shard, raw), name, path, raw)
            except SourceError as e:
                yield raw, e
