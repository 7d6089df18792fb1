"""Plain text files: one document per file (default) or one per non-empty line.

With ``split="line"`` a file is split into byte ranges over consumers like JSON lines
(:mod:`seqpack.sources.lines`); with ``split="file"`` a file is one record read by one consumer.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from seqpack.checks import check_choice
from seqpack.sources.jsonl import line_unit_size
from seqpack.sources.lines import content_size, fetch_lines, iter_line_range
from seqpack.sources.reader import Reader
from seqpack.sources.records import Record, SourceError
from seqpack.sources.streams import iter_chunks

TEXT_SPLITS = ("file", "line")  # one record per file, or per line


class TextReader(Reader):
    """Text files (plain, ``.zst``, ``.gz``).

    Args:
        split: ``"file"`` (the whole file is one record) or ``"line"`` (each line is one record;
            empty lines are records that yield nothing, so record numbers equal line numbers).
        Other arguments as :class:`~seqpack.sources.reader.Reader`.
    """

    format = "text"

    def __init__(self, paths, *, split: str = "file", **kwargs):
        self.split = check_choice(split, "split", TEXT_SPLITS)
        super().__init__(paths, **kwargs)

    def unit_sizes(self, shard: int, path: str, n_units: int) -> list[tuple[float, int | None]]:
        if self.split == "line":
            return line_unit_size(path)
        return [(float(content_size(path)[0]), None)]

    def read_unit(
        self, shard: int, path: str, unit: int, first: int, step: int = 1, stop: int = -1
    ) -> Iterator[tuple[int, Any]]:
        if self.split == "file":
            if first == 0:
                yield 0, self._decode(b"".join(iter_chunks(path)), shard, path, 0)
            return
        for offset, line_no, line in iter_line_range(path, first, stop):
            if line.strip():
                yield offset, self._decode(line.rstrip(b"\r"), shard, path, line_no)

    def fetch_records(self, shard: int, path: str, records: list[int]) -> dict[int, Record | SourceError]:
        if self.split == "file":
            return {0: self._decode(b"".join(iter_chunks(path)), shard, path, 0)} if 0 in records else {}
        lines = fetch_lines(path, records)
        return {
            n: self._decode(line.rstrip(b"\r"), shard, path, n) for n, line in lines.items() if line.strip()
        }

    def _decode(self, data: bytes, shard: int, path: str, record: int) -> Record | SourceError:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            return SourceError(
                path,
                record,
                "text",
                f"not valid UTF-8 (byte offset {e.start}: {data[e.start : e.start + 4]!r})",
            )
        return Record(self.doc_id(shard, record), self.name, text=text)
