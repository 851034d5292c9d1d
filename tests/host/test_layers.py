"""The layers of the design card: imports point down (tools -> model_dir -> loader), no cycles.

Read from the source with ast, so every import counts: at the top, inside a function, under
TYPE_CHECKING. A failure names the importing file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("loader", "model_dir", "tools")  # bottom to top
# What each layer may import from the project (besides the standard library and third parties).
ALLOWED = {"loader": {"loader"}, "model_dir": {"loader", "model_dir"},
           "tools": {"loader", "model_dir", "tools"}}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(project module, line) for every import in the file, resolved to the module imported."""
    out = []
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            # `from a import b` imports a, and a.b when b is a module
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            # the longest project module the name starts with
            parts = name.split(".")
            for n in range(len(parts), 0, -1):
                candidate = ".".join(parts[:n])
                if candidate in modules:
                    if candidate != me:
                        out.append((candidate, node.lineno))
                    break
    return out


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {m: {t for t, _ in imports(p, modules)} for m, p in modules.items()}


def test_the_packages_are_found() -> None:
    modules = project_modules()
    assert {"loader.main", "loader.contract", "model_dir.dataset", "tools.stats"} <= set(modules)


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_down(package: str) -> None:
    modules = project_modules()
    wrong = [
        f"{p.relative_to(ROOT)}:{line} imports {target}"
        for m, p in modules.items() if m.split(".")[0] == package
        for target, line in imports(p, modules)
        if target.split(".")[0] not in ALLOWED[package]
    ]
    assert not wrong, f"{package}/ may import only {sorted(ALLOWED[package])}: {wrong}"


def test_no_import_cycles() -> None:
    """Tarjan's strongly connected components over the module graph: every one a single node."""
    g = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path: Path) -> None:
    """The rules above on a tree built to break them."""
    global ROOT
    saved = ROOT
    ROOT = tmp_path
    try:
        for pkg in PACKAGES:
            (tmp_path / pkg).mkdir()
            (tmp_path / pkg / "__init__.py").write_text("")
        (tmp_path / "loader" / "a.py").write_text("from loader import b\n")
        (tmp_path / "loader" / "b.py").write_text("def f():\n    from . import a\n")
        (tmp_path / "loader" / "c.py").write_text("import tools.x\n")
        (tmp_path / "tools" / "x.py").write_text("")
        with pytest.raises(AssertionError, match=r"loader/c.py:1 imports tools.x"):
            test_imports_point_down("loader")
        with pytest.raises(AssertionError, match=r"\['loader.a', 'loader.b'\]"):
            test_no_import_cycles()
    finally:
        ROOT = saved
