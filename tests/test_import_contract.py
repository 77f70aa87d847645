"""The import graph: the stages never import each other, the core imports no stage, no cycles.

Every `import` and `from ... import` of every module counts, including the
ones inside functions (a lazy import is still a dependency).  The command
line's verb table names stage functions as strings; that is how the core
dispatches to a stage without importing it, and it is not an import.
"""

import ast
import pathlib
from typing import Dict, Set

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
CORE = "clicklens"
STAGES = ("beam_pipelines", "trainer", "serving")
PACKAGES = (CORE,) + STAGES


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, package: str) -> Set[str]:
    """Absolute names of the modules some source imports (relative imports resolved against `package`)."""
    tree = ast.parse(source)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            # `from pkg import module` imports pkg.module when that is a module.
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph() -> Dict[str, Set[str]]:
    """{module: the repo modules it imports} over every module of the four packages."""
    files = {module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = {m for m in imported_modules(path.read_text(encoding="utf-8"), package) if m in files}
    return graph


def top(module: str) -> str:
    return module.split(".")[0]


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_graph_covers_every_package(graph):
    assert {top(m) for m in graph} == set(PACKAGES)
    assert len(graph) > 40


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_imports_only_itself_and_the_core(graph, stage):
    crossings = sorted((m, dep) for m, deps in graph.items() if top(m) == stage
                       for dep in deps if top(dep) not in (stage, CORE))
    assert crossings == [], f"{stage} imports another stage: {crossings}"


def test_the_core_imports_no_stage(graph):
    crossings = sorted((m, dep) for m, deps in graph.items() if top(m) == CORE for dep in deps if top(dep) != CORE)
    assert crossings == []


def test_there_is_no_import_cycle(graph):
    """Tarjan's strongly connected components: any component of two or more modules is a cycle."""
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in graph[node]:
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert cycles == []


def test_this_check_sees_lazy_relative_and_package_level_imports():
    """The walker finds imports inside functions, relative ones and `from package import module`."""
    source = "def f():\n    from serving import client\n    import trainer.model\n    from . import graph\n"
    found = imported_modules(source, "beam_pipelines")
    assert {"serving", "serving.client", "trainer.model", "beam_pipelines.graph"} <= found


def test_the_verb_table_names_each_stage_by_string(graph):
    """The core reaches the stages only through cli.VERBS targets, which exist."""
    import importlib.util

    from clicklens import cli

    for verb in cli.VERBS:
        module_name_, function_name = verb.target.split(":")
        assert importlib.util.find_spec(module_name_) is not None, verb.target
        assert module_name_ in graph, verb.target
