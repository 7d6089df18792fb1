"""PackMIL vs batch size 1 (the common MIL practice): ABMIL on CPU, time per epoch and accuracy.

Synthetic task (label depends on a few instances; ``seqpack.sources.synthetic_bags``, shared with
``examples/wsi_packmil.py``). Each slide is a bag of ``N`` patch features,
``D = 64``, background instances ``~ N(0, I)``. Three classes: class 0 bags hold only background;
class ``c`` in {1, 2} bags also hold ``max(8, round(0.02 N))`` *key* instances shifted by ``+2.5``
along a class-specific random unit direction. Classes are balanced. Features are stored float16,
as feature extractors usually write them.

Bag sizes ("PANDA-like long tail", an assumption, not measured on PANDA): ``N ~ lognormal`` with
median 1,500 patches and sigma 1.2 (natural log), rounded and clipped to ``[200, 200_000]`` -- most
biopsies are a few hundred to a few thousand 256-px patches at 20x, with a long tail of large slides.

Training, same model (ABMIL, gated attention, hidden 128), optimizer (AdamW), epochs and thread
count for every method; the learning rate is 1e-3 for ``bs1`` and 3e-3 for the packed runs (a step
holds ~10 slides; both picked from {1e-3, 3e-3, 1e-2} on a 300-slide run):
  - ``bs1``: every slide whole, one optimizer step per slide;
  - ``packmil``: seqpack ``PackMIL`` with the PANDA configuration of the paper (``pack_len`` 600,
    ``main_fraction`` 0.4, cap 600 per branch, next-fit), 8 packs per step, residual hyperslides
    with soft labels, loss ``L_main + 0.2 L_res``;
  - ``packmil-nores``: the same without the residual branch (ablation).
Accuracy is measured on a held-out 20% with whole bags (inference needs no packing); besides final
and best, the table gives the mean of the last 4 epochs (single epochs of 120 test slides move by
several points). Epoch time includes building batches (sampling, packing, copying features). The
methods take turns epoch by epoch so that other load on a shared machine affects them alike; the
load average before and after the run is recorded, because the ratio moves with it (per-step
overheads of batch size 1 suffer more from contention).

Where the speed-up comes from: PackMIL caps each branch at ``pack_len * r`` = 600 features per bag
(the paper's PANDA setting), so an epoch processes fewer features (``features/epoch``; their ratio
to bs1 bounds the speed-up of a compute-bound model on CPU) and in larger, fewer steps.

Prints a markdown table and writes ``benchmarks/results/mil{,_quick}.{md,json}``.

    python benchmarks/mil.py --quick     # 120 slides, 2 epochs (smoke test)
    python benchmarks/mil.py             # 600 slides, 12 epochs (a few minutes on one core)
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F
from report import markdown_table, result_stem, write_results
from seqpack.ops.mil import ABMIL

from seqpack.sources.features import InMemoryBags, LabelTable
from seqpack.sources.synthetic_bags import synthetic_feature_bags
from seqpack.stages.mil import PackMIL

D = 64
N_CLASSES = 3
LOGNORMAL_MEDIAN, LOGNORMAL_SIGMA, N_MIN, N_MAX = 1500, 1.2, 200, 200_000
KEY_FRACTION, KEY_MIN, KEY_SHIFT = 0.02, 8, 2.5


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


def train_bs1(train_bags, train_labels, test_bags, test_labels, lr, seed):
    """Batch size 1: yields ``(epoch seconds, test accuracy, steps, features)`` per epoch."""
    model = make_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    while True:
        t0, steps = time.perf_counter(), 0
        for i in rng.permutation(len(train_bags)).tolist():
            x = torch.from_numpy(train_bags[i]).float()
            loss = F.cross_entropy(model.forward_bag(x)[None], torch.tensor([train_labels[i]]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        seconds = time.perf_counter() - t0
        yield seconds, accuracy(model, test_bags, test_labels), steps, int(sum(map(len, train_bags)))


def train_packed(train_bags, train_labels, test_bags, test_labels, lr, seed, residual, aux_alpha=0.2):
    """PackMIL: yields ``(epoch seconds, test accuracy, steps, features)`` per epoch."""
    ids = [f"s{i}" for i in range(len(train_bags))]
    source = InMemoryBags(train_bags, ids)
    table = LabelTable(ids, np.asarray(train_labels), [str(c) for c in range(N_CLASSES)], False)
    stage = PackMIL(
        source,
        table,
        pack_len=600,
        packs_per_batch=8,
        main_fraction=0.4,
        residual=residual,
        algorithm="greedy",
        seed=seed,
        num_epochs=None,
        pad=False,
    )
    model = make_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
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
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        seconds = time.perf_counter() - t0
        feats = stage.stats["main_features"] + stage.stats["residual_features"] - before
        yield seconds, accuracy(model, test_bags, test_labels), steps, feats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="120 slides, 2 epochs")
    ap.add_argument("--slides", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (same for all methods)")
    ap.add_argument("--lr", type=float, default=1e-3, help="bs1 learning rate")
    ap.add_argument("--lr-packed", type=float, default=3e-3, help="packed learning rate")
    ap.add_argument("--target", type=float, default=0.85, help="accuracy for the time-to-target column")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n_slides = args.slides or (120 if args.quick else 600)
    epochs = args.epochs or (2 if args.quick else 12)
    torch.set_num_threads(args.threads)

    load_before = os.getloadavg()
    bags, labels, sizes = synthetic_slides(n_slides, args.seed)
    n_train = int(0.8 * n_slides)
    tr_b, tr_y, te_b, te_y = bags[:n_train], labels[:n_train], bags[n_train:], labels[n_train:]
    print(
        f"{n_slides} slides, N: median {int(np.median(sizes))}, mean {sizes.mean():.0f}, "
        f"p90 {int(np.percentile(sizes, 90))}, max {sizes.max()}; D={D}; {args.threads} thread(s)"
    )
    trainers = {
        "bs1": train_bs1(tr_b, tr_y, te_b, te_y, args.lr, args.seed),
        "packmil": train_packed(tr_b, tr_y, te_b, te_y, args.lr_packed, args.seed, residual=True),
        "packmil-nores": train_packed(tr_b, tr_y, te_b, te_y, args.lr_packed, args.seed, residual=False),
    }
    runs = {k: {"epoch_s": [], "acc": [], "steps": 0, "features_per_epoch": 0} for k in trainers}
    # methods take turns epoch by epoch, so a change in machine load hits all of them alike
    for epoch in range(epochs):
        for name, gen in trainers.items():
            seconds, acc, steps, feats = next(gen)
            r = runs[name]
            r["epoch_s"].append(seconds)
            r["acc"].append(acc)
            r["steps"] += steps
            r["features_per_epoch"] = feats
            print(f"epoch {epoch + 1} {name}: {seconds:.2f}s, acc {acc:.3f}", flush=True)
    load_after = os.getloadavg()
    base = float(np.mean(runs["bs1"]["epoch_s"]))
    base_feats = runs["bs1"]["features_per_epoch"]
    rows = []
    for name, r in runs.items():
        mean_s = float(np.mean(r["epoch_s"]))
        hit = [i for i, a in enumerate(r["acc"]) if a >= args.target]
        to_target = float(np.sum(r["epoch_s"][: hit[0] + 1])) if hit else None
        rows.append(
            {
                "method": name,
                "epoch_s": mean_s,
                "speedup_vs_bs1": base / mean_s,
                "steps_per_epoch": r["steps"] // epochs,
                "features_per_epoch": r["features_per_epoch"],
                "feature_ratio_vs_bs1": base_feats / r["features_per_epoch"],
                "final_acc": r["acc"][-1],
                "mean_acc_last4": float(np.mean(r["acc"][-4:])),
                "best_acc": max(r["acc"]),
                "epochs_to_target": hit[0] + 1 if hit else None,
                "s_to_target": to_target,
                "acc_per_epoch": r["acc"],
            }
        )
    columns = [
        "method", "s/epoch", "speedup vs bs1", "steps/epoch", "features/epoch (bs1 / this)", "final acc",
        "mean acc last 4", "best acc", f"epochs to {args.target}", f"s to {args.target}",
    ]  # fmt: skip
    table = markdown_table(
        columns,
        (
            [
                r["method"],
                f"{r['epoch_s']:.2f}",
                f"{r['speedup_vs_bs1']:.2f}x",
                r["steps_per_epoch"],
                f"{r['features_per_epoch']:,} ({r['feature_ratio_vs_bs1']:.2f}x)",
                f"{r['final_acc']:.3f}",
                f"{r['mean_acc_last4']:.3f}",
                f"{r['best_acc']:.3f}",
                r["epochs_to_target"] or "-",
                f"{r['s_to_target']:.1f}" if r["s_to_target"] is not None else "not reached",
            ]
            for r in rows
        ),
    ) + (
        f"\nload average (1/5/15 min) before {tuple(round(x, 2) for x in load_before)}, "
        f"after {tuple(round(x, 2) for x in load_after)} on {os.cpu_count()} cores"
    )
    print(table)
    for r in rows:
        print(f"{r['method']}: accuracy per epoch {[round(a, 3) for a in r['acc_per_epoch']]}")
    out = {
        "config": {
            "slides": n_slides,
            "epochs": epochs,
            "threads": args.threads,
            "lr": args.lr,
            "lr_packed": args.lr_packed,
            "seed": args.seed,
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
                "pack_len": 600,
                "packs_per_batch": 8,
                "main_fraction": 0.4,
                "max_instances": 600,
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
    written = write_results(result_stem("mil", args.quick), table + "\n", out, indent=2)
    print(f"wrote {written}.{{json,md}}")


if __name__ == "__main__":
    main()
