"""The library's layout: no import cycle between tcl's modules, no module over 350 lines."""
from __future__ import annotations

import ast
from pathlib import Path

import tcl

ROOT = Path(tcl.__file__).parent
MAX_LINES = 350


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """The tcl modules path imports (relative imports resolved; `from pkg import sub` counts the submodule)."""
    name, tree = _module(path), ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "tcl"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "tcl":
                continue
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    mods = {_module(p): p for p in ROOT.rglob("*.py")}
    # a module's own packages are left out: they import it by design (a package re-exporting its modules)
    return {m: {i for i in _imports(p, top_level_only) if i in mods and i != m and not m.startswith(i + ".")}
            for m, p in mods.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_at_load() -> None:
    graph = _graph(top_level_only=True)
    assert "tcl.compress.patch" in graph["tcl.search.scorer"]  # the graph sees relative imports
    assert _cycle(graph) is None


def test_no_import_cycle_inside_functions_but_the_search_entry_point() -> None:
    graph = _graph(top_level_only=False)
    graph["tcl.search"] = graph["tcl.search"] - {"tcl.cli"}  # search.main's deferred import of the CLI it serves
    assert _cycle(graph) is None


def test_no_module_over_350_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules: {long}"


def test_every_loaded_tcl_module_is_this_package() -> None:
    import sys

    outside = {n: m.__file__ for n, m in list(sys.modules.items())
               if n.split(".")[0] == "tcl" and getattr(m, "__file__", None) and not m.__file__.startswith(str(ROOT))}
    assert not outside, f"imported by an old module path, from another copy of tcl: {outside}"
