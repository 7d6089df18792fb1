"""Byte streams of (possibly compressed) files, line by line, with truncation detection.

``zstandard``'s ``stream_reader`` returns a clean EOF on a truncated frame, which would drop the
tail of a shard silently; :func:`iter_chunks` drives ``decompressobj`` itself and raises when the
input ends inside a frame. Every file is opened by :func:`seqpack.sources.remote.open_input`, so a
URL streams through the block cache (read-ahead, retries) exactly like a local file.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator

import zstandard

from seqpack.sources.records import SourceError
from seqpack.sources.remote import open_input

CHUNK = 1 << 20


def _zstd_chunks(path: str) -> Iterator[bytes]:
    dctx = zstandard.ZstdDecompressor()
    with open_input(path) as f:
        dobj = dctx.decompressobj()
        in_frame = False
        while True:
            data = f.read(CHUNK)
            if not data:
                break
            while data:
                try:
                    out = dobj.decompress(data)
                except zstandard.ZstdError as e:
                    raise SourceError(path, None, None, f"corrupt zstd stream: {e}") from None
                in_frame = True
                if out:
                    yield out
                if dobj.eof:  # frame finished: any leftover bytes start the next frame
                    data = dobj.unused_data
                    dobj = dctx.decompressobj()
                    in_frame = False
                else:
                    data = b""
        if in_frame:
            raise SourceError(path, None, None, "truncated zstd stream: the input ends inside a frame")


def _gzip_chunks(path: str) -> Iterator[bytes]:
    try:
        with open_input(path) as raw, gzip.GzipFile(fileobj=raw, mode="rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk
    except (EOFError, gzip.BadGzipFile, OSError) as e:
        raise SourceError(path, None, None, f"truncated or corrupt gzip stream: {e}") from None


def _plain_chunks(path: str) -> Iterator[bytes]:
    with open_input(path) as f:
        while chunk := f.read(CHUNK):
            yield chunk


def iter_chunks(path: str) -> Iterator[bytes]:
    """Decompressed bytes of ``path`` by extension (``.zst``/``.zstd``, ``.gz``, else plain)."""
    if path.endswith((".zst", ".zstd")):
        return _zstd_chunks(path)
    if path.endswith(".gz"):
        return _gzip_chunks(path)
    return _plain_chunks(path)


def iter_lines(path: str) -> Iterator[bytes]:
    """Lines of ``path`` without their ``\\n`` (a final unterminated line included).

    A truncation error is raised with the number of the line it cut (0-based), after every
    complete line before it was yielded.
    """
    tail = b""
    n = 0
    chunks = iter_chunks(path)
    while True:
        try:
            chunk = next(chunks)
        except StopIteration:
            break
        except SourceError as e:
            raise SourceError(path, n, None, e.problem) from None
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        n += len(lines)
        yield from lines
    if tail:
        yield tail
