"""``seqpack stats`` and ``seqpack inspect`` on a preprocess output at a URL (moto's S3 server on
localhost, behind a proxy that can inject faults): the same numbers and rows as the local directory
it was copied from, ``--verify`` catching a replaced or missing shard object, clear errors for a URL
that is not an output, and transient errors retried by the remote layer."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import s3fs
from test_remote import _text_corpus, fresh_cache, run_pp, s3  # noqa: F401  (fixtures: s3, autouse cache)

from seqpack.cli import main
from seqpack.shards import MANIFEST

pytestmark = pytest.mark.usefixtures("s3")  # moto's server, AWS_ENDPOINT_URL naming it


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict:
    """Local preprocess outputs, Parquet and webdataset (3 tasks and the merge: 4 shards each), of one
    corpus."""
    d = tmp_path_factory.mktemp("outputs")
    inputs = _text_corpus(d)
    out = {}
    for fmt in ("parquet", "wds"):
        run_pp(inputs, d / fmt, cfg={"format": fmt})
        out[fmt] = d / fmt
    return out


def upload_output(local, bucket: str) -> str:
    """Copy a local output's files (shards, manifest) to ``s3://BUCKET/out``; its URL."""
    fs = s3fs.S3FileSystem()
    fs.mkdir(bucket)
    for name in sorted(os.listdir(local)):
        if os.path.isfile(local / name):
            fs.put_file(str(local / name), f"{bucket}/out/{name}")
    return f"s3://{bucket}/out"


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main(argv)
    got = capsys.readouterr()
    return rc, got.out, got.err


def shards_of(local) -> list[str]:
    return [s["name"] for s in json.loads((local / MANIFEST).read_text())["shards"]]


@pytest.mark.parametrize("fmt", ["parquet", "wds"])
def test_stats_and_inspect_of_a_url_equal_the_local_directory(outputs, fmt, tmp_path, capsys):
    local = outputs[fmt]
    url = upload_output(local, f"same-{fmt}")
    rc, out, _ = run(["stats", str(local), "--json", "--verify"], capsys)
    assert rc == 0
    want = json.loads(out)
    for given in (url, url + "/"):  # a trailing slash names the same output
        rc, out, err = run(["stats", given, "--json", "--verify"], capsys)
        assert rc == 0, err
        got = json.loads(out)
        assert got.pop("directory") == url and want.pop("directory", None) in (None, str(local))
        assert got == want and got["bad_shards"] == [] and got["tokens_out"] > 0
        assert got["shards"] == len(shards_of(local)) == 4
    # the text report: the same lines but the first, which names the output
    rc, out, _ = run(["stats", str(local), "--verify"], capsys)
    local_lines = out.splitlines()
    rc, out, _ = run(["stats", url, "--verify"], capsys)
    assert rc == 0 and out.splitlines()[0].startswith(f"{url}: strategy ")
    assert out.splitlines()[1:] == local_lines[1:] and "4/4 shards match their sha256" in out
    # inspect: the same rows, segments and decoded text (shards are named by their file names)
    for flags in (["--n", "4"], ["--n", "2", "--verify"], ["--n", "1000"]):
        rc, want_rows, _ = run(["inspect", str(local), *flags], capsys)
        rc_url, got_rows, err = run(["inspect", url, *flags], capsys)
        assert rc == rc_url == 0, err
        assert got_rows == want_rows and want_rows.count("\nrow ") == min(int(flags[1]), want["rows"])
    png = tmp_path / "url.png"
    rc, out, err = run(["stats", url, "--plot", str(png)], capsys)
    assert rc == 0, err
    assert f"plot              {png}" in out and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_verify_reports_a_replaced_or_missing_shard_object(outputs, tmp_path, capsys):
    local = outputs["parquet"]
    url = upload_output(local, "damaged")
    first, second, third, _ = shards_of(local)
    assert run(["stats", url, "--verify"], capsys)[0] == 0
    assert run(["inspect", url, "--n", "1"], capsys)[0] == 0  # this process now knows the objects' sizes
    fs = s3fs.S3FileSystem()
    data = bytearray((local / first).read_bytes())
    data[len(data) // 2] ^= 1  # same size, other bytes: only the sha256 tells
    fs.pipe_file(f"damaged/out/{first}", bytes(data))
    fs.pipe_file(f"damaged/out/{second}", (local / second).read_bytes() + b"x")  # other size
    # inspect --verify stops at the first shard, naming it, as it does locally (below); the object's
    # size and version this process remembers from the inspect above are asked again
    rc, _, err = run(["inspect", url, "--n", "1", "--verify"], capsys)
    assert rc == 2 and f"{url}/{first}" in err and "sha256" in err
    rc, out, _ = run(["stats", url, "--verify", "--json"], capsys)
    assert rc == 1 and json.loads(out)["bad_shards"] == [first, second]
    rc, out, _ = run(["stats", url, "--verify"], capsys)
    assert rc == 1 and f"2/4 shards match their sha256; BAD: {[first, second]}" in out
    # a local copy with the same damage reports the same
    copy = tmp_path / "copy"
    shutil.copytree(local, copy)
    (copy / first).write_bytes(bytes(data))
    (copy / second).write_bytes((local / second).read_bytes() + b"x")
    rc, out, _ = run(["stats", str(copy), "--verify", "--json"], capsys)
    assert rc == 1 and json.loads(out)["bad_shards"] == [first, second]
    rc, _, err = run(["inspect", str(copy), "--n", "1", "--verify"], capsys)
    assert rc == 2 and str(copy / first) in err and "sha256" in err
    # a deleted shard object is a bad shard, as a deleted file is
    fs.rm_file(f"damaged/out/{third}")
    rc, out, _ = run(["stats", url, "--verify", "--json"], capsys)
    assert rc == 1 and json.loads(out)["bad_shards"] == [first, second, third]


def test_a_url_without_manifest_is_a_clear_error(outputs, capsys):
    local = outputs["parquet"]
    fs = s3fs.S3FileSystem()
    fs.mkdir("nomanifest")
    names = shards_of(local)
    for name in names:  # shards but no manifest: a copy cut short, or a run not finished
        fs.put_file(str(local / name), f"nomanifest/partial/{name}")
    fs.put_file(str(local / names[0]), f"nomanifest/running/{names[0]}")
    fs.pipe_file("nomanifest/running/.seqpack/task-00000.json", b"{}")  # a URL run's mirrored work dir
    cases = {
        "s3://nomanifest/partial": "not a seqpack preprocess output, or an unfinished one (no manifest.json)",
        "s3://nomanifest/running": "an unfinished preprocess run (no manifest.json yet); rerun the same",
        "s3://nomanifest/nothing": "nothing at this URL: not a seqpack preprocess output",
        f"s3://nomanifest/partial/{names[0]}": "an object (a file), not a preprocess output directory",
    }
    for url, message in cases.items():
        for argv in (["stats", url, "--json"], ["stats", url, "--verify"], ["inspect", url]):
            rc, out, err = run(argv, capsys)
            assert rc == 2 and out == "" and err.count("\n") == 1
            assert err.startswith(f"seqpack {argv[0]}: error: {url}: {message}")


def test_transient_errors_are_retried_by_the_remote_layer(s3, outputs, capsys):  # noqa: F811
    local = outputs["parquet"]
    url = upload_output(local, "flaky")
    rc, out, _ = run(["stats", str(local), "--json", "--verify"], capsys)
    want = {k: v for k, v in json.loads(out).items() if k != "directory"}
    rc, want_rows, _ = run(["inspect", str(local), "--n", "5"], capsys)
    s3.faults.every_503, s3.faults.every_cut = 3, 4
    try:
        rc, out, err = run(["stats", url, "--json", "--verify"], capsys)
        rc_rows, rows, err_rows = run(["inspect", url, "--n", "5", "--verify"], capsys)
    finally:
        s3.faults.every_503 = s3.faults.every_cut = 0
    assert rc == 0 and rc_rows == 0, err + err_rows
    assert {k: v for k, v in json.loads(out).items() if k != "directory"} == want and rows == want_rows
    assert s3.faults.counts.get("503", 0) > 0 and s3.faults.counts.get("cut", 0) > 0
