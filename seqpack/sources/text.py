"""Plain text files: one document per file (default) or one per non-empty line."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from seqpack.checks import check_choice
from seqpack.sources.reader import Reader
from seqpack.sources.records import Record, SourceError
from seqpack.sources.streams import iter_chunks, iter_lines

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

    def read_unit(self, shard: int, path: str, unit: int, first: int, step: int) -> Iterator[tuple[int, Any]]:
        if self.split == "file":
            if first == 0:
                yield 0, self._decode(b"".join(iter_chunks(path)), shard, path, 0)
            return
        want = first
        for raw, line in enumerate(iter_lines(path)):
            if raw != want:
                continue
            want += step
            if line.strip():
                yield raw, self._decode(line.rstrip(b"\r"), shard, path, raw)

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
