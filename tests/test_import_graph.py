"""The packages import in one direction: no module of memkit or adapters imports (at the top or inside a
function) a module that imports it back, so each can be read and loaded on its own."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("memkit", "adapters")


def module_graph() -> dict[str, set[str]]:
    files = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            files[name] = path
    graph = {}
    for name, path in files.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join([*parts, *([node.module] if node.module else [])])
                deps |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = {d for d in deps if d in files and d != name and d not in PACKAGES}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    found = set()

    def walk(node, path):
        if node in path:
            cycle = path[path.index(node):]
            first = cycle.index(min(cycle))
            found.add(tuple(cycle[first:] + cycle[:first]))
            return
        for dep in graph[node]:
            walk(dep, [*path, node])

    for node in graph:
        walk(node, [])
    return found


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == {("a", "b", "c")}


def test_no_module_imports_one_that_imports_it_back():
    graph = module_graph()
    assert "adapters.identity" in graph["adapters.base"] and "memkit.train.losses" in graph["memkit.train.module"]
    assert find_cycles(graph) == set()
