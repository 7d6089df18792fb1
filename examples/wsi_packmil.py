"""Train ABMIL on whole-slide feature bags with PackMIL packing and the hyperslide residual.

Writes a small synthetic cohort to disk the way feature extractors do (one ``.h5`` per slide with a
``features`` dataset, as CLAM writes them; ``.npy`` when h5py is missing) plus a ``labels.csv``,
then reads it back with seqpack's readers and trains:

    source = read_feature_bags(feature_dir)                       # N and D from headers only
    labels = read_labels(feature_dir / "labels.csv")
    stage  = PackMIL(source, labels, pack_len=..., main_fraction=0.4, ...)
    for batch in stage:                                           # MILBatch, .residual = hyperslides
        loss = CE(model(batch.features, batch.bag_ids, batch.n_bags), batch.labels)
             + 0.2 * CE(model(residual...), residual.labels)      # soft labels

With ``--downsample r`` the attention-driven downsampler (ADS) reduces each bag by ``r`` inside
the pack before pooling. Halfway through, the stage's ``state_dict`` is saved and a fresh stage
resumes from it, yielding exactly the batches the first one would have.

    python examples/wsi_packmil.py --slides 60 --epochs 8
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

from seqpack.sources.features import read_feature_bags, read_labels
from seqpack.stages.mil import MILBatch, PackMIL


def write_cohort(root: Path, n_slides: int, dim: int, seed: int) -> None:
    """Slides with long-tailed bag sizes; 'tumor' slides hold a few shifted key instances."""
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(dim)
    direction /= np.linalg.norm(direction)
    try:
        import h5py
    except ImportError:
        h5py = None
    rows = []
    for i in range(n_slides):
        n = int(np.clip(rng.lognormal(np.log(800), 1.0), 100, 40_000))
        x = rng.standard_normal((n, dim), dtype=np.float32)
        label = "tumor" if i % 2 else "normal"
        if label == "tumor":
            x[rng.choice(n, max(8, n // 25), replace=False)] += 4.0 * direction
        sid = f"slide_{i:04d}"
        if h5py is not None:
            with h5py.File(root / f"{sid}.h5", "w") as f:
                f["features"] = x.astype(np.float16)
        else:
            np.save(root / f"{sid}.npy", x.astype(np.float16))
        rows.append((sid, label))
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
    ap.add_argument("--slides", type=int, default=60)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--pack-len", type=int, default=512)
    ap.add_argument("--downsample", type=int, default=1, help="ADS factor r (1 = off)")
    ap.add_argument("--aux-alpha", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_cohort(root, args.slides, args.dim, args.seed)
        source = read_feature_bags(root)
        labels = read_labels(root / "labels.csv")
        print(
            f"{len(source)} slides, D={source.dim}, N from {source.lengths.min()} to {source.lengths.max()}"
        )

        def make_stage() -> PackMIL:
            return PackMIL(
                source,
                labels,
                pack_len=args.pack_len,
                packs_per_batch=4,
                main_fraction=0.4,
                downsample=args.downsample,
                min_seq_len=32,
                seed=args.seed,
                num_epochs=args.epochs,
            )

        stage = make_stage()
        model = PackedABMIL(source.dim, labels.num_classes, args.downsample)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
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
        with torch.no_grad():  # inference: whole bags, no sampling, no packing
            pred = [
                int(model.mil.forward_bag(torch.from_numpy(source.load(i)).float()).argmax())
                if model.ads is None
                else int(
                    model.mil.forward_bag(
                        model.ads.forward_bag(torch.from_numpy(source.load(i)).float(), downsample=False)
                    ).argmax()
                )
                for i in range(len(source))
            ]
        truth = [int(labels.get(s)) for s in source.slide_ids]
        acc = float(np.mean(np.array(pred) == np.array(truth)))
        print(f"{steps} steps in {seconds:.1f}s, train-set accuracy {acc:.3f}, resume exact: {resumed_ok}")
        print("stats:", {k: v for k, v in stage.stats.items() if v})
        return {"steps": steps, "accuracy": acc, "resumed_ok": resumed_ok, "stats": dict(stage.stats)}


if __name__ == "__main__":
    main()
