"""Lazy re-exports for package ``__init__`` modules (PEP 562).

A package lists which of its modules defines each public name; ``package.X`` imports only the module
that defines ``X``, on first access. So ``import seqpack`` and ``seqpack --help`` import no torch or
numba, and ``seqpack.pack`` imports the planner alone.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, sources: Mapping[str, tuple[str, ...]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``sources`` maps a module to the names it defines.

    A name is imported on first access and then stored in the package's namespace, so later accesses
    are plain attribute lookups. Unknown names raise ``AttributeError`` as usual.
    """
    module_of = {name: module for module, names in sources.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = module_of.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)  # later accesses skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(module_of))

    return __getattr__, __dir__


def import_pyplot() -> Any:
    """``matplotlib.pyplot`` with the file-only Agg backend; a clear error when the ``plot`` extra is missing.

    matplotlib is optional (``pip install 'seqpack[plot]'``) and heavy, so it is imported only when a
    plot is drawn.
    """
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError as e:
        raise ImportError(
            "plotting needs matplotlib, which seqpack installs only with its 'plot' extra: "
            "pip install 'seqpack[plot]'"
        ) from e
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")
