"""Dataset decomposition + a length curriculum vs concat-and-chunk, on real Python source, on CPU.

The corpus is the bytes of the standard library's ``.py`` files (a byte-level tokenizer: ids 0..255,
EOT = 256), a seeded sample of about ``--train-bytes`` bytes for training and other files held out.
Two runs of the same tiny ``transformers`` Llama (sdpa attention, packed batches with position ids)
see the same number of targets per step (``--tokens-per-step``):

- **DD + Grow-P2**: ``seqpack.DecomposedDataset`` with buckets ``2^5..2^8``, odds 8 4 2 1 over
  ``--cycles`` cycles; every sequence comes from one document, every step has exactly
  ``tokens_per_step`` targets.
- **concat-and-chunk**: documents concatenated and cut into rows of 257 tokens (256 targets each),
  ``seqpack.SeqlenCurriculum(mode="reshape")`` with a constant length, rows shuffled globally (as
  concat-and-chunk pipelines do); rows attend across documents.

Both are evaluated on held-out windows of 256 targets taken inside single documents. Prints the
attention cost per step (sum of l^2) of both, and writes a loss-per-token-seen PNG and JSON.

    python examples/decomposition_curriculum.py                 # ~300 steps per run, a few minutes
    python examples/decomposition_curriculum.py --steps 40      # smoke test
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from seqpack import (
    IGNORE_INDEX,
    BucketCurriculum,
    DecomposedDataset,
    SeqlenCurriculum,
    SeqlenSchedule,
    VarlenBatch,
)

EOT = 256
RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def stdlib_documents(
    train_bytes: int, eval_docs: int, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Byte arrays of a seeded sample of stdlib ``.py`` files: ``~train_bytes`` for training, then eval."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
    order = np.random.default_rng(seed).permutation(len(files))
    train, held, seen = [], [], 0
    for i in order:
        data = np.frombuffer(files[i].read_bytes(), np.uint8).astype(np.int64)
        if len(data) == 0:
            continue
        if seen < train_bytes:
            train.append(data)
            seen += len(data)
        elif len(data) > 1024 and len(held) < eval_docs:
            held.append(data)
        if seen >= train_bytes and len(held) >= eval_docs:
            break
    return train, held


def tiny_llama(seed: int):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=257,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        attn_implementation="sdpa",
        use_cache=False,
    )
    return transformers.LlamaForCausalLM(cfg)


def batch_loss(model, batch) -> torch.Tensor:
    """Mean loss over the step's targets.

    Every segment of a DD step (and every concat-and-chunk row) has the same length, so the packed
    batch is viewed as a plain ``[rows, length]`` causal batch: no mask is needed, and the attention
    computed is exactly ``rows * length^2`` (a packed batch through dense SDPA would pay ``T^2``).
    """
    n = batch.n_real_segments
    lens = batch.seqlens[:n]
    if not bool((lens == lens[0]).all()):
        raise ValueError("expected equal-length segments")
    L = int(lens[0])
    ids = batch.input_ids[: n * L].view(n, L)
    targets = batch.shift_labels[: n * L].view(n, L)
    logits = model(input_ids=ids).logits
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss / max(batch.num_loss_tokens, 1)


@torch.no_grad()
def eval_loss(model, windows: torch.Tensor) -> float:
    model.eval()
    logits = model(input_ids=windows[:, :-1]).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    model.train()
    return float(loss)


def attention_cost(batch) -> int:
    """sum of l^2 over the step's attended sequences (input lengths, i.e. segment length - 1)."""
    lens = batch.seqlens[: batch.n_real_segments].long() - 1
    return int((lens * lens).sum())


def concat_and_chunk(
    docs: list[np.ndarray], row: int, rows_per_step: int, seed: int
) -> Iterator[VarlenBatch]:
    """The baseline: documents in a seeded random order, concatenated and cut into rows of ``row`` tokens
    (``SeqlenCurriculum(mode="reshape")`` with a constant length), rows shuffled globally, then grouped
    ``rows_per_step`` to a step. Rows attend across the documents they span."""
    rng = np.random.default_rng(seed)
    stream = SeqlenCurriculum(
        [docs[i] for i in rng.permutation(len(docs))],
        SeqlenSchedule(schedule_type="fixed_discrete", difficulty=[row], max_step=[]),
        tokens_per_step=row,
        mode="reshape",
    )
    rows = [b for b in stream if b.num_tokens == row]  # the short last row is left out of this baseline
    order = rng.permutation(len(rows))
    for lo in range(0, len(order) - rows_per_step + 1, rows_per_step):
        picked = [rows[i] for i in order[lo : lo + rows_per_step]]
        yield VarlenBatch.from_segments(
            [b.input_ids.numpy() for b in picked], [int(b.doc_ids[0]) for b in picked]
        )


def train(name, model, batches, steps, windows, lr, eval_every):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    log = {"name": name, "tokens": [], "eval_loss": [], "train_tokens": [], "train_loss": [], "attn_cost": []}
    tokens = 0
    t0 = time.perf_counter()
    log["tokens"].append(0)
    log["eval_loss"].append(eval_loss(model, windows))
    for step in range(steps):
        batch = next(batches, None)
        if batch is None:
            break
        loss = batch_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        tokens += batch.num_loss_tokens
        log["train_tokens"].append(tokens)
        log["train_loss"].append(float(loss.detach()))
        log["attn_cost"].append(attention_cost(batch))
        if (step + 1) % eval_every == 0:
            log["tokens"].append(tokens)
            log["eval_loss"].append(eval_loss(model, windows))
            print(
                f"  {name:>18} step {step + 1:4d} tokens {tokens:8d} train {float(loss):.3f} "
                f"eval {log['eval_loss'][-1]:.3f}"
            )
    log["seconds"] = time.perf_counter() - t0
    log["steps"] = len(log["train_loss"])
    return log


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per run (capped by one DD epoch)")
    ap.add_argument("--tokens-per-step", type=int, default=2048)
    ap.add_argument("--train-bytes", type=int, default=700_000)
    ap.add_argument("--cycles", type=int, default=2, help="Grow-P2 curriculum cycles")
    ap.add_argument("--max-log2", type=int, default=8, help="largest bucket / concat-chunk row is 2^this")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: fastest for a tiny model on shared cores)"
    )
    ap.add_argument("--out", default=str(RESULTS / "decomposition_training.png"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    train_docs, held = stdlib_documents(args.train_bytes, 32, args.seed)
    row = (1 << args.max_log2) + 1
    windows = torch.as_tensor(np.stack([d[:row] for d in held]))
    n_tokens = sum(len(d) + 1 for d in train_docs)
    print(
        f"corpus: {len(train_docs)} stdlib files, {n_tokens:,} byte tokens (+EOT); "
        f"{len(held)} held-out windows"
    )

    dd = DecomposedDataset(
        train_docs,
        tokens_per_step=args.tokens_per_step,
        min_log2=5,
        max_log2=args.max_log2,
        eot_id=EOT,
        seed=args.seed,
        curriculum=BucketCurriculum("grow_p2", n_cycles=args.cycles),
    )
    st = dd.stats()
    assert st["input_tokens"] == st["emitted_tokens_all_ranks"] + st["leftover_tokens"] + st["dropped_tokens"]
    print(
        f"DD: {len(dd)} steps, dropped {st['dropped_tokens']} tokens (< 33-token tails), "
        f"left over {st['leftover_tokens']} (partial batches), buckets {st['bucket_tokens']}"
    )
    cc = concat_and_chunk(
        [np.append(d, EOT) for d in train_docs], row, args.tokens_per_step >> args.max_log2, args.seed
    )
    steps = min(args.steps, len(dd))

    logs = []
    for name, stream in (("DD + Grow-P2", iter(dd)), (f"concat-and-chunk {row - 1}", iter(cc))):
        print(f"training {name} for {steps} steps")
        logs.append(train(name, tiny_llama(args.seed), stream, steps, windows, args.lr, args.eval_every))
    for log in logs:
        log["attn_cost_per_step"] = float(np.mean(log["attn_cost"]))
    ratio = logs[0]["attn_cost_per_step"] / logs[1]["attn_cost_per_step"]
    summary = {
        "steps": steps,
        "tokens_per_step": args.tokens_per_step,
        "runs": {
            log["name"]: {
                "final_eval_loss": log["eval_loss"][-1],
                "tokens_seen": log["train_tokens"][-1],
                "attn_cost_per_step": log["attn_cost_per_step"],
                "seconds": log["seconds"],
            }
            for log in logs
        },
        "dd_attn_cost_vs_concat_chunk": ratio,
    }
    print(json.dumps(summary, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for log, c in zip(logs, ("#2e7d32", "#555")):
        ax[0].plot(log["tokens"], log["eval_loss"], "-o", ms=3, c=c, label=f"{log['name']} (held-out)")
        k = max(1, min(10, len(log["train_loss"])))
        sm = np.convolve(log["train_loss"], np.ones(k) / k, mode="valid")
        ax[0].plot(
            log["train_tokens"][k - 1 :], sm, c=c, alpha=0.35, lw=1, label=f"{log['name']} (train, avg {k})"
        )
        ax[1].plot(
            np.arange(1, log["steps"] + 1), np.array(log["attn_cost"]) / 1e6, c=c, lw=1, label=log["name"]
        )
    ax[0].set_xlabel("target tokens seen")
    ax[0].set_ylabel("loss (nats / byte)")
    ax[0].set_title("tiny Llama on stdlib bytes")
    ax[0].legend(fontsize=8)
    ax[1].set_xlabel("optimizer step")
    ax[1].set_ylabel("attention cost per step (sum l^2, x1e6)")
    ax[1].set_title(f"DD / concat-chunk attention cost = {ratio:.2f}")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    out.with_suffix(".json").write_text(json.dumps({**summary, "logs": logs}, indent=1))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return summary


if __name__ == "__main__":
    main()
