"""The two length distributions every benchmark uses, built the same way everywhere.

- ``sft_like_lengths``: 1M synthetic SFT-like documents, lognormal with median 350 tokens and
  sigma 1.2 (a long right tail: mean ~720), clipped to [8, 16384], seed 0.
- ``python_source_lengths``: token counts of every ``.py`` file of the local Python install
  (stdlib + site-packages of the running interpreter), tokenized with a byte-level BPE (16K vocab)
  trained here on a sample of those files, or plain byte lengths with ``tokenizer="bytes"``.
  Cached under ``benchmarks/results/`` because tokenizing ~400 MB takes a minute or two.
"""

from __future__ import annotations

import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def sft_like_lengths(
    n: int = 1_000_000, seed: int = 0, median: float = 350.0, sigma: float = 1.2
) -> np.ndarray:
    """int64 ``[n]`` token lengths, lognormal(median, sigma) clipped to [8, 16384]."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(median), sigma, n), 8, 16384).astype(np.int64)


def python_source_files() -> list[Path]:
    """Every ``.py`` file under the stdlib and site-packages directories, sorted."""
    roots = {Path(sysconfig.get_paths()[k]) for k in ("stdlib", "purelib", "platlib")}
    files: set[Path] = set()
    for root in roots:
        if root.is_dir():
            files.update(p for p in root.rglob("*.py") if p.is_file())
    return sorted(files)


def train_byte_bpe(files: list[Path], vocab_size: int = 16384, sample_bytes: int = 32 << 20):
    """A byte-level BPE trained on the first ``sample_bytes`` of a seeded sample of ``files``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = np.random.default_rng(0)
    order = rng.permutation(len(files))

    def sample():
        seen = 0
        for i in order:
            text = files[i].read_text(errors="replace")
            seen += len(text)
            yield text
            if seen > sample_bytes:
                return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(sample(), trainer=trainer)
    return tok


def python_source_lengths(tokenizer: str = "bpe", refresh: bool = False) -> np.ndarray:
    """int64 token (or byte) length of every local ``.py`` file; cached per interpreter."""
    tag = f"{sys.version_info.major}{sys.version_info.minor}"
    cache = RESULTS / f"pysrc_lengths_{tokenizer}_py{tag}.npy"
    if cache.exists() and not refresh:
        return np.load(cache)
    files = python_source_files()
    t0 = time.perf_counter()
    if tokenizer == "bytes":
        lengths = np.array([p.stat().st_size for p in files], np.int64)
    else:
        tok = train_byte_bpe(files)
        lengths = np.zeros(len(files), np.int64)
        step = 512
        for lo in range(0, len(files), step):
            texts = [p.read_text(errors="replace") for p in files[lo : lo + step]]
            lengths[lo : lo + step] = [len(e.ids) for e in tok.encode_batch(texts)]
    seconds = time.perf_counter() - t0
    print(f"[corpora] {len(files)} .py files -> {lengths.sum():,} tokens ({tokenizer}) in {seconds:.1f}s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    np.save(cache, lengths)
    return lengths
