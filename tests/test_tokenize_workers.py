"""Tokenizer threads in DataLoader workers (``seqpack.loader._WorkerInit``).

The thread budget is a pure function of (workers, cores, environment). The end-to-end checks run in
a fresh Python process: whether a forked worker may start a Rust thread pool depends on whether
the parent process ever ran one, and the pytest process may already have (other tests encode with
``tokenizers``); a timeout there turns a deadlocked worker into a failure instead of a hang.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from seqpack.loader import _WorkerInit

ROOT = Path(__file__).resolve().parent.parent

budget = _WorkerInit.tokenizer_env


def test_budget_is_cores_per_worker_when_the_variable_is_unset():
    assert budget(2, 8, {}) == {"RAYON_NUM_THREADS": "4"}
    assert budget(3, 8, {}) == {"RAYON_NUM_THREADS": "2"}
    assert budget(1, 2, {}) == {"RAYON_NUM_THREADS": "2"}


def test_one_core_per_worker_or_less_is_one_thread():
    # more busy threads than cores only add spin-waiting (2 workers x 2 threads on 2 cores is slower)
    assert budget(2, 2, {}) == {"TOKENIZERS_PARALLELISM": "false"}
    assert budget(4, 2, {}) == {"TOKENIZERS_PARALLELISM": "false"}
    assert budget(0, 1, {}) == {"TOKENIZERS_PARALLELISM": "false"}


def test_ranks_on_the_machine_share_its_cores():
    assert budget(2, 16, {"LOCAL_WORLD_SIZE": "4"}) == {"RAYON_NUM_THREADS": "2"}
    assert budget(2, 16, {"LOCAL_WORLD_SIZE": "8"}) == {"TOKENIZERS_PARALLELISM": "false"}
    assert budget(2, 16, {"LOCAL_WORLD_SIZE": "x"}) == {"RAYON_NUM_THREADS": "8"}  # unreadable: 1 rank


def test_an_explicit_setting_is_one_thread_and_a_user_thread_count_is_kept():
    # "false": the user's choice; "true": tokenizers' fork handler stays out, so a pool the
    # parent used would hang the worker
    assert budget(2, 8, {"TOKENIZERS_PARALLELISM": "false"}) == {"TOKENIZERS_PARALLELISM": "false"}
    assert budget(2, 8, {"TOKENIZERS_PARALLELISM": "true"}) == {"TOKENIZERS_PARALLELISM": "false"}
    assert budget(2, 8, {"RAYON_NUM_THREADS": "3"}) == {}


SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path

    tmp = Path(sys.argv[1])
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # train without starting this process's pool
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    words = ["alpha", "beta", "gamma", "delta", "def", "return", "self", "import", "(x)", "= 1"]
    texts = [" ".join(words[(i * 7 + k * 3) % len(words)] for k in range(20 + i % 37)) for i in range(300)]
    with open(tmp / "docs.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\\n")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(tmp / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    expected = {i: tok.encode(t, add_special_tokens=False).ids + [eos] for i, t in enumerate(texts)}
    del os.environ["TOKENIZERS_PARALLELISM"]

    os.sched_getaffinity = lambda pid: set(range(8))  # 8 cores whatever the machine (forked workers too)
    from seqpack import build_loader
    from seqpack.sources import vocab

    encode = vocab.HFTokenizer.encode_batch

    def counting(self, texts):
        # the Rust pool starts on the first parallel call: threads before and after it
        before = len(os.listdir("/proc/self/task"))
        out = encode(self, texts)
        with open(tmp / f"threads-{os.getpid()}", "a") as f:
            f.write(f"{before} {len(os.listdir('/proc/self/task'))} {os.environ.get('RAYON_NUM_THREADS')}\\n")
        return out

    vocab.HFTokenizer.encode_batch = counting
    cfg = {
        "sources": [{"path": str(tmp / "docs.jsonl")}],
        "tokenizer": {"name": str(tmp / "tokenizer.json"), "eos_token": "<|endoftext|>"},
        "stage": {"type": "pack", "capacity": 1024, "pad_to": 1024, "buffer_docs": 50},
    }

    def run(num_workers):
        docs = {}
        for b in build_loader(cfg, num_workers=num_workers):
            cu = b.cu_seqlens.tolist()
            for s in range(b.n_real_segments):
                piece = b.input_ids[cu[s] : cu[s + 1]].tolist()
                docs.setdefault(int(b.doc_ids[s]) & ((1 << 36) - 1), []).append((int(b.seg_start[s]), piece))
        return {d: [t for _, p in sorted(ps) for t in p] for d, ps in docs.items()}

    def threads():
        # per worker process, its encode_batch calls: [threads the call started, RAYON_NUM_THREADS]
        workers = []
        for p in sorted(tmp.glob("threads-*")):
            if int(p.name.split("-")[1]) != os.getpid():
                rows = [line.split() for line in p.read_text().splitlines()]
                workers.append([[int(after) - int(before), env] for before, after, env in rows])
            p.unlink()
        return workers

    report = {"expected": expected}
    report["fresh"] = run(2)  # this process never ran the pool: workers start their own
    report["fresh_threads"] = threads()
    report["in_process"] = run(0)  # the pool starts here, in the parent
    threads()
    report["after_parent_pool"] = run(2)  # tokenizers' fork handler: one thread in workers
    report["after_parent_pool_threads"] = threads()
    os.environ["TOKENIZERS_PARALLELISM"] = "true"  # the handler stays out: the loader says one thread
    report["explicit_true"] = run(2)
    report["explicit_true_threads"] = threads()
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("tokenize_workers")
    (tmp / "script.py").write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")}
    env.update(PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore", LOCAL_WORLD_SIZE="1")
    out = subprocess.run(
        [sys.executable, str(tmp / "script.py"), str(tmp)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,  # a worker deadlocked on a pool inherited over fork fails here
    )
    assert out.returncode == 0, out.stderr[-3000:]
    raw = json.loads(out.stdout.strip().splitlines()[-1])
    return {k: {int(d): t for d, t in v.items()} if isinstance(v, dict) else v for k, v in raw.items()}


def test_workers_with_threads_give_the_same_tokens(report):
    assert len(report["expected"]) == 300
    assert report["fresh"] == report["expected"]
    assert report["in_process"] == report["expected"]


def test_a_fresh_worker_runs_its_own_pool_of_its_budget(report):
    # 8 cores over 2 workers: 4 threads each, started by the worker's first encode_batch call
    workers = report["fresh_threads"]
    assert len(workers) == 2
    for calls in workers:
        assert calls[0] == [4, "4"]
        # no later call starts a pool again (a thread of the DataLoader's own, e.g. its result
        # queue's feeder, may start meanwhile: the chain runs on a thread of its own)
        assert all(c[0] < 4 and c[1] == "4" for c in calls[1:]), workers


def test_workers_after_the_parent_ran_the_pool_use_one_thread(report):
    assert report["after_parent_pool"] == report["expected"]
    assert len(report["after_parent_pool_threads"]) == 2
    # no pool (it would start 4 threads here); one thread of the DataLoader's own may start meanwhile
    assert all(c[0] <= 1 for calls in report["after_parent_pool_threads"] for c in calls)
    assert report["explicit_true"] == report["expected"]
    assert len(report["explicit_true_threads"]) == 2
    assert all(c[0] <= 1 and c[1] == "None" for calls in report["explicit_true_threads"] for c in calls)
