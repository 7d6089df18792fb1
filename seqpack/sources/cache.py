"""The cache under every remote read: pieces of remote files kept in memory (LRU, bounded) and
optionally on local disk (LRU by access time, bounded, atomic writes), plus the thread pool that
prefetches them in the background.

Two kinds of pieces:

- *blocks* for streams (JSON lines, text, tar read front to back): block ``b`` covers bytes
  ``[b * block_bytes, (b + 1) * block_bytes)``; a read that needs several missing blocks fetches
  each contiguous run of them with one range request, and reads ahead;
- *exact ranges* for random access (Parquet, Arrow): the byte range a reader asks for (a column
  chunk of a row group, a footer) is fetched as is, so a projected read fetches no byte of the
  columns it skips; a later read inside a cached range is served from it. Prefetch asks for the
  same ranges the reader will (:func:`seqpack.sources.rowgroups.column_ranges`).

A piece fetched by a prefetch job and asked for by the reader at the same time is fetched once (the
reader waits on the prefetch's future). Pieces are keyed by the file's identity (URL, size and
ETag/modification time), so a changed object is never served from a stale cache.

Settings (environment, read when the first remote file is opened; :func:`configure` overrides):

=============================  ==================  ===============================================
``SEQPACK_BLOCK_BYTES``        ``1048576``         bytes per block (and the read granularity)
``SEQPACK_CACHE_MEMORY``       ``268435456``       in-memory cache bound per process, bytes
``SEQPACK_CACHE_DIR``          (none)              on-disk cache under ``$SEQPACK_CACHE_DIR/blocks``
``SEQPACK_CACHE_BYTES``        ``8589934592``      on-disk cache bound, bytes (0 disables it)
``SEQPACK_PREFETCH``           ``4``               units (row groups, files) read ahead; 0: none
``SEQPACK_PREFETCH_THREADS``   ``4``               prefetch threads per process
=============================  ==================  ===============================================
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

log = logging.getLogger(__name__)

Fetch = Callable[[int, int], bytes]  # (first block, end block) -> their bytes, back to back


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected an integer") from None
    if value < 0:
        raise ValueError(f"{name}={raw!r}: expected an integer >= 0")
    return value


@dataclass(frozen=True)
class CacheConfig:
    """How remote reads are cached and prefetched (see the module docstring for the env names)."""

    block_bytes: int = 1 << 20
    memory_bytes: int = 256 << 20
    disk_dir: str | None = None
    disk_bytes: int = 8 << 30
    prefetch: int = 4
    threads: int = 4

    @classmethod
    def from_env(cls) -> CacheConfig:
        d = cls()
        return cls(
            block_bytes=max(1, _env_int("SEQPACK_BLOCK_BYTES", d.block_bytes)),
            memory_bytes=_env_int("SEQPACK_CACHE_MEMORY", d.memory_bytes),
            # the same root as seqpack's other caches (length indexes in .../lengths)
            disk_dir=os.path.join(root, "blocks") if (root := os.environ.get("SEQPACK_CACHE_DIR")) else None,
            disk_bytes=_env_int("SEQPACK_CACHE_BYTES", d.disk_bytes),
            prefetch=_env_int("SEQPACK_PREFETCH", d.prefetch),
            threads=max(1, _env_int("SEQPACK_PREFETCH_THREADS", d.threads)),
        )


@dataclass
class CacheStats:
    """Counters of one process's block store (``fetched_bytes``: bytes received from remote)."""

    requests: int = 0
    fetched_bytes: int = 0
    memory_hits: int = 0
    disk_hits: int = 0
    retries: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


class DiskCache:
    """Blocks as files under ``root``: written to a temporary name and renamed (a reader never sees a
    partial block), access time kept in the mtime, oldest files evicted past ``limit`` bytes."""

    def __init__(self, root: str, limit: int):
        self.root, self.limit = root, limit
        os.makedirs(root, exist_ok=True)
        self.total = sum(e.stat().st_size for e in os.scandir(root) if e.name.endswith(".blk"))
        self._lock = threading.Lock()

    def _path(self, key: str) -> str:
        return os.path.join(self.root, hashlib.sha256(key.encode()).hexdigest()[:40] + ".blk")

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                data = f.read()
            os.utime(path)  # LRU: the mtime is the last access
        except OSError:
            return None
        return data

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:  # a full or read-only cache disk slows reads down, it must not fail them
            log.warning("seqpack block cache: cannot write %s: %s", path, e)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return
        with self._lock:
            self.total += len(data)
            if self.total > self.limit:
                self._evict()

    def _evict(self) -> None:
        """Remove the least recently used blocks until 90% of the limit (other processes share the
        directory, so the listing, not this process's counter, is the truth)."""
        entries = []
        for e in os.scandir(self.root):
            if e.name.endswith(".blk"):
                try:
                    st = e.stat()
                except OSError:
                    continue
                entries.append((st.st_mtime_ns, st.st_size, e.path))
        entries.sort()
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total <= self.limit * 0.9:
                break
            try:
                os.unlink(path)
            except OSError:
                pass
            total -= size
        self.total = total


class BlockStore:
    """Blocks of remote files in memory (and on disk), with in-flight de-duplication and prefetch."""

    def __init__(self, config: CacheConfig):
        self.config = config
        self.stats = CacheStats()
        self._mem: OrderedDict[tuple, bytes] = OrderedDict()  # (fid, block) or (fid, start, end)
        self._ranges: dict[str, set[tuple[int, int]]] = {}  # fid -> cached exact ranges
        self._mem_total = 0
        self._inflight: dict[tuple, Future] = {}
        self._lock = threading.Lock()
        on_disk = config.disk_dir and config.disk_bytes > 0
        self._disk = DiskCache(config.disk_dir, config.disk_bytes) if on_disk else None
        self._pool: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ memory LRU
    def _remember(self, key: tuple, data: bytes) -> None:
        with self._lock:
            if key not in self._mem:
                self._mem[key] = data
                self._mem_total += len(data)
                if len(key) == 3:
                    self._ranges.setdefault(key[0], set()).add(key[1:])
            while self._mem_total > self.config.memory_bytes and len(self._mem) > 1:
                old_key, old = self._mem.popitem(last=False)
                self._mem_total -= len(old)
                if len(old_key) == 3:
                    self._ranges.get(old_key[0], set()).discard(old_key[1:])
            fut = self._inflight.pop(key, None)
        if fut is not None:
            fut.set_result(data)

    def _fail(self, keys: list[tuple], err: BaseException) -> None:
        with self._lock:
            futs = [self._inflight.pop(k, None) for k in keys]
        for fut in futs:
            if fut is not None:
                fut.set_exception(err)

    # ------------------------------------------------------------------ reads
    def get_blocks(self, fid: str, b0: int, b1: int, fetch: Fetch) -> list[bytes]:
        """Blocks ``b0 .. b1-1`` of file ``fid``, fetching the missing ones (contiguous runs at once)."""
        out: dict[int, bytes] = {}
        mine: list[int] = []
        waits: dict[int, Future] = {}
        with self._lock:
            for b in range(b0, b1):
                key = (fid, b)
                data = self._mem.get(key)
                if data is not None:
                    self._mem.move_to_end(key)
                    self.stats.memory_hits += 1
                    out[b] = data
                elif key in self._inflight:
                    waits[b] = self._inflight[key]
                else:
                    self._inflight[key] = Future()
                    mine.append(b)
        try:
            missing = []
            for b in mine:
                data = self._disk.get(f"{fid}#{b}") if self._disk is not None else None
                if data is None:
                    missing.append(b)
                    continue
                self.stats.disk_hits += 1
                self._remember((fid, b), data)
                out[b] = data
            for run in _runs(missing):
                data = fetch(run[0], run[-1] + 1)
                self.stats.requests += 1
                self.stats.fetched_bytes += len(data)
                bs = self.config.block_bytes
                for i, b in enumerate(run):
                    blk = data[i * bs : (i + 1) * bs]
                    if self._disk is not None:
                        self._disk.put(f"{fid}#{b}", blk)
                    self._remember((fid, b), blk)
                    out[b] = blk
        except BaseException as e:
            self._fail([(fid, b) for b in mine if b not in out], e)
            raise
        for b, fut in waits.items():
            try:
                out[b] = fut.result()
            except Exception:  # the prefetch that owned it failed: fetch it here, with retries
                out[b] = self.get_blocks(fid, b, b + 1, fetch)[0]
        return [out[b] for b in range(b0, b1)]

    def _covering(self, fid: str, start: int, end: int) -> tuple[tuple, bytes | Future] | None:
        """A cached or in-flight exact range of ``fid`` containing ``[start, end)`` (lock held)."""
        for a, b in self._ranges.get(fid, ()):
            if a <= start and end <= b:
                self._mem.move_to_end((fid, a, b))
                return (fid, a, b), self._mem[(fid, a, b)]
        for key, fut in self._inflight.items():
            if len(key) == 3 and key[0] == fid and key[1] <= start and end <= key[2]:
                return key, fut
        return None

    def get_range(self, fid: str, start: int, end: int, fetch: Fetch) -> bytes:
        """Bytes ``[start, end)`` of ``fid``: from a cached range containing them, or fetched exactly."""
        key = (fid, start, end)
        with self._lock:
            found = self._covering(fid, start, end)
            if found is None:
                self._inflight[key] = Future()
        if found is not None:
            (_, a, _), got = found
            if isinstance(got, Future):
                try:
                    got = got.result()
                except Exception:  # the prefetch that owned it failed: fetch here, with retries
                    return self.get_range(fid, start, end, fetch)
            else:
                self.stats.memory_hits += 1
            return got[start - a : end - a]
        try:
            data = self._disk.get(f"{fid}@{start}-{end}") if self._disk is not None else None
            if data is not None:
                self.stats.disk_hits += 1
            else:
                data = fetch(start, end)
                self.stats.requests += 1
                self.stats.fetched_bytes += len(data)
                if self._disk is not None:
                    self._disk.put(f"{fid}@{start}-{end}", data)
        except BaseException as e:
            self._fail([key], e)
            raise
        self._remember(key, data)
        return data

    def prefetch_range(self, fid: str, start: int, end: int, fetch: Fetch) -> None:
        """Fetch the exact range ``[start, end)`` in the background (unless cached or in flight)."""
        with self._lock:
            if end <= start or self._covering(fid, start, end) is not None:
                return
        self.submit(self._quiet_range, fid, start, end, fetch)

    def _quiet_range(self, fid: str, start: int, end: int, fetch: Fetch) -> None:
        try:
            self.get_range(fid, start, end, fetch)
        except Exception as e:  # the reader's own read retries and reports
            log.debug("prefetch of %s bytes %d-%d failed: %s", fid, start, end, e)

    def prefetch(self, fid: str, b0: int, b1: int, fetch: Fetch) -> None:
        """Fetch blocks ``b0 .. b1-1`` in the background (errors are left for the real read to meet)."""
        if b1 <= b0:
            return
        with self._lock:
            if all((fid, b) in self._mem or (fid, b) in self._inflight for b in range(b0, b1)):
                return
        self.submit(self._quiet, fid, b0, b1, fetch)

    def submit(self, fn: Callable, *args) -> None:
        """Run ``fn(*args)`` on the prefetch pool (created on first use, one per process)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.config.threads, thread_name_prefix="seqpack-prefetch")
        self._pool.submit(fn, *args)

    def _quiet(self, fid: str, b0: int, b1: int, fetch: Fetch) -> None:
        try:
            self.get_blocks(fid, b0, b1, fetch)
        except Exception as e:  # the reader's own read retries and reports it
            log.debug("prefetch of %s blocks %d-%d failed: %s", fid, b0, b1, e)

    def shutdown(self) -> None:
        """Drop queued prefetches; running ones finish in the background (a read stuck in retries
        against a server that went away must not hold the caller up)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _runs(blocks: list[int]) -> list[list[int]]:
    """Split sorted block indices into runs of consecutive ones."""
    runs: list[list[int]] = []
    for b in blocks:
        if runs and runs[-1][-1] == b - 1:
            runs[-1].append(b)
        else:
            runs.append([b])
    return runs


_STORE: BlockStore | None = None


def store() -> BlockStore:
    """This process's block store (built from the environment on first use)."""
    global _STORE
    if _STORE is None:
        _STORE = BlockStore(CacheConfig.from_env())
    return _STORE


def configure(**changes) -> CacheConfig:
    """Replace this process's block store with one using ``changes`` over the current settings
    (``block_bytes``, ``memory_bytes``, ``disk_dir``, ``disk_bytes``, ``prefetch``, ``threads``).
    Returns the new settings; cached blocks in memory are dropped."""
    global _STORE
    old = store()
    old.shutdown()
    _STORE = BlockStore(replace(old.config, **changes))
    return _STORE.config


def _after_fork() -> None:
    # a forked DataLoader worker must not share the parent's pool threads, locks or futures
    global _STORE
    if _STORE is not None:
        _STORE = BlockStore(_STORE.config)


os.register_at_fork(after_in_child=_after_fork)
