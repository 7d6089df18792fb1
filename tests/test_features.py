"""Feature-bag readers: every on-disk format round-trips, headers give N and D, bad input is named."""

from __future__ import annotations

import io
import sys
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
import zstandard
from safetensors.numpy import save_file as save_np
from safetensors.torch import save_file as save_pt

from seqpack.mil import (
    FeatureBagError,
    FeatureFiles,
    InMemoryBags,
    SafetensorsBags,
    WebDatasetBags,
    read_feature_bags,
    read_labels,
)

h5py = pytest.importorskip("h5py")


def _bags(dtype=np.float32, ns=(5, 1, 37), d=6, seed=0):
    rng = np.random.default_rng(seed)
    return {f"s{i}": rng.standard_normal((n, d)).astype(dtype) for i, n in enumerate(ns)}


def _write(tmp_path, bags, ext):
    for sid, x in bags.items():
        p = tmp_path / f"{sid}{ext}"
        if ext == ".npy":
            np.save(p, x)
        elif ext == ".pt":
            torch.save({"features": torch.from_numpy(x), "coords": torch.zeros(len(x), 2)}, p)
        elif ext == ".h5":
            with h5py.File(p, "w") as f:
                f["features"] = x
                f["coords"] = np.zeros((len(x), 2), np.int64)
        else:
            save_np({"features": x}, str(p))


@pytest.mark.parametrize("ext", [".npy", ".pt", ".h5", ".safetensors"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_per_slide_files_round_trip(tmp_path, ext, dtype):
    bags = _bags(dtype)
    _write(tmp_path, bags, ext)
    src = read_feature_bags(tmp_path)
    assert isinstance(src, FeatureFiles)
    assert src.slide_ids == sorted(bags)
    assert src.lengths.tolist() == [len(bags[s]) for s in src.slide_ids]
    assert src.dim == 6
    for i, s in enumerate(src.slide_ids):
        got = src.load(i)
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, bags[s])


def test_safetensors_many_slides_and_bf16(tmp_path):
    bags = _bags(np.float32)
    tensors = {s: torch.from_numpy(x) for s, x in bags.items()}
    tensors["s_bf16"] = torch.from_numpy(bags["s0"]).bfloat16()
    save_pt(tensors, str(tmp_path / "all.safetensors"))
    src = read_feature_bags(tmp_path / "all.safetensors")
    assert isinstance(src, SafetensorsBags)
    i = src.index_of("s_bf16")
    got = src.load(i)
    assert got.dtype == np.float32 and got.shape == bags["s0"].shape
    np.testing.assert_allclose(got, bags["s0"], rtol=1e-2, atol=1e-2)
    np.testing.assert_array_equal(src.load(src.index_of("s2")), bags["s2"])


def test_webdataset_tars_with_plain_and_zstd_members(tmp_path):
    bags = _bags(np.float16, ns=(3, 9, 4, 11))
    shard0 = tmp_path / "shard-000.tar"
    with wds.TarWriter(str(shard0)) as w:  # webdataset's own encoder writes the .npy members
        for sid in ("s0", "s1"):
            w.write({"__key__": sid, "features.npy": bags[sid], "label.cls": 1})
    shard1 = tmp_path / "shard-001.tar"
    with tarfile.open(shard1, "w") as tf:
        for sid in ("s2", "s3"):
            buf = io.BytesIO()
            np.save(buf, bags[sid])
            data = zstandard.ZstdCompressor().compress(buf.getvalue())
            info = tarfile.TarInfo(f"{sid}.features.npy.zst")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    src = read_feature_bags([shard0, shard1])
    assert isinstance(src, WebDatasetBags)
    assert src.slide_ids == ["s0", "s1", "s2", "s3"]
    assert src.lengths.tolist() == [3, 9, 4, 11]
    for i, s in enumerate(src.slide_ids):
        np.testing.assert_array_equal(src.load(i), bags[s])
    # streaming readers see the same members (the shard is a valid webdataset)
    keys = [s["__key__"] for s in wds.WebDataset(str(shard0), shardshuffle=False)]
    assert keys == ["s0", "s1"]


def test_compressed_tar_rejected(tmp_path):
    p = tmp_path / "x.tar.gz"
    p.write_bytes(b"")
    with pytest.raises(FeatureBagError, match="uncompressed"):
        WebDatasetBags([p])


def test_mismatched_dim_names_slide(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((3, 4), np.float32))
    np.save(tmp_path / "b.npy", np.zeros((3, 5), np.float32))
    with pytest.raises(FeatureBagError, match=r"'b'.*b\.npy.*D=5.*'a'.*D=4"):
        read_feature_bags(tmp_path)


def test_bad_shapes_and_dtypes_name_slide(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros(7, np.float32))
    with pytest.raises(FeatureBagError, match=r"'flat'.*\[N, D\]"):
        read_feature_bags(tmp_path / "flat.npy")
    np.save(tmp_path / "ints.npy", np.zeros((3, 2), np.int64))
    with pytest.raises(FeatureBagError, match=r"'ints'.*floating"):
        read_feature_bags(tmp_path / "ints.npy")
    torch.save({"coords": torch.zeros(2, 2)}, tmp_path / "nokey.pt")
    with pytest.raises(FeatureBagError, match=r"'nokey'.*'features'"):
        read_feature_bags(tmp_path / "nokey.pt")


def test_leading_batch_dim_squeezed_and_empty_bag_allowed(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((1, 4, 3), np.float32))
    np.save(tmp_path / "b.npy", np.zeros((0, 3), np.float32))
    src = read_feature_bags(tmp_path)
    assert src.lengths.tolist() == [4, 0] and src.dim == 3
    assert src.load(0).shape == (4, 3)


def test_duplicate_slide_ids(tmp_path):
    (tmp_path / "x").mkdir()
    np.save(tmp_path / "a.npy", np.zeros((2, 2), np.float32))
    np.save(tmp_path / "x" / "a.npy", np.zeros((2, 2), np.float32))
    with pytest.raises(FeatureBagError, match="'a' appears twice"):
        read_feature_bags(tmp_path, recursive=True)


def test_h5py_missing_gives_clear_error(tmp_path, monkeypatch):
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["features"] = np.zeros((2, 2), np.float32)
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ImportError, match="pip install h5py"):
        read_feature_bags(tmp_path)


def test_in_memory_bags():
    src = InMemoryBags([np.zeros((2, 3), np.float32), np.ones((4, 3), np.float32)], ["x", "y"])
    assert src.lengths.tolist() == [2, 4] and src.dim == 3 and src.index_of("y") == 1


# ---------------------------------------------------------------------------------------- labels
def test_labels_single_label_names_and_ints(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("slide_id,label\ns1,tumor\ns0,normal\ns2,tumor\n")
    t = read_labels(p)
    assert t.classes == ["normal", "tumor"] and not t.multi_label
    assert t.get("s1") == 1 and t.get("s0") == 0
    p.write_text("slide_id,isup\na,10\nb,2\nc,0\n")
    t = read_labels(p)
    assert t.classes == ["0", "2", "10"] and t.get("a") == 2
    t = read_labels(p, classes=["10", "2", "0"])
    assert t.get("a") == 0
    with pytest.raises(KeyError, match="'zz'.*labels.csv"):
        t.get("zz")


def test_labels_multi_label(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("case,slide_id,lusc,luad,meso\nc1,s1,1,0,1\nc1,s2,0,0,0\n")
    t = read_labels(p, label_columns=["lusc", "luad", "meso"])
    assert t.multi_label and t.classes == ["lusc", "luad", "meso"]
    assert t.get("s1").tolist() == [1, 0, 1]


@pytest.mark.parametrize(
    "text, match",
    [
        ("slide_id,label\ns1,a\ns1,b\n", r"row 3: slide 's1' already labelled at row 2"),
        ("slide_id,label\ns1,\n", r"row 2, column 'label': missing label for slide 's1'"),
        ("slide_id,a,b\ns1,1,2\n", r"row 2, column 'b': multi-label value must be 0 or 1"),
        ("id,label\ns1,a\n", r"no 'slide_id' column"),
    ],
)
def test_labels_bad_input(tmp_path, text, match):
    p = tmp_path / "labels.csv"
    p.write_text(text)
    with pytest.raises(FeatureBagError, match=match):
        read_labels(p)


def test_legacy_torch_save_format(tmp_path):
    x = torch.randn(4, 3)
    torch.save(x, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    src = read_feature_bags(tmp_path)
    assert src.lengths.tolist() == [4]
    np.testing.assert_array_equal(src.load(0), x.numpy())


def _rows_cases(n, seed=0):
    rng = np.random.default_rng(seed)
    few = rng.choice(n, 7, replace=False)  # unsorted, under half the bag: partial read
    return [few, np.r_[few, few[:2]], np.sort(few), np.arange(n)[::-1], np.zeros(0, np.int64)]


@pytest.mark.parametrize("ext", [".npy", ".pt", ".h5", ".safetensors"])
def test_load_rows_matches_whole_load_per_slide_files(tmp_path, ext):
    bags = _bags(np.float16, ns=(40, 63))
    _write(tmp_path, bags, ext)
    src = read_feature_bags(tmp_path)
    for i in range(len(src)):
        for rows in _rows_cases(int(src.lengths[i]), seed=i):
            got = src.load_rows(i, rows)
            assert got.dtype == np.float16 and got.shape == (len(rows), 6)
            np.testing.assert_array_equal(got, src.load(i)[rows])
    with pytest.raises(IndexError, match="s0"):
        src.load_rows(0, np.array([40]))


def test_load_rows_safetensors_tars_memory_and_leading_dim(tmp_path):
    bags = _bags(np.float32, ns=(30, 41))
    tensors = {s: torch.from_numpy(x) for s, x in bags.items()}
    tensors["bf"] = torch.from_numpy(bags["s0"]).bfloat16()  # numpy has no bf16: whole-read fallback
    save_pt(tensors, str(tmp_path / "all.safetensors"))
    shard = tmp_path / "a.tar"
    with tarfile.open(shard, "w") as tf:
        for sid, x in bags.items():
            for ext, zst in (("features.npy", False), ("features.npy.zst", True)):
                buf = io.BytesIO()
                np.save(buf, x[None] if sid == "s1" else x)  # s1 stored [1, N, D]
                data = zstandard.ZstdCompressor().compress(buf.getvalue()) if zst else buf.getvalue()
                key = sid if not zst else f"z{sid}"
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    np.save(tmp_path / "lead.npy", bags["s1"][None])
    sources = [
        read_feature_bags(tmp_path / "all.safetensors"),
        read_feature_bags(shard),
        InMemoryBags(list(bags.values()), list(bags)),
        FeatureFiles([tmp_path / "lead.npy"]),
    ]
    for src in sources:
        for i in range(len(src)):
            for rows in _rows_cases(int(src.lengths[i]), seed=i):
                np.testing.assert_array_equal(src.load_rows(i, rows), src.load(i)[rows])


def test_labels_survival_time_bin_and_censorship(tmp_path):
    p = tmp_path / "surv.csv"
    p.write_text("slide_id,case,disc_label,censorship\na,c1,2,0\nb,c2,0,1\nc,c3,3,1\n")
    t = read_labels(p, time_column="disc_label", censor_column="censorship")
    assert t.survival and not t.multi_label
    assert t.labels.tolist() == [[2, 0], [0, 1], [3, 1]]
    assert t.classes == ["0", "1", "2", "3"] and t.num_classes == 4
    assert read_labels(p, time_column="disc_label", censor_column="censorship", n_bins=6).num_classes == 6
    with pytest.raises(FeatureBagError, match="time bin 3 outside"):
        read_labels(p, time_column="disc_label", censor_column="censorship", n_bins=3)
    with pytest.raises(ValueError, match="both"):
        read_labels(p, time_column="disc_label")


@pytest.mark.parametrize(
    "text,match",
    [
        ("slide_id,t,c\na,1,2\n", r"row 2, column 'c'.*censorship must be 0 \(event\) or 1"),
        ("slide_id,t,c\na,1,0\nb,x,0\n", r"row 3, column 't'.*integer"),
        ("slide_id,t,c\na,-1,0\n", r"row 2, column 't'.*outside"),
        ("slide_id,t\na,1\n", r"label columns"),
    ],
)
def test_labels_survival_bad_input(tmp_path, text, match):
    p = tmp_path / "s.csv"
    p.write_text(text)
    with pytest.raises(FeatureBagError, match=match):
        read_labels(p, time_column="t", censor_column="c")
