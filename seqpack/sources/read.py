"""``read(paths, format=...)``: the reader for a format, the first step of a pipeline.

``read(...) -> tokenize(...) -> PackStage(...)`` builds a resumable chain by hand; the loader
(:func:`seqpack.build_loader`) builds the same chain per rank and worker from a config.

A format names a :class:`~seqpack.sources.reader.Reader` subclass: the built-in ones below, any
registered with :func:`register_reader`, or any imported subclass whose ``format`` attribute
names it (``seqpack.shards`` defines the ``seqpack`` reader of preprocessed shards that way, so
this module needs no import of the modules below it).
"""

from __future__ import annotations

import os

from seqpack.sources.columnar import ArrowReader, ParquetReader
from seqpack.sources.formats import FORMATS, guess_format
from seqpack.sources.hf import HFDatasetReader
from seqpack.sources.jsonl import JsonlReader
from seqpack.sources.paths import resolve_paths
from seqpack.sources.reader import Reader
from seqpack.sources.text import TextReader
from seqpack.sources.webdataset import WebDatasetReader

READERS: dict[str, type[Reader]] = {
    "jsonl": JsonlReader,
    "parquet": ParquetReader,
    "arrow": ArrowReader,
    "hf": HFDatasetReader,
    "webdataset": WebDatasetReader,
    "text": TextReader,
}


def register_reader(format: str, cls: type[Reader], *, replace: bool = False) -> None:
    """Make ``format: <format>`` available to :func:`read` and loader configs."""
    if format in READERS and not replace:
        raise ValueError(f"reader {format!r} is already registered")
    READERS[format] = cls


def _declared_readers() -> dict[str, type[Reader]]:
    """``format -> class`` of every imported Reader subclass that declares its own ``format``."""
    out: dict[str, type[Reader]] = {}
    todo = list(Reader.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.format != Reader.format:
            out.setdefault(cls.format, cls)
    return out


def known_formats() -> list[str]:
    """Every format a source may name now (built-in, registered, or declared by a Reader subclass)."""
    return sorted(set(FORMATS) | set(READERS) | set(_declared_readers()))


def reader_class(format: str) -> type[Reader]:
    """The reader registered for ``format`` (or declared by an imported Reader subclass)."""
    if format not in READERS:
        declared = _declared_readers()
        if format not in declared:
            raise ValueError(f"format must be one of {known_formats()}, got {format!r}")
        READERS[format] = declared[format]
    return READERS[format]


def read(paths, format: str | None = None, **kwargs) -> Reader:
    """A stateful reader node over ``paths`` (file, glob, directory or list).

    Args:
        paths: what to read.
        format: one of :func:`known_formats` (``jsonl``, ``parquet``, ``arrow``, ``hf``,
            ``webdataset``, ``text``, ``seqpack``); guessed from the file name when omitted.
        **kwargs: reader options: field keys (``text_key``, ``input_ids_key``, ``loss_mask_key``,
            ``prompt_key``/``response_key``, ``messages_key``), ``on_error``, ``consumer``,
            ``shuffle_seed``, ``epoch``, ``source_index``, ``name`` and format options
            (``split`` for text, ``streaming``/``chunk_rows``/``hf_kwargs`` for hf).

    Returns:
        A :class:`~seqpack.sources.reader.Reader` yielding :class:`~seqpack.sources.records.Record`.
    """
    if format is None:
        first = paths if isinstance(paths, (str, os.PathLike)) else list(paths)[0]
        format = guess_format(os.fspath(first))
    return reader_class(format)(paths, **kwargs)


# formats whose path option is files, globs or directories of files (re-resolved every epoch)
FILE_FORMATS = ("jsonl", "parquet", "arrow", "webdataset", "text")


def with_source_files(cfg: dict) -> dict:
    """``cfg`` with each file source's resolved files recorded as its ``expect_files``.

    The loader calls it once (epoch 0); readers built for later epochs re-resolve their globs and
    raise, naming them, when files recorded here are gone (a deleted shard must not silently
    shorten an epoch). Sources that cannot be resolved now are left to their reader's own error.
    """
    sources = []
    for s in cfg.get("sources") or []:
        s = dict(s)
        paths = s.get("path")
        local = all("://" not in str(p) for p in (paths if isinstance(paths, list) else [paths]))
        if s.get("format") in FILE_FORMATS and local and "expect_files" not in s:
            try:
                s["expect_files"] = resolve_paths(paths, allow_empty=True)
            except (OSError, ValueError):
                pass  # the reader reports it
        sources.append(s)
    return {**cfg, "sources": sources} if "sources" in cfg else cfg
