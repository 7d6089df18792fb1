"""Start-up: every `seqpack ... --help` imports no torch or numba; `import seqpack` + the planner import
no torch; `--version`; the lazy re-exports; the optional `plot` extra's error message.

Import checks run in a fresh interpreter (this test process has torch loaded already).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

import seqpack
from seqpack.cli import build_parser, main, version
from seqpack.lazy import import_pyplot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("torch", "numba", "torchdata", "pyarrow", "datasets", "matplotlib", "tokenizers")


def _fresh(code: str) -> dict:
    """Run ``code`` in a new interpreter that prints one JSON object; return it."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def _commands() -> list[list[str]]:
    """Every command path of the parser: [], ["preprocess"], ["curriculum", "plot"], ..."""
    out: list[list[str]] = []

    def walk(parser, path):
        out.append(path)
        for action in parser._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                for name, sub in action.choices.items():
                    walk(sub, [*path, name])

    walk(build_parser(), [])
    return out


def test_every_help_imports_no_torch_or_numba():
    commands = _commands()
    assert ["preprocess"] in commands and ["stats"] in commands and ["curriculum", "plot"] in commands
    code = f"""
import contextlib, io, json, sys
from seqpack.cli import main
helps = {{}}
for path in {commands!r}:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            main([*path, "--help"])
        except SystemExit as e:
            assert e.code == 0, (path, e.code)
    helps[" ".join(path)] = buf.getvalue().startswith("usage: seqpack")
print(json.dumps({{"helps": helps, "heavy": sorted(m for m in {HEAVY!r} if m in sys.modules)}}))
"""
    got = _fresh(code)
    assert got["heavy"] == []
    assert got["helps"] == {" ".join(p): True for p in commands}


def test_import_and_pack_import_no_torch():
    got = _fresh(
        "import json, sys, seqpack\n"
        "after_import = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numba'))\n"
        "plan = seqpack.pack([5, 7], 8)\n"
        "print(json.dumps({'after_import': after_import, 'torch': 'torch' in sys.modules,\n"
        "  'bins': plan.bin_offsets.tolist(), 'lens': plan.seg_len.tolist(),\n"
        "  'seqpack': sorted(m for m in sys.modules if m.startswith('seqpack'))}))"
    )
    assert got["after_import"] == [] and got["torch"] is False
    assert got["bins"] == [0, 1, 2] and got["lens"] == [7, 5]
    # only the planner and its one kernel module: no stage, loader, decompose or MIL module
    heavy_parts = ("seqpack.stages", "seqpack.mil", "seqpack.loader")
    assert not [m for m in got["seqpack"] if m.startswith(heavy_parts)]
    assert "seqpack.ops.decompose" not in got["seqpack"] and "seqpack.ops.mil" not in got["seqpack"]


def test_version(capsys):
    try:
        expected = importlib.metadata.version("seqpack")
    except importlib.metadata.PackageNotFoundError:
        expected = seqpack.__version__
    assert version() == expected
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"seqpack {expected}\n"


@pytest.mark.parametrize("package", ["seqpack", "seqpack.curriculum", "seqpack.shards", "seqpack.preprocess"])
def test_lazy_reexports_complete(package):
    mod = importlib.import_module(package)
    table = {name for names in mod._SOURCES.values() for name in names}
    assert table == set(mod.__all__)
    assert set(mod.__all__) <= set(dir(mod))
    for name in mod.__all__:
        value = getattr(mod, name)
        assert getattr(importlib.import_module(_source(mod, name)), name) is value
    with pytest.raises(AttributeError, match="no_such_name"):
        mod.no_such_name  # noqa: B018
    ns: dict = {}
    exec(f"from {package} import *", ns)
    assert set(mod.__all__) <= set(ns)


def _source(mod, name: str) -> str:
    return next(m for m, names in mod._SOURCES.items() if name in names)


def test_preprocess_cli_choices_equal_their_sources():
    from seqpack.preprocess import cli, config, executors
    from seqpack.shards import format as shard_format

    assert cli.STRATEGIES == config.STRATEGIES
    assert cli.PACK_ALGORITHMS == config.PACK_ALGORITHMS
    assert cli.OVERFLOW == config.OVERFLOW
    assert cli.ENGINES == executors.ENGINES
    assert cli.SHARD_FORMATS == shard_format.SHARD_FORMATS
    assert cli.MANIFEST == shard_format.MANIFEST


def test_plot_without_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'seqpack\[plot\]'"):
        import_pyplot()
