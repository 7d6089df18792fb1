"""Feature-bag readers for whole-slide-image MIL: one bag of patch features ``[N, D]`` per slide.

Every source gives random access to slides by index and knows each bag's length ``N`` and the
feature width ``D`` *before* loading any features (read from file headers), so the PackMIL stage can
plan a whole epoch from integers alone and load features only when a batch is assembled.

Formats:
  - a directory (or list) of per-slide files ``{slide_id}.npy`` / ``.pt`` / ``.h5`` / ``.safetensors``
    (``.h5`` needs ``h5py``; the dataset key defaults to ``features`` as written by CLAM);
  - one ``.safetensors`` file holding one tensor per slide (tensor name = slide id);
  - webdataset tars with one ``.npy`` (or member-compressed ``.npy.zst``) member per slide, indexed
    once for random access (tars must not be compressed as a whole: members are read by offset);
  - in-memory arrays (``InMemoryBags``).

Labels come from a CSV (``read_labels``): one slide-id column and either one label column
(single-label; class names or integers) or several 0/1 columns (multi-label).

Bad input is reported with the slide id and file: ``N = 0`` bags, a width ``D`` that differs from
the first slide, non-float or non-2-D arrays, missing label rows. Policies for skipping are applied by
the stage, which counts what it skipped.
"""

from __future__ import annotations

import csv
import io
import os
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FEATURE_EXTENSIONS = (".npy", ".pt", ".h5", ".safetensors")


class FeatureBagError(ValueError):
    """A feature bag or label file is malformed; the message names slide id and file."""


def _require_h5py():
    try:
        import h5py
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading .h5 feature bags needs h5py: pip install h5py (or seqpack[mil])") from e
    return h5py


def _check_shape(shape: tuple, dtype, slide_id: str, where: str) -> tuple[int, int]:
    if len(shape) == 3 and shape[0] == 1:  # some extractors store [1, N, D]
        shape = shape[1:]
    if len(shape) != 2:
        raise FeatureBagError(
            f"slide {slide_id!r} ({where}): features must be [N, D], got shape {tuple(shape)}"
        )
    kind = np.dtype(dtype).kind if not isinstance(dtype, str) else dtype
    if kind not in ("f", "bf16"):
        raise FeatureBagError(f"slide {slide_id!r} ({where}): features must be floating point, got {dtype}")
    return int(shape[0]), int(shape[1])


def _as_2d_float(arr: np.ndarray, slide_id: str, where: str) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    _check_shape(arr.shape, arr.dtype, slide_id, where)
    return arr


class FeatureBagSource:
    """Random access to feature bags. Subclasses fill ``slide_ids``, ``lengths`` and implement ``_load``.

    Attributes:
        slide_ids: one string id per slide, in source order.
        lengths: int64 ``[n_slides]``, features per bag (``N``), read from headers.
        dim: feature width ``D`` (every non-empty bag must have it).
    """

    slide_ids: list[str]
    lengths: np.ndarray
    dim: int
    #: ``load`` returns arrays already in memory (no read): callers may gather rows from them directly
    holds_arrays: bool = False

    def __len__(self) -> int:
        return len(self.slide_ids)

    def location(self, i: int) -> str:
        """Where slide ``i`` lives (for error messages)."""
        return "<memory>"

    def load(self, i: int) -> np.ndarray:
        """Features of slide ``i``: float ``[N, D]`` numpy array (float16/float32 as stored; bf16 -> fp32)."""
        arr = _as_2d_float(self._load(i), self.slide_ids[i], self.location(i))
        if arr.shape[0] != self.lengths[i] or (arr.shape[0] > 0 and arr.shape[1] != self.dim):
            raise FeatureBagError(
                f"slide {self.slide_ids[i]!r} ({self.location(i)}): loaded shape {arr.shape} differs from "
                f"header [{self.lengths[i]}, {self.dim}]"
            )
        return arr

    def load_rows(self, i: int, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (int ``[k]``, any order, repeats allowed) of slide ``i``: ``[k, D]``, same values
        as ``load(i)[rows]``. File formats that allow it read only those rows; no shape or value
        checks beyond ``load``'s header check (the stage checks a bag once, on its first full load)."""
        rows = np.asarray(rows, np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.lengths[i]):
            raise IndexError(f"slide {self.slide_ids[i]!r}: rows outside [0, {self.lengths[i]})")
        if len(rows) * 2 < self.lengths[i]:
            part = self._load_rows(i, rows)
            if part is not None:
                return part
        return self.load(i)[rows]

    def _load_rows(self, i: int, rows: np.ndarray) -> np.ndarray | None:
        """Read only ``rows``; None when the format needs a whole read."""
        return None

    def _load(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def _finish(self, ids: list[str], shapes: list[tuple[int, int]]) -> None:
        """Set ``slide_ids``/``lengths``/``dim`` and check ids are unique and widths agree."""
        seen: dict[str, int] = {}
        for i, s in enumerate(ids):
            if s in seen:
                raise FeatureBagError(
                    f"slide id {s!r} appears twice: {self.location(seen[s])} and {self.location(i)}"
                )
            seen[s] = i
        self.slide_ids = list(ids)
        self.lengths = np.array([n for n, _ in shapes], np.int64)
        dims = [(d, i) for i, (n, d) in enumerate(shapes) if n > 0]
        self.dim = dims[0][0] if dims else (shapes[0][1] if shapes else 0)
        for d, i in dims:
            if d != self.dim:
                raise FeatureBagError(
                    f"slide {ids[i]!r} ({self.location(i)}) has feature width D={d}, but slide "
                    f"{ids[dims[0][1]]!r} has D={self.dim}"
                )

    def index_of(self, slide_id: str) -> int:
        if not hasattr(self, "_index"):
            self._index = {s: i for i, s in enumerate(self.slide_ids)}
        return self._index[slide_id]


class InMemoryBags(FeatureBagSource):
    """Bags held as arrays (synthetic data, tests, or features already in RAM)."""

    holds_arrays = True

    def __init__(self, features: Sequence[np.ndarray], slide_ids: Sequence[str] | None = None):
        ids = list(slide_ids) if slide_ids is not None else [f"slide_{i}" for i in range(len(features))]
        if len(ids) != len(features):
            raise ValueError(f"{len(features)} bags but {len(ids)} slide ids")
        self._arrays = [_as_2d_float(np.asarray(f), s, "<memory>") for f, s in zip(features, ids)]
        self._finish(ids, [a.shape for a in self._arrays])

    def _load(self, i: int) -> np.ndarray:
        return self._arrays[i]

    def _load_rows(self, i: int, rows: np.ndarray) -> np.ndarray:
        return self._arrays[i][rows]


def _pt_tensor(obj, key: str, slide_id: str, where: str):
    import torch

    if isinstance(obj, dict):
        if key not in obj:
            raise FeatureBagError(f"slide {slide_id!r} ({where}): no {key!r} entry, keys are {sorted(obj)}")
        obj = obj[key]
    if not isinstance(obj, torch.Tensor):
        raise FeatureBagError(f"slide {slide_id!r} ({where}): expected a tensor, got {type(obj).__name__}")
    return obj


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.detach().cpu().numpy()


def _squeeze_batch(arr: np.ndarray) -> np.ndarray:
    return arr[0] if arr.ndim == 3 and arr.shape[0] == 1 else arr


_ST_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64}


def _safetensors_header(fh) -> dict:
    import json

    size = int.from_bytes(fh.read(8), "little")
    header = json.loads(fh.read(size))
    header.pop("__metadata__", None)
    for v in header.values():
        v["_data_start"] = 8 + size + v["data_offsets"][0]
    return header


def _safetensors_rows(path: Path, name: str, rows: np.ndarray) -> np.ndarray | None:
    """Rows of tensor ``name`` by memory-mapping the file (safetensors stores raw little-endian
    C-order data after a JSON header); None for dtypes numpy lacks (bf16)."""
    with open(path, "rb") as fh:
        entry = _safetensors_header(fh)[name]
    dtype = _ST_DTYPES.get(entry["dtype"])
    if dtype is None:
        return None
    shape = tuple(entry["shape"])
    le = np.dtype(dtype).newbyteorder("<")
    arr = np.memmap(path, dtype=le, mode="r", offset=entry["_data_start"], shape=shape)
    return np.asarray(_squeeze_batch(arr)[rows])


class FeatureFiles(FeatureBagSource):
    """One file per slide: ``.npy``, ``.pt`` (tensor or dict), ``.h5`` or ``.safetensors``.

    The slide id is the file name without extension. ``key`` names the tensor/dataset inside
    ``.pt`` dicts, ``.h5`` files and ``.safetensors`` files (a safetensors file with a single tensor
    is read whatever its name).
    """

    def __init__(self, paths: Iterable[str | os.PathLike], *, key: str = "features"):
        self.paths = [Path(p) for p in paths]
        self.key = key
        for p in self.paths:
            if p.suffix not in FEATURE_EXTENSIONS:
                raise FeatureBagError(
                    f"{p}: unsupported feature file type (expected one of {FEATURE_EXTENSIONS})"
                )
        ids = [p.stem for p in self.paths]
        self._finish(ids, [self._header(i, s) for i, s in enumerate(ids)])

    @classmethod
    def from_dir(
        cls, root: str | os.PathLike, *, key: str = "features", recursive: bool = False
    ) -> FeatureFiles:
        """Every feature file under ``root`` (sorted by path, so order is stable)."""
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"feature directory {root} does not exist")
        it = root.rglob("*") if recursive else root.iterdir()
        paths = sorted(p for p in it if p.is_file() and p.suffix in FEATURE_EXTENSIONS)
        if not paths:
            raise FeatureBagError(f"{root}: no feature files ({', '.join(FEATURE_EXTENSIONS)})")
        return cls(paths, key=key)

    def location(self, i: int) -> str:
        return str(self.paths[i])

    def _header(self, i: int, slide_id: str) -> tuple[int, int]:
        p, where = self.paths[i], str(self.paths[i])
        if p.suffix == ".npy":
            arr = np.load(p, mmap_mode="r")
            return _check_shape(arr.shape, arr.dtype, slide_id, where)
        if p.suffix == ".pt":
            import torch

            try:  # mmap reads only the header pages of zip-format files
                obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (pre-zip) torch.save format cannot be mmapped
                obj = torch.load(p, map_location="cpu", weights_only=True)
            t = _pt_tensor(obj, self.key, slide_id, where)
            return _check_shape(
                tuple(t.shape), "f" if t.is_floating_point() else str(t.dtype), slide_id, where
            )
        if p.suffix == ".h5":
            h5py = _require_h5py()
            with h5py.File(p, "r") as f:
                if self.key not in f:
                    raise FeatureBagError(
                        f"slide {slide_id!r} ({where}): no dataset {self.key!r}, has {list(f)}"
                    )
                ds = f[self.key]
                return _check_shape(ds.shape, ds.dtype, slide_id, where)
        from safetensors import safe_open

        with safe_open(p, framework="pt") as f:
            name = self._st_name(f.keys(), slide_id, where)
            sl = f.get_slice(name)
            dt = sl.get_dtype()
            return _check_shape(
                tuple(sl.get_shape()),
                "bf16" if dt == "BF16" else ("f" if dt.startswith("F") else dt),
                slide_id,
                where,
            )

    def _st_name(self, keys, slide_id: str, where: str) -> str:
        keys = list(keys)
        if self.key in keys:
            return self.key
        if len(keys) == 1:
            return keys[0]
        raise FeatureBagError(f"slide {slide_id!r} ({where}): no tensor {self.key!r}, has {sorted(keys)}")

    def _load(self, i: int) -> np.ndarray:
        p, sid, where = self.paths[i], self.slide_ids[i], str(self.paths[i])
        if p.suffix == ".npy":
            return np.load(p)
        if p.suffix == ".pt":
            import torch

            return _torch_to_numpy(
                _pt_tensor(torch.load(p, map_location="cpu", weights_only=True), self.key, sid, where)
            )
        if p.suffix == ".h5":
            h5py = _require_h5py()
            with h5py.File(p, "r") as f:
                return f[self.key][()]
        from safetensors import safe_open

        with safe_open(p, framework="pt") as f:
            return _torch_to_numpy(f.get_tensor(self._st_name(f.keys(), sid, where)))

    def _load_rows(self, i: int, rows: np.ndarray) -> np.ndarray | None:
        p, sid, where = self.paths[i], self.slide_ids[i], str(self.paths[i])
        if p.suffix == ".npy":
            return _squeeze_batch(np.load(p, mmap_mode="r"))[rows]
        if p.suffix == ".h5":
            h5py = _require_h5py()
            # h5py point selection needs increasing, unique indices
            uniq, inverse = np.unique(rows, return_inverse=True)
            with h5py.File(p, "r") as f:
                ds = f[self.key]
                part = ds[0, uniq] if ds.ndim == 3 else ds[uniq]
            return part[inverse]
        if p.suffix == ".safetensors":
            with open(p, "rb") as fh:
                names = list(_safetensors_header(fh))
            return _safetensors_rows(p, self._st_name(names, sid, where), rows)
        if p.suffix == ".pt":
            import torch

            try:
                obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy format: whole read
                return None
            t = _pt_tensor(obj, self.key, sid, where)
            t = t[0] if t.dim() == 3 else t
            return _torch_to_numpy(t[torch.from_numpy(rows)])
        return None


class SafetensorsBags(FeatureBagSource):
    """One ``.safetensors`` file with one ``[N, D]`` tensor per slide (tensor name = slide id)."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = Path(path)
        with safe_open(self.path, framework="pt") as f:
            ids = sorted(f.keys())
            shapes = []
            for s in ids:
                sl = f.get_slice(s)
                dt = sl.get_dtype()
                shapes.append(
                    _check_shape(
                        tuple(sl.get_shape()),
                        "bf16" if dt == "BF16" else ("f" if dt.startswith("F") else dt),
                        s,
                        str(self.path),
                    )
                )
        self._finish(ids, shapes)

    def location(self, i: int) -> str:
        return f"{self.path}[{self.slide_ids[i]}]"

    def _load(self, i: int) -> np.ndarray:
        from safetensors import safe_open

        with safe_open(self.path, framework="pt") as f:
            return _torch_to_numpy(f.get_tensor(self.slide_ids[i]))

    def _load_rows(self, i: int, rows: np.ndarray) -> np.ndarray | None:
        return _safetensors_rows(self.path, self.slide_ids[i], rows)


@dataclass
class _TarMember:
    tar: Path
    offset: int
    size: int
    compressed: bool


def _npy_header(fp) -> tuple[tuple, np.dtype, bool]:
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fp)
    return np.lib.format.read_array_header_2_0(fp)


class WebDatasetBags(FeatureBagSource):
    """Webdataset tars with one ``.npy`` (or ``.npy.zst``) feature member per slide.

    The slide id is the webdataset key (member name up to the first dot, directories kept), so
    ``slide_7.npy`` and ``slide_7.features.npy`` both give ``slide_7``; ``member`` picks which
    ``.npy`` extension to read when a sample has several (default: the only one, or ``features.npy``).
    Tars are indexed once (headers only) and members are read by offset, so tars must be plain
    (uncompressed) ``.tar`` files; compress members with zstd instead (``.npy.zst``).
    """

    def __init__(self, tars: str | os.PathLike | Iterable[str | os.PathLike], *, member: str | None = None):
        tars = [tars] if isinstance(tars, (str, os.PathLike)) else list(tars)
        self.tars = [Path(t) for t in tars]
        self._members: list[_TarMember] = []
        ids: list[str] = []
        shapes: list[tuple[int, int]] = []
        for t in self.tars:
            if t.suffix != ".tar":
                raise FeatureBagError(
                    f"{t}: only uncompressed .tar shards can be indexed (compress members with zstd)"
                )
            by_key: dict[str, dict[str, tarfile.TarInfo]] = {}
            with tarfile.open(t, "r:") as tf:
                for m in tf.getmembers():
                    if not m.isfile():
                        continue
                    d, base = os.path.split(m.name)
                    key, _, ext = base.partition(".")
                    if ext.endswith("npy") or ext.endswith("npy.zst"):
                        by_key.setdefault(os.path.join(d, key), {})[ext] = m
            for key, exts in by_key.items():
                ext = self._pick(exts, member, key, t)
                m = exts[ext]
                self._members.append(_TarMember(t, m.offset_data, m.size, ext.endswith(".zst")))
                ids.append(key)
        self.slide_ids = ids  # location() names members by id while headers are read
        for i, s in enumerate(ids):
            shape, _, dtype = _npy_header(self._raw(i, header_only=True))
            shapes.append(_check_shape(shape, dtype, s, self.location(i)))
        self._finish(ids, shapes)

    @staticmethod
    def _pick(exts: dict, member: str | None, key: str, tar: Path) -> str:
        if member is not None:
            for ext in (member, member + ".zst"):
                if ext in exts:
                    return ext
            raise FeatureBagError(f"slide {key!r} ({tar}): no member .{member}, has {sorted(exts)}")
        if len(exts) == 1:
            return next(iter(exts))
        for ext in ("features.npy", "features.npy.zst", "npy", "npy.zst"):
            if ext in exts:
                return ext
        raise FeatureBagError(f"slide {key!r} ({tar}): several .npy members {sorted(exts)}; pass member=")

    def location(self, i: int) -> str:
        m = self._members[i]
        return f"{m.tar}:{self.slide_ids[i]}"

    def _raw(self, i: int, header_only: bool = False) -> io.BufferedIOBase:
        m = self._members[i]
        with open(m.tar, "rb") as f:
            f.seek(m.offset)
            data = f.read(m.size if not (header_only and not m.compressed) else min(m.size, 4096))
        if m.compressed:
            import zstandard

            reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data))
            data = reader.read(4096) if header_only else reader.read()
        return io.BytesIO(data)

    def _load(self, i: int) -> np.ndarray:
        return np.load(self._raw(i), allow_pickle=False)

    def _load_rows(self, i: int, rows: np.ndarray) -> np.ndarray | None:
        m = self._members[i]
        if m.compressed:
            return None
        with open(m.tar, "rb") as f:
            f.seek(m.offset)
            shape, fortran, dtype = _npy_header(f)
            start = f.tell()
        if fortran or dtype.hasobject:
            return None
        arr = np.memmap(m.tar, dtype=dtype, mode="r", offset=start, shape=tuple(shape))
        return np.asarray(_squeeze_batch(arr)[rows])


def read_feature_bags(
    path: str | os.PathLike | Sequence[str | os.PathLike], *, key: str = "features", recursive: bool = False
) -> FeatureBagSource:
    """Open feature bags by what ``path`` is: a directory of per-slide files, a ``.safetensors`` file
    of many slides, a ``.tar`` shard (or a list of them), or a list of per-slide files."""
    if isinstance(path, (str, os.PathLike)):
        p = Path(path)
        if p.is_dir():
            return FeatureFiles.from_dir(p, key=key, recursive=recursive)
        if p.suffix == ".tar":
            return WebDatasetBags([p])
        if p.suffix == ".safetensors":
            return SafetensorsBags(p)
        if not p.exists():
            raise FileNotFoundError(f"feature path {p} does not exist")
        return FeatureFiles([p], key=key)
    paths = [Path(x) for x in path]
    if paths and all(x.suffix == ".tar" for x in paths):
        return WebDatasetBags(paths)
    files: list[Path] = []
    for x in paths:  # directories expand to their feature files, in sorted order
        if x.is_dir():
            files += FeatureFiles.from_dir(x, key=key, recursive=recursive).paths
        elif x.suffix == ".tar":
            raise FeatureBagError(f"{x}: tar shards cannot be mixed with per-slide feature files in one list")
        else:
            files.append(x)
    return FeatureFiles(files, key=key)


# ---------------------------------------------------------------------------------------- labels
@dataclass
class LabelTable:
    """Slide labels from a CSV.

    Attributes:
        slide_ids: row ids in file order.
        labels: int64 ``[n]`` class indices (single-label), int64 ``[n, C]`` 0/1 (multi-label), or int64
            ``[n, 2]`` ``(time bin, censorship)`` for survival (censorship 1 = censored, 0 = event).
        classes: class names; index ``k`` of ``labels`` means ``classes[k]`` (survival: the time bins
            ``"0" .. "K-1"``).
        multi_label: whether ``labels`` is multi-hot.
        survival: whether ``labels`` holds ``(time bin, censorship)`` pairs.
    """

    slide_ids: list[str]
    labels: np.ndarray
    classes: list[str]
    multi_label: bool
    path: str = "<memory>"
    survival: bool = False
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._index = {s: i for i, s in enumerate(self.slide_ids)}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __contains__(self, slide_id: str) -> bool:
        return slide_id in self._index

    def get(self, slide_id: str) -> np.ndarray:
        """Label of one slide (int64 scalar array or ``[C]``); ``KeyError`` naming the slide if missing."""
        if slide_id not in self._index:
            raise KeyError(f"slide {slide_id!r} has no row in label file {self.path}")
        return self.labels[self._index[slide_id]]


def read_labels(
    path: str | os.PathLike,
    *,
    id_column: str = "slide_id",
    label_columns: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    time_column: str | None = None,
    censor_column: str | None = None,
    n_bins: int | None = None,
) -> LabelTable:
    """Read a labels CSV: ``id_column`` plus one label column (single-label) or several 0/1 columns
    (multi-label). By default every other column is a label column.

    Survival labels: pass ``time_column`` (discrete time bin, an integer ``0 .. K-1``) and
    ``censor_column`` (``1`` = censored, ``0`` = event observed; the CLAM/PORPOISE ``censorship``
    convention); ``n_bins`` fixes ``K`` (default: largest bin + 1). Other columns are ignored.

    Single-label values are class names; ``classes`` fixes their order, else integers sort
    numerically and names alphabetically. Errors name the file, row (1-based, header = row 1) and column.
    """
    path = Path(path)
    survival = time_column is not None or censor_column is not None
    if survival and (time_column is None or censor_column is None):
        raise ValueError("survival labels need both time_column and censor_column")
    if survival:
        label_columns = [time_column, censor_column]
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        if id_column not in header:
            raise FeatureBagError(f"{path}: no {id_column!r} column (columns: {header})")
        cols = list(label_columns) if label_columns is not None else [c for c in header if c != id_column]
        missing = [c for c in cols if c not in header]
        if not cols or missing:
            raise FeatureBagError(f"{path}: label columns {missing or cols} not in header {header}")
        ids: list[str] = []
        raw: list[list[str]] = []
        seen: dict[str, int] = {}
        for rowno, row in enumerate(reader, start=2):
            sid = (row.get(id_column) or "").strip()
            if not sid:
                raise FeatureBagError(f"{path} row {rowno}: empty {id_column!r}")
            if sid in seen:
                raise FeatureBagError(
                    f"{path} row {rowno}: slide {sid!r} already labelled at row {seen[sid]}"
                )
            seen[sid] = rowno
            vals = []
            for c in cols:
                v = (row.get(c) or "").strip()
                if not v:
                    raise FeatureBagError(
                        f"{path} row {rowno}, column {c!r}: missing label for slide {sid!r}"
                    )
                vals.append(v)
            ids.append(sid)
            raw.append(vals)
    if survival:
        return _survival_table(path, ids, raw, seen, time_column, censor_column, n_bins)
    if len(cols) == 1:
        values = [r[0] for r in raw]
        if classes is None:
            uniq = set(values)
            try:
                classes = [str(v) for v in sorted(uniq, key=int)]
            except ValueError:
                classes = sorted(uniq)
        lookup = {c: k for k, c in enumerate(classes)}
        labels = np.empty(len(values), np.int64)
        for i, v in enumerate(values):
            if v not in lookup:
                raise FeatureBagError(
                    f"{path} row {seen[ids[i]]}: slide {ids[i]!r} has label {v!r} not in {list(classes)}"
                )
            labels[i] = lookup[v]
        return LabelTable(ids, labels, list(classes), False, str(path))
    labels = np.empty((len(raw), len(cols)), np.int64)
    for i, r in enumerate(raw):
        for j, v in enumerate(r):
            if v not in ("0", "1"):
                raise FeatureBagError(
                    f"{path} row {seen[ids[i]]}, column {cols[j]!r}: multi-label value must be 0 or 1, "
                    f"got {v!r}"
                )
            labels[i, j] = int(v)
    return LabelTable(ids, labels, list(cols), True, str(path))


def _survival_table(
    path: Path,
    ids: list[str],
    raw: list[list[str]],
    seen: dict[str, int],
    time_column: str,
    censor_column: str,
    n_bins: int | None,
) -> LabelTable:
    labels = np.empty((len(raw), 2), np.int64)
    for i, (t, c) in enumerate(raw):
        row = seen[ids[i]]
        try:
            labels[i, 0] = int(t)
        except ValueError:
            raise FeatureBagError(
                f"{path} row {row}, column {time_column!r}: time bin must be an integer, got {t!r}"
            ) from None
        if labels[i, 0] < 0 or (n_bins is not None and labels[i, 0] >= n_bins):
            raise FeatureBagError(
                f"{path} row {row}, column {time_column!r}: time bin {t} outside [0, {n_bins or 'inf'})"
            )
        if c not in ("0", "1"):
            raise FeatureBagError(
                f"{path} row {row}, column {censor_column!r}: censorship must be 0 (event) or 1 (censored), "
                f"got {c!r}"
            )
        labels[i, 1] = int(c)
    k = n_bins if n_bins is not None else (int(labels[:, 0].max()) + 1 if len(labels) else 0)
    return LabelTable(ids, labels, [str(b) for b in range(k)], False, str(path), survival=True)
