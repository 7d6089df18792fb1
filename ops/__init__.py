"""Compute kernels (installed as ``seqpack.ops``): numba packing kernels, torch attention references."""
