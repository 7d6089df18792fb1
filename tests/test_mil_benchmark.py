"""benchmarks/mil.py stays runnable and reports what it trained: feature counts per epoch follow the
sampling caps exactly, and accuracies are summarized per seed and paired against batch size 1."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def mil_bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import mil  # benchmarks/mil.py (imports its neighbours report/corpora by plain name)

        yield mil
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_every_method_trains_and_counts_the_features_its_cap_allows(mil_bench):
    from seqpack.mil import branch_sizes

    bags, labels, sizes = mil_bench.synthetic_slides(18, seed=3)
    train, test = (bags[:12], labels[:12]), (bags[12:], labels[12:])
    for name, settings in mil_bench.METHODS.items():
        gen = mil_bench.trainer(name, 1e-3, 0, 1, train, test)
        seconds, acc, steps, feats = next(gen)
        assert seconds > 0 and 0.0 <= acc <= 1.0 and steps > 0
        if settings is None:
            assert feats == int(sizes[:12].sum()) and steps == 12
            continue
        expect = branch_sizes(
            sizes[:12],
            main_fraction=mil_bench.MAIN_FRACTION,
            max_instances=settings["max_instances"],
            small_below=0,
            residual=settings["residual"],
        )
        assert feats == int(expect["main"].sum() + expect["residual"].sum()), name


def test_summary_pairs_seeds_against_bs1(mil_bench):
    def run(acc, secs, feats):
        return {"epoch_s": secs, "acc": acc, "steps": 20, "features_per_epoch": feats}

    runs = {
        "bs1": [run([0.5, 0.6, 0.7], [4.0, 4.0, 4.0], 1000), run([0.5, 0.8, 0.9], [4.0, 4.0, 4.0], 1000)],
        "packmil": [run([0.6, 0.7, 0.8], [1.0, 1.0, 1.0], 250), run([0.6, 0.8, 0.8], [1.0, 1.0, 1.0], 250)],
    }
    rows = {r["method"]: r for r in mil_bench.summarize(runs, epochs=3, target=0.75, last=2)}
    packed = rows["packmil"]
    assert packed["speedup_vs_bs1"] == pytest.approx(4.0)
    assert packed["feature_ratio_vs_bs1"] == pytest.approx(4.0)
    # per seed: mean of the last 2 epochs; bs1 0.65 / 0.85, packed 0.75 / 0.80 -> paired +0.10 / -0.05
    assert packed["final_acc_per_seed"] == pytest.approx([0.75, 0.80])
    assert packed["diff_vs_bs1_mean"] == pytest.approx(0.025)
    assert packed["diff_vs_bs1_std"] == pytest.approx(np.std([0.10, -0.05], ddof=1))
    # time to 0.75: packed seed 0 at epoch 3 (3 s), seed 1 at epoch 2 (2 s); bs1 only seed 1 (8 s)
    assert packed["s_to_target_mean"] == pytest.approx(2.5) and packed["seeds_reaching_target"] == 2
    assert rows["bs1"]["s_to_target_mean"] == pytest.approx(8.0) and rows["bs1"]["seeds_reaching_target"] == 1
