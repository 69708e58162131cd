"""The layout's rules, checked on the source itself: no module imports another's private names, the import graph
(function-level imports included) has no cycles, and no module grows past MAX_LINES.

Run alone for a report: `python tests/test_architecture.py`.
"""
from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lite_ft"
MAX_LINES = 350


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the package."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every lite_ft import in the file, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "lite_ft":
                    yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.split(".")[0] != "lite_ft":
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in known:  # `from lite_ft.training import checkpoint`: a module, not a name
                    yield submodule, None, node.lineno
                else:
                    yield base, alias.name, node.lineno


def private_imports(known: dict[str, Path]) -> list[str]:
    """`module:line imports _name from other` for each private name taken from another module."""
    found = []
    for name, path in known.items():
        for target, imported, line in imports(name, path, known):
            if imported and imported.startswith("_") and not imported.endswith("__") and target != name:
                found.append(f"{name}:{line} imports {imported} from {target}")
    return found


def graph(known: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the lite_ft modules it imports (`from lite_ft.x import name` imports lite_ft.x)."""
    edges: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        for target, _, _ in imports(name, path, known):
            while target not in known and "." in target:
                target = target.rpartition(".")[0]
            if target in known and target != name:
                edges[name].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return groups


def long_modules(known: dict[str, Path], limit: int = MAX_LINES) -> list[str]:
    """`module: N lines` for each module over `limit` lines."""
    counts = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in known.items()}
    return [f"{name}: {n} lines" for name, n in sorted(counts.items()) if n > limit]


def test_no_module_imports_a_private_name_from_another() -> None:
    assert private_imports(modules()) == []


def test_the_import_graph_has_no_cycles() -> None:
    assert cycles(graph(modules())) == []


def test_no_module_is_over_the_line_limit() -> None:
    assert long_modules(modules()) == []


def test_the_checks_catch_what_they_look_for(tmp_path: Path) -> None:
    """A package with a private import, a cycle through a function-level import, and a long module."""
    root = tmp_path / "lite_ft"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "__init__.py").write_text("")
    (root / "a.py").write_text("from lite_ft.sub.b import _helper\n")
    (root / "sub" / "b.py").write_text("def f():\n    from lite_ft import a\n" + "x = 1\n" * MAX_LINES)
    known = modules(root)
    assert private_imports(known) == ["lite_ft.a:1 imports _helper from lite_ft.sub.b"]
    assert cycles(graph(known)) == [["lite_ft.a", "lite_ft.sub.b"]]
    assert long_modules(known) == [f"lite_ft.sub.b: {MAX_LINES + 2} lines"]


if __name__ == "__main__":
    known = modules()
    problems = private_imports(known) + [" -> ".join(c) for c in cycles(graph(known))] + long_modules(known)
    print("\n".join(problems) or "no rule broken")
    sys.exit(1 if problems else 0)
