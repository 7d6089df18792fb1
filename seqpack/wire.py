"""One flat buffer per batch across the DataLoader worker boundary.

Every tensor that crosses from a worker to the main process costs a shared-memory segment, a file
descriptor and a pickle round trip, so the number of tensors, not the bytes, sets the ceiling of a
worker (measured: a trivial worker shipping a 7-tensor ``VarlenBatch`` peaks at 2.3 Mtok/s, the
same bytes as one tensor at 8.1). A worker therefore sends a :class:`WireItem`: ONE buffer (a
uint8 numpy array: pickled by value through the pipe, which beats a shared-memory tensor per batch)
holding every tensor of the batch back to back (each 8-byte aligned), next to the worker's chain
state pickled to bytes when it sends one with this batch; the main process rebuilds the batch with
:func:`decode_batch` as views into that buffer (no copy) and keeps the state bytes unparsed until
a checkpoint asks for them (:func:`load_state_bytes`).

A ``VarlenBatch`` is built in that layout from the start (its *storage*: one uint8 array that
every tensor of the batch views, :func:`new_storage`), so sending it copies nothing: the pack
stage gathers tokens straight into the storage's head (:func:`batch_tokens`), the numba kernel
writes the other fields behind them, and :func:`encode_batch` ships the storage as it is.

Batches that are dataclasses or mappings of tensors (``VarlenBatch``, a stage's dict of tensors)
are flattened; anything else travels as it is next to the buffer.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import pickle

try:
    import fcntl
except ImportError:  # not on Windows: pipes keep their default size there
    fcntl = None
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch

_ALIGN = 8
# bytes of the pipe that carries a DataLoader's worker results (Linux; the unprivileged maximum
# by default): a 64 KB pipe moves a 230 KB batch in four blocking round trips between the worker's
# feeder thread and the main process, each a wake-up on a busy machine
PIPE_BYTES = 1 << 20
_NO_BYTES = np.zeros(0, np.uint8)
# a DataLoader item is a list of batches of about this many bytes (4 batches of 8192 tokens), at
# most GROUP_ITEMS of them (see grouped)
GROUP_BYTES = 1 << 20
GROUP_ITEMS = 16
_NUMPY = {
    torch.int64: np.int64, torch.int32: np.int32, torch.int16: np.int16, torch.int8: np.int8,
    torch.uint8: np.uint8, torch.bool: np.bool_, torch.float32: np.float32, torch.float64: np.float64,
    torch.float16: np.float16,
}  # fmt: skip


@functools.lru_cache(maxsize=1024)
def storage_layout(size: int, n: int) -> tuple[int, ...]:
    """Byte offsets in a batch's storage of ``input_ids``, ``labels``, ``position_ids`` (int64
    ``[T]``), ``seq_idx`` (int32 ``[T]``), ``cu_seqlens`` (int32 ``[n + 2]``), ``doc_ids``,
    ``seg_start`` (int64 ``[n + 1]``), and its total size, for ``T = size`` tokens and ``n``
    segments (room for a padding one); each array starts 8-byte aligned. The last byte of the
    storage says whether a batch was built in it already (see :func:`storage_of`)."""
    out, at = [], 0
    for nbytes in (8 * size, 8 * size, 8 * size, 4 * size, 4 * (n + 2), 8 * (n + 1), 8 * (n + 1)):
        out.append(at)
        at += -(-nbytes // 8) * 8
    out.append(at + _ALIGN)
    return tuple(out)


def new_storage(size: int, n: int) -> np.ndarray:
    """A fresh storage: uint8, not zeroed (every byte of a batch is written by its builder), its
    last byte 0 (not built in yet)."""
    raw = np.empty(storage_layout(size, n)[-1], np.uint8)
    raw[-1] = 0
    return raw


def storage_of(input_ids: np.ndarray, n: int) -> np.ndarray | None:
    """The storage whose head ``input_ids`` is (from :func:`batch_tokens`), else None.

    A storage is private to seqpack (only :func:`batch_tokens` hands out a view of one, always its
    head), so its identity and sizes identify it without comparing pointers (~2 us each). Its last
    byte is set once a batch is built in it, so a batch's ``input_ids.numpy()`` given to
    ``from_arrays`` again is copied, never built over (the first batch keeps its fields).
    """
    raw = input_ids.base
    if (
        type(input_ids) is np.ndarray
        and type(raw) is np.ndarray
        and raw.base is None
        and input_ids.dtype == np.int64
        and raw.dtype == np.uint8
        and len(raw) == storage_layout(len(input_ids), n)[-1]  # (cached)
        and raw[-1] == 0
    ):
        return raw
    return None


@functools.lru_cache(maxsize=1024)
def storage_spans(size: int, n: int, n_seg: int) -> tuple:
    """The ``(name, dtype, shape, byte offset, bytes)`` of each tensor of a ``VarlenBatch`` in its
    storage (``T = size``, room for ``n`` segments, ``n_seg`` segments with padding), as
    :func:`encode_batch` sends them."""
    offs = storage_layout(size, n)
    i64, i32 = torch.int64, torch.int32
    return (
        ("input_ids", i64, (size,), 0, 8 * size),
        ("labels", i64, (size,), offs[1], 8 * size),
        ("position_ids", i64, (size,), offs[2], 8 * size),
        ("cu_seqlens", i32, (n_seg + 1,), offs[4], 4 * (n_seg + 1)),
        ("seq_idx", i32, (size,), offs[3], 4 * size),
        ("doc_ids", i64, (n_seg,), offs[5], 8 * n_seg),
        ("seg_start", i64, (n_seg,), offs[6], 8 * n_seg),
    )


def batch_tokens(size: int, n: int) -> np.ndarray:
    """int64 ``[size]``: where to write the tokens of a batch of ``n`` segments before
    :meth:`VarlenBatch.from_arrays` (which then builds the batch around it without a copy)."""
    return new_storage(size, n)[: 8 * size].view(np.int64)


class _StatePickler(pickle.Pickler):
    """Pickles torch tensors as numpy arrays: ~100x cheaper than torch's own reduction (which goes
    through ``torch.save`` per tensor), and the state is small tensors only. CPU tensors only."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is torch.Tensor and obj.device.type == "cpu" and obj.dtype != torch.bfloat16:
            return torch.from_numpy, (obj.numpy(),)
        return NotImplemented


def dumps_state(state: Any) -> bytes:
    """``state`` pickled for the trip to the main process (tensors as numpy, see :class:`_StatePickler`)."""
    buf = io.BytesIO()
    # protocol 4: arrays unpickle as copies (5 would make them views of one bytes object, which
    # torch.save refuses to write as separate tensors)
    _StatePickler(buf, protocol=4).dump(state)
    return buf.getvalue()


class WireItem(NamedTuple):
    """What a worker sends per batch.

    Attributes:
        buffer: ``B`` bytes: the batch's tensors (see ``layout``); between a worker and the main
            process it may instead be ``(worker, start, B)``: where in that worker's shared-memory
            ring the bytes lie (:mod:`seqpack.ring`).
        layout: ``(kind, cls, fields)``: how to rebuild the batch (see :func:`encode_batch`).
        obj: the batch itself when it has no tensors to flatten, else None.
        worker_id: the *logical* worker (consumer slot inside the rank) that produced it.
        stats: the worker's chain counters after this batch, or None: unchanged since the last
            ones it sent (they come with every state and with the worker's last batch).
        skip: batches the worker made after the chain state it last sent (0: ``state`` is the
            one right after this batch).
        state: the worker's chain state pickled (:func:`dumps_state`), or ``b""``: none sent
            with this batch.
    """

    buffer: np.ndarray | tuple[int, int, int]
    layout: tuple
    obj: Any
    worker_id: int
    stats: dict | None
    skip: int = 0
    state: bytes = b""


def _tensor_fields(batch: Any) -> tuple[str, type | None, list[tuple[str, Any]]] | None:
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return "dataclass", type(batch), [(f.name, getattr(batch, f.name)) for f in dataclasses.fields(batch)]
    if isinstance(batch, Mapping) and any(isinstance(v, torch.Tensor) for v in batch.values()):
        return "mapping", None, list(batch.items())
    return None


@functools.lru_cache(maxsize=64)
def _other_fields(cls: type, tensor_names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in tensor_names)


def _stored_spans(batch: Any) -> tuple[np.ndarray, tuple] | None:
    """``(storage, spans)`` when every tensor of ``batch`` still is the view its builder made into
    one storage (``VarlenBatch.from_arrays`` notes the storage, those tensors and their spans as
    ``_storage``), else None. Identity is the check: a field replaced since (even by a view of the
    same memory) fails it and takes the general path; writes into the tensors are in the storage."""
    note = getattr(batch, "_storage", None)
    if note is None:
        return None
    buf, tensors, tensor_spans = note
    for span, t in zip(tensor_spans, tensors):
        if getattr(batch, span[0]) is not t:
            return None  # replaced since
    others = []
    for name in _other_fields(type(batch), tuple(span[0] for span in tensor_spans)):
        value = getattr(batch, name)
        if isinstance(value, torch.Tensor):
            return None  # a tensor outside the storage (e.g. loss_weights added later)
        others.append((name, None, value, -1, 0))
    return buf, tensor_spans + tuple(others)


def encode_batch(batch: Any, state: Any, worker_id: int, stats: dict | None, skip: int = 0) -> WireItem:
    """Pack ``batch``'s tensors into one buffer, with the pickled ``state`` (None: no state this
    time, ``skip`` batches since the last one).

    ``layout``'s fields are ``(name, dtype, shape, byte offset, bytes)`` for a tensor and
    ``(name, None, value, -1, 0)`` for any other value (ints, None). CPU tensors only. A batch
    built in one storage (``VarlenBatch.from_arrays``) is sent as that storage, without a copy.
    """
    state_bytes = state if isinstance(state, bytes) else (dumps_state(state) if state is not None else b"")
    stored = _stored_spans(batch)
    if stored is not None:
        return WireItem(
            stored[0], ("dataclass", type(batch), stored[1]), None, worker_id, stats, skip, state_bytes
        )
    parts = _tensor_fields(batch)
    spans: list[tuple] = []
    tensors: list[tuple[int, torch.Tensor]] = []
    at = 0
    if parts is None:
        return WireItem(_NO_BYTES, ("object", None, ()), batch, worker_id, stats, skip, state_bytes)
    kind, cls, items = parts
    for name, value in items:
        if isinstance(value, torch.Tensor) and value.device.type == "cpu":
            t = value.contiguous()
            spans.append((name, t.dtype, tuple(t.shape), at, t.numel() * t.element_size()))
            tensors.append((at, t))
            at += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
        else:
            spans.append((name, None, value, -1, 0))
    # a numpy array, not a tensor: it is pickled by value through the worker's pipe, which measured
    # ~3x faster per batch than a tensor's shared-memory segment (create, map, pass an fd)
    raw = buf = np.empty(at, np.uint8)
    for off, t in tensors:
        a = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().reshape(-1).view(np.uint8)
        raw[off : off + len(a)] = a
    return WireItem(buf, (kind, cls, tuple(spans)), None, worker_id, stats, skip, state_bytes)


def item_bytes(item: WireItem) -> int:
    """Bytes of ``item``'s batch buffer (wherever it lies): a function of the batch alone (a state
    rides with a batch when its timing says so, so its bytes would make the cut vary by run)."""
    buf = item.buffer
    return buf[2] if type(buf) is tuple else len(buf)


def grouped(items: Iterator[WireItem], first: int = 0) -> Iterator[list[WireItem]]:
    """``items`` cut into the lists a worker hands the DataLoader, one per DataLoader item.

    Each DataLoader item costs ~250 us of fixed work over both processes (index and result queues,
    a feeder thread per side, the profiler hook): a list of batches pays it once for all of them. A
    list closes once it holds :data:`GROUP_BYTES` or :data:`GROUP_ITEMS` batches, a rule on the
    batches themselves (never on time), so the same stream is cut the same way in every run, and the
    batch order over workers (the DataLoader takes one list per worker in turn) is reproducible.
    ``first``: the size of the first list (the rest of a list a checkpoint interrupted; 0: by the rule).
    """
    group: list[WireItem] = []
    size, cap = 0, first
    for item in items:
        group.append(item)
        size += item_bytes(item)
        if (cap and len(group) == cap) or (not cap and (size >= GROUP_BYTES or len(group) == GROUP_ITEMS)):
            yield group
            group, size, cap = [], 0, 0
    if group:
        yield group


def decode_batch(item: WireItem) -> Any:
    """The batch of ``item``, its tensors views into ``item.buffer`` (no copy)."""
    kind, cls, spans = item.layout
    if kind == "object":
        return item.obj
    raw = item.buffer
    values = {}
    for name, dtype, shape, off, n in spans:
        if dtype is None:
            values[name] = shape
            continue
        np_dtype = _NUMPY.get(dtype)
        if np_dtype is not None:  # numpy views + from_numpy: ~3x cheaper than slicing a tensor
            flat = torch.from_numpy(raw[off : off + n].view(np_dtype))
        else:  # bfloat16 and other types numpy lacks
            flat = torch.from_numpy(raw[off : off + n]).view(dtype)
        values[name] = flat if len(shape) == 1 else flat.view(shape)
    return cls(**values) if kind == "dataclass" else values


def state_bytes(item: WireItem) -> bytes | None:
    """The pickled chain state sent with ``item``, or None when the worker sent none with it."""
    return item.state or None


def load_state_bytes(raw: bytes) -> Any:
    """Inverse of the state part of :func:`encode_batch`."""
    return pickle.loads(raw)


def widen_worker_pipe(iterator: Any, nbytes: int = PIPE_BYTES) -> bool:
    """Grow the pipe of a multi-process DataLoader ``iterator``'s worker results to ``nbytes``
    (Linux ``F_SETPIPE_SZ``), so a worker writes a whole batch without waiting for the main process
    to read each 64 KB of it (measured: trivial worker 11-12 -> 16-17 Mtok/s at 8192 tokens per
    batch). Returns whether it did; anything else (another OS, a limit) leaves the pipe as it is."""
    queue = getattr(iterator, "_worker_result_queue", None)
    reader = getattr(queue, "_reader", None)
    if fcntl is None or reader is None or not hasattr(fcntl, "F_SETPIPE_SZ"):
        return False
    try:
        fcntl.fcntl(reader.fileno(), fcntl.F_SETPIPE_SZ, nbytes)
    except OSError:  # over /proc/sys/fs/pipe-max-size, or not a pipe
        return False
    return True
