"""Loader config: a dict, or a YAML / TOML file, validated with errors that name the key.

Minimal config::

    sources:
      - {path: "data/*.jsonl.zst", text_key: text, weight: 3}
      - {path: "shards/*.parquet", input_ids_key: input_ids, weight: 1}
    tokenizer: byte                  # or a tokenizer.json path, a hub name, or {name, add_bos, add_eos}
    stage: {type: pack, capacity: 8192, algorithm: online, buffer_docs: 1000}
    shuffle: {seed: 0, buffer: 1000}  # omit (or null) for file order

Other top-level sections (``curriculum``, ``balance``, ...) are kept as given for the stages and
options that read them. Relative source paths in a file config are relative to the file.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

FORMATS = ("jsonl", "parquet", "arrow", "hf", "webdataset", "text", "seqpack")
_EXT_FORMAT = [
    (
        (".jsonl", ".jsonl.zst", ".jsonl.zstd", ".jsonl.gz", ".json", ".json.zst", ".json.gz", ".ndjson"),
        "jsonl",
    ),
    ((".parquet", ".pq"), "parquet"),
    ((".arrow", ".feather", ".ipc"), "arrow"),
    ((".tar", ".tar.gz", ".tgz"), "webdataset"),
    ((".txt", ".txt.zst", ".txt.gz", ".md", ".text"), "text"),
]
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
}
TOP_DEFAULTS: dict[str, Any] = {
    "tokenizer": "byte",
    "shuffle": None,
    "on_error": "raise",
    "mix_by": "tokens",
    "tokenize_batch": 256,
    "even_batches": "auto",
    "seed": 0,
}


class ConfigError(ValueError):
    """Invalid config; the message names the key path (e.g. ``sources[1].weight``)."""


def load_config(config: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Read (YAML ``.yaml``/``.yml``, TOML ``.toml``, JSON ``.json``) and validate a loader config."""
    base = None
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        base = os.path.dirname(os.path.abspath(path))
        with open(path, "rb") as f:
            data = f.read()
        if path.endswith(".toml"):
            import tomllib

            raw = tomllib.loads(data.decode("utf-8"))
        elif path.endswith(".json"):
            import json

            raw = json.loads(data)
        else:
            import yaml

            raw = yaml.safe_load(data)
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{path}: the config must be a mapping, got {type(raw).__name__}")
    else:
        raw = config
    return validate_config(raw, base_dir=base)


def guess_format(path: str) -> str:
    """Format from the file name (a glob's first match; ``hf`` for a ``save_to_disk`` directory)."""
    if any(ch in path for ch in "*?[") and not any(
        path.lower().endswith(e) for exts, _ in _EXT_FORMAT for e in exts
    ):
        import glob

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
    for exts, fmt in _EXT_FORMAT:
        if p.endswith(exts):
            return fmt
    raise ConfigError(f"cannot tell the format of {path!r}; set 'format' to one of {FORMATS}")


def validate_config(raw: Mapping[str, Any], base_dir: str | None = None) -> dict[str, Any]:
    """Check keys and types, fill defaults; returns a new dict (the input is not modified)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config must be a mapping, got {type(raw).__name__}")
    cfg = copy.deepcopy(dict(raw))
    for k, v in TOP_DEFAULTS.items():
        cfg.setdefault(k, v)
    entry = _stage_entry(cfg.get("stage", {"type": "pack"}))
    sources = cfg.get("sources")
    if not isinstance(sources, list) or not sources:
        raise ConfigError("sources: expected a non-empty list of {path, ...}")
    out_sources = []
    # stages that read their own sources (entry.documents False) check them in entry.validate
    for i, s in enumerate(sources if entry is None or entry.documents else []):
        where = f"sources[{i}]"
        if isinstance(s, str):
            s = {"path": s}
        if not isinstance(s, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(s).__name__}")
        s = dict(s)
        unknown = set(s) - SOURCE_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(SOURCE_KEYS)})")
        if "path" not in s:
            raise ConfigError(f"{where}.path: missing")
        paths = s["path"] if isinstance(s["path"], list) else [s["path"]]
        if base_dir is not None and not s.get("streaming"):
            paths = [
                p if os.path.isabs(os.fspath(p)) else os.path.join(base_dir, os.fspath(p)) for p in paths
            ]
        s["path"] = [os.fspath(p) for p in paths]
        fmt = s.get("format") or guess_format(s["path"][0])
        from seqpack.sources.read import READER_MODULES, READERS

        if fmt not in FORMATS and fmt not in READERS and fmt not in READER_MODULES:
            raise ConfigError(f"{where}.format: {fmt!r} is not one of {FORMATS}")
        s["format"] = fmt
        w = s.get("weight", 1.0)
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not w > 0:
            raise ConfigError(f"{where}.weight: expected a number > 0, got {w!r}")
        s["weight"] = float(w)
        s.setdefault("name", f"source{i}")
        s.setdefault("on_error", cfg["on_error"])
        if s["on_error"] not in ("raise", "skip"):
            raise ConfigError(f"{where}.on_error: expected 'raise' or 'skip', got {s['on_error']!r}")
        out_sources.append(s)
    names = [s["name"] for s in out_sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"sources: names must be unique, got {names}")
    if entry is None or entry.documents:
        cfg["sources"] = out_sources
        _resolve_chat_templates(cfg)

    stage = cfg.get("stage", {"type": "pack"})
    if not isinstance(stage, Mapping) or "type" not in stage:
        raise ConfigError("stage: expected a mapping with a 'type' (e.g. {type: pack, capacity: 8192})")
    stage = dict(stage)
    cfg["stage"] = stage

    sh = cfg.get("shuffle")
    if sh not in (None, False):
        if sh is True:
            sh = {}
        if not isinstance(sh, Mapping):
            raise ConfigError(f"shuffle: expected a mapping {{seed, buffer, shards}}, got {sh!r}")
        unknown = set(sh) - {"seed", "buffer", "shards"}
        if unknown:
            raise ConfigError(f"shuffle: unknown keys {sorted(unknown)}")
        sh = {
            "seed": int(sh.get("seed", cfg["seed"])),
            "buffer": int(sh.get("buffer", 1000)),
            "shards": bool(sh.get("shards", True)),
        }
        if sh["buffer"] < 0:
            raise ConfigError(f"shuffle.buffer: expected >= 0, got {sh['buffer']}")
    else:
        sh = None
    cfg["shuffle"] = sh
    if cfg["mix_by"] not in ("tokens", "documents"):
        raise ConfigError(f"mix_by: expected 'tokens' or 'documents', got {cfg['mix_by']!r}")
    if cfg["even_batches"] not in ("auto", "allreduce", "precount", "none"):
        raise ConfigError(f"even_batches: expected auto/allreduce/precount/none, got {cfg['even_batches']!r}")
    if entry is not None and entry.validate is not None:
        try:
            cfg = entry.validate(cfg, base_dir)
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from e
    return cfg


def _resolve_chat_templates(cfg: dict) -> None:
    """``chat_template`` of chat sources: a Jinja string, ``"plain"`` (built-in), or unset /
    ``"tokenizer"``: the template saved with a local tokenizer, else plain."""
    template, template_vars = None, None
    for i, s in enumerate(cfg["sources"]):
        if s.get("messages_key") and s.get("chat_template") in (None, "tokenizer"):
            if template_vars is None:
                from seqpack.sources.chat import tokenizer_chat_template
                from seqpack.sources.tokenize import TokenizerSpec

                try:
                    name = TokenizerSpec.parse(cfg["tokenizer"]).name
                except (TypeError, ValueError) as e:
                    raise ConfigError(f"tokenizer: {e}") from e
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


def _stage_entry(stage: Any):
    """The loader's registry entry for ``stage.type`` when it is a registered (or lazily known) stage."""
    if not isinstance(stage, Mapping) or stage.get("type") is None:
        return None
    from seqpack.stages import stage_entry

    return stage_entry(stage["type"])
