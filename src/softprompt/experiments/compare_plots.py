"""The comparison's plots, drawn from result documents only (matplotlib: the ``plots`` extra).

One panel per TASK, holding every method of every result document of that task (labelled by
the document's tag where a task has several), and one y-range shared by all panels of a figure,
so a 2-point gap looks like 2 points everywhere. Error bars are the test set's binomial
standard error, sqrt(p (1 - p) / n) at the plotted accuracy (n: the document's test rows);
the spread over seeds is in the tables. Figures: test accuracy per method, learning curves
(accuracy vs optimiser steps, where the runs have ``--curve``), and accuracy against trainable
parameters, training time and training examples.
"""

from __future__ import annotations

import math
from pathlib import Path

from softprompt.experiments.compare_curve import binomial_se
from softprompt.provenance import pyplot, save_figure

PLOTS = (
    ("params", "test accuracy vs trainable parameters"),
    ("time", "test accuracy vs training time"),
    ("size", "test accuracy vs training examples"),
)
COLORS = {
    "zero-shot": "tab:gray",
    "few-shot": "tab:brown",
    "prompt-tuning": "tab:blue",
    "deep-prompt": "tab:green",
    "prompt-residual": "tab:purple",
    "lora": "tab:orange",
    "full": "tab:red",
}
SE_NOTE = "error bars: the test set's standard error"
MARKERS = ("o", "s", "^", "D", "v")  # a method's first, second, ... line in one panel (same colour)


def doc_name(doc: dict) -> str:
    """The run's tag (its file is compare_<tag>.json), or its task."""
    return doc.get("tag") or doc["task"]


def by_task(docs: list[dict]) -> dict[str, list[dict]]:
    """Documents grouped by task, tasks in first-seen order."""
    out: dict[str, list[dict]] = {}
    for d in docs:
        out.setdefault(d["task"], []).append(d)
    return out


def points(docs: list[dict], kind: str) -> list[dict]:
    """The drawable points of one task's documents: one per (document, method, training size)
    (params/time/bars: each document's largest size and zero-shot only), with x, y (%), SE (%)."""
    out = []
    for d in docs:
        n_test, rows = d["data"]["test"], d["summary"]
        largest = max(r["n_train"] for r in rows)
        for r in rows:
            if kind != "size" and r["n_train"] not in (largest, 0):
                continue
            x = {"params": max(1.0, r["trainable_params"]), "time": r.get("train_time_s") or 0.0,
                 "size": max(1, r["n_train"]), "bars": 0}[kind]
            p = r["accuracy_mean"]
            out.append({"doc": doc_name(d), "method": r["method"], "n": r["n_train"], "x": x,
                        "y": 100 * p, "se": 100 * binomial_se(p, n_test), "steps": r.get("steps")})
    return out


def y_range(values: list[tuple[float, float]]) -> tuple[float, float]:
    """One honest range for every panel: the lowest and highest (value -/+ error), padded and
    rounded out to 5 points, within 0-100."""
    if not values:
        return 0.0, 100.0
    lo = min(v - e for v, e in values) - 2
    hi = max(v + e for v, e in values) + 2
    return max(0.0, 5 * math.floor(lo / 5)), min(100.0, 5 * math.ceil(hi / 5))


def _label(pt: dict, several_docs: bool) -> str:
    return f"{pt['method']} ({pt['doc']})" if several_docs else pt["method"]


def _figure(plt, n_panels: int):
    cols = min(3, n_panels)
    rows = -(-n_panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, 4.4 * rows), squeeze=False)
    for ax in list(axes.flat)[n_panels:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _save(plt, fig, out: Path, name: str, title: str, made: list) -> None:
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, out / name)
    plt.close(fig)
    made.append((name, title))


def plot(docs: list[dict], out: Path, stem: str) -> list[tuple[str, str]]:
    """Every figure (one panel per task); [(file name, title)]."""
    plt = pyplot()
    tasks, made = by_task(docs), []
    _bars(plt, tasks, out, stem, made)
    _curves(plt, tasks, out, stem, made)
    for kind, title in PLOTS:
        per_task = {t: points(ds, kind) for t, ds in tasks.items()}
        lo, hi = y_range([(p["y"], p["se"]) for pts in per_task.values() for p in pts])
        fig, axes = _figure(plt, len(tasks))
        for ax, (task, pts) in zip(axes, per_task.items()):
            _panel(ax, task, pts, kind, len(tasks[task]) > 1)
            ax.set_ylim(lo, hi)
        _save(plt, fig, out, f"{stem}_{kind}.png", f"{title} ({SE_NOTE})", made)
    return made


def _bars(plt, tasks: dict[str, list[dict]], out: Path, stem: str, made: list) -> None:
    """Test accuracy of every method of every run, one panel per task, shared y-range."""
    per_task = {t: points(ds, "bars") for t, ds in tasks.items()}
    lo, hi = y_range([(p["y"], p["se"]) for pts in per_task.values() for p in pts])
    fig, axes = _figure(plt, len(tasks))
    for ax, (task, pts) in zip(axes, per_task.items()):
        pts = sorted(pts, key=lambda p: (list(COLORS).index(p["method"]), p["doc"]))
        several = len(tasks[task]) > 1
        sizes = len({p["n"] for p in pts if p["n"]}) > 1  # runs on different training sizes: say which
        budgets = len({p["steps"] for p in pts if p["steps"]}) > 1  # and on different step budgets
        for i, p in enumerate(pts):
            ax.errorbar([i], [p["y"]], yerr=[p["se"]], marker="o", capsize=4, color=COLORS[p["method"]])
            ax.annotate(f"{p['y']:.1f}", (i, p["y"] + p["se"]), textcoords="offset points", xytext=(0, 3),
                        ha="center", fontsize=7)
        ax.set_xticks(range(len(pts)))
        ax.set_xticklabels([_label(p, several) + (f" n={p['n']}" if sizes and p["n"] else "")
                            + (f" {p['steps']:.0f} steps" if budgets and p["steps"] else "") for p in pts],
                           rotation=35, ha="right", fontsize=7)
        ax.set_ylim(lo, hi)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(task)
        ax.grid(alpha=0.3, axis="y")
    _save(plt, fig, out, f"{stem}_tasks.png", f"test accuracy per task, every run ({SE_NOTE})", made)


def _curves(plt, tasks: dict[str, list[dict]], out: Path, stem: str, made: list) -> None:
    """Learning curves: test (solid, with SE) and dev (dashed) accuracy against steps; a method's
    later lines in one panel (another run of it: ``--num-virtual-tokens 40``, say) keep its colour
    with another marker, test dash-dotted and dev dotted."""
    lines = {}
    for task, ds in tasks.items():
        with_curve = [(d, r) for d in ds for r in d["summary"] if r.get("curve")]
        if with_curve:
            lines[task] = with_curve
    if not lines:
        return
    vals = [(100 * p["test_mean"], 100 * p["test_se"]) for ls in lines.values() for _, r in ls for p in r["curve"]]
    vals += [(100 * p["dev_mean"], 0.0) for ls in lines.values() for _, r in ls for p in r["curve"]]
    lo, hi = y_range(vals)
    fig, axes = _figure(plt, len(lines))
    for ax, (task, ls) in zip(axes, lines.items()):
        several_docs = len({id(d) for d, _ in ls}) > 1
        several_n = len({r["n_train"] for _, r in ls}) > 1
        seen: dict[str, int] = {}
        for d, r in ls:
            xs = [p["steps"] for p in r["curve"]]
            name = r["method"] + (f" n={r['n_train']}" if several_n else "") + (f" ({doc_name(d)})" if several_docs else "")
            color, k = COLORS[r["method"]], seen.setdefault(r["method"], 0)
            seen[r["method"]] += 1
            ax.errorbar(xs, [100 * p["test_mean"] for p in r["curve"]], yerr=[100 * p["test_se"] for p in r["curve"]],
                        marker=MARKERS[k % len(MARKERS)], ls="-" if k == 0 else "-.", capsize=3, color=color,
                        label=f"{name}, test")
            ax.plot(xs, [100 * p["dev_mean"] for p in r["curve"]], ls="--" if k == 0 else ":", marker=".", color=color, alpha=0.6,
                    label=f"{name}, dev")
        ax.set_ylim(lo, hi)
        ax.set_xlabel("optimiser steps (batch 8)")
        ax.set_ylabel("accuracy (%), mean over seeds")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7 if len(ls) <= 4 else 5, framealpha=0.5)  # a crowded panel: smaller, see-through
    _save(plt, fig, out, f"{stem}_curves.png", f"learning curves ({SE_NOTE}; dev dashed)", made)


def _panel(ax, task: str, pts: list[dict], kind: str, several: bool) -> None:
    groups: dict[tuple[str, str], list[dict]] = {}
    for p in pts:
        groups.setdefault((p["method"], p["doc"]), []).append(p)
    for (method, _), ps in sorted(groups.items(), key=lambda kv: list(COLORS).index(kv[0][0])):
        ps.sort(key=lambda p: p["x"])
        label = _label(ps[0], several)
        if kind == "size" and method == "zero-shot":
            ax.axhline(ps[0]["y"], color=COLORS[method], ls="--", label=label)
            continue
        ax.errorbar([p["x"] for p in ps], [p["y"] for p in ps], yerr=[p["se"] for p in ps], marker="o", capsize=3,
                    color=COLORS[method], label=label, ls="-" if kind == "size" else "none")
    if kind in ("params", "size"):
        ax.set_xscale("log")
    if kind == "size":
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        ax.set_xticks(sorted({p["x"] for p in pts if p["method"] != "zero-shot"}))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())  # only the measured sizes are labelled
    ax.set_xlabel({"params": "trainable parameters (log; 0 drawn at 1)", "time": "training time (s)",
                   "size": "training examples (log)"}[kind])
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(task)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
