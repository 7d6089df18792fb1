"""Plot a curriculum config: simulated bucket draws and the max-length schedule over training.

``seqpack curriculum plot CONFIG --steps N -o out.png`` (:func:`add_subcommand`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from seqpack.curriculum.odds import BucketCurriculum, BucketSampler
from seqpack.lazy import import_pyplot

if TYPE_CHECKING:  # the config module imports the numba planners; `seqpack --help` must not
    from seqpack.curriculum.config import CurriculumConfig


def simulate_bucket_draws(cfg: CurriculumConfig, steps: int) -> tuple[list[int], np.ndarray]:
    """Bucket draws over ``steps`` for a corpus with equal token mass per bucket (for plotting).

    Returns ``(bucket_log2s, drawn [steps])`` (-1 once the simulated epoch is used up).
    """
    if cfg.decompose is not None:
        log2s = list(range(cfg.decompose.min_log2, cfg.decompose.max_log2 + 1))
    elif cfg.boundaries is not None:
        log2s = list(cfg.boundaries)
    else:
        raise ValueError("curriculum: plotting bucket odds needs 'decompose' or 'boundaries'")
    n = len(log2s)
    batches = np.full(n, steps // n, np.int64)
    batches[: steps - batches.sum()] += 1
    sampler = BucketSampler(batches, cfg.buckets or BucketCurriculum(progress=cfg.progress), seed=cfg.seed)
    tps = cfg.tokens_per_step or 1
    drawn = np.full(steps, -1, np.int64)
    for s in range(steps):
        i = sampler.next(s if cfg.progress == "steps" else s * tps)
        if i is None:
            break
        drawn[s] = i
    return log2s, drawn


def plot_curriculum(cfg: CurriculumConfig, steps: int, out: str | os.PathLike) -> Path:
    """Draw bucket odds (rolling draw frequency) and/or the max length over ``steps`` into a PNG."""
    plt = import_pyplot()  # the optional 'plot' extra; a clear ImportError without it
    panels = []
    if cfg.buckets is not None or cfg.decompose is not None:
        panels.append("buckets")
    if cfg.seqlen is not None:
        panels.append("seqlen")
    if not panels:
        raise ValueError("curriculum: nothing to plot (no 'buckets'/'decompose' and no 'seqlen')")
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 3.2 * len(panels)), squeeze=False)
    x = np.arange(steps)
    for ax, panel in zip(axes[:, 0], panels):
        if panel == "buckets":
            log2s, drawn = simulate_bucket_draws(cfg, steps)
            window = max(1, steps // 50)
            kernel = np.ones(window) / window
            freqs = [np.convolve((drawn == i).astype(float), kernel, mode="same") for i in range(len(log2s))]
            label = (lambda v: f"D{v} (2^{v})") if cfg.decompose is not None else (lambda v: f"<= {v}")
            ax.stackplot(x, freqs, labels=[label(v) for v in log2s])
            ax.set_ylabel(f"bucket share\n(rolling {window} steps)")
            ax.set_ylim(0, 1)
            cyc = cfg.buckets.n_cycles if cfg.buckets else 1
            odds = cfg.buckets.odds if cfg.buckets else "uniform"
            ax.set_title(f"bucket draws: odds={odds}, n_cycles={cyc} (equal token mass per bucket)")
            ax.legend(loc="upper right", fontsize=7, ncol=2)
        else:
            t = x if cfg.progress == "steps" else x * (cfg.tokens_per_step or 1)
            ax.plot(x, [cfg.seqlen(v) for v in t])
            ax.set_ylabel("max sequence length")
            ax.set_title(f"max length: {cfg.seqlen.schedule_type}")
        ax.set_xlabel("optimizer step")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _cmd_plot(args) -> int:
    # the config module imports the numba planners: only when the command runs, so `--help` stays fast
    from seqpack.curriculum.config import load_curriculum_config

    cfg = load_curriculum_config(args.config)
    path = plot_curriculum(cfg, args.steps, args.output)
    print(f"wrote {path}")
    return 0


def add_subcommand(subparsers) -> None:
    """``seqpack curriculum plot CONFIG --steps N -o out.png``."""
    p = subparsers.add_parser("curriculum", help="length curricula: plot a config's schedules")
    sub = p.add_subparsers(dest="curriculum_command", required=True)
    plot = sub.add_parser("plot", help="draw bucket odds / max length over training")
    plot.add_argument("config", help="loader config (.yaml/.yml/.toml/.json) with a curriculum: section")
    plot.add_argument("--steps", type=int, required=True, help="optimizer steps to draw")
    plot.add_argument("-o", "--output", default="curriculum.png", help="PNG path")
    plot.set_defaults(func=_cmd_plot)
