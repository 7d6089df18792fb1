"""``--engine ray`` runs the same tasks as Ray tasks on a local Ray instance: byte-identical output."""

from __future__ import annotations

import os

import pytest

ray = pytest.importorskip("ray", reason="ray is an optional extra (pip install 'seqpack[ray]')")

from test_preprocess import corpus, output_bytes, run  # noqa: E402, F401  (fixture reused)


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
    )
    yield
    ray.shutdown()


def test_ray_engine_output_is_byte_identical_to_local(corpus, tmp_path, local_ray):  # noqa: F811
    local = run(corpus, tmp_path / "local", workers=1)
    on_ray = run(corpus, tmp_path / "ray", workers=2, engine="ray")
    assert on_ray == local
    assert output_bytes(str(tmp_path / "ray")) == output_bytes(str(tmp_path / "local"))
    assert on_ray["totals"]["tokens_out"] == on_ray["totals"]["tokens_in"] > 0
