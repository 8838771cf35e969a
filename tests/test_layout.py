"""The package's layout stays true: imports run one way (the contracts in pyproject.toml), no import
cycle (imports inside functions included), no import inside a function to dodge one, no private name
used across modules, and a top level of a dozen modules.
"""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fxabstract"


def _name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, tuple[pathlib.Path, ast.Module]]:
    return {_name(p): (p, ast.parse(p.read_text(), str(p))) for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, path: pathlib.Path, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (relative imports resolved against `module`)."""
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    base = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(modules: dict) -> dict[str, list[tuple[ast.AST, str, list[str]]]]:
    """Per module: (node, imported module, imported names) for every import of a fxabstract module,
    wherever it is in the file (functions included)."""
    out = {}
    for module, (path, tree) in modules.items():
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(module, path, node)
                if target.split(".")[0] == "fxabstract":
                    found.append((node, target, [a.name for a in node.names]))
            elif isinstance(node, ast.Import):
                found += [(node, a.name, []) for a in node.names if a.name.split(".")[0] == "fxabstract"]
        out[module] = found
    return out


def _depends(modules: dict, target: str, names: list[str]) -> set[str]:
    """The package modules an import loads: the module, and each name that is itself a submodule."""
    subs = {f"{target}.{n}" for n in names if f"{target}.{n}" in modules}
    return subs | ({target} if target in modules and (len(subs) < len(names) or not names) else set())


def test_import_contracts_hold():
    """The layer and forbidden-import contracts in pyproject.toml ([tool.importlinter])."""
    run = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                          "lint_imports_command()"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, f"an import contract is broken:\n{run.stdout[-4000:]}{run.stderr[-2000:]}"
    assert "broken" in run.stdout and " 0 broken" in run.stdout, run.stdout[-2000:]


def test_no_import_cycle():
    """No cycle among the package's modules, counting imports inside functions (a lazy import hides a
    cycle from Python, not from this check). Importing a package runs its __init__, so that is an edge
    to the __init__; but a package's own modules reach it first (Python imports parents before
    children), so an edge from a module up to a package it sits in is not one."""
    modules = _modules()
    graph = {m: set() for m in modules}
    for module, found in _imports(modules).items():
        for _, target, names in found:
            deps = _depends(modules, target, names)
            graph[module] |= {d for d in deps if d != module and not module.startswith(d + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        stack.pop()
        state[m] = 2
        return None
    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_no_import_inside_a_function():
    """Package modules import each other at the top of the file only (optional third-party libraries,
    matplotlib or onnxruntime, may still load lazily)."""
    lazy = [f"{m}:{node.lineno} imports {target}" for m, found in _imports(_modules()).items()
            for node, target, _ in found if node.col_offset > 0]
    assert not lazy, f"imports of fxabstract modules inside functions: {lazy}"


def test_no_private_name_used_across_modules():
    """A name starting with `_` is private to its module: no other module imports it or reads it as an
    attribute of an imported module."""
    modules = _modules()
    bad = []
    for module, found in _imports(modules).items():
        bound = {}                         # local name -> imported fxabstract module
        for node, target, names in found:
            bad += [f"{module}:{node.lineno} imports {target}.{n}" for n in names if n.startswith("_") and n != "__version__"]
            for alias in node.names:
                full = f"{target}.{alias.name}" if isinstance(node, ast.ImportFrom) else alias.name
                if full in modules:
                    bound[alias.asname or alias.name.split(".")[0]] = full
        for node in ast.walk(modules[module][1]):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{module}:{node.lineno} reads {bound[node.value.id]}.{node.attr}")
    assert not bad, f"private names used across modules: {bad}"


def test_top_level_has_about_a_dozen_modules():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 14, f"{len(top)} modules at the package's top level: {top}; put new ones in a stage's folder"
    folders = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert folders == ["interpret", "output", "passes", "sites", "zoo"], folders


def test_fold_names_no_pattern():
    """The fold runs the site table; adding a site kind never touches it."""
    source = (PACKAGE / "passes" / "fold.py").read_text()
    for pattern in ("heads", "gqa", "splits", "excitation", "head_ops", "head_rows"):
        assert f"sites.{pattern}" not in source and f"import {pattern}" not in source, \
            f"passes/fold.py names the pattern module {pattern}"
