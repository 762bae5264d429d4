"""The package's shape, checked: the stages are packages that import only the stages below them, no import circle,
few modules at the root, no very long class (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_cls"
# Each stage may import the stages before it in this list, never one after it. The root's shared modules come first
# (everything uses them); the CLI last (it imports every stage).
LAYERS = ["errors", "atomic", "arg_parser", "hardware", "database", "task", "data", "model", "export", "store",
          "monitoring", "lifecycle", "serving", "trainer_cli", "cli", "__main__"]  # fmt: skip
ROOT_MODULES_MAX = 12
CLASS_LINES_MAX = 300


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool) -> set[str]:
    """The lightning_cls modules a file imports (at module level only, or anywhere: function-level imports too)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_cls"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lightning_cls"))
    return found


def graph(top_level_only: bool) -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        name: {m for m in imports(path, top_level_only) if m in files and m != name} for name, path in files.items()
    }


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 else -1


def test_every_module_belongs_to_a_stage():
    unknown = sorted(m for m in graph(True) if m != "lightning_cls" and m.split(".")[1] not in LAYERS)
    assert not unknown, f"modules outside the stages of LAYERS: {unknown}"


def test_no_stage_imports_a_later_stage():
    upward = sorted(
        f"{m} -> {d}" for m, deps in graph(False).items() for d in deps if m != "lightning_cls" and layer(d) > layer(m)
    )
    assert not upward, "imports of a later stage:\n" + "\n".join(upward)


def test_no_import_circles():
    edges, circles, state = graph(False), [], {}  # imports inside functions count: they are circles when they run

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                circles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_few_modules_at_the_root():
    root = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root) <= ROOT_MODULES_MAX, f"{len(root)} modules at the package root: {root}"


def test_no_class_is_very_long():
    long = [
        f"{module_name(p)}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for p in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > CLASS_LINES_MAX
    ]
    assert not long, "classes over the limit: " + ", ".join(long)
