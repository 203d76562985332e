"""The modules' imports go one way: no module reaches, even from inside a function, a module that
reaches it back. Read from the source with ast, so nothing is imported here."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Folder -> the package it is installed as.
PACKAGES = {"gru_engine": "gru_engine", "exporters": "gru_engine.exporters", "bench": "gru_engine.bench"}


def _modules() -> dict[str, Path]:
    modules = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [part for part in path.relative_to(ROOT / folder).with_suffix("").parts if part != "__init__"]
            if not parts or not parts[-1].startswith("test_"):
                modules[".".join([package, *parts])] = path
    return modules


def _installed(name: str) -> str:
    """A source-tree name (exporters.x) as the installed one (gru_engine.exporters.x)."""
    for folder, package in PACKAGES.items():
        if name == folder or name.startswith(folder + "."):
            return package + name[len(folder):]
    return name


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (``from package import module`` names the module)."""
    modules = _modules()

    def known(name):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(known(_installed(alias.name)) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                source = package.rsplit(".", node.level - 1)[0] if node.level else node.module
                if node.level and node.module:
                    source += "." + node.module
                source = _installed(source)
                targets.update(known(f"{source}.{alias.name}") if f"{source}.{alias.name}" in modules
                               else known(source) for alias in node.names)
        graph[module] = {target for target in targets if target and target != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that reach each other (strongly connected, more than one module)."""
    order, low, stack, found = {}, {}, [], []

    def visit(module):
        order[module] = low[module] = len(order)
        stack.append(module)
        for target in graph[module]:
            if target not in order:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], order[target])
        if low[module] == order[module]:
            group = stack[stack.index(module):]
            del stack[stack.index(module):]
            if len(group) > 1:
                found.append(sorted(group))

    for module in graph:
        if module not in order:
            visit(module)
    return found


def test_the_graph_sees_imports_of_every_kind():
    graph = import_graph()
    assert {"gru_engine.spec", "gru_engine.exporters.onnx_reader", "gru_engine.bench.runner"} <= set(graph)
    assert "gru_engine.frontends" in graph["gru_engine.spec"]                    # from . import frontends
    assert "gru_engine.exporters.onnx_recurrent" in graph["gru_engine.exporters.onnx_gru"]  # from .x import y
    assert "gru_engine.bench.runner" in graph["gru_engine.cli"]                  # inside a function
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_one_that_imports_it_back():
    assert cycles(import_graph()) == []
