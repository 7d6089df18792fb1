"""PackMIL vs batch size 1 (the common MIL practice): ABMIL on CPU, time per epoch and accuracy.

Synthetic task (label depends on a few instances; ``seqpack.mil.synthetic``, shared with
``examples/wsi_packmil.py``). Each slide is a bag of ``N`` patch features,
``D = 64``, background instances ``~ N(0, I)``. Three classes: class 0 bags hold only background;
class ``c`` in {1, 2} bags also hold ``max(8, round(0.02 N))`` *key* instances shifted by ``+2.5``
along a class-specific random unit direction. Classes are balanced. Features are stored float16,
as feature extractors usually write them.

Bag sizes ("PANDA-like long tail", an assumption, not measured on PANDA): ``N ~ lognormal`` with
median 1,500 patches and sigma 1.2 (natural log), rounded and clipped to ``[200, 200_000]`` -- most
biopsies are a few hundred to a few thousand 256-px patches at 20x, with a long tail of large slides.

Methods (same model: ABMIL, gated attention, hidden 128; AdamW with cosine decay to 0 per step; same
epochs and thread count):
  - ``bs1``: every slide whole, one optimizer step per slide;
  - ``packmil``: seqpack ``PackMIL`` with the PANDA configuration of the paper (``capacity`` 600,
    ``main_fraction`` 0.4, cap 600 features per branch and bag, next-fit), 8 packs per step,
    residual hyperslides with soft labels, loss ``L_main + 0.2 L_res``;
  - ``packmil-nores``: the same without the residual branch (ablation);
  - ``packmil-cap400``, ``packmil-cap300``: with the residual branch, ``max_instances`` 400 / 300
    per branch and bag: the sampling knob that trades features per epoch for speed.
Each method's peak learning rate is picked by ``--tune`` from a grid (``LR_GRID``) on validation
slides of the same cohort, held out from both training and test (``results/mil_tune.md``).

Accuracy is measured on held-out slides (480 by default) with whole bags (inference needs no
packing), per seed as the mean of the last 3 epochs, then mean +- std over 3 seeds (model init,
sampling and order; the data stay fixed); "vs bs1" is the paired difference per seed. Epoch time
includes building batches (sampling, packing, copying features). Methods take turns epoch by epoch
so that other load on a shared machine affects them alike; the load average before and after the
run is recorded.

Where the speed-up comes from on CPU: ABMIL is matrix-multiply bound here (~94 GFLOP/s in the
GEMMs of a packed step on one core), so an epoch costs about its feature count: the cap per branch
sets how many features an epoch processes (``features/epoch``; its ratio to bs1 bounds the
speed-up), and larger, fewer steps add ~10%. The residual branch doubles the features of large
bags, so the paper's exact PANDA setting (cap 600 + residual) is ~3.5x per epoch on CPU; a cap of
300-400 with the residual, or cap 600 without it, is 4.6-7x at accuracy at least equal to bs1's
(``results/mil.md``; random subsets per epoch also regularize). On a GPU, where batch size 1 is
bound by launches rather than arithmetic, batching itself is the larger gain. Overlapping batch
building with a DataLoader worker process did not pay on this 2-core machine (the transfer cost
more than the 0.13 s/epoch of building it hides), so both methods build in the training process.

Prints markdown tables and writes ``benchmarks/results/mil{,_quick}.{md,json,png}`` (``--tune``:
``mil_tune{,_quick}``).

    python benchmarks/mil.py --quick     # 120 + 60 slides, 2 epochs, 1 seed (smoke test)
    python benchmarks/mil.py --tune      # learning rate per method on validation slides
    python benchmarks/mil.py             # 480 + 480 slides, 12 epochs, 3 seeds (~10 min, one core)
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from report import markdown_table, result_stem, write_results
from seqpack.ops.mil import ABMIL

from seqpack.mil import InMemoryBags, LabelTable, PackMIL, synthetic_feature_bags

D = 64
N_CLASSES = 3
LOGNORMAL_MEDIAN, LOGNORMAL_SIGMA, N_MIN, N_MAX = 1500, 1.2, 200, 200_000
KEY_FRACTION, KEY_MIN, KEY_SHIFT = 0.02, 8, 2.5
CAPACITY, PACKS_PER_BATCH, MAIN_FRACTION = 600, 8, 0.4  # the paper's PANDA setting


def synthetic_slides(n_slides: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Bags (float16 ``[N, D]``), labels ``[n]`` and bag sizes, as documented in the module docstring."""
    return synthetic_feature_bags(
        n_slides,
        dim=D,
        n_classes=N_CLASSES,
        median=LOGNORMAL_MEDIAN,
        sigma=LOGNORMAL_SIGMA,
        n_min=N_MIN,
        n_max=N_MAX,
        key_fraction=KEY_FRACTION,
        key_min=KEY_MIN,
        key_shift=KEY_SHIFT,
        seed=seed,
    )


def make_model(seed: int) -> ABMIL:
    torch.manual_seed(seed)
    return ABMIL(D, N_CLASSES, hidden=128, attn_dim=64)


@torch.no_grad()
def accuracy(model: ABMIL, bags: list[np.ndarray], labels: np.ndarray) -> float:
    model.eval()
    pred = [int(model.forward_bag(torch.from_numpy(b).float()).argmax()) for b in bags]
    model.train()
    return float(np.mean(np.array(pred) == labels))


def optimizer_step(model: ABMIL, lr: float, total_steps: int) -> Callable[[torch.Tensor], None]:
    """``update(loss)``: one AdamW step with cosine decay from ``lr`` to 0 over ``total_steps`` (the same
    optimizer and schedule for every method)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps))

    def update(loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()

    return update


def train_bs1(train_bags, train_labels, test_bags, test_labels, lr, seed, epochs):
    """Batch size 1: yields ``(epoch seconds, test accuracy, steps, features)`` per epoch."""
    model = make_model(seed)
    update = optimizer_step(model, lr, epochs * len(train_bags))
    rng = np.random.default_rng(seed)
    while True:
        t0, steps = time.perf_counter(), 0
        for i in rng.permutation(len(train_bags)).tolist():
            x = torch.from_numpy(train_bags[i]).float()
            loss = F.cross_entropy(model.forward_bag(x)[None], torch.tensor([train_labels[i]]))
            update(loss)
            steps += 1
        seconds = time.perf_counter() - t0
        yield seconds, accuracy(model, test_bags, test_labels), steps, int(sum(map(len, train_bags)))


def train_packed(
    train_bags, train_labels, test_bags, test_labels, lr, seed, epochs, *, residual, max_instances,
    aux_alpha=0.2,
):  # fmt: skip
    """PackMIL: yields ``(epoch seconds, test accuracy, steps, features)`` per epoch."""
    ids = [f"s{i}" for i in range(len(train_bags))]
    source = InMemoryBags(train_bags, ids)
    table = LabelTable(ids, np.asarray(train_labels), [str(c) for c in range(N_CLASSES)], False)
    stage = PackMIL(
        source,
        table,
        capacity=CAPACITY,
        packs_per_batch=PACKS_PER_BATCH,
        max_instances=max_instances,
        main_fraction=MAIN_FRACTION,
        residual=residual,
        algorithm="greedy",
        seed=seed,
        num_epochs=None,
        pad_to=None,
    )
    model = make_model(seed)
    update = optimizer_step(model, lr, epochs * stage.batches_per_epoch())
    batches = iter(stage)
    while True:
        t0, steps = time.perf_counter(), 0
        before = stage.stats["main_features"] + stage.stats["residual_features"]
        for _ in range(stage.batches_per_epoch()):  # the epoch's length is known before loading
            b = next(batches)
            loss = F.cross_entropy(model(b.features, b.bag_ids, b.n_bags), b.labels)
            if b.residual is not None and b.residual.n_bags:
                r = b.residual
                loss = loss + aux_alpha * F.cross_entropy(model(r.features, r.bag_ids, r.n_bags), r.labels)
            update(loss)
            steps += 1
        seconds = time.perf_counter() - t0
        feats = stage.stats["main_features"] + stage.stats["residual_features"] - before
        yield seconds, accuracy(model, test_bags, test_labels), steps, feats


# name -> PackMIL settings; None is batch size 1. ``max_instances`` caps each branch per bag and epoch.
METHODS: dict[str, dict | None] = {
    "bs1": None,
    "packmil": {"max_instances": 600, "residual": True},  # the paper's PANDA setting
    "packmil-nores": {"max_instances": 600, "residual": False},
    "packmil-cap400": {"max_instances": 400, "residual": True},
    "packmil-cap300": {"max_instances": 300, "residual": True},
}


# peak learning rates, chosen by ``--tune`` (results/mil_tune.md) on validation slides
LEARNING_RATES = {
    "bs1": 3e-3,
    "packmil": 3e-3,
    "packmil-nores": 3e-3,
    "packmil-cap400": 1e-3,
    "packmil-cap300": 3e-3,
}
LR_GRID = {"bs1": [3e-4, 1e-3, 3e-3, 1e-2], "packed": [1e-3, 3e-3, 1e-2]}


def trainer(name: str, lr: float, seed: int, epochs: int, train, evaluate):
    """The epoch generator of method ``name``: ``train``/``evaluate`` are ``(bags, labels)``."""
    if METHODS[name] is None:
        return train_bs1(*train, *evaluate, lr, seed, epochs)
    return train_packed(*train, *evaluate, lr, seed, epochs, **METHODS[name])


def tune(
    methods: list[str], epochs: int, last: int, train, validation, seed: int, quick: bool
) -> dict[str, float]:
    """Peak learning rate per method from ``LR_GRID``, scored on validation slides (disjoint from
    training and test: the held-out test slides never choose anything). Writes
    ``results/mil_tune.{md,json}`` and returns ``{method: best lr}``."""
    scores: dict[str, dict[float, float]] = {}
    for name in methods:
        scores[name] = {}
        for lr in LR_GRID["bs1" if METHODS[name] is None else "packed"]:
            gen = trainer(name, lr, seed, epochs, train, validation)
            acc = [next(gen)[1] for _ in range(epochs)]
            scores[name][lr] = float(np.mean(acc[-last:]))
            print(
                f"tune {name} lr {lr:g}: validation accuracy {scores[name][lr]:.3f}",
                [round(a, 3) for a in acc],
            )
    best = {name: max(s, key=s.get) for name, s in scores.items()}
    grid = sorted({lr for s in scores.values() for lr in s})
    table = markdown_table(
        ["method", *[f"lr {lr:g}" for lr in grid], "chosen"],
        (
            [
                name,
                *[f"{scores[name][lr]:.3f}" if lr in scores[name] else "-" for lr in grid],
                f"{best[name]:g}",
            ]
            for name in methods
        ),
    )
    table += (
        f"\nvalidation accuracy (mean of the last {last} of {epochs} epochs, seed {seed}) on "
        f"{len(validation[0])} validation slides (neither training nor test); AdamW with cosine decay\n"
    )
    print(table)
    write_results(
        result_stem("mil_tune", quick),
        table,
        {"scores": {k: {str(lr): a for lr, a in v.items()} for k, v in scores.items()}, "best": best},
        indent=2,
    )
    return best


def summarize(runs: dict, epochs: int, target: float, last: int) -> list[dict]:
    """One row per method: times and accuracies averaged over seeds (accuracy per seed = mean of the
    last ``last`` epochs), with the paired difference to ``bs1``."""
    base_s = float(np.mean([s for r in runs["bs1"] for s in r["epoch_s"]]))
    base_feats = runs["bs1"][0]["features_per_epoch"]
    base_final = np.array([np.mean(r["acc"][-last:]) for r in runs["bs1"]])
    rows = []
    for name, per_seed in runs.items():
        mean_s = float(np.mean([s for r in per_seed for s in r["epoch_s"]]))
        final = np.array([np.mean(r["acc"][-last:]) for r in per_seed])
        diff = final - base_final
        to_target = []
        for r in per_seed:
            hit = [i for i, a in enumerate(r["acc"]) if a >= target]
            to_target.append(float(np.sum(r["epoch_s"][: hit[0] + 1])) if hit else None)
        reached = [t for t in to_target if t is not None]
        rows.append(
            {
                "method": name,
                "settings": METHODS[name],
                "epoch_s": mean_s,
                "speedup_vs_bs1": base_s / mean_s,
                "steps_per_epoch": per_seed[0]["steps"] // epochs,
                "features_per_epoch": per_seed[0]["features_per_epoch"],
                "feature_ratio_vs_bs1": base_feats / per_seed[0]["features_per_epoch"],
                "final_acc_mean": float(final.mean()),
                "final_acc_std": float(final.std(ddof=1)) if len(final) > 1 else 0.0,
                "final_acc_per_seed": final.tolist(),
                "diff_vs_bs1_mean": float(diff.mean()),
                "diff_vs_bs1_std": float(diff.std(ddof=1)) if len(diff) > 1 else 0.0,
                "seeds_reaching_target": len(reached),
                "s_to_target_mean": float(np.mean(reached)) if reached else None,
                "acc_per_epoch": [r["acc"] for r in per_seed],
                "epoch_s_per_epoch": [r["epoch_s"] for r in per_seed],
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="120 + 60 slides, 2 epochs, one seed")
    ap.add_argument("--slides", type=int, default=None, help="training slides")
    ap.add_argument("--test-slides", type=int, default=None, help="held-out slides (whole bags)")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="model/sampling seeds (paired)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (same for all methods)")
    ap.add_argument(
        "--lr",
        nargs="+",
        default=[],
        metavar="METHOD=LR",
        help="override a peak learning rate of LEARNING_RATES",
    )
    ap.add_argument(
        "--tune", action="store_true", help="pick each method's learning rate on validation slides"
    )
    ap.add_argument("--val-slides", type=int, default=240, help="validation slides (used by --tune)")
    ap.add_argument("--target", type=float, default=0.85, help="accuracy for the time-to-target column")
    ap.add_argument("--last", type=int, default=3, help="epochs averaged for the final accuracy")
    ap.add_argument("--data-seed", type=int, default=0)
    args = ap.parse_args()
    n_train = args.slides or (120 if args.quick else 480)
    n_test = args.test_slides or (60 if args.quick else 480)
    epochs = args.epochs or (2 if args.quick else 12)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    methods = ["bs1", *[m for m in args.methods if m != "bs1"]]  # bs1 is the reference of every ratio
    last = min(args.last, epochs)
    torch.set_num_threads(args.threads)

    lrs = dict(LEARNING_RATES)
    for item in args.lr:
        name, _, value = item.partition("=")
        if name not in METHODS or not value:
            ap.error(f"--lr takes METHOD=LR with METHOD in {list(METHODS)}, got {item!r}")
        lrs[name] = float(value)

    load_before = os.getloadavg()
    # one cohort (the class directions are drawn with it): training, held-out test, then validation
    n_val = args.val_slides  # drawn in every run, so training and test slides match the tuning run's
    bags, labels, sizes = synthetic_slides(n_train + n_test + n_val, args.data_seed)
    tr_b, tr_y = bags[:n_train], labels[:n_train]
    te_b, te_y = bags[n_train : n_train + n_test], labels[n_train : n_train + n_test]
    if args.tune:
        val_b, val_y = bags[n_train + n_test :], labels[n_train + n_test :]
        tune(methods, epochs, last, (tr_b, tr_y), (val_b, val_y), seeds[0], args.quick)
        return
    print(
        f"{n_train} + {n_test} slides, N: median {int(np.median(sizes))}, mean {sizes.mean():.0f}, "
        f"p90 {int(np.percentile(sizes, 90))}, max {sizes.max()}; D={D}; {args.threads} thread(s); "
        f"seeds {seeds}"
    )
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in seeds:
        trainers = {}
        for name in methods:
            trainers[name] = trainer(name, lrs[name], seed, epochs, (tr_b, tr_y), (te_b, te_y))
            runs[name].append({"epoch_s": [], "acc": [], "steps": 0, "features_per_epoch": 0})
        # methods take turns epoch by epoch, so a change in machine load hits all of them alike
        for epoch in range(epochs):
            for name, gen in trainers.items():
                seconds, acc, steps, feats = next(gen)
                r = runs[name][-1]
                r["epoch_s"].append(seconds)
                r["acc"].append(acc)
                r["steps"] += steps
                r["features_per_epoch"] = feats
                print(f"seed {seed} epoch {epoch + 1} {name}: {seconds:.2f}s, acc {acc:.3f}", flush=True)
    load_after = os.getloadavg()
    rows = summarize(runs, epochs, args.target, last)
    pm = "\u00b1"
    columns = [
        "method", "cap/branch", "residual", "s/epoch", "speedup vs bs1", "steps/epoch",
        "features/epoch (bs1 / this)", f"acc (last {last} ep.)", "vs bs1 (paired)",
        f"s to {args.target} (seeds)",
    ]  # fmt: skip
    table = markdown_table(
        columns,
        (
            [
                r["method"],
                r["settings"]["max_instances"] if r["settings"] else "whole bag",
                ("yes" if r["settings"]["residual"] else "no") if r["settings"] else "-",
                f"{r['epoch_s']:.2f}",
                f"{r['speedup_vs_bs1']:.2f}x",
                r["steps_per_epoch"],
                f"{r['features_per_epoch']:,} ({r['feature_ratio_vs_bs1']:.2f}x)",
                f"{r['final_acc_mean']:.3f} {pm} {r['final_acc_std']:.3f}",
                "-"
                if r["method"] == "bs1"
                else f"{r['diff_vs_bs1_mean']:+.3f} {pm} {r['diff_vs_bs1_std']:.3f}",
                (
                    f"{r['s_to_target_mean']:.1f} ({r['seeds_reaching_target']}/{len(seeds)})"
                    if r["s_to_target_mean"] is not None
                    else f"not reached (0/{len(seeds)})"
                ),
            ]
            for r in rows
        ),
    ) + (
        f"\nmean {pm} std over seeds {seeds}; {n_train} training and {n_test} held-out slides, "
        f"{epochs} epochs; load average (1/5/15 min) before {tuple(round(x, 2) for x in load_before)}, "
        f"after {tuple(round(x, 2) for x in load_after)} on {os.cpu_count()} cores\n"
    )
    print(table)
    for r in rows:
        for seed, acc in zip(seeds, r["acc_per_epoch"]):
            print(f"{r['method']} seed {seed}: accuracy per epoch {[round(a, 3) for a in acc]}")
    out = {
        "config": {
            "train_slides": n_train,
            "test_slides": n_test,
            "epochs": epochs,
            "seeds": seeds,
            "threads": args.threads,
            "peak_lr": {m: lrs[m] for m in methods},
            "schedule": "AdamW, cosine decay to 0 per step",
            "final_acc": f"mean of the last {last} epochs",
            "data_seed": args.data_seed,
            "D": D,
            "classes": N_CLASSES,
            "bag_sizes": {
                "distribution": "lognormal",
                "median": LOGNORMAL_MEDIAN,
                "sigma": LOGNORMAL_SIGMA,
                "clip": [N_MIN, N_MAX],
                "observed_median": int(np.median(sizes)),
                "observed_mean": float(sizes.mean()),
                "observed_max": int(sizes.max()),
            },
            "task": {"key_fraction": KEY_FRACTION, "key_min": KEY_MIN, "key_shift": KEY_SHIFT},
            "packmil": {
                "capacity": CAPACITY,
                "packs_per_batch": PACKS_PER_BATCH,
                "main_fraction": MAIN_FRACTION,
                "aux_alpha": 0.2,
                "algorithm": "greedy",
            },
            "machine": platform.platform(),
            "cpu_count": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "torch": torch.__version__,
        },
        "rows": rows,
    }
    written = write_results(result_stem("mil", args.quick), table, out, indent=2)
    plot(rows, written.with_suffix(".png"))
    print(f"wrote {written}.{{json,md,png}}")


def plot(rows: list[dict], path) -> None:
    """Held-out accuracy against cumulative training seconds (mean over seeds), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in rows:
        seconds = np.cumsum(np.mean(np.array(r["epoch_s_per_epoch"]), axis=0))
        acc = np.mean(np.array(r["acc_per_epoch"]), axis=0)
        ax.plot(seconds, acc, marker="o", ms=3, label=f"{r['method']} ({r['speedup_vs_bs1']:.1f}x/epoch)")
    ax.set_xlabel("training seconds (cumulative epoch time, mean over seeds)")
    ax.set_ylabel("held-out accuracy (whole bags)")
    ax.set_title("ABMIL on synthetic PANDA-like bags, CPU: PackMIL vs batch size 1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
