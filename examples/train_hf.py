"""Train a tiny transformers Llama on packed batches from ``seqpack.build_loader``.

What a real training script needs from a packing library, in one file:

- the loader (``seqpack.build_loader``), rank-sharded, equal step counts on every rank
  (``loader.steps_per_epoch()``, zero-loss padding micro-batches instead of dropped data);
- gradient accumulation with the right normalization: each micro-batch's weighted loss sum is
  divided by the step's ``num_loss_tokens`` summed over its micro-batches and all-reduced over ranks
  (``seqpack.step_normalizer`` + ``seqpack.packed_loss``), so the step's gradient is exactly that of
  the token-mean (or, with ``--loss sample``, document-mean) loss over every document of the step;
- the boundary guard (``seqpack.install_packing_guard``) and a packed-vs-alone check at start;
- checkpoints of model, optimizer, loader and RNG (atomic), and ``--resume`` that continues
  bitwise-identically on CPU;
- ``torchrun`` (gloo on CPU, NCCL on CUDA) and, on CUDA with flash-attn installed, the
  padding-free flash-attention path (``attn_implementation="flash_attention_2"`` fed the batch's
  ``cu_seq_lens``).

Run::

    python examples/train_hf.py --out build/train_hf                 # bundled corpus, 300 steps, CPU
    python examples/train_hf.py --out build/train_hf --resume        # continue from the last checkpoint
    torchrun --nproc-per-node 2 examples/train_hf.py --out build/train_hf_ddp
    python examples/train_hf.py --out build/train_hf --compare       # packed vs unpacked PNG

``--compare`` trains twice from the same initialization on the same documents and the same
documents per optimizer step: once packed (one forward per bin), once unpacked (one forward per
document). The gradients are the same, so the loss-per-token curves agree within float noise, and
the packed run needs several times fewer forward/backward passes; ``compare.png`` shows both.
Wall-clock (in ``compare.json``) depends on the attention path: on CPU, SDPA with transformers'
block-diagonal mask computes all ``T^2`` scores of a bin, so packed passes cost more there; flash-attn
varlen on CUDA computes only ``sum(l_i^2)``, which is where fewer, fuller passes pay off.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import numpy as np
import torch

import seqpack
from seqpack.preprocess import DEMO_CORPUS


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--data", default=DEMO_CORPUS, help="jsonl(.zst) with a 'text' field (default: bundled corpus)"
    )
    ap.add_argument("--out", default="build/train_hf", help="checkpoints, losses.json, compare.png")
    ap.add_argument("--capacity", type=int, default=1024, help="tokens per packed micro-batch")
    ap.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    ap.add_argument("--max-steps", type=int, default=300, help="optimizer steps in all")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument(
        "--loss", choices=["token", "sample"], default="token", help="token mean or document mean"
    )
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--ckpt-every", type=int, default=50, help="optimizer steps between checkpoints")
    ap.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt if present")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads", type=int, default=1, help="CPU threads (fixed, so runs are bitwise repeatable)"
    )
    ap.add_argument("--compare", action="store_true", help="packed vs unpacked run, writes compare.png")
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------------- setup
def init_distributed() -> tuple[int, int, torch.device]:
    """torchrun sets WORLD_SIZE/RANK; gloo on CPU, NCCL on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return torch.distributed.get_rank(), world, device
    return 0, 1, device


def attention_implementation(device: torch.device) -> str:
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            return "sdpa"
    return "sdpa"


def build_model(args, vocab_size: int, device: torch.device):
    import transformers

    torch.manual_seed(args.seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max(args.capacity, 64),
        use_cache=False,  # a KV cache would switch off packed-sequence detection (the guard checks it)
        attn_implementation=attention_implementation(device),
    )
    model = transformers.LlamaForCausalLM(config).to(device)
    if model.config._attn_implementation.startswith("flash"):
        model = model.to(torch.bfloat16)
    return model


def loader_config(args) -> dict:
    return {
        "sources": [{"path": args.data, "text_key": "text"}],
        "tokenizer": {"name": "byte", "add_eos": True},
        "stage": {"type": "pack", "capacity": args.capacity, "algorithm": "online", "buffer_docs": 256},
        "shuffle": {"seed": args.seed, "buffer_docs": 256},
        "seed": args.seed,
    }


def forward_kwargs(batch: seqpack.VarlenBatch, model) -> dict:
    """Model inputs of a packed batch: no attention mask; flash paths also get ``cu_seq_lens``."""
    hf = batch.to_hf()
    hf.pop("labels")
    if not model.config._attn_implementation.startswith("flash"):
        hf = {"input_ids": hf["input_ids"], "position_ids": hf["position_ids"]}
    return hf


# ----------------------------------------------------------------------------------- checkpoint
def save_checkpoint(path: str, state: dict) -> None:
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint intact


def rng_state() -> dict:
    """The RNG states as tensors, ints and strings only, so the checkpoint loads with
    ``torch.load(weights_only=True)`` (numpy's state tuple holds an ndarray, which would not)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {
            "version": version,
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss_next,
        },
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))


# ----------------------------------------------------------------------------------- training
def micro_step_groups(loader, accum: int):
    """Yield lists of ``accum`` micro-batches (the last group of an epoch may be shorter), forever.

    Every rank gets the same number of micro-batches per epoch (the loader pads with zero-loss
    batches), so every rank forms the same groups and the all-reduces line up.
    """
    while True:
        group = []
        for batch in loader:
            group.append(batch)
            if len(group) == accum:
                yield group
                group = []
        if group:
            yield group


def train_step(model, ddp_model, optimizer, group, args, world: int, device) -> float:
    """One optimizer step over a group of micro-batches; returns the step's loss per token."""
    if args.loss == "sample":
        group = [seqpack.with_loss_weights(b, "sample") for b in group]
    normalizer = seqpack.step_normalizer(group)  # summed over micro-batches, all-reduced over ranks
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), dtype=torch.float64)
    for i, batch in enumerate(group):
        batch = batch.to(device)
        sync = i == len(group) - 1
        ctx = ddp_model.no_sync() if (world > 1 and not sync) else _nullcontext()
        with ctx:
            logits = ddp_model(**forward_kwargs(batch, model)).logits
            # DDP averages gradients over ranks; scale by world so the result is the global mean
            loss = seqpack.packed_loss(logits, batch, normalizer=normalizer, scale=world)
            loss.backward()
        loss_sum += loss.detach().double().cpu() / world
    optimizer.step()
    if world > 1:
        torch.distributed.all_reduce(loss_sum)
    return float(loss_sum)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def train(args) -> list[float]:
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    rank, world, device = init_distributed()
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "checkpoint.pt" if world == 1 else f"checkpoint_rank{rank}.pt")
    loader = seqpack.build_loader(loader_config(args), rank=rank, world_size=world)
    model = build_model(args, vocab_size=259, device=device)
    seqpack.install_packing_guard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    steps_per_epoch = -(-loader.steps_per_epoch() // args.accum)  # the same on every rank
    step, losses = 0, []
    if args.resume and os.path.exists(ckpt_path):
        # weights_only: a checkpoint is data, never code (everything in it is a tensor or a plain value)
        state = torch.load(ckpt_path, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        step, losses = state["step"], state["losses"]
        log(args, rank, f"resumed at step {step} (epoch {loader.epoch})")
    elif rank == 0 and not args.quiet:
        # the safety net: does this model + attention path keep documents apart on a real batch?
        first = next(iter(seqpack.pack_documents([np.arange(1, 60), np.arange(5, 50)], 128)))
        print(seqpack.check_packing(model, first.to(device), atol=1e-2 if device.type == "cuda" else 1e-4))
    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    log(
        args,
        rank,
        f"world {world}, {steps_per_epoch} optimizer steps per epoch, attention "
        f"{model.config._attn_implementation}, device {device}",
    )
    model.train()
    groups = micro_step_groups(loader, args.accum)
    t0 = time.perf_counter()
    micro, padding = 0, 0
    while step < args.max_steps:
        group = next(groups)
        micro += len(group)
        padding += sum(b.n_real_segments == 0 for b in group)  # zero-loss batches of a rank out of data
        loss = train_step(model, ddp_model, optimizer, group, args, world, device)
        step += 1
        losses.append(loss)
        log(args, rank, f"step {step} loss {loss!r}")
        if step % args.ckpt_every == 0 or step == args.max_steps:
            save_checkpoint(
                ckpt_path,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "loader": loader.state_dict(),
                    "rng": rng_state(),
                    "step": step,
                    "losses": losses,
                    "args": vars(args),
                },
            )
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump({"steps_per_epoch": steps_per_epoch, "micro_batches": micro, "padding_batches": padding}, f)
    if rank == 0:
        with open(os.path.join(args.out, "losses.json"), "w") as f:
            json.dump({"losses": losses, "steps_per_epoch": steps_per_epoch, "world_size": world}, f)
        log(args, rank, f"done: {step} steps, last loss {losses[-1]:.4f}, {time.perf_counter() - t0:.1f}s")
    if world > 1:
        torch.distributed.barrier()  # tear down together: gloo aborts a rank whose peer left first
        torch.distributed.destroy_process_group()
    return losses


def log(args, rank: int, msg: str) -> None:
    """Rank 0 prints; ``--quiet`` keeps only the per-step loss lines (what the resume test reads)."""
    if rank == 0 and (not args.quiet or msg.startswith("step ")):
        print(msg, flush=True)


# ----------------------------------------------------------------------------------- compare
def compare(args) -> dict:
    """Packed vs unpacked training on the same documents per optimizer step (see module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    loader = seqpack.build_loader(loader_config(args), rank=0, world_size=1)
    steps = []
    for batch in loader:
        steps.append(batch)
        if len(steps) == args.max_steps:
            break
    results = {}
    for mode in ("packed", "unpacked"):
        model = build_model(args, vocab_size=259, device=device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
        curve, passes, t0 = [], 0, time.perf_counter()
        for batch in steps:
            normalizer = seqpack.step_normalizer([batch])
            optimizer.zero_grad(set_to_none=True)
            if mode == "packed":
                pieces = [batch]
            else:  # the same documents, one forward each, accumulated into the same step
                cu = batch.cu_seqlens.tolist()
                pieces = [
                    seqpack.VarlenBatch.from_segments(
                        [batch.input_ids[cu[s] : cu[s + 1]].numpy()],
                        [int(batch.doc_ids[s])],
                        loss_masks=[(batch.labels[cu[s] : cu[s + 1]] != seqpack.IGNORE_INDEX).numpy()],
                    )
                    for s in range(batch.n_real_segments)
                ]
            total = 0.0
            for piece in pieces:
                logits = model(**forward_kwargs(piece, model)).logits
                loss = seqpack.packed_loss(logits, piece, normalizer=normalizer)
                loss.backward()
                total += loss.item()
                passes += 1
            optimizer.step()
            curve.append((passes, total))
        results[mode] = {"curve": curve, "seconds": time.perf_counter() - t0, "passes": passes}
        print(
            f"{mode}: {passes} forward/backward passes, {results[mode]['seconds']:.1f}s, "
            f"final loss/token {curve[-1][1]:.4f}",
            flush=True,
        )
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for mode, style in (("packed", "-"), ("unpacked", "--")):
        curve = results[mode]["curve"]
        axes[0].plot(range(1, len(curve) + 1), [c[1] for c in curve], style, label=mode)
        axes[1].plot(
            [c[0] for c in curve],
            [c[1] for c in curve],
            style,
            label=f"{mode} ({results[mode]['passes']} passes)",
        )
    axes[0].set(xlabel="optimizer step", ylabel="training loss per token", title="same documents per step")
    axes[1].set(
        xlabel="forward/backward passes", ylabel="training loss per token", title="passes to get there"
    )
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    path = os.path.join(args.out, "compare.png")
    os.makedirs(args.out, exist_ok=True)
    fig.savefig(path, dpi=110)
    diff = max(abs(a[1] - b[1]) for a, b in zip(results["packed"]["curve"], results["unpacked"]["curve"]))
    summary = {
        "steps": len(steps),
        "packed_passes": results["packed"]["passes"],
        "unpacked_passes": results["unpacked"]["passes"],
        "packed_seconds": results["packed"]["seconds"],
        "unpacked_seconds": results["unpacked"]["seconds"],
        "final_loss_packed": results["packed"]["curve"][-1][1],
        "final_loss_unpacked": results["unpacked"]["curve"][-1][1],
        "max_abs_loss_diff": diff,
        "png": path,
    }
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.compare:
        compare(args)
    else:
        train(args)


if __name__ == "__main__":
    sys.exit(main())
