"""The package's shape: no import cycles (function-local imports included), no module over 400 lines,
few function-local imports of the package's own modules (each with a reason on its line or above).

Run as a script (``python tests/test_architecture.py``) to print the import graph's cycles, the long
modules and the function-local imports.
"""

from __future__ import annotations

import ast
import os
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 400
MAX_LOCAL_IMPORTS = 5
# packages shipped from other folders (pyproject's package-dir mapping)
PACKAGE_DIRS = {"seqpack": ROOT / "seqpack", "seqpack.ops": ROOT / "ops"}


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    line: int
    local: bool  # inside a function or method body


def _modules() -> dict[str, Path]:
    """Module name -> file, for every .py file of the package (``pkg/__init__.py`` is ``pkg``)."""
    out: dict[str, Path] = {}
    for pkg, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            if any(part in ("data",) for part in rel.parts[:-1]) and pkg == "seqpack":
                continue  # bundled data scripts, not part of the import graph
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if name.startswith("seqpack.ops.") or name == "seqpack.ops" or pkg == "seqpack":
                if pkg == "seqpack" and rel.parts and rel.parts[0] == "ops":
                    continue  # a link to ../ops in a development worktree
                out[name] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is one of our modules."""
    while name:
        if name in modules:
            return name
        if "." not in name:
            return None
        name = name.rsplit(".", 1)[0]
    return None


def _edges(modules: dict[str, Path]) -> list[Edge]:
    edges: list[Edge] = []
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        is_pkg = path.name == "__init__.py"
        # which nodes sit inside a function body
        local_nodes: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if inner is not node:
                        local_nodes.add(id(inner))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg_parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg_parts = pkg_parts[: len(pkg_parts) - (node.level - 1)]
                    base = ".".join(pkg_parts + ([base] if base else []))
                # `from pkg import sub` imports the submodule pkg.sub when it is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            if isinstance(node, ast.Import) and getattr(node, "level", 0):
                continue
            for t in targets:
                dst = _resolve(t, modules)
                if dst is not None and dst != mod:
                    edges.append(Edge(mod, dst, node.lineno, id(node) in local_nodes))
    return edges


def _cycles(modules: dict[str, Path], edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for e in edges:
        graph[e.src].add(e.dst)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _has_reason(path: Path, line: int) -> bool:
    """A comment on the import's line or the line above says why the import is local."""
    lines = path.read_text().splitlines()
    here = lines[line - 1]
    above = lines[line - 2].strip() if line >= 2 else ""
    return "#" in here or above.startswith("#")


def test_no_import_cycles() -> None:
    modules = _modules()
    cycles = _cycles(modules, _edges(modules))
    assert cycles == [], "import cycles among the package's modules: " + "; ".join(
        " <-> ".join(c) for c in cycles
    )


def test_no_module_over_limit() -> None:
    long = {
        name: n
        for name, path in _modules().items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}, f"modules over {MAX_LINES} lines: {long}"


def test_few_local_imports_each_with_a_reason() -> None:
    modules = _modules()
    local = [e for e in _edges(modules) if e.local]
    sites = sorted({(e.src, e.line) for e in local})
    assert len(sites) <= MAX_LOCAL_IMPORTS, f"{len(sites)} function-local imports of seqpack modules: {sites}"
    missing = [(m, line) for m, line in sites if not _has_reason(modules[m], line)]
    assert missing == [], f"function-local imports without a one-line reason: {missing}"


def test_the_checker_sees_cycles(tmp_path: Path) -> None:
    """The cycle finder itself: a -> b -> a is found, a -> b is not."""
    mods = {"p.a": tmp_path / "a.py", "p.b": tmp_path / "b.py", "p.c": tmp_path / "c.py"}
    edges = [Edge("p.a", "p.b", 1, False), Edge("p.b", "p.a", 1, True), Edge("p.b", "p.c", 2, False)]
    assert _cycles(mods, edges) == [["p.a", "p.b"]]
    assert _cycles(mods, edges[:1] + edges[2:]) == []


def main() -> int:
    modules = _modules()
    edges = _edges(modules)
    print("cycles:")
    for c in _cycles(modules, edges):
        print("  " + " <-> ".join(c))
    print(f"modules over {MAX_LINES} lines:")
    for name, path in sorted(modules.items()):
        n = len(path.read_text().splitlines())
        if n > MAX_LINES:
            print(f"  {name}: {n}")
    print("function-local imports of seqpack modules:")
    for e in sorted({(e.src, e.line, e.dst) for e in edges if e.local}):
        print(f"  {e[0]}:{e[1]} -> {e[2]}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.fspath(ROOT))
    sys.exit(main())
