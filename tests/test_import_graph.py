"""The package's import graph, read from the source (function-level imports included): no cycle, and no import
inside a function that defers nothing.

Why from the AST: an import cycle hidden inside a function works until someone moves the import to the top (or
imports the modules in another order), and Python only reports it then. Reading every ``import`` statement finds it
now. An import inside a function is only worth its surprise when it keeps something slow (torch, pandas, papermill)
out of a module's import; one whose module is already imported at the top, directly or through another vesselnb
module, defers nothing. Third-party modules are compared by their full dotted name (``scipy.spatial`` is not
``scipy.ndimage``), so a package's own imports of its submodules, which the source does not show, are not guessed.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "vesselnb"
# Copied into HF folders and imported by transformers as a package of its own, never as vesselnb modules.
EXCLUDED = (PACKAGE / "demo" / "remote_code",)


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # the imported module: a vesselnb module, or a third-party dotted name (``scipy.spatial``)
    line: int
    in_function: bool


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    """Every module of the package (the remote code included, as a leaf: its own imports are not vesselnb's)."""
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _parsed(path: Path) -> bool:
    return not any(path.is_relative_to(excluded) for excluded in EXCLUDED)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, in_function: bool = False) -> Iterator[tuple[ast.AST, bool]]:
    """Every import statement with whether it sits in a function; ``if TYPE_CHECKING:`` blocks never run."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for other in child.orelse:
                yield from _walk(other, in_function)
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, in_function
        yield from _walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node, in_function in _walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            assert isinstance(node, ast.ImportFrom)
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from vesselnb import runner` imports the module vesselnb.runner; `from x import y` a name of x.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for target in targets:
            if target.split(".")[0] == "vesselnb":
                while target not in modules:  # `import vesselnb.convert.cli` names a module; trim attributes
                    target = target.rsplit(".", 1)[0]
            if target and target != name and target != "__future__":
                found.append(Import(name, target, node.lineno, in_function))
    return found


def all_imports() -> list[Import]:
    modules = package_modules()
    return [imp for name, path in modules.items() if _parsed(path) for imp in imports_of(name, path, modules)]


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a path ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for start in sorted(edges):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(edges.get(start, ())))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(edges.get(nxt, ()))))
    return None


def _edges(imports: list[Import], *, function_level: bool) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for imp in imports:
        if imp.target.startswith("vesselnb") and (function_level or not imp.in_function):
            edges.setdefault(imp.source, set()).add(imp.target)
    return edges


def test_cycle_finder_finds_a_cycle_through_function_level_edges() -> None:
    """The checker itself: a cycle is found, and only a real one."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    imports = [Import("vesselnb.x", "vesselnb.y", 1, False), Import("vesselnb.y", "vesselnb.x", 9, True)]
    assert find_cycle(_edges(imports, function_level=False)) is None
    assert find_cycle(_edges(imports, function_level=True)) == ["vesselnb.x", "vesselnb.y", "vesselnb.x"]


def test_the_graph_is_read_from_every_module() -> None:
    imports = all_imports()
    sources = {imp.source for imp in imports}
    assert {"vesselnb.cli", "vesselnb.runner", "vesselnb.run_folder", "vesselnb.convert.stage"} <= sources
    # `from vesselnb import runner` is an edge to the module vesselnb.runner, not to the package.
    assert any(imp.source == "vesselnb.cli" and imp.target == "vesselnb.runner" for imp in imports)
    assert any(imp.in_function for imp in imports)  # function-level imports are part of the graph


def test_no_import_cycle() -> None:
    cycle = find_cycle(_edges(all_imports(), function_level=True))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_function_level_import_that_defers_nothing() -> None:
    imports = all_imports()
    top: dict[str, set[str]] = {}
    for imp in imports:
        if not imp.in_function:
            top.setdefault(imp.source, set()).add(imp.target)

    def closure(module: str) -> set[str]:
        seen, todo = set(), [module]
        while todo:
            for target in top.get(todo.pop(), ()):
                if target not in seen:
                    seen.add(target)
                    if target.startswith("vesselnb"):
                        todo.append(target)
        return seen

    useless = [
        f"{imp.source}:{imp.line} imports {imp.target}, already imported at the top"
        for imp in imports
        if imp.in_function and imp.target in closure(imp.source)
    ]
    assert not useless, "function-level imports that defer nothing:\n" + "\n".join(useless)
