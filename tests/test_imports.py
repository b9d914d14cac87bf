"""The package's import graph (every import, module-level or inside a function): no circle, and the
library never reaches into the training code."""
import ast
from pathlib import Path

import unipixel

ROOT = Path(unipixel.__file__).parent


def module_name(path: Path) -> str:
    parts = ("unipixel", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the unipixel modules it imports (`from .pkg import mod` counts as importing mod)."""
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]) if node.level else ""
                target = ".".join(p for p in (base, node.module) if p)
                edges |= {f"{target}.{a.name}" if f"{target}.{a.name}" in files else target for a in node.names}
        graph[name] = {e for e in edges if e in files and e != name}
    return graph


def test_no_import_circle():
    graph, done, path = import_graph(), set(), []

    def visit(name):
        if name in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(name) :] + [name]))
        if name in done:
            return
        path.append(name)
        for other in sorted(graph[name]):
            visit(other)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_library_never_imports_training_code():
    reaching = {name: sorted(e for e in edges if e.startswith("unipixel.train"))
                for name, edges in import_graph().items() if not name.startswith("unipixel.train")}  # fmt: skip
    assert {name: edges for name, edges in reaching.items() if edges} == {}
