"""The preprocess config: what determines the output bytes, where it comes from, and its fingerprint.

Options are merged defaults < config file (a loader config; its ``preprocess:`` section may set any
option, its ``stage`` gives the packing defaults) < explicit options, then validated into a
:class:`PreprocessConfig`. The fingerprint of a run hashes that config, the input files (size and
sampled content) and the tokenizer: an output directory belongs to exactly one fingerprint.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import InitVar, asdict, dataclass, field, replace
from typing import Any

from seqpack.checks import (
    ConfigError,
    check_choice,
    check_int,
    check_keys,
    check_mapping,
    read_config_file,
    rename_keys,
)
from seqpack.config import validate_config
from seqpack.shards import SHARD_FORMATS
from seqpack.sources.formats import guess_format
from seqpack.sources.reader import resolve_paths
from seqpack.sources.remote import exists as remote_exists
from seqpack.sources.remote import info as remote_info
from seqpack.sources.remote import open_input
from seqpack.sources.tokenize import TokenizerSpec, load_tokenizer, special_ids, tokenizer_file
from seqpack.sources.urls import absolute, is_url

STRATEGIES = ("pack", "decompose", "none")
PACK_ALGORITHMS = ("bfd", "ffd", "greedy", "online")
OVERFLOW = ("split", "truncate", "drop", "error")
BYTE_TOKENIZER_ID = "seqpack-byte-tokenizer-v1"
DEFAULT_CAPACITY = 2048
# a segment's first token is never a loss target (nothing in the row predicts it), so a row of c tokens
# trains on at most (c - 1) / c of them and each further document piece costs one more: below 16 tokens
# (at most 94% targets with a single piece) rows are mostly boundaries and hold no real document whole
MIN_CAPACITY = 16
# the small self-written corpus shipped with the package (seqpack/data/make_corpus.py rebuilds it)
DEMO_CORPUS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "corpus.jsonl.zst"
)
# keys of a ``preprocess:`` config section (and of the CLI options with the same names)
OPTION_KEYS = (
    "capacity",
    "strategy",
    "algorithm",
    "overflow",
    "format",
    "tasks",
    "rows_per_shard",
    "row_group_rows",
    "seed",
    "min_log2",
    "tokenize_batch",
    "compression_level",
    "window_tokens",
)
# old option name -> new (accepted for one release with a DeprecationWarning)
RENAMED_OPTIONS = {"seq_len": "capacity"}
# top-level keys of a config file preprocess accepts (a loader config is accepted as is)
CONFIG_KEYS = (
    "sources",
    "tokenizer",
    "on_error",
    "seed",
    "preprocess",
    "stage",
    "shuffle",
    "mix_by",
    "tokenize_batch",
    "even_batches",
    "curriculum",
    "balance",
)
_POSITIVE = ("capacity", "tasks", "rows_per_shard", "row_group_rows", "tokenize_batch", "window_tokens")


class PreprocessError(ConfigError):
    """Bad arguments, config or output directory; the message names the offending item."""


@dataclass
class PreprocessConfig:
    """Everything that determines the output bytes (stored in full in the manifest).

    Attributes:
        sources: validated source dicts of the loader config (``path`` list, ``format``, field keys).
        tokenizer: tokenizer spec (``name``, ``add_bos``, ``add_eos``, ...), see ``TokenizerSpec``.
        capacity: tokens per row (bin capacity for ``pack``; max row length for ``none``; the largest
            bucket ``2^floor(log2(capacity))`` for ``decompose``, whose rows hold ``2^k + 1`` tokens).
        strategy: ``pack``, ``decompose`` or ``none``.
        algorithm: packing algorithm (``bfd``, ``ffd``, ``greedy``, ``online``).
        overflow: documents longer than ``capacity``: ``split`` (default), ``truncate``, ``drop``, ``error``.
        format: ``parquet`` or ``wds``.
        tasks: number of tasks the input is split into (fixed; independent of the worker count).
        rows_per_shard: rows per output shard; row_group_rows: rows per Parquet row group.
        seed: bin-order shuffle of ``pack`` (task ``k`` uses ``seed + k``) and decomposition draws.
        min_log2: smallest bucket of ``decompose`` (shorter tails are dropped and counted).
        window_tokens: a task plans and writes its documents in windows of about this many tokens,
            which bounds its memory and is the unit of resume inside a task.
        seq_len: deprecated name of ``capacity`` (init only; DeprecationWarning).
    """

    sources: list[dict]
    tokenizer: dict = field(default_factory=lambda: {"name": "byte"})
    capacity: int = DEFAULT_CAPACITY
    strategy: str = "pack"
    algorithm: str = "bfd"
    overflow: str = "split"
    format: str = "parquet"
    tasks: int = 4
    rows_per_shard: int = 4096
    row_group_rows: int = 256
    seed: int = 0
    min_log2: int = 6
    tokenize_batch: int = 256
    compression_level: int = 3
    window_tokens: int = 1 << 24
    seq_len: InitVar[int | None] = None

    def __post_init__(self, seq_len: int | None) -> None:
        if seq_len is not None:
            if self.capacity not in (DEFAULT_CAPACITY, seq_len):
                raise PreprocessError("seq_len: deprecated name of capacity; give only 'capacity'")
            warnings.warn(
                "PreprocessConfig(seq_len=...) is deprecated; use capacity", DeprecationWarning, stacklevel=3
            )
            self.capacity = seq_len
        try:
            check_choice(self.strategy, "strategy", STRATEGIES)
            check_choice(self.algorithm, "algorithm", PACK_ALGORITHMS)
            check_choice(self.overflow, "overflow", OVERFLOW)
            check_choice(self.format, "format", SHARD_FORMATS)
            for name in _POSITIVE:
                setattr(self, name, check_int(getattr(self, name), name, minimum=1))
            if self.capacity < MIN_CAPACITY:
                c = self.capacity
                raise ConfigError(
                    f"capacity (--seq-len): {c} tokens per row is below the minimum of {MIN_CAPACITY}: a "
                    f"segment's first token is never a loss target, so a row of {c} tokens trains on at most "
                    f"{c - 1} of them ({(c - 1) / c:.0%}) and each further document in it loses one more; "
                    "rows that short are mostly boundaries (typical values: 2048-8192)"
                )
            self.seed = check_int(self.seed, "seed")
            self.compression_level = check_int(self.compression_level, "compression_level")
            self.min_log2 = check_int(self.min_log2, "min_log2")
            if self.strategy == "decompose":  # buckets 2^min_log2 .. 2^max_log2
                check_int(self.min_log2, "min_log2", minimum=0, maximum=self.max_log2)
        except ConfigError as e:
            raise PreprocessError(str(e)) from None

    @property
    def max_log2(self) -> int:
        """Largest ``decompose`` bucket exponent, ``floor(log2(capacity))``."""
        return int(math.floor(math.log2(self.capacity)))

    def as_dict(self) -> dict:
        return asdict(self)


def _deprecated_seq_len(self: PreprocessConfig) -> int:
    warnings.warn("PreprocessConfig.seq_len is deprecated; use capacity", DeprecationWarning, stacklevel=2)
    return self.capacity


# reading the old attribute keeps working too; set after the class because the name is also the
# init-only field (whose default the generated __init__ has already captured)
PreprocessConfig.seq_len = property(_deprecated_seq_len)  # type: ignore[assignment]


# ------------------------------------------------------------------------------------------ reading
def load_config_file(path: str) -> dict:
    """Read a YAML/TOML/JSON config; unknown top-level or ``preprocess`` keys are errors naming them.

    Returns the file's mapping with ``preprocess`` holding the options it sets (a ``pack`` stage's
    ``capacity``/``algorithm``/``overflow``/``seed`` and a top-level ``seed`` are defaults) and
    ``_base_dir``, the file's folder (relative source paths are relative to it).
    """
    try:
        raw = read_config_file(path)
    except ConfigError as e:
        raise PreprocessError(str(e)) from None
    try:
        check_keys(raw, CONFIG_KEYS, "")
        section = dict(check_mapping(raw.get("preprocess") or {}, "preprocess"))
        rename_keys(section, RENAMED_OPTIONS, "preprocess")
        check_keys(section, OPTION_KEYS, "preprocess")
    except ConfigError as e:
        raise PreprocessError(f"{path}: {e}") from None
    out = dict(raw)
    out["_base_dir"] = os.path.dirname(os.path.abspath(path))
    stage = raw.get("stage") if isinstance(raw.get("stage"), Mapping) else {}
    opts = {}
    if stage.get("type") == "pack":
        for k in ("capacity", "algorithm", "overflow", "seed"):
            if k in stage:
                opts[k] = stage[k]
    if "seed" in raw:
        opts.setdefault("seed", raw["seed"])
    opts.update(section)
    out["preprocess"] = opts
    return out


def _check_exists(path: str, what: str) -> None:
    """Refuse a missing input path (or a glob matching nothing) by name, before its format is guessed."""
    if os.path.exists(path) or (is_url(path) and remote_exists(path)):
        return
    if is_url(path):
        raise PreprocessError(f"{what} {path!r}: no such object, directory or matching files")
    if any(ch in path for ch in "*?["):
        if not glob.glob(path):
            raise PreprocessError(f"{what} {path!r}: the pattern matches no files")
        return
    hint = " (INPUT is a file, glob or directory)" if what == "input" else ""
    raise PreprocessError(f"{what} {path!r} does not exist{hint}")


def _grouped_sources(inputs: Sequence[str], fields: Mapping[str, str] | None) -> list[dict]:
    """One source per input format, listing that format's files (absolute paths)."""
    by_format: dict[str, list[str]] = {}
    for p in inputs:
        _check_exists(os.fspath(p), "input")
        try:
            fmt = guess_format(os.fspath(p))
        except ValueError as e:
            raise PreprocessError(str(e)) from None
        by_format.setdefault(fmt, []).append(absolute(os.fspath(p)))
    return [
        {"path": paths, "format": fmt, "name": fmt, **dict(fields or {})} for fmt, paths in by_format.items()
    ]


def _check_source_paths(sources: Any, base_dir: str | None) -> None:
    """A config's local sources (no ``format`` given, not streamed) must exist: say so by name rather
    than failing to guess the format of a missing file."""
    for i, src in enumerate(sources if isinstance(sources, list) else []):
        src = {"path": src} if isinstance(src, str) else src
        if not isinstance(src, Mapping) or src.get("format") or src.get("streaming"):
            continue
        for p in src.get("path") if isinstance(src.get("path"), list) else [src.get("path")]:
            if isinstance(p, (str, os.PathLike)):
                p = os.fspath(p)
                p = p if base_dir is None or is_url(p) else os.path.join(base_dir, p)
                _check_exists(p, f"sources[{i}].path")


def build_config(
    inputs: Sequence[str],
    *,
    config_file: dict | None = None,
    tokenizer: str | Mapping | None = None,
    fields: Mapping[str, str] | None = None,
    on_error: str | None = None,
    eos_token: str | None = None,
    **options: Any,
) -> PreprocessConfig:
    """Merge defaults < config file < explicit options into a validated :class:`PreprocessConfig`.

    Args:
        inputs: input files/globs/directories (grouped into one source per format), or empty when
            the config file lists ``sources``.
        config_file: the result of :func:`load_config_file`.
        tokenizer: ``"byte"``, a ``tokenizer.json`` path, or a spec mapping.
        fields: field keys for the CLI inputs (``text_key``, ``messages_key``, ...).
        eos_token: the EOS token's string (overrides the tokenizer spec's; must be in the vocabulary).
        options: any of :data:`OPTION_KEYS` (None values are ignored; ``seq_len`` is the deprecated
            name of ``capacity``).
    """
    file_cfg = config_file or {}
    opts = dict(file_cfg.get("preprocess", {}))
    try:
        check_keys(options, (*OPTION_KEYS, *RENAMED_OPTIONS), "")
        given = rename_keys({k: v for k, v in options.items() if v is not None}, RENAMED_OPTIONS, "")
    except ConfigError as e:
        raise PreprocessError(str(e)) from None
    opts.update(given)
    if inputs:
        sources = _grouped_sources(inputs, fields)
    elif file_cfg.get("sources"):
        sources = file_cfg["sources"]
        _check_source_paths(sources, file_cfg.get("_base_dir"))
    else:
        raise PreprocessError("no input: pass INPUT files or a --config with 'sources'")
    # only the sources and tokenizer of a loader config matter here; the stage is ours
    loader_cfg = {
        "sources": sources,
        "tokenizer": tokenizer or file_cfg.get("tokenizer", "byte"),
        "stage": {"type": "preprocess"},
    }
    if on_error or file_cfg.get("on_error"):
        loader_cfg["on_error"] = on_error or file_cfg["on_error"]
    try:
        validated = validate_config(loader_cfg, base_dir=None if inputs else file_cfg.get("_base_dir"))
    except ValueError as e:  # the loader's ConfigError names the key
        raise PreprocessError(str(e)) from None
    try:
        spec = TokenizerSpec.parse(validated["tokenizer"])
        if eos_token is not None:
            spec = replace(spec, eos_token=TokenizerSpec.parse({"eos_token": eos_token}).eos_token)
        # a path, a cached hub name or the hub; the named special tokens must be in its vocabulary
        special_ids(load_tokenizer(spec.name), spec)
    except (ValueError, TypeError, OSError) as e:  # load and special_ids errors name the tokenizer
        raise PreprocessError(str(e) if str(e).startswith("tokenizer") else f"tokenizer: {e}") from None
    if "tasks" not in opts:
        # one task per input file (globs and directories expanded), at least 4 so that a single big
        # file still spreads over workers (records are then split inside it)
        n_files = sum(
            len(s["path"] if s["format"] in ("hf", "seqpack") else resolve_paths(s["path"]))
            for s in validated["sources"]
        )
        opts["tasks"] = max(4, min(n_files, 1024))
    try:
        return PreprocessConfig(sources=validated["sources"], tokenizer=asdict(spec), **opts)
    except TypeError as e:
        raise PreprocessError(str(e)) from None


# ------------------------------------------------------------------------------------------ identity
def tokenizer_fingerprint(spec: Mapping[str, Any]) -> str:
    """sha256 of what defines the token ids: the ``tokenizer.json`` bytes (or the byte tokenizer's id)."""
    s = TokenizerSpec.parse(dict(spec))
    h = hashlib.sha256()
    if s.name == "byte":
        h.update(BYTE_TOKENIZER_ID.encode())
    elif (path := tokenizer_file(s.name)) is not None:  # a file, or a hub name's cached copy
        with open(path, "rb") as f:
            h.update(f.read())
    else:  # a hub name not cached: only its name is known without the network
        h.update(s.name.encode())
    return h.hexdigest()


def tokenizer_info(cfg: PreprocessConfig) -> dict:
    """The manifest's ``tokenizer`` entry: name, sha256, vocabulary size and special ids."""
    spec = TokenizerSpec.parse(cfg.tokenizer)
    try:
        tok = load_tokenizer(spec.name)
        bos, eos, pad = special_ids(tok, spec)
    except (ValueError, OSError) as e:
        raise PreprocessError(f"tokenizer: {e}") from None
    return {
        "name": spec.name,
        "sha256": tokenizer_fingerprint(cfg.tokenizer),
        "vocab_size": int(tok.vocab_size),
        "bos_id": bos,
        "eos_id": eos,
        "pad_id": pad,
    }


def input_files(cfg: PreprocessConfig) -> list[dict]:
    """Each input file with its size and a sampled hash (part of the fingerprint: a changed input
    is a different run)."""
    out = []
    for s in cfg.sources:
        paths = s["path"] if s["format"] == "hf" else resolve_paths(s["path"])
        for p in paths:
            if is_url(p):  # objects listed by the glob exist; their size and sampled bytes as locally
                entry = {"bytes": remote_info(p)["size"], "sample_sha256": _sample_hash(p)}
            elif os.path.isfile(p):
                entry = {"bytes": os.path.getsize(p), "sample_sha256": _sample_hash(p)}
            else:
                entry = {"bytes": None, "sample_sha256": None}
            out.append({"source": s["name"], "path": absolute(p), **entry})
    return out


def _sample_hash(path: str, n: int = 1 << 16) -> str:
    """sha256 of a file's first and last ``n`` bytes: catches edited inputs without reading them whole."""
    h = hashlib.sha256()
    with open_input(path, sequential=False) as f:
        h.update(f.read(n))
        size = f.seek(0, os.SEEK_END)
        f.seek(n)
        if size > n:
            f.seek(max(size - n, n))
            h.update(f.read(n))
    return h.hexdigest()


def fingerprint(cfg: PreprocessConfig, inputs: list[dict], tokenizer_hash: str) -> str:
    """sha256 of the config, the inputs (:func:`input_files`) and the tokenizer hash."""
    blob = json.dumps(
        {"config": cfg.as_dict(), "inputs": inputs, "tokenizer": tokenizer_hash}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()
