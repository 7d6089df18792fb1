"""The ``seqpack preprocess`` command: options -> :func:`build_config` -> :func:`preprocess` -> a summary.

``--seq-len`` (alias ``--capacity``) sets the config's ``capacity``, the tokens of one row.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from seqpack.checks import ConfigError, check_int
from seqpack.sources.urls import absolute, is_url, join

# Copies of the choices `--help` shows, so that building the parser imports no torch or numba (the
# command imports seqpack.preprocess when it runs); tests/test_startup.py checks each equals its source.
STRATEGIES = ("pack", "decompose", "none")  # seqpack.preprocess.config.STRATEGIES
PACK_ALGORITHMS = ("bfd", "ffd", "greedy", "online")  # seqpack.preprocess.config.PACK_ALGORITHMS
OVERFLOW = ("split", "truncate", "drop", "error")  # seqpack.preprocess.config.OVERFLOW
ENGINES = ("local", "ray")  # seqpack.preprocess.executors.ENGINES
SHARD_FORMATS = ("parquet", "wds")  # seqpack.shards.SHARD_FORMATS
MANIFEST = "manifest.json"  # seqpack.shards.MANIFEST

FIELD_KEYS = ("text_key", "messages_key", "input_ids_key")
# CLI options that are preprocess config options of the same name
CONFIG_OPTIONS = (
    "capacity",
    "strategy",
    "algorithm",
    "overflow",
    "format",
    "tasks",
    "rows_per_shard",
    "seed",
    "min_log2",
    "window_tokens",
)


def positive_int(text: str) -> int:
    """argparse type: a positive integer."""
    try:
        return check_int(int(text), "value", minimum=1)
    except (ValueError, ConfigError):
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser(
        "preprocess",
        help="tokenize, plan and write training shards with a manifest",
        description="Read INPUT files (jsonl[.zst|.gz], parquet, arrow, webdataset tars, text, HF dataset "
        "dirs, earlier preprocess outputs), tokenize, plan rows and write shards plus manifest.json "
        "into --output. Options left unset come from --config (a loader config; a 'preprocess:' section "
        "may set any option), else defaults.",
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="input files, globs or directories")
    p.add_argument(
        "--output", "-o", required=True, help="output directory, or a URL (s3://bucket/prefix, gs://...)"
    )
    p.add_argument("--config", help="YAML/TOML/JSON config (sources, tokenizer, preprocess: {...})")
    p.add_argument(
        "--tokenizer",
        help="'byte' (default), a tokenizer.json path, or a Hub name (read from the local Hugging Face "
        "cache without the network when it is there)",
    )
    p.add_argument(
        "--eos-token",
        metavar="TOKEN",
        help="the EOS token appended to each document (for tokenizers without a known one; must be in "
        "the vocabulary)",
    )
    p.add_argument(
        "--seq-len",
        "--capacity",
        dest="capacity",
        type=positive_int,
        metavar="N",
        help="tokens per row: sets the config's 'capacity' (default 2048, at least 16)",
    )
    p.add_argument("--strategy", choices=STRATEGIES, help="pack (default), decompose or none")
    p.add_argument("--algorithm", choices=PACK_ALGORITHMS, help="packing algorithm (default bfd)")
    p.add_argument("--overflow", choices=OVERFLOW, help="default split")
    p.add_argument("--format", choices=SHARD_FORMATS, help="parquet (default) or wds tars")
    p.add_argument("--tasks", type=positive_int, help="input parts (default max(4, input files))")
    p.add_argument("--rows-per-shard", type=positive_int, help="rows per shard (default 4096)")
    p.add_argument(
        "--window-tokens",
        type=positive_int,
        help="tokens a task plans and writes at a time (memory bound, resume unit; default 2^24)",
    )
    p.add_argument("--seed", type=int, help="planning seed (default 0)")
    p.add_argument("--min-log2", type=int, help="decompose: smallest bucket exponent (default 6)")
    p.add_argument("--text-key", help="field holding the text (default 'text')")
    p.add_argument("--messages-key", help="field holding chat messages (assistant turns get loss)")
    p.add_argument("--input-ids-key", help="field holding pre-tokenized ids")
    p.add_argument("--on-error", choices=("raise", "skip"), help="bad records: raise (default) or skip+count")
    p.add_argument("--workers", type=positive_int, default=1, help="parallel tasks (default 1)")
    p.add_argument("--engine", choices=ENGINES, default="local", help="local processes (default) or ray")
    p.add_argument("--overwrite", action="store_true", help="replace another run's output in --output")
    p.add_argument(
        "--only-task",
        type=int,
        action="append",
        metavar="K",
        help="run only task K (repeatable; e.g. one per Slurm array job) and skip the manifest; "
        "a final run without it merges",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar, summary only")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    # reason: the job's modules (torch, numba, shards) load only when it runs, so `--help` stays fast
    from seqpack.preprocess import build_config, load_config_file, output, preprocess

    try:
        file_cfg = load_config_file(args.config) if args.config else None
        cfg = build_config(
            args.inputs,
            config_file=file_cfg,
            tokenizer=args.tokenizer,
            fields={k: getattr(args, k) for k in FIELD_KEYS if getattr(args, k)},
            on_error=args.on_error,
            eos_token=args.eos_token,
            **{k: getattr(args, k) for k in CONFIG_OPTIONS},
        )
        if args.only_task is None and not is_url(args.output):  # a URL's output is checked once pulled
            state, message = output.existing_run(os.path.abspath(args.output), cfg)
            if state == "complete":
                print(message)
                return 0
            if state == "different" and not args.overwrite:
                print(f"seqpack preprocess: error: {message}", file=sys.stderr)
                return 2
        t0 = time.perf_counter()
        man = preprocess(
            cfg,
            args.output,
            workers=args.workers,
            engine=args.engine,
            overwrite=args.overwrite,
            progress=not args.quiet,
            only_tasks=args.only_task,
        )
    except (OSError, ValueError) as e:  # PreprocessError and bad input name file/record/field; disk errors
        print(f"seqpack preprocess: error: {e}", file=sys.stderr)
        return 2
    if man is None:
        print(
            f"tasks {sorted(set(args.only_task))} of {cfg.tasks} done in {args.output}; "
            "rerun without --only-task to finish and write the manifest"
        )
        return 0
    t = man["totals"]
    dt = time.perf_counter() - t0
    print(
        f"{t['documents']:,} documents, {t['tokens_in']:,} tokens in -> {t['rows']:,} rows in {t['shards']} "
        f"shards, {t['tokens_out']:,} tokens out (fill {t['fill']:.2%}; dropped {t['dropped_tokens']:,}, "
        f"truncated {t['truncated_tokens']:,}; skipped files {t.get('skipped_files', 0):,}, records "
        f"{t['skipped_records']:,}) in {dt:.1f} s -> {join(absolute(args.output), MANIFEST)}"
    )
    if t.get("skipped_files", 0) or t["skipped_records"]:
        print(
            f"seqpack preprocess: warning: skipped {t.get('skipped_files', 0):,} unreadable files (or their "
            f"unread rest) and {t['skipped_records']:,} bad records under --on-error skip; rerun with "
            "--on-error raise to see the first problem",
            file=sys.stderr,
        )
    return 0
