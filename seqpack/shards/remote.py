"""Shards on URLs: the checks a local shard gets on open (``shards.verify``), done by range reads."""

from __future__ import annotations

import hashlib

from seqpack.shards.verify import ShardError, check_digest
from seqpack.sources.remote import info as remote_info
from seqpack.sources.remote import open_input


def check_remote(url: str, entry: dict, sha256: bool) -> None:
    """The checks of a local shard's open for an object: its size, its footer's sha256 (fetched by
    range), and its whole sha256 when asked."""
    size = remote_info(url)["size"]
    if size != int(entry["bytes"]):
        raise ShardError(f"{url}: {size:,} bytes, the manifest says {int(entry['bytes']):,}")
    with open_input(url, sequential=False) as f:
        if entry.get("footer_sha256") and url.endswith(".parquet"):
            f.seek(max(0, size - 8))
            n = int.from_bytes(f.read(4), "little") + 8
            f.seek(max(0, size - n))
            if hashlib.sha256(f.read()).hexdigest() != entry["footer_sha256"]:
                raise ShardError(f"{url}: footer sha256 differs from the manifest's (corrupt footer)")
        if sha256:
            f.seek(0)
            check_digest(url, hashlib.sha256(f.read()).hexdigest(), entry)
