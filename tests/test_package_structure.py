"""The package's house rules, read from its source: no import circle, arrows that point down, and the
runtime apart from developer tools."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "owlore_kernels"


def _modules() -> dict[str, str]:
    """module name -> file, for every .py file of the package."""
    found = {}
    for folder, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[module.removesuffix(".__init__")] = path
    return found


def import_graph(modules: dict[str, str]) -> dict[str, set[str]]:
    """module -> the package modules it imports, anywhere in its file (imports inside functions too:
    a circle hidden in a function is still a circle). ``from . import x`` where x is a submodule
    points at x, not at the package whose __init__ merely contains it."""
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        base = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = base.split(".")[: len(base.split(".")) - node.level + 1]
                    target = ".".join(parts + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    edges[module].add(sub if sub in modules else target)
            elif isinstance(node, ast.Import):
                edges[module].update(alias.name for alias in node.names)
        edges[module] = {m for m in edges[module] if m in modules and m != module}
    return edges


def find_circle(edges: dict[str, set[str]]):
    """One import circle as a list of modules, or None (depth-first search, colouring)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_circle_finder_finds_a_planted_circle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_circle(edges) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_in_the_package():
    circle = find_circle(import_graph(_modules()))
    assert circle is None, " -> ".join(circle)


@pytest.mark.parametrize("lower,higher", [
    ("owlore_kernels.update_rule", "owlore_kernels.optim"),
    ("owlore_kernels.distributed", "owlore_kernels.optim"),
    ("owlore_kernels.in_backward", "owlore_kernels.optim"),
    ("owlore_kernels.ops", "owlore_kernels.optim"),
])
def test_lower_modules_do_not_import_the_optimizer(lower, higher):
    edges = import_graph(_modules())
    reach, todo = set(), [lower]
    while todo:
        for n in edges[todo.pop()]:
            if n not in reach:
                reach.add(n)
                todo.append(n)
    assert higher not in reach


def test_the_runtime_holds_no_developer_tool():
    """The static GPU compile check is a developer tool: it lives outside the package."""
    assert not any(m.endswith("gpu_static") for m in _modules())
