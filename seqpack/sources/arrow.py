"""Arrow arrays as numpy arrays without pandas.

``pyarrow.Array.to_numpy`` (and ``numpy.asarray`` of an Arrow array) goes through pyarrow's pandas
conversion, whose first call imports pandas: 0.2-0.7 s of a fresh process's first batch, for an
integer array whose buffer numpy can view directly. Readers of pre-tokenized columns use
:func:`arrow_numpy` instead.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def arrow_numpy(arr: pa.Array) -> np.ndarray:
    """A copy-free numpy view of a null-free integer Arrow array (boolean: unpacked to ``bool``).

    Slices are honoured (``arr.offset``). An array with nulls (a bad record, reported later by the
    reader) keeps ``to_numpy``'s float-with-NaN result.
    """
    if arr.null_count:
        return arr.to_numpy(zero_copy_only=False)
    data = arr.buffers()[1]
    if pa.types.is_boolean(arr.type):  # bit-packed, least significant bit first
        bits = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little", count=arr.offset + len(arr))
        return bits[arr.offset :].view(np.bool_)
    if not pa.types.is_integer(arr.type):
        raise TypeError(f"arrow_numpy: expected an integer or boolean array, got {arr.type}")
    kind = "i" if pa.types.is_signed_integer(arr.type) else "u"
    dtype = np.dtype(f"{kind}{arr.type.bit_width // 8}")
    return np.frombuffer(data, dtype, count=len(arr), offset=arr.offset * dtype.itemsize)
