"""Loader config: a dict, or a YAML / TOML / JSON file, validated with errors that name the key.

Minimal config::

    sources:
      - {path: "data/*.jsonl.zst", text_key: text, weight: 3}
      - {path: "shards/*.parquet", input_ids_key: input_ids, weight: 1}
    tokenizer: byte                  # or a tokenizer.json path, a hub name, or {name, eos_token, ...}
    stage: {type: pack, capacity: 8192, algorithm: online, buffer_docs: 1000}
    shuffle: {seed: 0, buffer_docs: 1000}  # omit (or null) for file order

``partition``: how a source's records are cut over the rank x worker consumers: ``bytes``
(default, from file metadata) or ``tokens`` (exact token counts from the source's length index,
built by one tokenizing pass and cached, the index ``even_batches: precount`` uses: near-equal
tokens per consumer, so fewer padding steps).

Other top-level sections (``curriculum``, ``balance``, ...) are kept as given for the stages and
options that read them; a registered stage checks its own section (``StageEntry.validate``).
A source that resolves to no data (an empty directory, a glob of directories, empty files) is an
error unless it sets ``allow_empty: true`` (then a warning, counted as ``read/<name>/empty_sources``).
Relative source paths in a file config are relative to the file. Deprecated keys still work for
one release with a DeprecationWarning: ``shuffle.buffer`` (now ``shuffle.buffer_docs``) and
``tokenizer.path`` (now ``tokenizer.name``).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

from seqpack.checks import (
    ConfigError,
    check_bool,
    check_choice,
    check_int,
    check_keys,
    check_mapping,
    read_config_file,
    rename_keys,
)
from seqpack.sources.chat import tokenizer_chat_template
from seqpack.sources.fields import FieldSpec
from seqpack.sources.formats import FORMATS, guess_format
from seqpack.sources.mixture import MIX_BY, check_weight
from seqpack.sources.read import known_formats
from seqpack.sources.records import ON_ERROR
from seqpack.sources.text import TEXT_SPLITS
from seqpack.sources.tokenize import TokenizerSpec
from seqpack.sources.urls import is_url
from seqpack.stages import StageEntry, stage_entry

SOURCE_KEYS = {
    "path",
    "format",
    "name",
    "weight",
    "on_error",
    "text_key",
    "input_ids_key",
    "loss_mask_key",
    "prompt_key",
    "response_key",
    "messages_key",
    "split",
    "chunk_rows",
    "streaming",
    "hf_kwargs",
    "group_key",
    "chat_template",
    "chat_template_vars",
    "storage_options",
    "verify",
    "allow_empty",
}
TOP_DEFAULTS: dict[str, Any] = {
    "tokenizer": "byte",
    "shuffle": None,
    "on_error": "raise",
    "mix_by": "tokens",
    "tokenize_batch": 256,
    "even_batches": "auto",
    "partition": "bytes",
    "seed": 0,
}
SHUFFLE_KEYS = ("seed", "buffer_docs", "shards")
EVEN_BATCHES = ("auto", "allreduce", "precount", "none")

__all__ = ["ConfigError", "FORMATS", "SOURCE_KEYS", "guess_format", "load_config", "validate_config"]


def load_config(config: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Read (YAML ``.yaml``/``.yml``, TOML ``.toml``, JSON ``.json``) and validate a loader config."""
    if isinstance(config, (str, os.PathLike)):
        base = os.path.dirname(os.path.abspath(os.fspath(config)))
        return validate_config(read_config_file(config), base_dir=base)
    return validate_config(config)


def validate_config(raw: Mapping[str, Any], base_dir: str | None = None) -> dict[str, Any]:
    """Check keys and types, fill defaults; returns a new dict (the input is not modified)."""
    cfg = copy.deepcopy(dict(check_mapping(raw, "config")))
    for k, v in TOP_DEFAULTS.items():
        cfg.setdefault(k, v)
    entry = _stage_entry(cfg.get("stage", {"type": "pack"}))
    cfg["tokenizer"] = _check_tokenizer(cfg["tokenizer"])
    check_choice(cfg["on_error"], "on_error", ON_ERROR)
    sources = cfg.get("sources")
    if not isinstance(sources, list) or not sources:
        raise ConfigError("sources: expected a non-empty list of {path, ...}")
    # stages that read their own sources (entry.documents False) check them in entry.validate
    if entry is None or entry.documents:
        cfg["sources"] = [_check_source(s, i, cfg["on_error"], base_dir) for i, s in enumerate(sources)]
        names = [s["name"] for s in cfg["sources"]]
        if len(set(names)) != len(names):
            raise ConfigError(f"sources: names must be unique, got {names}")
        _resolve_chat_templates(cfg)

    stage = cfg.get("stage", {"type": "pack"})
    if not isinstance(stage, Mapping) or "type" not in stage:
        raise ConfigError("stage: expected a mapping with a 'type' (e.g. {type: pack, capacity: 8192})")
    stage = dict(stage)
    cfg["stage"] = stage

    check_int(cfg["seed"], "seed")
    cfg["shuffle"] = _check_shuffle(cfg.get("shuffle"), cfg["seed"])
    check_int(cfg["tokenize_batch"], "tokenize_batch", minimum=1)
    check_choice(cfg["mix_by"], "mix_by", MIX_BY)
    check_choice(cfg["even_batches"], "even_batches", EVEN_BATCHES)
    check_choice(cfg["partition"], "partition", ("bytes", "tokens"))
    if entry is not None and entry.validate is not None:
        try:
            cfg = entry.validate(cfg, base_dir)
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from e
    return cfg


def _check_source(s: Any, i: int, on_error: str, base_dir: str | None) -> dict[str, Any]:
    """``sources[i]`` checked, with absolute paths, its format, weight, name and on_error filled in."""
    where = f"sources[{i}]"
    s = dict(check_mapping({"path": s} if isinstance(s, str) else s, where))
    check_keys(s, SOURCE_KEYS, where)
    if "path" not in s:
        raise ConfigError(f"{where}.path: missing")
    paths = s["path"] if isinstance(s["path"], list) else [s["path"]]
    if base_dir is not None and not s.get("streaming"):
        paths = [os.fspath(p) for p in paths]
        paths = [p if is_url(p) or os.path.isabs(p) else os.path.join(base_dir, p) for p in paths]
    s["path"] = [os.fspath(p) for p in paths]
    if not s.get("format"):
        try:
            s["format"] = guess_format(s["path"][0])
        except ConfigError as e:
            raise ConfigError(f"{where}.format: {e}") from None
    check_choice(s["format"], f"{where}.format", known_formats())
    s["weight"] = check_weight(s.get("weight", 1.0), f"{where}.weight")
    s.setdefault("name", f"source{i}")
    s.setdefault("on_error", on_error)
    check_choice(s["on_error"], f"{where}.on_error", ON_ERROR)
    if s["format"] == "text" and "split" in s:
        check_choice(s["split"], f"{where}.split", TEXT_SPLITS)
    if "chunk_rows" in s:
        check_int(s["chunk_rows"], f"{where}.chunk_rows", minimum=1)
    if "streaming" in s:
        check_bool(s["streaming"], f"{where}.streaming")
    if "verify" in s:  # sha256 of each preprocessed shard before reading it (sizes always are checked)
        check_bool(s["verify"], f"{where}.verify")
        if s["format"] != "seqpack":
            raise ConfigError(f"{where}.verify: only sources of format 'seqpack' have checksums to verify")
    if "allow_empty" in s:  # a source with no data is an error unless this is true (then counted)
        check_bool(s["allow_empty"], f"{where}.allow_empty")
    if s.get("hf_kwargs") is not None:
        check_mapping(s["hf_kwargs"], f"{where}.hf_kwargs")
    if s.get("storage_options") is not None:
        check_mapping(s["storage_options"], f"{where}.storage_options")
    try:
        FieldSpec.from_config(s).kind  # noqa: B018 - key combinations (prompt_key needs response_key)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    return s


def _check_tokenizer(spec: Any) -> Any:
    """The ``tokenizer`` entry with deprecated keys renamed (so later parses do not warn again)."""
    if isinstance(spec, Mapping):
        spec = rename_keys(dict(spec), {"path": "name"}, "tokenizer")
    try:
        TokenizerSpec.parse(spec)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"tokenizer: {e}") from e
    return spec


def _check_shuffle(sh: Any, seed: int) -> dict[str, Any] | None:
    """``shuffle``: null/false (file order), true (defaults) or ``{seed, buffer_docs, shards}``."""
    if sh in (None, False):
        return None
    sh = dict(check_mapping({} if sh is True else sh, "shuffle"))
    rename_keys(sh, {"buffer": "buffer_docs"}, "shuffle")
    check_keys(sh, SHUFFLE_KEYS, "shuffle")
    return {
        "seed": check_int(sh.get("seed", seed), "shuffle.seed"),
        "buffer_docs": check_int(sh.get("buffer_docs", 1000), "shuffle.buffer_docs", minimum=0),
        "shards": check_bool(sh.get("shards", True), "shuffle.shards"),
    }


def _resolve_chat_templates(cfg: dict) -> None:
    """``chat_template`` of chat sources: a Jinja string, ``"plain"`` (built-in), or unset /
    ``"tokenizer"``: the template saved with a local tokenizer, else plain."""
    template, template_vars = None, None
    for i, s in enumerate(cfg["sources"]):
        if s.get("messages_key") and s.get("chat_template") in (None, "tokenizer"):
            if template_vars is None:
                name = TokenizerSpec.parse(cfg["tokenizer"]).name  # checked by _check_tokenizer
                template, template_vars = tokenizer_chat_template(name)
            s["chat_template"] = template
            s.setdefault("chat_template_vars", template_vars)
        elif s.get("chat_template") == "plain":
            s["chat_template"] = None
        elif s.get("chat_template") is not None and not isinstance(s["chat_template"], str):
            raise ConfigError(
                f"sources[{i}].chat_template: expected a Jinja string, 'tokenizer' or 'plain', "
                f"got {type(s['chat_template']).__name__}"
            )


def _stage_entry(stage: Any) -> StageEntry | None:
    """The registry entry of ``stage.type``; None when the type is missing or not registered (a
    caller-defined type such as preprocess's own; the loader refuses unregistered types when it runs)."""
    if not isinstance(stage, Mapping) or not isinstance(stage.get("type"), str):
        return None
    return stage_entry(stage["type"])
