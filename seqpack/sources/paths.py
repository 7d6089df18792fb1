"""Source paths: expanding a path, glob, directory or list of them into files."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

from seqpack.sources.remote import expand as expand_url
from seqpack.sources.urls import is_url


def resolve_paths(
    paths: str | os.PathLike | Sequence[str | os.PathLike], allow_empty: bool = False
) -> list[str]:
    """Expand a path, a glob or a list of them into a list of files (each glob sorted).

    Directories expand to the files directly inside them (sorted). A pattern that matches nothing
    is an error (a typo must not silently yield an empty epoch) unless ``allow_empty``. URLs
    (``s3://``, ``hf://``, ...) expand the same way on their filesystem
    (:func:`seqpack.sources.remote.expand`).
    """
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    out: list[str] = []
    for p in items:
        p = os.fspath(p)
        if is_url(p):  # expanded on its own filesystem (a pattern matching nothing raises there)
            try:
                out.extend(expand_url(p))
            except FileNotFoundError:
                if not allow_empty or not any(ch in p for ch in "*?["):
                    raise
        elif any(ch in p for ch in "*?["):
            hits = sorted(glob.glob(p, recursive=True))
            if not hits and not allow_empty:
                raise FileNotFoundError(f"glob {p!r} matched no files")
            out.extend(h for h in hits if os.path.isfile(h))
        elif os.path.isdir(p):
            out.extend(
                sorted(os.path.join(p, f) for f in os.listdir(p) if os.path.isfile(os.path.join(p, f)))
            )
        elif os.path.exists(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"no such file: {p!r}")
    return out


def spec_text(paths) -> str:
    """A source's path option as text (for messages)."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    return ", ".join(os.fspath(p) for p in items)
