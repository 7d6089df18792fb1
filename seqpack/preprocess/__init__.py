"""Offline preprocessing: read -> tokenize -> plan rows -> write shards, as independent tasks.

The input is split into ``tasks`` fixed parts with the readers' own partition (task ``k`` of ``T``
is consumer ``(k, T)``: whole files/row groups when there are at least ``T`` of them, otherwise
every ``T``-th record). ``T`` is part of the config, never derived from the worker count, so the
output bytes are the same for any number of workers and for either executor.

Modules, in the order a run uses them:

- ``config``: :class:`PreprocessConfig` (``capacity`` = tokens per row, strategy, ...), built by
  :func:`build_config` from defaults < a config file (:func:`load_config_file`) < explicit options;
  the run's fingerprint (config + inputs + tokenizer).
- ``lock``: the run lock of the output directory (one run writes it at a time; a stale lock of a
  killed run is reported and taken over).
- ``output``: the output directory (run marker, task and window markers, ``manifest.json``).
- ``task``: one task, window by window: read, tokenize, plan (``pack``/``decompose``/``none``),
  gather, write shards (atomic), then its markers; resumable after its last window.
- ``tails``: which part-filled ``pack`` rows a window holds back (planned again with the next
  window, the last window's as the task's tail) and how held pieces are stored.
- ``executors``: tasks in this process, in spawned processes or on Ray, and :func:`preprocess`,
  which skips the tasks whose markers and shards verify, plans the tasks' tails together and
  merges the manifest.
- ``cli``: ``seqpack preprocess``.

A shard is listed in the manifest only after its task's marker exists, and a marker only after its
shards were renamed into place, so a half-written shard is never listed; a killed run resumes and
ends with the same bytes.
"""

from seqpack.lazy import lazy_exports

# defining module -> the public names it gives, imported on first access (seqpack/lazy.py)
_SOURCES: dict[str, tuple[str, ...]] = {
    "seqpack.preprocess.config": (
        "DEMO_CORPUS", "OPTION_KEYS", "PreprocessConfig", "PreprocessError", "build_config", "fingerprint",
        "load_config_file",
    ),
    "seqpack.preprocess.executors": ("ENGINES", "EXECUTORS", "preprocess", "run_local", "run_ray"),
    "seqpack.preprocess.lock": ("LockError", "StaleLockWarning", "run_lock"),
    "seqpack.preprocess.output": ("WORK_DIR", "merge_manifest", "prepare_output", "task_done"),
    "seqpack.preprocess.task": ("RowPlan", "TaskSpec", "gather_rows", "plan_rows", "run_task"),
}
__getattr__, __dir__ = lazy_exports(__name__, _SOURCES)

__all__ = ["DEMO_CORPUS", "ENGINES", "EXECUTORS", "OPTION_KEYS", "WORK_DIR", "LockError", "PreprocessConfig"]
__all__ += ["PreprocessError", "RowPlan", "TaskSpec", "build_config", "fingerprint", "gather_rows"]
__all__ += ["load_config_file", "merge_manifest", "plan_rows", "prepare_output", "preprocess", "run_local"]
__all__ += ["run_lock", "run_ray", "run_task", "StaleLockWarning", "task_done"]
