"""Config errors, the validation helpers that name the offending key, and the one config-file reader.

Every module that validates user input (loader config, stage sections, curriculum files, the
preprocess CLI) uses these helpers so that an error always reads ``<where>: <what is wrong>``, where
``<where>`` is the key path the user wrote (``stage.capacity``, ``sources[1].weight``).
Imports nothing of seqpack: every other module may import it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any


class ConfigError(ValueError):
    """Invalid config; the message names the key path (e.g. ``sources[1].weight``)."""


def choices(values: Sequence[Any]) -> str:
    """``'a', 'b' or 'c'`` for error messages."""
    quoted = [repr(v) for v in values]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def check_int(
    value: Any, where: str, minimum: int | None = None, maximum: int | None = None, allow_none: bool = False
) -> int | None:
    """``value`` as an int in ``[minimum, maximum]`` (bools, floats refused); ConfigError names ``where``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np  # numpy integers are ints to users

            ok = isinstance(value, np.integer)
        except ImportError:  # pragma: no cover - numpy is a requirement
            ok = False
        if not ok:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        value = int(value)
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where}: must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{where}: must be <= {maximum}, got {value}")
    return value


def check_float(
    value: Any,
    where: str,
    minimum: float | None = None,
    maximum: float | None = None,
    allow_none: bool = False,
) -> float | None:
    """``value`` as a float in ``[minimum, maximum]``; ConfigError names ``where``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    value = float(value)
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where}: must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{where}: must be <= {maximum}, got {value}")
    return value


def check_choice(value: Any, where: str, allowed: Sequence[Any]) -> Any:
    """``value`` if it is one of ``allowed``; ConfigError naming ``where`` and the choices otherwise."""
    if value not in allowed:
        raise ConfigError(f"{where}: must be {choices(allowed)}, got {value!r}")
    return value


def check_bool(value: Any, where: str) -> bool:
    """``value`` if it is a bool (YAML ``true``/``false``); ConfigError naming ``where`` otherwise."""
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    return value


def check_mapping(value: Any, where: str) -> Mapping:
    """``value`` if it is a mapping; ConfigError naming ``where`` otherwise."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def check_keys(cfg: Mapping, allowed: Sequence[str] | set[str], where: str) -> None:
    """Refuse keys outside ``allowed`` (typos would otherwise be ignored silently)."""
    unknown = sorted(set(cfg) - set(allowed))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (allowed: {', '.join(sorted(allowed))})")


def rename_keys(cfg: dict, renames: Mapping[str, str], where: str) -> dict:
    """Move deprecated keys to their new names in place, with a DeprecationWarning naming both.

    Old keys keep working for one release; giving both the old and the new key is an error.
    """
    for old, new in renames.items():
        if old not in cfg:
            continue
        prefix = f"{where}." if where else ""
        if new in cfg:
            raise ConfigError(f"{prefix}{old}: deprecated name of {prefix}{new}; give only {new!r}")
        warnings.warn(
            f"{prefix}{old} is deprecated and will be removed in the next release; use {prefix}{new}",
            DeprecationWarning,
            stacklevel=3,
        )
        cfg[new] = cfg.pop(old)
    return cfg


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a YAML (``.yaml``/``.yml``, the default), TOML (``.toml``) or JSON (``.json``) file to a dict.

    The one config-file reader: loader configs, curriculum files and preprocess configs all use it.
    A syntax error or a non-mapping top level raises ConfigError naming the file.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from e
    try:
        if path.endswith(".toml"):
            import tomllib

            raw = tomllib.loads(data.decode("utf-8"))
        elif path.endswith(".json"):
            import json

            raw = json.loads(data)
        else:
            import yaml

            raw = yaml.safe_load(data)
    except Exception as e:  # each parser has its own error type; all mean "not valid syntax"
        raise ConfigError(f"{path}: not a valid config file: {e}") from e
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: the config must be a mapping, got {type(raw).__name__}")
    return dict(raw)


def rename_kwargs(kwargs: Mapping[str, Any], renames: Mapping[str, str], where: str, **given: Any) -> dict:
    """Keyword arguments of the function ``where`` given under deprecated names (``renames``: old ->
    new) moved to their new names, with the DeprecationWarning of :func:`rename_keys`.

    ``kwargs`` is the function's ``**kwargs``: a name not in ``renames`` is a TypeError, as Python
    raises for an unknown keyword. ``given``: the new-name arguments the function received (None =
    not given), so that passing both names is an error. Returns ``given`` completed by the renamed ones.
    """
    unknown = sorted(set(kwargs) - set(renames))
    if unknown:
        raise TypeError(f"{where}() got an unexpected keyword argument {unknown[0]!r}")
    out = {k: v for k, v in given.items() if v is not None}
    out.update(kwargs)
    return {**given, **rename_keys(out, renames, where)}


def check_pad_to(value: Any, where: str, largest: int) -> int | None:
    """Tokens (or features) a batch's flat axis is padded to, from a ``pad_to`` value: None (no
    padding), ``"max"`` (``largest``, the most a batch of the stage can hold) or an int >= ``largest``
    (a smaller one could not fix the shape). ConfigError naming ``where`` otherwise."""
    if value is None:
        return None
    if value == "max":
        return largest
    if isinstance(value, str):
        raise ConfigError(f"{where}: expected null, 'max' or an integer, got {value!r}")
    return check_int(value, where, minimum=largest)
