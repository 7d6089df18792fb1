"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: intra-op threads only add synchronization on a shared 2-core machine.

    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``; the previous thread
    count is restored after the module.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def seeded_global_rngs():
    """Tests that draw from torch's or numpy's global generator get the same draws every run."""
    import numpy as np

    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(autouse=True, scope="session")
def length_index_cache(tmp_path_factory):
    """Length indexes (seqpack.sources.lengths) go to a per-session folder, not ~/.cache (spawned
    ranks inherit the variable)."""
    import os

    old = os.environ.get("SEQPACK_CACHE_DIR")
    os.environ["SEQPACK_CACHE_DIR"] = str(tmp_path_factory.mktemp("seqpack-cache"))
    yield
    if old is None:
        os.environ.pop("SEQPACK_CACHE_DIR", None)
    else:
        os.environ["SEQPACK_CACHE_DIR"] = old
