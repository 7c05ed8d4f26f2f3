"""The package's shape, checked: imports point downward (lazy imports included), no import cycles,
no module over 400 lines, no function over 60 lines without a written reason, and the package
data (task recipes, web page) ships inside the package. And the tests' own shape: no test module
imports another (shared fixtures live in ``conftest.py``, shared helpers in non-``test_`` modules).

Layer order (docs/design.md): base -> forward -> training, inference -> evaluate ->
experiments, serve -> cli. A module may import its own layer's base modules, any lower layer,
and its own package; sibling packages of one layer stay independent.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src" / "softprompt"
BASE = {"__init__", "config", "configio", "models", "prompt", "adapter", "store", "promptdir", "durable", "data", "recipes", "metrics",
        "provenance", "chat", "hfdata", "compat", "precision", "offset", "memory", "sides", "datafiles", "splits"}
LAYERS = {"base": 0, "forward": 1, "training": 2, "inference": 2, "evaluate": 3, "experiments": 4, "serve": 4,
          "cli": 5}
# modules being split by concern in their own change; remove an entry once it fits
TOO_LONG_FOR_NOW: set[str] = set()
REASON = "Over 60 lines:"


def modules() -> dict[str, Path]:
    out = {}
    for f in SRC.rglob("*.py"):
        parts = f.relative_to(SRC).with_suffix("").parts
        name = ".".join(("softprompt", *parts))
        out[name.removesuffix(".__init__")] = f
    return out


def unit(module: str) -> str:
    """The layer unit of a module: 'base', a subpackage name, or a top-level module name."""
    top = module.split(".")[1] if "." in module else "__init__"
    return "base" if top in BASE else "cli" if top == "__main__" else top


def _type_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:``: annotations only, never run."""
    return {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
            for stmt in block.body for n in ast.walk(stmt)}


def imports(path: Path, names: set[str], type_only: bool = True) -> set[str]:
    """softprompt modules imported anywhere in ``path`` (function-level imports too; with
    ``type_only=False``, not those under ``if TYPE_CHECKING:``, which never run)."""
    found = set()
    tree = ast.parse(path.read_text())
    skip = set() if type_only else _type_only(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("softprompt")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("softprompt"):
            subs = {f"{node.module}.{a.name}" for a in node.names}
            found |= {s for s in subs if s in names} or {node.module}
    return {m if m in names else m.rsplit(".", 1)[0] for m in found}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(f, set(mods)) - {m} for m, f in mods.items()}


@pytest.fixture(scope="module")
def runtime_graph() -> dict[str, set[str]]:
    """The imports that run (an import for annotations only cannot make a cycle)."""
    mods = modules()
    return {m: imports(f, set(mods), type_only=False) - {m} for m, f in mods.items()}


def test_the_graph_sees_every_module_and_lazy_imports(graph):
    assert "softprompt.forward.decoder" in graph and "softprompt.cli.commands" in graph
    # a function-level import is seen: the CLI loads the training code only when a command runs
    assert "softprompt.training.tune" in graph["softprompt.cli.commands"]


def test_imports_point_downward(graph):
    bad = []
    for m, deps in graph.items():
        for d in deps:
            um, ud = unit(m), unit(d)
            if um == ud or ud == "base" and um != "base":
                continue
            if um == "base" or LAYERS[ud] >= LAYERS[um]:
                bad.append(f"{m} -> {d}")
    assert not bad, "upward or sideways imports:\n" + "\n".join(sorted(bad))


def test_no_import_cycles(runtime_graph):
    graph = runtime_graph
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_sizes():
    long_modules, long_functions = [], []
    for f in SRC.rglob("*.py"):
        rel = str(f.relative_to(SRC))
        if rel in TOO_LONG_FOR_NOW:
            continue
        text = f.read_text()
        if len(text.splitlines()) > 400:
            long_modules.append(f"{rel}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60 and REASON not in (ast.get_docstring(node) or ""):
                    long_functions.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    assert not long_modules, "modules over 400 lines:\n" + "\n".join(long_modules)
    assert not long_functions, f"functions over 60 lines without '{REASON} <why>' in the docstring:\n" + "\n".join(long_functions)


def imported_test_modules(path: Path) -> list[str]:
    """The ``test_*`` modules that ``path`` imports (function-level imports too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
        if any(n.split(".")[0].startswith("test_") for n in names):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_no_test_module_imports_another():
    """A test module runs alone: what several modules share is a fixture in conftest.py or a
    helper in a non-test module, never a name taken from another test module."""
    bad = [f"{f.name} {hit}" for f in sorted(TESTS.glob("test_*.py")) for hit in imported_test_modules(f)]
    assert not bad, "test modules importing test modules:\n" + "\n".join(bad)
