"""Columnar sources read Arrow buffers without pandas (pyarrow's ``to_numpy`` would import it)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from seqpack.sources.arrow import arrow_numpy

CHILD = textwrap.dedent(
    """
    import sys
    import seqpack

    cfg = {
        "sources": [{"path": sys.argv[1], "input_ids_key": "input_ids", "loss_mask_key": "mask"}],
        "stage": {"type": "pack", "capacity": 64},
    }
    batch = next(iter(seqpack.build_loader(cfg)))
    batch.validate()
    print(batch.num_tokens, int(batch.num_loss_tokens), "pandas" in sys.modules)
    """
)


def test_reading_a_parquet_source_imports_no_pandas(tmp_path):
    ids = [list(range(1, 1 + n)) for n in (5, 9, 3, 20)]
    masks = [[i % 2 == 0 for i in range(len(x))] for x in ids]
    path = tmp_path / "tok.parquet"
    pq.write_table(pa.table({"input_ids": ids, "mask": masks}), path, row_group_size=2)
    res = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    tokens, _, pandas_loaded = res.stdout.split()
    assert int(tokens) == 37 and pandas_loaded == "False"


@pytest.mark.parametrize("type_", [pa.int8(), pa.uint16(), pa.int32(), pa.int64(), pa.bool_()])
def test_numpy_view_matches_pylist_on_slices(type_):
    rng = np.random.default_rng(0)
    values = rng.integers(0, 2 if type_ == pa.bool_() else 100, 21).tolist()
    arr = pa.array([bool(v) for v in values] if type_ == pa.bool_() else values, type_)
    for piece in (arr, arr.slice(3), arr.slice(9, 10), arr.slice(21)):
        out = arrow_numpy(piece)
        assert out.tolist() == piece.to_pylist()
        assert out.dtype == (np.bool_ if type_ == pa.bool_() else np.dtype(type_.to_pandas_dtype()))


def test_numpy_view_of_list_offsets_and_nulls():
    lists = pa.array([[1, 2], [3], [4, 5, 6]], pa.list_(pa.int32())).slice(1)
    assert arrow_numpy(lists.offsets).tolist() == [2, 3, 6]  # absolute offsets into the unsliced values
    assert arrow_numpy(lists.values).tolist() == [1, 2, 3, 4, 5, 6]
    with_null = arrow_numpy(pa.array([1, None, 3], pa.int32()))
    assert with_null[0] == 1 and np.isnan(with_null[1])
    with pytest.raises(TypeError, match="integer or boolean"):
        arrow_numpy(pa.array([1.5]))
