"""Reading from URLs: fsspec filesystems, remote glob/directory expansion, ranged block reads with
retries, and clear errors for missing or denied objects.

Any fsspec protocol works (``s3://``, ``gs://``, ``hf://``, ``http(s)://``, ...); the backend
package (``s3fs``, ``gcsfs``, ``huggingface_hub``: the ``remote`` extra) is imported by fsspec when
its protocol is first used. Credentials and endpoints come from each backend's own environment and
config (``AWS_*`` variables and ``~/.aws``, ``GOOGLE_APPLICATION_CREDENTIALS``, ``HF_TOKEN``,
``AWS_ENDPOINT_URL`` for an S3-compatible server), never from seqpack's config files; a source may
pass extra backend options as ``storage_options`` (e.g. ``{"endpoint_url": ..., "anon": true}``).

Every remote read goes through :class:`RemoteFile`: blocks of the object come from the process's
:mod:`~seqpack.sources.cache` or from one range request per run of missing blocks, so Parquet row
groups are read column chunk by column chunk, never as whole files. Each request is retried with
exponential backoff on transient errors (HTTP 5xx, connection resets and cuts mid-body, timeouts);
a 404 or 403 raises :class:`~seqpack.sources.records.SourceError` naming the URL at once.
"""

from __future__ import annotations

import errno
import io
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec

from seqpack.sources.cache import store
from seqpack.sources.records import SourceError
from seqpack.sources.urls import is_url, protocol

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries per request; waits ``base_s * 2**i`` (capped at ``max_s``, jittered)."""

    attempts: int = 8
    base_s: float = 0.05
    max_s: float = 2.0


RETRY = RetryPolicy()

# ------------------------------------------------------------------------------ storage options
_OPTIONS: dict[str, dict] = {}
_INFO: dict[str, dict] = {}
_INFO_LOCK = threading.Lock()


def set_storage_options(prefix: str, options: Mapping[str, Any] | None) -> None:
    """Use backend ``options`` for every URL starting with ``prefix`` (a source's ``storage_options``)."""
    if options:
        _OPTIONS[prefix] = dict(options)


def storage_options(url: str) -> dict:
    """The options of the longest registered prefix of ``url`` (empty: the backend's defaults)."""
    best = max((p for p in _OPTIONS if url.startswith(p)), key=len, default=None)
    return dict(_OPTIONS[best]) if best is not None else {}


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path inside it)`` of ``url`` (fsspec caches the filesystem instances)."""
    try:
        return fsspec.core.url_to_fs(url, **storage_options(url))
    except ImportError as e:
        raise ImportError(
            f"{url}: reading {protocol(url)}:// URLs needs a package seqpack installs with its 'remote' "
            f"extra (pip install 'seqpack[remote]'): {e}"
        ) from e


# ------------------------------------------------------------------------------ errors and retries
_TRANSIENT_ERRNO = {
    errno.EBUSY,  # s3fs: 503 SlowDown
    errno.EIO,  # s3fs: an error code it does not know (ServiceUnavailable, InternalError, ...)
    getattr(errno, "EREMOTEIO", -1),  # s3fs: 500 InternalError
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ECONNREFUSED,
    errno.EPIPE,
    errno.ETIMEDOUT,
}
_TRANSIENT_NAMES = {
    "ClientPayloadError",  # aiohttp: the body ended early (connection cut mid-body)
    "ServerDisconnectedError",
    "ClientOSError",
    "ClientConnectorError",
    "ServerTimeoutError",
    "ConnectionTimeoutError",
    "SocketTimeoutError",
    "IncompleteReadError",  # botocore
    "ResponseStreamingError",
    "EndpointConnectionError",
    "ConnectionClosedError",
    "ReadTimeoutError",
    "ConnectTimeoutError",
    "FSTimeoutError",
    "ProtocolError",
    "RemoteDisconnected",
    "IncompleteRead",
    "ShortRead",
}


class ShortRead(ConnectionError):
    """A range request returned fewer bytes than asked for (a body cut off without an error)."""


def _status(e: BaseException) -> int | None:
    for attr in ("status", "status_code"):
        v = getattr(e, attr, None)
        if isinstance(v, int):
            return v
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        return resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def classify(e: BaseException) -> str:
    """``"missing"`` (404), ``"denied"`` (401/403), ``"transient"`` (retry) or ``"fatal"``."""
    chain: list[BaseException] = []
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for err in chain:
        status = _status(err)
        if isinstance(err, FileNotFoundError) or status == 404:
            return "missing"
        if isinstance(err, PermissionError) or status in (401, 403):
            return "denied"
        if status is not None and (status >= 500 or status in (408, 429)):
            return "transient"
        if isinstance(err, (ConnectionError, TimeoutError)) or type(err).__name__ in _TRANSIENT_NAMES:
            return "transient"
        if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNO:
            return "transient"
    return "fatal"


def call(url: str, what: str, fn: Callable[[], T], policy: RetryPolicy = RETRY) -> T:
    """``fn()`` with retries on transient errors; 404/403 and exhausted retries raise SourceError."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except SourceError:
            raise
        except Exception as e:
            kind = classify(e)
            if kind == "missing":
                raise SourceError(url, None, None, f"no such object or file (404) while {what}") from None
            if kind == "denied":
                raise SourceError(
                    url,
                    None,
                    None,
                    f"access denied (403) while {what}: the credentials of the {protocol(url)} backend "
                    "(its environment variables or config) do not allow reading it",
                ) from None
            if kind == "fatal" or attempt == policy.attempts:
                tries = f" after {attempt} attempts" if attempt > 1 else ""
                raise SourceError(url, None, None, f"{what} failed{tries}: {type(e).__name__}: {e}") from e
            st = store().stats
            st.retries += 1
            st.reasons[type(e).__name__] = st.reasons.get(type(e).__name__, 0) + 1
            time.sleep(min(policy.max_s, policy.base_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0))
    raise AssertionError("unreachable")  # pragma: no cover


# ------------------------------------------------------------------------------ listing
def _has_magic(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def info(url: str, fresh: bool = False) -> dict:
    """The object's size and version (ETag or modification time), asked once per process unless
    ``fresh`` (random-access files are opened once per unit and assumed unchanged while read)."""
    with _INFO_LOCK:
        hit = None if fresh else _INFO.get(url)
    if hit is not None:
        return hit
    fs, path = filesystem(url)
    raw = call(url, "reading its size", lambda: fs.info(path))
    if raw.get("type") == "directory":
        raise SourceError(url, None, None, "is a directory, not a file")
    if raw.get("size") is None:
        raise SourceError(url, None, None, "the server does not report the object's size")
    return _remember_info(url, raw)


def _remember_info(url: str, raw: dict) -> dict:
    """Keep a listing's or lookup's size and version of ``url`` (a listing saves a request per file)."""
    version = next((raw[k] for k in ("ETag", "etag", "md5Hash", "mtime", "LastModified") if raw.get(k)), "")
    out = {"size": int(raw["size"]), "version": str(version)}
    with _INFO_LOCK:
        _INFO[url] = out
    return out


def forget() -> None:
    """Drop the process's cached object sizes (the next open asks the server again)."""
    with _INFO_LOCK:
        _INFO.clear()


def expand(url: str) -> list[str]:
    """Files of a URL: a glob (sorted matches), a directory (files directly inside, sorted) or one
    file. A pattern matching nothing or a missing object is an error naming the URL."""
    fs, path = filesystem(url)

    def full(p: str) -> str:
        return p if is_url(p) else fs.unstrip_protocol(p)

    if _has_magic(path):
        hits = call(url, "expanding the glob", lambda: fs.glob(path, detail=True))
        entries = [d for d in hits.values() if d.get("type", "file") == "file"]
        if not entries:
            raise FileNotFoundError(f"glob {url!r} matched no files")
        return _listed(entries, full)
    try:
        raw = call(url, "looking it up", lambda: fs.info(path))
    except SourceError as e:
        if "(404)" in e.problem:
            raise FileNotFoundError(f"no such file: {url!r}") from None
        raise
    if raw.get("type") != "directory":
        if raw.get("size") is not None:
            _remember_info(url, raw)
        return [url]
    entries = call(url, "listing the directory", lambda: fs.ls(path, detail=True))
    return _listed([d for d in entries if d.get("type") == "file"], full)


def _listed(entries: list[dict], full: Callable[[str], str]) -> list[str]:
    """Sorted URLs of listed files; their sizes and versions are remembered (no HEAD per file)."""
    out = []
    for d in entries:
        u = full(d["name"])
        if d.get("size") is not None:
            _remember_info(u, d)
        out.append(u)
    return sorted(out)


def exists(url: str) -> bool:
    """Whether ``url`` (or, for a pattern, anything it matches) exists."""
    try:
        return bool(expand(url))
    except FileNotFoundError:
        return False


# ------------------------------------------------------------------------------ reading
class RemoteFile(io.RawIOBase):
    """A seekable binary file over a URL, read through the cache (:mod:`seqpack.sources.cache`).

    Args:
        url: the object.
        sequential: read front to back (streams): whole blocks, ``readahead`` blocks prefetched past
            each read. Otherwise (Parquet, Arrow) each read fetches exactly its byte range, and the
            readers prefetch the ranges of their next units.
        readahead: blocks to prefetch past each read of a sequential file.
        fresh: ask the object's size and version again (not the process's cached answer).
    """

    def __init__(self, url: str, *, sequential: bool = False, readahead: int = 0, fresh: bool = False):
        super().__init__()
        self.url = url
        meta = info(url, fresh)
        self.size, self.fid = meta["size"], f"{url}|{meta['size']}|{meta['version']}"
        self._fs, self._path = filesystem(url)
        self._store = store()
        self._bs = self._store.config.block_bytes
        self._pos = 0
        self.sequential, self.readahead = sequential, readahead

    # io protocol
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"{self.url}: negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def _fetch(self, b0: int, b1: int) -> bytes:
        return self._fetch_exact(b0 * self._bs, min(self.size, b1 * self._bs))

    def _fetch_exact(self, start: int, end: int) -> bytes:
        def get() -> bytes:
            data = self._fs.cat_file(self._path, start=start, end=end)
            if len(data) != end - start:
                raise ShortRead(f"got {len(data)} of {end - start} bytes")
            return data

        return call(self.url, f"reading bytes {start}-{end}", get)

    def pread(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` (clipped to the file)."""
        end = min(end, self.size)
        if end <= start:
            return b""
        if not self.sequential:
            return self._store.get_range(self.fid, start, end, self._fetch_exact)
        b0, b1 = start // self._bs, (end - 1) // self._bs + 1
        blocks = self._store.get_blocks(self.fid, b0, b1, self._fetch)
        if self.readahead:
            nblocks = -(-self.size // self._bs)
            self._store.prefetch(self.fid, b1, min(nblocks, b1 + self.readahead), self._fetch)
        lo = start - b0 * self._bs
        if len(blocks) == 1:
            return blocks[0][lo : lo + end - start]
        return b"".join(blocks)[lo : lo + end - start]

    def prefetch(self, start: int, end: int) -> None:
        """Fetch bytes ``[start, end)`` into the cache in the background."""
        end = min(end, self.size)
        if end > start and not self.sequential:
            self._store.prefetch_range(self.fid, start, end, self._fetch_exact)
        elif end > start:
            self._store.prefetch(self.fid, start // self._bs, (end - 1) // self._bs + 1, self._fetch)

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else self._pos + n
        data = self.pread(self._pos, end)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)


def open_input(path: str, *, sequential: bool = True):
    """A local file, or a URL as a :class:`RemoteFile`, opened for binary reading.

    ``sequential``: the caller reads front to back (JSON lines, text, tar), so blocks ahead of each
    read are prefetched (``SEQPACK_PREFETCH`` x 4 blocks).
    """
    if not is_url(path):
        return open(path, "rb")
    # a stream is opened once per read of it: ask its size again, so a rewritten manifest is seen
    return RemoteFile(path, sequential=sequential, readahead=store().config.prefetch * 4, fresh=True)
