"""Train a tiny transformer with ChunkFlow: long documents as chains of chunks, short ones packed.

Each global batch mixes a few long documents (several chunks each) with many short ones. The
batch is cut into chunks of ``--capacity`` tokens (``seqpack.build_chunks``) and run with the
state-aware schedule keeping at most ``--k`` chunks of activations alive
(``seqpack.chunkflow_step``); gradients are exact, so the optimizer sees what full-sequence
training would give (``--check`` verifies it on the first batch).

The synthetic task is learnable only in context: each document is an arithmetic progression
modulo the vocabulary with its own stride, so the loss falls as the model learns to read the stride
from the previous tokens.

    python examples/chunkflow_train.py --steps 30 --capacity 64 --k 1 --check
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from seqpack.ops.chunked import TinyChunkedLM

from seqpack import IGNORE_INDEX, VarlenBatch, build_chunks, chunkflow_step


def synthetic_batch(rng: np.random.Generator, vocab: int, n_long: int, n_short: int, long_len: int) -> list:
    """Documents ``start + stride * t (mod vocab)``: ``n_long`` of up to ``long_len`` tokens, ``n_short``
    short ones."""
    lengths = np.concatenate(
        [rng.integers(long_len // 2, long_len + 1, n_long), rng.integers(4, max(5, long_len // 8), n_short)]
    )
    docs = []
    for n in rng.permutation(lengths):
        start, stride = rng.integers(0, vocab), rng.integers(1, 8)
        docs.append((start + stride * np.arange(n)) % vocab)
    return docs


def full_sequence_grads(model: TinyChunkedLM, docs) -> tuple[float, dict]:
    """Reference loss and gradients: every document whole, no chunking."""
    full = VarlenBatch.from_segments(docs, np.arange(len(docs)))
    model.zero_grad(set_to_none=True)
    logits, _ = model(full.input_ids, full.position_ids, full.cu_seqlens, full.max_seqlen)
    loss = F.cross_entropy(logits, full.shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    (loss / full.num_loss_tokens).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()) / full.num_loss_tokens, grads


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--capacity", "--chunk-size", type=int, default=64, help="tokens per chunk")
    ap.add_argument("--k", type=int, default=1, help="chunks with live activations")
    ap.add_argument("--long-len", type=int, default=300, help="longest document (tokens)")
    ap.add_argument("--n-long", type=int, default=2)
    ap.add_argument("--n-short", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="compare the first step with full-sequence training")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: fastest for tiny tensors)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = TinyChunkedLM(vocab_size=args.vocab, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses = []
    max_grad_err = None
    t0 = time.perf_counter()
    for step in range(args.steps):
        docs = synthetic_batch(rng, args.vocab, args.n_long, args.n_short, args.long_len)
        chunks = build_chunks(docs, args.capacity, seed=args.seed + step)
        if args.check and step == 0:
            ref_loss, ref_grads = full_sequence_grads(model, docs)
        opt.zero_grad(set_to_none=True)
        res = chunkflow_step(model, chunks, args.k)
        if args.check and step == 0:
            max_grad_err = max(
                float((p.grad - ref_grads[n]).abs().max()) for n, p in model.named_parameters()
            )
            print(
                f"check: loss chunkflow {res.loss:.6f} vs full {ref_loss:.6f}; "
                f"max |grad diff| {max_grad_err:.2e}"
            )
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(res.loss)
        n_dep = sum(c.is_dependent for c in chunks)
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(
                f"step {step:3d}  loss {res.loss:.4f}  chunks {len(chunks)} ({n_dep} dependent)  "
                f"targets {res.num_loss_tokens}  peak live {res.peak_live_chunks}  "
                f"recomputed {res.recomputed_chunks}"
            )
    print(f"{args.steps} steps in {time.perf_counter() - t0:.1f}s; loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return {"losses": losses, "max_grad_err": max_grad_err}


if __name__ == "__main__":
    main()
