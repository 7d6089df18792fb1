"""``read(paths, format=...)``: the reader for a format, the first step of a pipeline.

``read(...) -> tokenize(...) -> PackStage(...)`` builds a resumable chain by hand; the loader
(:func:`seqpack.build_loader`) builds the same chain per rank and worker from a config.
"""

from __future__ import annotations

from seqpack.sources.columnar import ArrowReader, HFDatasetReader, ParquetReader
from seqpack.sources.jsonl import JsonlReader
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
# format -> module that registers its reader on import (kept lazy: e.g. preprocessed shards)
READER_MODULES: dict[str, str] = {"seqpack": "seqpack.shards"}


def register_reader(format: str, cls: type[Reader], *, replace: bool = False) -> None:
    """Make ``format: <format>`` available to :func:`read` and loader configs."""
    if format in READERS and not replace:
        raise ValueError(f"reader {format!r} is already registered")
    READERS[format] = cls


def reader_class(format: str) -> type[Reader]:
    """The reader registered for ``format`` (importing its module when it is lazy)."""
    if format not in READERS and format in READER_MODULES:
        import importlib

        module = importlib.import_module(READER_MODULES[format])
        if format not in READERS:  # modules may just define a Reader subclass with ``format = ...``
            for obj in vars(module).values():
                if isinstance(obj, type) and issubclass(obj, Reader) and obj.format == format:
                    READERS[format] = obj
    if format not in READERS:
        known = sorted(set(READERS) | set(READER_MODULES))
        raise ValueError(f"format must be one of {known}, got {format!r}")
    return READERS[format]


def read(paths, format: str | None = None, **kwargs) -> Reader:
    """A stateful reader node over ``paths`` (file, glob, directory or list).

    Args:
        paths: what to read.
        format: one of ``READERS`` (``jsonl``, ``parquet``, ``arrow``, ``hf``, ``webdataset``,
            ``text``); guessed from the file name when omitted.
        **kwargs: reader options: field keys (``text_key``, ``input_ids_key``, ``loss_mask_key``,
            ``prompt_key``/``response_key``, ``messages_key``), ``on_error``, ``consumer``,
            ``shuffle_seed``, ``epoch``, ``source_index``, ``name`` and format options
            (``split`` for text, ``streaming``/``chunk_rows``/``hf_kwargs`` for hf).

    Returns:
        A :class:`~seqpack.sources.reader.Reader` yielding :class:`~seqpack.sources.records.Record`.
    """
    if format is None:
        from seqpack.config import guess_format

        first = paths if isinstance(paths, str) else str(list(paths)[0])
        format = guess_format(first)
    return reader_class(format)(paths, **kwargs)
