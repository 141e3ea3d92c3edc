"""The package's architecture: no import cycles, deferred imports only for heavy optional packages, every module's
declared room matches its imports, and the README's layout names every module."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("ddm_hpc", "kernels")
# The only imports allowed inside functions: heavy optional packages a module defers until it needs them.
DEFERRED = {"matplotlib", "PIL", "faiss", "safetensors", "torchvision", "trak", "triton"}  # safetensors: importer, optional
# Imported by every room (their docstrings say so); the rest must be declared.
EVERYWHERE = {"errors", "utils"}


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported internal module, inside a function, line) for every import that runs (not TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, bool, int]] = []

    def target(name: str) -> str | None:
        """The deepest known module ``name`` denotes (``from pkg import submodule`` names the submodule)."""
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append((alias.name, inner, child.lineno))
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                for alias in child.names:
                    full = f"{child.module}.{alias.name}"
                    found.append((full if full in MODULES else child.module, inner, child.lineno))
            visit(child, inner)

    visit(tree, False)
    return [(target(n) or n, inner, line) for n, inner, line in found]


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        graph[name] = {m for m, _, _ in _imports(path) if m in MODULES and m != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a list of modules, first = last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state:
                found = dfs(v)
                if found:
                    return found
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state:
            found = dfs(u)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    graph = _graph()
    assert len(graph) > 40 and graph["ddm_hpc.cli"] >= {"ddm_hpc.pipeline", "ddm_hpc.config"}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_inside_functions_only_defer_heavy_optional_packages():
    bad = [f"{path.relative_to(REPO)}:{line} imports {name}" for path in MODULES.values()
           for name, inner, line in _imports(path) if inner and name.split(".")[0] not in DEFERRED]
    assert not bad, "\n".join(bad)


def _room(path: Path) -> str | None:
    """The 'Room:' paragraph of a module's docstring."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    m = re.search(r"^Rooms?\b.*?(?:\n\s*\n|\Z)", doc, flags=re.M | re.S)
    return m.group(0) if m else None


def test_every_module_says_which_rooms_it_imports():
    """Each ddm_hpc module's docstring has a 'Room' paragraph naming (in ``double backticks``) every room of the
    package it imports, errors and utils aside; a package's name covers its modules."""
    problems = []
    for name, path in MODULES.items():
        if not name.startswith("ddm_hpc") or name == "ddm_hpc.diagnose.__main__":
            continue
        room = _room(path)
        if room is None:
            problems.append(f"{name}: no 'Room:' paragraph in its docstring")
            continue
        declared = set(re.findall(r"``([\w.]+)``", room))
        for imported in {m for m, _, _ in _imports(path) if m in MODULES and m != name}:
            short = imported.removeprefix("ddm_hpc.")
            if imported == "ddm_hpc" or short in EVERYWHERE or short.split(".")[0] in EVERYWHERE:
                continue
            own_package = (name if path.name == "__init__.py" else name.rpartition(".")[0]).removeprefix("ddm_hpc.")
            covered = any(short == d or short.startswith(d + ".") or short == f"{own_package}.{d}"
                          or (d == "kernels" and imported.startswith("kernels")) for d in declared)
            if not covered:
                problems.append(f"{name} imports {short}, which its Room paragraph does not name")
    assert not problems, "\n".join(problems)


def test_readme_layout_names_every_module():
    text = (REPO / "README.md").read_text()
    layout = text[text.index("## Layout"):]
    layout = layout[:layout.index("\n## ", 4)] if "\n## " in layout[4:] else layout
    missing = [name for name in MODULES if name.startswith("ddm_hpc.") and name != "ddm_hpc.diagnose.__main__"
               and f"`{name.rpartition('.')[2]}`" not in layout and f"{name.rpartition('.')[2]}/" not in layout]
    assert not missing, f"README 'Layout' does not name: {missing}"


@pytest.mark.parametrize("room", ["ddm_hpc.graph", "ddm_hpc.errors", "ddm_hpc.utils"])
def test_leaves_import_nothing_above_them(room):
    allowed = {"ddm_hpc", "ddm_hpc.errors"}
    assert _graph()[room] <= allowed, _graph()[room]


def test_only_the_cli_imports_the_pipeline():
    """Nothing below the pipeline runs a stage: methods and tasks declare variants, the pipeline makes them."""
    graph = _graph()
    assert {m for m, deps in graph.items() if "ddm_hpc.pipeline" in deps} == {"ddm_hpc.cli"}
