"""Source formats and how a path's format is told from its name: the one place both the config check
and :func:`seqpack.read` look it up.
"""

from __future__ import annotations

import glob
import os

from seqpack.checks import ConfigError

# the built-in reader formats (sources/read.py registers one reader class per name)
FORMATS = ("jsonl", "parquet", "arrow", "hf", "webdataset", "text", "seqpack")
# file-name endings of each format that a name can tell (``hf`` and ``seqpack`` are directories)
EXTENSIONS: tuple[tuple[tuple[str, ...], str], ...] = (
    (
        (".jsonl", ".jsonl.zst", ".jsonl.zstd", ".jsonl.gz", ".json", ".json.zst", ".json.gz", ".ndjson"),
        "jsonl",
    ),
    ((".parquet", ".pq"), "parquet"),
    ((".arrow", ".feather", ".ipc"), "arrow"),
    ((".tar", ".tar.gz", ".tgz"), "webdataset"),
    ((".txt", ".txt.zst", ".txt.gz", ".md", ".text"), "text"),
)


def guess_format(path: str) -> str:
    """The format of ``path`` from its name: a glob's first match, ``hf`` for a ``save_to_disk``
    directory, ``seqpack`` for a preprocess output directory, else the first file of a directory.

    Raises ConfigError (naming the path and the formats) when the name does not tell.
    """
    if any(ch in path for ch in "*?[") and not path.lower().endswith(_ALL_EXTENSIONS):
        hits = sorted(glob.glob(path))
        path = hits[0] if hits else path
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "manifest.json")):
            return "seqpack"  # a preprocess output directory (seqpack.shards)
        markers = ("dataset_info.json", "state.json", "dataset_dict.json")
        if any(os.path.exists(os.path.join(path, m)) for m in markers):
            return "hf"
        files = sorted(f for f in os.listdir(path) if not f.startswith("."))
        path = files[0] if files else path
    p = path.lower()
    for exts, fmt in EXTENSIONS:
        if p.endswith(exts):
            return fmt
    raise ConfigError(f"cannot tell the format of {path!r}; set 'format' to one of {FORMATS}")


_ALL_EXTENSIONS = tuple(e for exts, _ in EXTENSIONS for e in exts)
