"""``seqpack stats`` and ``seqpack inspect``: options -> :mod:`seqpack.shards.stats` -> printed.

This module imports only the standard library, so building the ``seqpack`` parser (``--help``) stays
fast; the commands import ``stats`` when they run. Both take a local output directory or its URL
(``s3://bucket/prefix``, any fsspec protocol; ``seqpack preprocess`` writes either).
"""

from __future__ import annotations

import argparse
import json
import sys


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser(
        "stats",
        help="counts, fill and length percentiles of a preprocess output",
        description="Summarize a `seqpack preprocess` output directory (or its URL: s3://, gs://, ...).",
    )
    p.add_argument("directory", metavar="DIR", help="the output directory, or its URL")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="OUT.png", help="write the document-length / row-fill plot here")
    p.add_argument("--verify", action="store_true", help="re-hash shards vs the manifest (exit 1 if bad)")
    p.set_defaults(func=_stats_cli)
    q = subparsers.add_parser(
        "inspect",
        help="show packed rows decoded with segment boundaries",
        description="Print the first rows of a `seqpack preprocess` output (a directory or its URL).",
    )
    q.add_argument("directory", metavar="DIR", help="the output directory, or its URL")
    q.add_argument("--n", type=int, default=3, help="rows to show (default 3)")
    q.add_argument("--verify", action="store_true", help="check the sha256 of each shard shown")
    q.set_defaults(func=_inspect_cli)


def _stats_cli(args: argparse.Namespace) -> int:
    # numpy, pyarrow and torch (via the shard format) load only when the command runs: `--help` stays fast
    from seqpack.shards import stats

    try:
        st = stats.shard_stats(args.directory)
        if args.plot:
            st["plot"] = stats.plot_stats(args.directory, args.plot)
        if args.verify:
            st["bad_shards"] = stats.verify_shards(args.directory)
    except stats.COMMAND_ERRORS as e:
        print(f"seqpack stats: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(st, sort_keys=True))
    else:
        print(stats.format_stats(st))
        if args.plot:
            print(f"  plot              {st['plot']}")
        if args.verify:
            bad = st["bad_shards"]
            print(
                f"  verified          {st['shards'] - len(bad)}/{st['shards']} shards match their sha256"
                + (f"; BAD: {bad}" if bad else "")
            )
    return 1 if args.verify and st["bad_shards"] else 0


def _inspect_cli(args: argparse.Namespace) -> int:
    if args.n < 0:
        print(f"seqpack inspect: error: --n must be >= 0, got {args.n}", file=sys.stderr)
        return 2
    # numpy, pyarrow and torch (via the shard format) load only when the command runs: `--help` stays fast
    from seqpack.shards import stats

    try:
        print(stats.inspect_rows(args.directory, args.n, verify=args.verify))
    except stats.COMMAND_ERRORS as e:
        print(f"seqpack inspect: error: {e}", file=sys.stderr)
        return 2
    return 0
