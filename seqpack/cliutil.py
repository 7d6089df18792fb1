"""The argparse parser class of ``seqpack`` subcommands: a mistyped flag is answered with the
subcommand's own usage and the closest option names (plain argparse hands unknown options up to the
top-level parser, which prints ``usage: seqpack ...`` with no hint).

Imports only the standard library, so ``seqpack --help`` stays light.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence


class SubcommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that refuses unknown arguments itself, suggesting close option names."""

    def parse_known_args(self, args: Sequence[str] | None = None, namespace=None):
        ns, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(self.unknown_message(extras))
        return ns, extras

    def option_names(self) -> list[str]:
        """Every option string of this parser (``--seq-len``, ``-o``, ...)."""
        return [s for a in self._actions for s in a.option_strings]

    def unknown_message(self, extras: Sequence[str]) -> str:
        """``unrecognized arguments: X (did you mean --y?)`` for each unknown flag that has a close match."""
        names = self.option_names()
        parts = []
        for arg in extras:
            flag = arg.split("=", 1)[0]
            close = difflib.get_close_matches(flag, names, n=3, cutoff=0.6) if flag.startswith("-") else []
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            parts.append(f"{arg}{hint}")
        return "unrecognized arguments: " + " ".join(parts)
