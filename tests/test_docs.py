"""The docs are true to the tree: every file path and ``softprompt`` module the README and
``docs/*.md`` name in backticks exists, and every ratio the README quotes next to a cited results
file (``benchmarks/results/...``) is written in that file, and the README's suite table is what its
result files render, and docs/comparison.md carries today's comparison-notes.md."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "softprompt"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# generated from result files by ``softprompt compare --report``: they quote the commands as run
GENERATED = {"comparison.md"}
# where a relative path in the docs may live: the repository, the package, the docs folder
ROOTS = (REPO, PACKAGE, REPO / "docs", REPO / "benchmarks", REPO / "src")
FILE = re.compile(r"^[\w.\-/]+\.(py|md|json|sh|txt|toml|csv|jsonl|png|html|js|css|ini)$")
MODULE = re.compile(r"^softprompt(\.\w+)+$")
NOT_PATHS = re.compile(r"[*<>{}$~ ]|^\.\.|^/|://|\b[A-Z]{3,}\b")  # patterns and placeholders (NAME)
# files the docs name as what a command writes, not as part of the tree
WRITTEN = re.compile(r"(^|/)(softprompt\.json|adapter_config\.json|adapter_model\.safetensors|checkpoint\.\w+|"
                     r"compare_\w*\.|continual_\w*\.|inspect_\w*\.|comparison\.md|train\.csv|test\.csv|data\.\w+|"
                     r"toy\.csv|my[_-]\w+\.\w+|notes\.md|reviews\.\w+|rows\.\w+)")


def _importable(dotted: str) -> bool:
    """``softprompt.a.b`` is a module, or a module's attribute (``softprompt.chat.encode_chat``)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _spans(path: Path) -> list[str]:
    return re.findall(r"`([^`\n]+)`", path.read_text())


def _exists(name: str) -> bool:
    name = name.rstrip("/").split("::")[0]
    if "/" not in name:  # a bare file name: somewhere in the tree
        return any(True for root in ("src", "tests", "benchmarks", "scripts", "docs", ".") for _ in
                   (REPO / root).glob(f"**/{name}" if root != "." else name))
    return any((root / name).exists() for root in ROOTS)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_named_path_and_module_exists(doc):
    if doc.name in GENERATED:
        pytest.skip("generated from result files")
    missing = []
    for span in _spans(doc):
        token = span.strip().rstrip(".,:;")
        if FILE.match(token):
            if not NOT_PATHS.search(token) and not WRITTEN.search(token) and not _exists(token):
                missing.append(token)
        elif MODULE.match(token) and not _importable(token):
            missing.append(token)
    assert missing == [], f"{doc.name} names what the tree does not have: {missing}"


FIGURE = r"(?<![\d.]){}(?![\d])"  # the number as written, as a ratio (3.36x) or in a table cell (| 3.36 |)


def _paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


def test_readme_figures_appear_in_the_results_file_it_cites():
    checked = 0
    for para in _paragraphs((REPO / "README.md").read_text()):
        cited = re.findall(r"benchmarks/results/[\w.\-]+\.(?:md|json)", para)
        if not cited:
            continue
        text = " ".join((REPO / c).read_text() for c in cited)
        for figure in re.findall(r"(?<![\w.])(\d+(?:\.\d+)?)x\b", para):
            assert re.search(FIGURE.format(re.escape(figure)), text), f"README quotes {figure}x; {cited} do not say it"
            checked += 1
    assert checked >= 1  # the README quotes at least one measured ratio next to its file


def test_the_figure_check_would_catch_a_drifted_number():
    para = "32 clients get 5.3x the throughput (`benchmarks/results/serve_load.md`)."
    text = (REPO / "benchmarks/results/serve_load.md").read_text()
    figure = re.findall(r"(?<![\w.])(\d+(?:\.\d+)?)x\b", para)[0]
    assert not re.search(FIGURE.format(re.escape(figure)), text)


def test_readme_suite_table_is_what_the_committed_results_render():
    """The README's six-task suite table is generated (``benchmarks/suite.sh report``): it cannot
    drift from ``benchmarks/results/compare_suite_<task>[_full][.partial].json`` and ``auto_suite.json``."""
    from softprompt.experiments import suite_table

    block = suite_table.generated_block((REPO / "README.md").read_text())
    assert block is not None, f"README.md lost its {suite_table.START} ... {suite_table.END} markers"
    results = REPO / "benchmarks" / "results"
    assert block == suite_table.block(results), \
        "README.md's suite table is stale: run benchmarks/suite.sh report"


def test_auto_suites_differences_are_against_the_committed_suite_cells(monkeypatch):
    """``auto_suite.json``/``.md`` measure auto against the suite's cells as the committed results
    give them today (``auto_suite.py --render``, run by ``benchmarks/suite.sh report``), so a later
    lr run that changes a cell cannot leave them stale."""
    import json

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import auto_suite  # noqa: PLC0415  (benchmarks/auto_suite.py)

    results = REPO / "benchmarks" / "results"
    for path in sorted(results.glob("auto_suite*.json")):  # the defaults' and --precision fp32's
        res = json.loads(path.read_text())
        now = auto_suite.summarize(res["runs"], results, [s["task"] for s in res["summary"]])
        assert json.loads(json.dumps(now)) == res["summary"], f"{path.name} is stale: run benchmarks/suite.sh report"
        assert path.with_suffix(".md").read_text() == auto_suite.markdown(res)


def test_comparison_md_carries_todays_notes():
    """``docs/comparison.md`` embeds ``docs/comparison-notes.md`` when ``benchmarks/suite.sh report``
    writes it: notes edited after the last report leave it stale."""
    notes = (REPO / "docs" / "comparison-notes.md").read_text().strip()
    assert notes in (REPO / "docs" / "comparison.md").read_text(), "docs/comparison.md is stale: run benchmarks/suite.sh report"
