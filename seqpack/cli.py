"""The ``seqpack`` command. Each subcommand lives with the concept it serves and registers here."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys

import seqpack
from seqpack.cliutil import SubcommandParser

# modules with an ``add_subcommand(subparsers)``, imported by name so this table is the one place to add a
# command: `curriculum plot`, `preprocess`, `stats` and `inspect`
SUBCOMMAND_MODULES: list[str] = ["seqpack.curriculum.plot", "seqpack.preprocess.cli", "seqpack.shards.cli"]


def version() -> str:
    """The installed distribution's version; the package's ``__version__`` when run from a source tree."""
    try:
        return importlib.metadata.version("seqpack")
    except importlib.metadata.PackageNotFoundError:
        return seqpack.__version__


def build_parser() -> argparse.ArgumentParser:
    """The ``seqpack`` parser. Building it imports no torch or numba (each command imports its job when
    it runs), so ``seqpack --help`` and ``seqpack CMD --help`` answer in a fraction of a second."""
    parser = argparse.ArgumentParser(prog="seqpack", description=__doc__)
    parser.add_argument("--version", action="version", version=f"seqpack {version()}")
    # a mistyped flag gets the subcommand's usage and a suggestion, for every subcommand
    sub = parser.add_subparsers(dest="command", required=True, parser_class=SubcommandParser)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_subcommand(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
