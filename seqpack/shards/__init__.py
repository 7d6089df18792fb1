"""Preprocessed shards on disk: the format (``format``), writing it (``writer``), reading it back
(``readers``) and looking at an output directory (``stats``; the ``seqpack stats`` / ``inspect``
commands in ``cli``, which imports ``stats`` only when a command runs, so ``--help`` stays fast).

Layering: ``verify`` (confinement, size, sha256) <- ``format`` <- ``writer``, ``readers`` <- ``stats``
<- ``cli``; ``seqpack.preprocess`` writes with ``writer``, the loader reads with ``readers``
(``format: seqpack`` sources, the ``packed_rows`` stage).
"""

from seqpack.lazy import lazy_exports

# defining module -> the public names it gives, imported on first access (seqpack/lazy.py)
_SOURCES: dict[str, tuple[str, ...]] = {
    "seqpack.shards.format": (
        "COLUMNS", "MANIFEST", "MANIFEST_FORMAT", "MANIFEST_VERSION", "SCHEMA", "SHARD_FORMATS",
        "SHARD_SUFFIX", "PackedRow", "ShardFile", "ShardInfo", "max_row_tokens", "read_manifest",
        "shard_entries", "shard_paths",
    ),
    "seqpack.shards.verify": (
        "ShardError", "check_entries", "check_file", "check_footer", "file_sha256", "footer_sha256",
        "shard_location", "verify_shard",
    ),
    "seqpack.shards.readers": ("PackedRowReader", "SeqpackShardReader", "iter_rows"),
    "seqpack.shards.writer": (
        "PackedRows", "atomic_write", "save_npz_atomic", "write_json_atomic", "write_shard",
    ),
}
__getattr__, __dir__ = lazy_exports(__name__, _SOURCES)

__all__ = ["COLUMNS", "MANIFEST", "MANIFEST_FORMAT", "MANIFEST_VERSION", "SCHEMA", "SHARD_FORMATS"]
__all__ += ["SHARD_SUFFIX", "PackedRow", "PackedRowReader", "PackedRows", "SeqpackShardReader", "ShardError"]
__all__ += ["ShardFile", "ShardInfo", "atomic_write", "check_entries", "check_file", "check_footer"]
__all__ += ["file_sha256", "footer_sha256"]
__all__ += ["iter_rows", "max_row_tokens", "read_manifest", "save_npz_atomic", "shard_entries"]
__all__ += ["shard_location", "shard_paths", "verify_shard", "write_json_atomic", "write_shard"]
