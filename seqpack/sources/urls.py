"""Telling URLs from local paths, without importing any filesystem library.

A path is a URL when it starts with ``protocol://`` (``s3://``, ``gs://``, ``hf://``, ``https://``,
any fsspec protocol). The CLI and config checks use this module; reading and writing a URL goes
through :mod:`seqpack.sources.remote`, which imports ``fsspec`` and is loaded only by the readers
and by a preprocess run with a URL output.
"""

from __future__ import annotations

import os
import re

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+://")


def is_url(path) -> bool:
    """True for ``protocol://...`` strings (a one-letter "protocol" is a Windows drive, not a URL)."""
    return isinstance(path, str) and _URL.match(path) is not None


def protocol(url: str) -> str:
    """``"s3"`` for ``"s3://bucket/key"``."""
    return url.split("://", 1)[0].lower()


def join(base: str, *names: str) -> str:
    """``os.path.join`` for local paths; ``/``-joined for URLs (object keys never use ``\\``)."""
    if not is_url(base):
        return os.path.join(base, *names)
    return "/".join([base.rstrip("/"), *(n.strip("/") for n in names)])


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1] if is_url(path) else os.path.basename(path)


def absolute(path: str) -> str:
    """A URL unchanged, a local path made absolute (what configs and manifests record)."""
    return path if is_url(path) else os.path.abspath(path)
