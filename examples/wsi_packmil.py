"""Train ABMIL on whole-slide feature bags with PackMIL packing and the hyperslide residual.

Writes a synthetic cohort to disk the way feature extractors do (one ``.h5`` per slide with a
``features`` dataset, as CLAM writes them; ``.npy`` when h5py is missing) plus a ``labels.csv``,
then reads it back with seqpack's readers and trains. The task is the one of ``benchmarks/mil.py``
(``seqpack.mil.synthetic``: three classes told apart by ~2% key instances) with smaller
bags (median 300 patches); 25% of the slides are held out and scored with whole bags.

    source = read_feature_bags(feature_dir)                       # N and D from headers only
    labels = read_labels(feature_dir / "labels.csv")
    stage  = PackMIL(source, labels, capacity=..., main_fraction=0.4, ...)
    for batch in stage:                                           # MILBatch, .residual = hyperslides
        loss = CE(model(batch.features, batch.bag_ids, batch.n_bags), batch.labels)
             + 0.2 * CE(model(residual...), residual.labels)      # soft labels

With ``--downsample r`` the attention-driven downsampler (ADS) reduces each bag by ``r`` inside
the pack before pooling. Halfway through, the stage's ``state_dict`` is saved and a fresh stage
resumes from it, yielding exactly the batches the first one would have.

    python examples/wsi_packmil.py                 # 400 slides, 12 epochs: held-out accuracy ~0.86
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from seqpack.ops.mil import ABMIL, AttentionDownsampler, seq_idx_from_cu

from seqpack.mil import (
    FeatureFiles,
    MILBatch,
    PackMIL,
    read_feature_bags,
    read_labels,
    synthetic_feature_bags,
)

CLASSES = ("benign", "grade_a", "grade_b")


def write_cohort(root: Path, n_slides: int, dim: int, median: int, seed: int) -> None:
    """``n_slides`` feature files (``.h5``, or ``.npy`` without h5py) and ``labels.csv``."""
    bags, labels, _ = synthetic_feature_bags(
        n_slides, dim=dim, n_classes=len(CLASSES), median=median, n_min=50, n_max=50 * median, seed=seed
    )
    try:
        import h5py
    except ImportError:
        h5py = None
    rows = []
    for i, (x, y) in enumerate(zip(bags, labels.tolist())):
        sid = f"slide_{i:04d}"
        if h5py is not None:
            with h5py.File(root / f"{sid}.h5", "w") as f:
                f["features"] = x
        else:
            np.save(root / f"{sid}.npy", x)
        rows.append((sid, CLASSES[y]))
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("slide_id", "label"), *rows])


class PackedABMIL(torch.nn.Module):
    """Optional ADS (per bag, inside the pack) followed by ABMIL pooling and a classifier."""

    def __init__(self, dim: int, n_classes: int, downsample: int):
        super().__init__()
        self.ads = AttentionDownsampler(dim, downsample, attn_dim=64) if downsample > 1 else None
        self.mil = ABMIL(dim, n_classes, hidden=64, attn_dim=32)

    def forward(self, b: MILBatch) -> torch.Tensor:
        if self.ads is None:
            return self.mil(b.features, b.bag_ids, b.n_bags)
        x, cu = self.ads(b.features[: b.num_features], b.bag_cu_seqlens)
        return self.mil(x, seq_idx_from_cu(cu), b.n_bags)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slides", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--median", type=int, default=300, help="median bag size (patches)")
    ap.add_argument(
        "--capacity", "--pack-len", type=int, default=512, help="features per pack (after downsampling)"
    )
    ap.add_argument("--packs-per-batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--downsample", type=int, default=1, help="ADS factor r (1 = off)")
    ap.add_argument("--aux-alpha", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (a small model runs best on 1)")
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_cohort(root, args.slides, args.dim, args.median, args.seed)
        files = read_feature_bags(root).paths
        n_test = max(1, args.slides // 4)  # held out, scored with whole bags
        source, test = FeatureFiles(files[n_test:]), FeatureFiles(files[:n_test])
        labels = read_labels(root / "labels.csv", classes=CLASSES)
        print(
            f"{len(source)} training slides ({len(test)} held out), D={source.dim}, "
            f"N from {source.lengths.min()} to {source.lengths.max()}"
        )

        def make_stage() -> PackMIL:
            return PackMIL(
                source,
                labels,
                capacity=args.capacity,
                packs_per_batch=args.packs_per_batch,
                main_fraction=0.4,
                downsample=args.downsample,
                min_seq_len=32,
                seed=args.seed,
                num_epochs=args.epochs,
            )

        stage = make_stage()
        model = PackedABMIL(source.dim, labels.num_classes, args.downsample)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
        steps, t0, resumed_ok = 0, time.perf_counter(), None
        half = len(stage) * args.epochs // 2
        for batch in stage:
            loss = F.cross_entropy(model(batch), batch.labels)
            res = batch.residual
            if res is not None and res.n_bags:
                loss = loss + args.aux_alpha * F.cross_entropy(model(res), res.labels)
            opt.zero_grad(set_to_none=True)
            (loss * batch.loss_scale).backward()
            opt.step()
            steps += 1
            if steps == half:  # checkpoint, then check a fresh stage resumes at the same batch
                state = stage.state_dict()
                fresh = make_stage()
                fresh.load_state_dict(state)
                ahead = next(iter(fresh))
                resumed_ok = None
                pending = ahead
            elif steps == half + 1:
                resumed_ok = torch.equal(batch.features, pending.features) and torch.equal(
                    batch.slide_ids, pending.slide_ids
                )
        seconds = time.perf_counter() - t0

        model.eval()

        def accuracy(src) -> float:
            with torch.no_grad():  # inference: whole bags, no sampling, no packing
                pred = []
                for i in range(len(src)):
                    x = torch.from_numpy(src.load(i)).float()
                    if model.ads is not None:
                        x = model.ads.forward_bag(x, downsample=False)
                    pred.append(int(model.mil.forward_bag(x).argmax()))
            truth = [int(labels.get(s)) for s in src.slide_ids]
            return float(np.mean(np.array(pred) == np.array(truth)))

        acc, train_acc = accuracy(test), accuracy(source)
        print(
            f"{steps} steps in {seconds:.1f}s, held-out accuracy {acc:.3f} (chance {1 / len(CLASSES):.2f}), "
            f"train {train_acc:.3f}, resume exact: {resumed_ok}"
        )
        print("stats:", {k: v for k, v in stage.stats.items() if v})
        return {
            "steps": steps,
            "accuracy": acc,
            "train_accuracy": train_acc,
            "resumed_ok": resumed_ok,
            "stats": dict(stage.stats),
        }


if __name__ == "__main__":
    main()
