"""Lines of a (possibly compressed) file by *byte range*, the unit of work of line-based readers.

A line-based file (JSON lines, text split by line) is addressed by offsets in its *decompressed*
byte stream. The rule that gives every line to exactly one range: **a line belongs to the range
that holds its first byte**. Reading the range ``[first, stop)`` therefore starts at the first
line that begins at or after ``first`` (the rest of a line cut by ``first`` belongs to the range
before) and ends with the last line that begins before ``stop`` (it may run past ``stop``).

Records keep their line numbers (doc ids and error messages count lines, not bytes):

- uncompressed local files seek straight to ``first``; the line number there is found by counting
  newlines in the bytes before it (a memchr pass, no parsing);
- compressed files (``.zst``, ``.gz``) and remote ones cannot seek: the range is read by
  decompressing from the start, skipping (not parsing) lines before ``first``, and *stopping* after
  the last line of the range. A file split into ``m`` ranges is thus decompressed
  ``(m + 1) / 2`` times in total rather than ``m`` times (splits happen only when a source has
  too few files for its consumers, and the reader warns then).
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Iterable, Iterator

import zstandard

from seqpack.sources.records import SourceError
from seqpack.sources.remote import info as remote_info
from seqpack.sources.remote import open_input
from seqpack.sources.streams import CHUNK, iter_chunks
from seqpack.sources.urls import is_url

COMPRESSED = (".zst", ".zstd", ".gz")
# assumed decompressed/compressed ratio when a compressed file does not record its size
GUESS_RATIO = 4


def seekable(path: str) -> bool:
    """True for an uncompressed local file (its byte offsets can be sought)."""
    return not path.endswith(COMPRESSED) and "://" not in path


def content_size(path: str) -> tuple[int, bool]:
    """``(decompressed bytes, exact)`` of ``path``, from metadata only.

    Plain files: the file size. zstd: the first frame's recorded content size (exact for the
    single-frame files ``zstd`` writes); gzip: the trailer's ISIZE (size mod 2**32 of the last
    member). Otherwise ``GUESS_RATIO`` times the compressed size. A wrong guess only moves range
    boundaries (the last range of a file always runs to its end), never what is read.
    """
    # a URL: the same sizes as the local file, so work is cut the same way (read by ranges)
    size = remote_info(path)["size"] if is_url(path) else os.path.getsize(path)
    if not path.endswith(COMPRESSED):
        return size, True
    try:
        with open_input(path, sequential=False) as f:
            if path.endswith((".zst", ".zstd")):
                n = zstandard.frame_content_size(f.read(18))
                if n >= 0:
                    return int(n), True
            elif size >= 18:
                f.seek(-4, os.SEEK_END)
                n = struct.unpack("<I", f.read(4))[0]
                if n >= size // 2:  # plausible (ISIZE wraps at 4 GiB)
                    return int(n), True
    except (OSError, zstandard.ZstdError, gzip.BadGzipFile):
        pass  # unreadable: the read reports it
    return size * GUESS_RATIO, False


def _split(chunks: Iterable[bytes], path: str, offset: int, line_no: int) -> Iterator[tuple[int, int, bytes]]:
    """``(byte offset, line number, line without \\n)`` of the lines of ``chunks``, which start at
    a line beginning ``offset`` (line ``line_no``). A failing stream raises SourceError naming the
    line it cut, with ``raw`` = that line's byte offset."""
    tail = b""
    it = iter(chunks)
    while True:
        try:
            chunk = next(it)
        except StopIteration:
            break
        except SourceError as e:
            err = SourceError(path, line_no, None, e.problem)
            err.raw = offset
            raise err from None
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        for line in lines:
            yield offset, line_no, line
            offset += len(line) + 1
            line_no += 1
    if tail:
        yield offset, line_no, tail


def _line_start(f, first: int) -> tuple[int, int]:
    """``(offset, line number)`` of the first line starting at or after ``first`` in open file ``f``."""
    if first <= 0:
        return 0, 0
    count, pos = 0, 0
    f.seek(0)
    while pos < first - 1:  # newlines strictly before byte first-1
        data = f.read(min(CHUNK, first - 1 - pos))
        if not data:
            return pos, count  # file shorter than first: no line starts there
        count += data.count(b"\n")
        pos += len(data)
    while True:  # the line holding byte first-1 ends at the next newline
        data = f.read(CHUNK)
        if not data:
            return pos, count
        i = data.find(b"\n")
        if i >= 0:
            return pos + i + 1, count + 1
        pos += len(data)


def _file_chunks(f) -> Iterator[bytes]:
    while chunk := f.read(CHUNK):
        yield chunk


def iter_line_range(path: str, first: int = 0, stop: int = -1) -> Iterator[tuple[int, int, bytes]]:
    """``(byte offset, line number, line)`` of the lines that *start* in ``[first, stop)`` of the
    decompressed stream (``stop`` -1: to the end). See the module docstring for the rule."""
    if seekable(path):
        with open(path, "rb") as f:
            offset, line_no = _line_start(f, first)
            f.seek(offset)
            for item in _split(_file_chunks(f), path, offset, line_no):
                if stop >= 0 and item[0] >= stop:
                    return
                yield item
        return
    lines = _split(iter_chunks(path), path, 0, 0)
    try:
        for item in lines:
            if item[0] < first:
                continue
            if stop >= 0 and item[0] >= stop:
                return  # stop decompressing: the rest belongs to other ranges
            yield item
    finally:
        lines.close()


def fetch_lines(path: str, line_numbers: Iterable[int]) -> dict[int, bytes]:
    """The lines numbered ``line_numbers`` (0-based) of ``path``, read once up to the last of them.

    Missing numbers (past the end) are absent from the result.
    """
    want = set(int(n) for n in line_numbers)
    out: dict[int, bytes] = {}
    if not want:
        return out
    last = max(want)
    chunks = _split(iter_chunks(path), path, 0, 0)
    try:
        for _, n, line in chunks:
            if n in want:
                out[n] = line
            if n >= last:
                break
    finally:
        chunks.close()
    return out
