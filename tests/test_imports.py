"""The house has no import circles (issue 26.8): a walk over every module's ``import`` statements,
including those inside functions (a lazy import is a circle deferred, not removed); imports under
``if TYPE_CHECKING:`` are for annotations only and are not counted."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bgpo", "baselines")


def modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    out = {}
    for pkg in packages:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = f.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _type_checking_only(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def imported(name: str, file: Path, known: dict[str, Path]) -> set[str]:
    """The package modules that module ``name`` imports (``from a.b import c`` counts ``a.b.c``
    when that is a module, else ``a.b``)."""
    tree = ast.parse(file.read_text())
    skip = _type_checking_only(tree)
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets.add(base)
            targets.update(f"{base}.{a.name}" for a in node.names)
    found = set()
    for t in targets:
        while t and t not in known:
            t = t.rpartition(".")[0]
        if t and t != name:
            found.add(t)
    return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def graph_of(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    known = modules(root, packages)
    return {m: imported(m, f, known) for m, f in known.items()}


def test_the_package_has_no_import_circle() -> None:
    graph = graph_of(ROOT, PACKAGES)
    assert len(graph) > 50 and sum(map(len, graph.values())) > 150  # the walk sees the house
    assert "bgpo.provision" in graph["bgpo.results"]  # an import inside a function counts
    found = circles(graph)
    detail = [f"{a} -> {b}" for comp in found for a in comp for b in sorted(graph[a]) if b in comp]
    assert found == [], f"import circles: {found}; edges inside them: {detail}"


def test_the_walk_finds_a_planted_circle(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n"
                              "def g():\n    import pkg.a\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nimport pkg.c\nif TYPE_CHECKING:\n"
                              "    import pkg.d2\n")
    (pkg / "d2.py").write_text("import pkg.d\n")
    assert circles(graph_of(tmp_path, ("pkg",))) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
