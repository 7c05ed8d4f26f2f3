"""Names a reader can trust: an import alias stands for one module across the code base, a
module is imported under at most one alias, and no two of the package's modules share a name."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "softprompt"


def _aliases() -> dict[str, set[tuple[str, str]]]:
    """alias -> {(module, file)} for every ``import softprompt.x as a`` / ``from softprompt import x as a``."""
    out: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for root in ("src", "tests", "benchmarks"):
        for path in (REPO / root).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("softprompt"):
                    for a in node.names:
                        if a.asname:
                            out[a.asname].add((f"{node.module}.{a.name}", path.name))
                elif isinstance(node, ast.Import):
                    for a in node.names:
                        if a.asname and a.name.startswith("softprompt"):
                            out[a.asname].add((a.name, path.name))
    return out


def test_an_alias_stands_for_one_module_and_a_module_has_one_alias():
    aliases = _aliases()
    for alias, uses in aliases.items():
        modules = {m for m, _ in uses}
        assert len(modules) == 1, f"alias {alias} is {sorted(uses)}"
    by_module: dict[str, set[str]] = defaultdict(set)
    for alias, uses in aliases.items():
        for module, _ in uses:
            by_module[module].add(alias)
    for module, names in by_module.items():
        assert len(names) == 1, f"{module} is imported as {sorted(names)}"


def test_no_two_modules_share_a_name():
    stems = defaultdict(list)
    for path in PACKAGE.rglob("*.py"):
        if path.stem not in ("__init__", "__main__"):
            stems[path.stem].append(str(path.relative_to(PACKAGE)))
    assert {s: p for s, p in stems.items() if len(p) > 1} == {}
