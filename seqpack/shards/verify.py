"""Checking shards against their manifest: where a shard may live, its size, its sha256.

Three checks, from cheap to thorough:

- **confinement** (:func:`shard_location`): a manifest names each shard by a relative path inside
  its output directory. An absolute path, a ``..`` component, an empty component or a symlink that
  resolves outside the directory is refused with a :class:`ShardError` naming the manifest entry,
  so a crafted or damaged manifest never makes ``inspect``, ``stats`` or the loader read another
  file. :func:`check_entries` applies it to every entry when a manifest is read.
- **size** (:func:`check_file`): every shard's size is compared with its entry when it is opened
  (one ``stat``): a truncated or replaced file fails before any row is read.
- **footer** (:func:`check_footer`): a Parquet shard's footer (a few KB: where the row groups
  are, their counts) is hashed on every open and compared with ``footer_sha256`` of its entry
  (manifests written before it existed have none).
- **sha256** (:func:`check_file` with ``sha256=True``, :func:`verify_shard`): the whole file is
  hashed; done where the user asks (``verify: true`` on a ``seqpack`` source, ``--verify`` in the
  CLI), by the preprocess resume, and always for webdataset shards, which are read whole anyway.

Parquet data pages carry CRC32 checksums (written and verified by ``seqpack.shards.format``), so a
flipped bit inside a page fails its row group even without the sha256.

This module imports only the standard library: it is the bottom of ``seqpack.shards``.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections.abc import Mapping
from typing import Any

ENTRY_INT_KEYS = ("rows", "tokens", "segments", "bytes")


class ShardError(ValueError):
    """A shard or manifest that is missing, corrupt or does not match its manifest entry."""


def file_sha256(path: str) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _name_problem(name: Any) -> str | None:
    """Why ``name`` is not a relative path inside the directory (lexically), or None."""
    if not isinstance(name, str) or not name:
        return "expected a non-empty relative file name"
    if "\x00" in name or "\\" in name:
        return "a NUL or backslash in a shard name"
    if "://" in name:
        return "a URL, not a name relative to the output directory"
    if name.startswith("/") or os.path.isabs(name) or (len(name) > 1 and name[1] == ":"):
        return "an absolute path; shard names must be relative to the output directory"
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "'..', '.' or empty path components leave or blur the output directory"
    return None


def _inside(root: str, path: str) -> bool:
    root, path = os.path.realpath(root), os.path.realpath(path)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def shard_location(directory: str, name: Any, where: str = "shard") -> str:
    """The path of shard ``name`` of output ``directory``; :class:`ShardError` if it would leave it.

    Args:
        directory: the output directory (a local path; for URLs only the lexical checks apply).
        name: the shard's ``name`` as the manifest (or a task marker) lists it.
        where: what to call the entry in the error, e.g. ``DIR/manifest.json: shards[3].name``.
    """
    problem = _name_problem(name)
    if problem is None:
        if "://" in directory:
            return posixpath.join(directory.rstrip("/"), name)
        path = os.path.join(directory, *name.split("/"))
        if not _inside(directory, path):
            problem = f"resolves to {os.path.realpath(path)!r}, outside {directory!r} (a symlink escape)"
        else:
            return path
    raise ShardError(f"{where} {name!r}: {problem}; refusing to read it")


def check_entries(directory: str, manifest: Mapping, manifest_path: str) -> None:
    """Check every ``shards[i]`` entry of a manifest: a mapping with a confined ``name``,
    non-negative integer counts and a sha256; :class:`ShardError` names the first bad entry."""
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise ShardError(f"{manifest_path}: 'shards' must be a list, got {type(shards).__name__}")
    seen: set[str] = set()
    for i, s in enumerate(shards):
        where = f"{manifest_path}: shards[{i}]"
        if not isinstance(s, Mapping):
            raise ShardError(f"{where}: expected a mapping, got {type(s).__name__}")
        shard_location(directory, s.get("name"), f"{where}.name")
        for k in ENTRY_INT_KEYS:
            v = s.get(k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ShardError(f"{where}.{k}: expected a non-negative integer, got {v!r}")
        for k in ("sha256", "footer_sha256"):
            if (k == "sha256" or k in s) and not isinstance(s.get(k), str):
                raise ShardError(f"{where}.{k}: expected a hex digest, got {s.get(k)!r}")
        if s["name"] in seen:
            raise ShardError(f"{where}.name {s['name']!r}: listed twice (its rows would be read twice)")
        seen.add(s["name"])


def check_file(path: str, entry: Mapping, *, sha256: bool = False) -> None:
    """:class:`ShardError` unless ``path`` exists with the size (and, if asked, the sha256) of its
    manifest ``entry``."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise ShardError(f"{path}: shard listed in the manifest is unreadable: {e.strerror or e}") from None
    if size != int(entry["bytes"]):
        raise ShardError(
            f"{path}: {size:,} bytes, the manifest says {int(entry['bytes']):,} (truncated, replaced or "
            "still being written)"
        )
    if sha256:
        check_digest(path, file_sha256(path), entry)


def footer_sha256(path: str) -> str:
    """Hex sha256 of a Parquet file's footer: its metadata, its 4-byte length and the ``PAR1``
    magic (the last ``len + 8`` bytes); a file too short for its stated footer hashes as is."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 8))
        tail = f.read(8)
        n = int.from_bytes(tail[:4], "little") + 8 if len(tail) == 8 else size
        f.seek(max(0, size - n))
        return hashlib.sha256(f.read()).hexdigest()


def check_footer(path: str, entry: Mapping) -> None:
    """:class:`ShardError` unless the Parquet footer of ``path`` has the digest its entry records."""
    digest = footer_sha256(path)
    if digest != entry["footer_sha256"]:
        raise ShardError(
            f"{path}: footer sha256 {digest[:16]}... differs from the manifest's "
            f"{entry['footer_sha256'][:16]}... (corrupt footer: the row groups cannot be located)"
        )


def check_digest(path: str, digest: str, entry: Mapping) -> None:
    """:class:`ShardError` unless ``digest`` is the sha256 the manifest ``entry`` records."""
    if digest != entry["sha256"]:
        raise ShardError(
            f"{path}: sha256 {digest[:16]}... differs from the manifest's {entry['sha256'][:16]}... "
            "(the file is corrupt or was changed after preprocessing)"
        )


def verify_shard(directory: str, info: Any) -> bool:
    """True when the shard exists (inside ``directory``) with the size and sha256 its manifest entry
    (a dict or :class:`~seqpack.shards.ShardInfo`) records; a name that leaves the directory raises."""
    entry = info if isinstance(info, Mapping) else info.as_dict()
    path = shard_location(directory, entry["name"])
    try:
        check_file(path, entry, sha256=True)
    except ShardError:
        return False
    return True
