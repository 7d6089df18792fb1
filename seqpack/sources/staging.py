"""Writing an output directory to a URL: a local staging directory mirrored to the object store.

``seqpack preprocess --output s3://bucket/prefix`` runs exactly as for a local directory, in a
staging directory (``SEQPACK_STAGING_DIR``, default ``$SEQPACK_CACHE_DIR/staging`` or
``~/.cache/seqpack/staging``; one subdirectory per URL), and :class:`StagedOutput` mirrors it:

- before the run, :meth:`~StagedOutput.pull` copies what the URL already holds (shards, markers, a
  manifest) into the staging directory, so the run's own checks (same run? finished tasks whose
  shards still verify? foreign files?) and its resume work as locally, on any machine;
- during the run a background thread pushes committed files every ``SEQPACK_PUSH_INTERVAL``
  seconds (default 10), and the end of the run pushes the rest: data files first, then the hidden
  work directory's markers listed *before* them (a marker is written after the shards it lists, so
  a pushed marker never names a shard the store lacks), and the final ``manifest.json`` last, after
  files the run deleted (an overwritten run's shards) were deleted remotely;
- every file is uploaded under a hidden temporary name and then moved to its name, so a reader
  never sees a half-written object, and never a manifest before all of its shards.

A run killed at any point resumes from the URL (pull, then the usual resume), or from the staging
directory when it is still there; a finished run removes its staging directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import threading
from collections.abc import Callable
from typing import TypeVar

from seqpack.sources.remote import call, filesystem
from seqpack.sources.urls import join

T = TypeVar("T")
MANIFEST = "manifest.json"


def staging_root() -> str:
    root = os.environ.get("SEQPACK_STAGING_DIR")
    if root:
        return root
    cache = os.environ.get("SEQPACK_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "seqpack")
    return os.path.join(cache, "staging")


def _is_temp(name: str) -> bool:
    return ".tmp-" in posixpath.basename(name)


class StagedOutput:
    """A URL output directory and its local staging directory.

    Args:
        url: the output (``s3://bucket/prefix``, any writable fsspec URL).
        final: the file pushed last (it marks the output complete).
        root: where staging directories live (default :func:`staging_root`).
    """

    def __init__(self, url: str, *, final: str = MANIFEST, root: str | None = None):
        self.url = url.rstrip("/")
        self.final = final
        key = hashlib.sha256(self.url.encode()).hexdigest()[:16]
        base = root or staging_root()
        self.local = os.path.join(base, key)
        self._record_path = os.path.join(base, f"{key}.sync.json")
        self._fs, self._path = filesystem(self.url)
        self._lock = threading.Lock()
        try:
            with open(self._record_path, encoding="utf-8") as f:
                self._record: dict[str, list[int]] = json.load(f)
        except (OSError, ValueError):
            self._record = {}

    # ------------------------------------------------------------------ bookkeeping
    def _stamp(self, rel: str) -> list[int]:
        st = os.stat(os.path.join(self.local, rel))
        return [st.st_size, st.st_mtime_ns]

    def _save_record(self) -> None:
        tmp = f"{self._record_path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self._record, f)
        os.replace(tmp, self._record_path)

    def _local_files(self) -> tuple[list[str], list[str]]:
        """``(data files, work files)``: relative names, no temporaries; work files live in hidden dirs."""
        data, work = [], []
        for dirpath, _dirs, files in os.walk(self.local):
            rel_dir = os.path.relpath(dirpath, self.local)
            for name in files:
                rel = name if rel_dir == "." else posixpath.join(*rel_dir.split(os.sep), name)
                if _is_temp(rel):
                    continue
                (work if rel_dir != "." else data).append(rel)
        return sorted(data), sorted(work)

    def _remote(self, rel: str) -> str:
        return posixpath.join(self._path, rel)

    # ------------------------------------------------------------------ pull / push
    def remote_files(self) -> list[str]:
        """Relative names of every object under the URL (temporaries excluded)."""
        found = call(self.url, "listing the output", lambda: self._fs.find(self._path))
        prefix = self._path.rstrip("/") + "/"
        return sorted(p[len(prefix) :] for p in found if p.startswith(prefix) and not _is_temp(p))

    def pull(self) -> int:
        """Copy the URL's files missing from the staging directory into it; returns how many."""
        os.makedirs(self.local, exist_ok=True)
        n = 0
        there = self.remote_files()
        for rel in set(self._record) - set(there):  # gone from the store: push it again
            del self._record[rel]
        for rel in there:
            dst = os.path.join(self.local, *rel.split("/"))
            if os.path.exists(dst):
                continue
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            tmp = f"{dst}.tmp-{os.getpid()}"
            src = self._remote(rel)
            call(join(self.url, rel), "downloading it", lambda s=src, t=tmp: self._fs.get_file(s, t))
            os.replace(tmp, dst)
            self._record[rel] = self._stamp(rel)
            n += 1
        self._save_record()
        return n

    def _upload(self, rel: str) -> None:
        src = os.path.join(self.local, *rel.split("/"))
        dst = self._remote(rel)
        head, name = posixpath.split(dst)
        tmp = posixpath.join(head, f".{name}.tmp-{os.getpid()}")
        url = join(self.url, rel)
        call(url, "uploading it", lambda: self._fs.put_file(src, tmp))
        call(url, "moving it into place", lambda: self._fs.mv(tmp, dst))
        self._record[rel] = self._stamp(rel)

    def push(self, final: bool = False) -> int:
        """Upload new or changed files (data, then markers); with ``final`` also delete remote files
        the run removed and upload the final file last. Returns the number of files uploaded."""
        with self._lock:
            _, work = self._local_files()  # markers first: their shards are on disk already
            data, _ = self._local_files()
            n = 0
            for rel in [*(d for d in data if d != self.final), *work]:
                try:
                    stamp = self._stamp(rel)
                except FileNotFoundError:  # removed by the run since the listing
                    continue
                if self._record.get(rel) != stamp:
                    self._upload(rel)
                    n += 1
            if final:
                here = set(data) | set(work)
                for rel in sorted(r for r in self._record if r not in here):
                    call(join(self.url, rel), "deleting it", lambda r=rel: self._fs.rm_file(self._remote(r)))
                    del self._record[rel]
                if self.final in here and self._record.get(self.final) != self._stamp(self.final):
                    self._upload(self.final)
                    n += 1
            self._save_record()
            self._fs.invalidate_cache(self._path)
            return n

    def discard(self) -> None:
        """Remove the staging directory and its record (after a complete, pushed run)."""
        shutil.rmtree(self.local, ignore_errors=True)
        try:
            os.unlink(self._record_path)
        except FileNotFoundError:
            pass
        self._record = {}

    def drop_final(self) -> None:
        """Delete the remote final file first (a run that replaces the output must not leave a
        manifest naming shards it is about to rewrite)."""
        dst = self._remote(self.final)
        if call(self.url, "checking the manifest", lambda: self._fs.exists(dst)):
            call(join(self.url, self.final), "deleting it", lambda: self._fs.rm_file(dst))
        self._record.pop(self.final, None)


def run_staged(url: str, overwrite: bool, run: Callable[[str], T], interval_s: float | None = None) -> T:
    """Run ``run(staging_dir)`` for a URL output: pull, run with periodic pushes, final push.

    A failed or interrupted run still pushes what it committed (so another machine can resume); the
    final file is pushed only when ``run`` returned a result that is not None.
    """
    out = StagedOutput(url)
    if overwrite:
        out.drop_final()
    out.pull()
    interval = float(os.environ.get("SEQPACK_PUSH_INTERVAL", "10")) if interval_s is None else interval_s
    stop = threading.Event()

    def pusher() -> None:
        while not stop.wait(interval):
            try:
                out.push()
            except Exception:  # the final push retries and reports
                pass

    thread = threading.Thread(target=pusher, name="seqpack-push", daemon=True)
    thread.start()
    result = None
    try:
        result = run(out.local)
    finally:
        stop.set()
        thread.join()
        out.push(final=result is not None)
    if result is not None:
        out.discard()  # the URL holds it all now; a later run pulls what it needs
    return result
