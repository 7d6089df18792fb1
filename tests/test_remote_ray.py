"""``--engine ray`` with inputs and output on S3 (moto): Ray tasks read the input objects themselves,
and the shards are byte-identical to a local-engine run on local files."""

from __future__ import annotations

import os

import pytest

ray = pytest.importorskip("ray", reason="ray is an optional extra (pip install 'seqpack[ray]')")

import s3fs  # noqa: E402
from test_remote import _text_corpus, local_bytes, run_pp, s3, s3_bytes  # noqa: E402, F401  (fixture)


@pytest.fixture(scope="module")
def ray_with_s3(s3):  # noqa: F811
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env = {k: os.environ[k] for k in s3.env()}
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", **env}},
    )
    yield s3
    ray.shutdown()


def test_ray_engine_reads_and_writes_s3_byte_identically(ray_with_s3, tmp_path, monkeypatch):
    monkeypatch.setenv("SEQPACK_STAGING_DIR", str(tmp_path / "staging"))
    inputs = _text_corpus(tmp_path)
    local = run_pp(inputs, tmp_path / "local")
    fs = s3fs.S3FileSystem()
    fs.mkdir("raybkt")
    for p in inputs:
        fs.put_file(str(p), f"raybkt/in/{p.name}")
    on_ray = run_pp(["s3://raybkt/in/*.jsonl"], "s3://raybkt/ray", workers=2, engine="ray")
    assert on_ray["totals"] == local["totals"] and on_ray["totals"]["tokens_out"] > 0
    assert s3_bytes("raybkt/ray") == local_bytes(tmp_path / "local")
    assert fs.exists("raybkt/ray/manifest.json")
