"""Feature-bag file formats (each a :class:`~seqpack.mil.bags.FeatureBagSource`) and
:func:`read_feature_bags`, which picks one by what a path is.

Formats:
  - a directory (or list) of per-slide files ``{slide_id}.npy`` / ``.pt`` / ``.h5`` / ``.safetensors``
    (``.h5`` needs ``h5py``; the dataset key defaults to ``features`` as written by CLAM);
  - one ``.safetensors`` file holding one tensor per slide (tensor name = slide id);
  - webdataset tars with one ``.npy`` (or member-compressed ``.npy.zst``) member per slide, indexed
    once for random access (tars must not be compressed as a whole: members are read by offset).

Epoch reads go through ``load_rows``: memory-mapped ``.npy``/safetensors/tar members and h5 point
selection read only the drawn rows.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from seqpack.mil.bags import FeatureBagError, FeatureBagSource, check_shape, squeeze_batch

FEATURE_EXTENSIONS = (".npy", ".pt", ".h5", ".safetensors")


def _require_h5py():
    try:
        import h5py
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading .h5 feature bags needs h5py: pip install h5py (or seqpack[mil])") from e
    return h5py


def _pt_tensor(obj, key: str, slide_id: str, where: str):
    if isinstance(obj, dict):
        if key not in obj:
            raise FeatureBagError(f"slide {slide_id!r} ({where}): no {key!r} entry, keys are {sorted(obj)}")
        obj = obj[key]
    if not isinstance(obj, torch.Tensor):
        raise FeatureBagError(f"slide {slide_id!r} ({where}): expected a tensor, got {type(obj).__name__}")
    return obj


def _torch_to_numpy(t) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.detach().cpu().numpy()


_ST_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64}


def _st_shape(sl, slide_id: str, where: str) -> tuple[int, int]:
    """``(N, D)`` of a safetensors slice, checked (BF16 counts as floating point)."""
    dt = sl.get_dtype()
    kind = "bf16" if dt == "BF16" else ("f" if dt.startswith("F") else dt)
    return check_shape(tuple(sl.get_shape()), kind, slide_id, where)


def _safetensors_header(fh) -> dict:
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
    return np.asarray(squeeze_batch(arr)[rows])


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
            return check_shape(arr.shape, arr.dtype, slide_id, where)
        if p.suffix == ".pt":
            try:  # mmap reads only the header pages of zip-format files
                obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (pre-zip) torch.save format cannot be mmapped
                obj = torch.load(p, map_location="cpu", weights_only=True)
            t = _pt_tensor(obj, self.key, slide_id, where)
            return check_shape(
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
                return check_shape(ds.shape, ds.dtype, slide_id, where)
        from safetensors import safe_open

        with safe_open(p, framework="pt") as f:
            return _st_shape(f.get_slice(self._st_name(f.keys(), slide_id, where)), slide_id, where)

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
            return squeeze_batch(np.load(p, mmap_mode="r"))[rows]
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
            shapes = [_st_shape(f.get_slice(s), s, str(self.path)) for s in ids]
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
            shapes.append(check_shape(shape, dtype, s, self.location(i)))
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
        return np.asarray(squeeze_batch(arr)[rows])


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
