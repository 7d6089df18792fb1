"""Where tasks run (this process, spawned local processes, or Ray) and :func:`preprocess`, the driver
that checks the output directory, hands out the unfinished tasks and merges their markers.

Executors only schedule: a task writes its shards and markers straight into the shared output
directory and returns its small marker, so every executor and worker count gives the same bytes.
After the last task, the driver plans the tasks' tails together (:func:`merge_tails`, see
:mod:`seqpack.preprocess.tails`) and writes the manifest.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

import numpy as np
from tqdm.auto import tqdm

from seqpack.preprocess.config import (
    PreprocessConfig,
    PreprocessError,
    fingerprint,
    input_files,
    tokenizer_info,
)
from seqpack.preprocess.lock import run_lock
from seqpack.preprocess.output import WindowProgress, merge_manifest, prepare_output, tail_path, task_done
from seqpack.preprocess.tails import load_pieces
from seqpack.preprocess.task import TaskSpec, gather_rows, plan_rows, row_stats, run_task, write_rows
from seqpack.sources.staging import run_staged
from seqpack.sources.urls import is_url

ENGINES = ("local", "ray")
TICK_S = 2.0  # how often executors let the progress bar look at finished windows


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """End this process when ``parent_pid`` (the driver) dies, so a killed run leaves no workers
    writing into an output directory the next run has taken over.

    On Linux the kernel sends SIGKILL on the parent's death (``prctl(PR_SET_PDEATHSIG)``, no
    polling); elsewhere a daemon thread polls the parent pid every second. A parent that died
    before this ran (a race at spawn) ends the process at once.
    """
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            armed = libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent_pid:
        os._exit(1)
    if not armed:

        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="seqpack-parent-watch", daemon=True).start()


def _worker_init(parent_pid: int) -> None:
    die_with_parent(parent_pid)
    # parallelism comes from the processes; the Rust pool of `tokenizers` would oversubscribe
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def run_local(
    specs: list[TaskSpec],
    workers: int,
    on_done: Callable[[dict], None],
    on_tick: Callable[[], None] = lambda: None,
) -> None:
    """Tasks in this process (``workers == 1``) or in ``workers`` spawned processes."""
    if workers <= 1 or len(specs) <= 1:
        for s in specs:
            on_done(run_task(s, on_window=lambda _: on_tick()))
        return
    ctx = mp.get_context("spawn")  # fork would copy tokenizer thread pools and locks
    n = min(workers, len(specs))
    with ProcessPoolExecutor(
        max_workers=n, mp_context=ctx, initializer=_worker_init, initargs=(os.getpid(),)
    ) as ex:
        futures = {ex.submit(run_task, s): s for s in specs}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=TICK_S, return_when=FIRST_EXCEPTION)
            on_tick()
            for f in done:
                exc = f.exception()
                if exc is not None:
                    for p in pending:
                        p.cancel()
                    raise PreprocessError(f"task {futures[f].task} failed: {exc}") from exc
                on_done(f.result())


def run_ray(
    specs: list[TaskSpec],
    workers: int,
    on_done: Callable[[dict], None],
    on_tick: Callable[[], None] = lambda: None,
) -> None:
    """The same tasks as Ray tasks (one CPU each); uses a running Ray instance or starts a local one.

    Each worker process keeps its tokenizer cached between tasks (``load_tokenizer`` is cached per
    process). Tasks return only their small marker; shards go straight to the shared output
    directory, never through the object store.
    """
    try:
        import ray  # optional extra: only this engine needs it
    except ImportError:
        raise PreprocessError("--engine ray needs ray: pip install 'seqpack[ray]'") from None
    started = False
    if not ray.is_initialized():
        ray.init(
            num_cpus=max(1, workers),
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
        )
        started = True
    try:
        remote = ray.remote(num_cpus=1, max_retries=0)(run_task)
        refs = {remote.remote(s): s for s in specs}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=TICK_S)
            on_tick()
            for r in done:
                try:
                    on_done(ray.get(r))
                except ray.exceptions.RayTaskError as e:
                    for p in pending:
                        ray.cancel(p)
                    raise PreprocessError(f"task {refs[r].task} failed: {e}") from e
    finally:
        if started:
            ray.shutdown()


def merge_tails(out_dir: str, cfg: PreprocessConfig) -> dict | None:
    """Plan the tails of all tasks together (task order) and write their rows as shards of the
    pseudo-task ``cfg.tasks``; returns its marker-like dict (``task``, ``shards``, ``stats``,
    ``row_lengths``, ``row_capacity``) or None when no task held anything back.

    Runs once, after every task; deterministic, so a rerun after a kill rewrites the same bytes.
    """
    pieces = [p for k in range(cfg.tasks) for p in load_pieces(tail_path(out_dir, k))]
    if not pieces:
        return None
    lengths = np.fromiter((len(p.tokens) for p in pieces), np.int64, len(pieces))
    doc_ids = np.fromiter((p.doc_id for p in pieces), np.int64, len(pieces))
    plan = plan_rows(lengths, doc_ids, cfg, cfg.tasks)
    rows = gather_rows(pieces, plan)
    # pieces are at most `capacity` long, so planning them again loses nothing
    if rows.n_tokens != int(lengths.sum()):
        raise PreprocessError(f"merge: {int(lengths.sum()) - rows.n_tokens} tail tokens were cut (a bug)")
    return {
        "task": cfg.tasks,
        "shards": write_rows(out_dir, cfg.tasks, 0, rows, cfg),
        "stats": row_stats(rows, plan),
        "row_lengths": rows.row_lengths(),
        "row_capacity": plan.row_capacity,
    }


EXECUTORS: dict[str, Callable[..., None]] = {
    "local": run_local,
    "ray": run_ray,
}


def preprocess(
    cfg: PreprocessConfig,
    out_dir: str,
    *,
    workers: int = 1,
    engine: str = "local",
    overwrite: bool = False,
    progress: bool = True,
    only_tasks: Sequence[int] | None = None,
) -> dict | None:
    """Run (or resume) preprocessing into ``out_dir`` and return the manifest.

    Args:
        cfg: what to produce (its fields and the inputs decide the output bytes).
        workers: parallel tasks (processes or Ray CPUs); does not change the output.
        engine: ``local`` or ``ray``.
        overwrite: replace a different run's output in ``out_dir``.
        progress: tqdm bar over tasks with tokens/s.
        only_tasks: run just these tasks and return None without writing the manifest (one job of
            a Slurm job array each; a final run without it skips the finished tasks and merges).

    Raises:
        LockError: ``out_dir`` is being written by a run of another config (a run of the same
            config is waited for; see :mod:`seqpack.preprocess.lock`).
    """
    if engine not in EXECUTORS:
        raise PreprocessError(f"engine: {engine!r} is not one of {list(EXECUTORS)}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers <= 0:
        raise PreprocessError(f"workers: expected a positive integer, got {workers!r}")
    if is_url(out_dir):  # staged locally and mirrored: shards and markers as they land, manifest last
        return run_staged(
            out_dir,
            overwrite,
            lambda local: preprocess(
                cfg,
                local,
                workers=workers,
                engine=engine,
                overwrite=overwrite,
                progress=progress,
                only_tasks=only_tasks,
            ),
        )
    out_dir = os.path.abspath(out_dir)
    tok = tokenizer_info(cfg)
    fp = fingerprint(cfg, input_files(cfg), tok["sha256"])
    if only_tasks is not None:
        bad = [k for k in only_tasks if not 0 <= k < cfg.tasks]
        if bad:
            raise PreprocessError(f"only_tasks: {bad} out of range for {cfg.tasks} tasks")
    # the driver holds the run lock for the whole run (any engine): a run of another config is
    # refused, one of the same config waits; --only-task jobs of one run share it
    with run_lock(out_dir, fp, shared=only_tasks is not None):
        return _run_locked(cfg, out_dir, fp, tok, workers, engine, overwrite, progress, only_tasks)


def _run_locked(
    cfg: PreprocessConfig,
    out_dir: str,
    fp: str,
    tok: dict,
    workers: int,
    engine: str,
    overwrite: bool,
    progress: bool,
    only_tasks: Sequence[int] | None,
) -> dict | None:
    """The body of :func:`preprocess`, run holding the output directory's lock."""
    # concurrent single-task jobs share the directory: none of them may delete the others' temp files
    prepare_output(out_dir, fp, overwrite, clean_temp=only_tasks is None)
    markers: list[dict] = []
    todo: list[TaskSpec] = []
    for k in range(cfg.tasks) if only_tasks is None else sorted(set(only_tasks)):
        m = task_done(out_dir, k, fp)
        if m is None:
            todo.append(TaskSpec(cfg.as_dict(), out_dir, k, fp))
        else:
            markers.append(m)
    bar = tqdm(
        total=cfg.tasks,
        initial=len(markers),
        unit="task",
        desc="preprocess",
        disable=not progress,
        file=sys.stderr,
    )
    watch = WindowProgress(out_dir, [s.task for s in todo], fp)
    t0 = time.perf_counter()

    def on_tick() -> None:
        if progress:
            tokens = watch.tokens()
            bar.set_postfix_str(f"{tokens:,} tok, {tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s")

    def on_done(marker: dict) -> None:
        markers.append(marker)
        bar.update(1)
        on_tick()

    try:
        EXECUTORS[engine](todo, workers, on_done, on_tick)
    finally:
        bar.close()
    if only_tasks is not None:
        return None
    return merge_manifest(out_dir, cfg, fp, markers, tok, merged=merge_tails(out_dir, cfg))
