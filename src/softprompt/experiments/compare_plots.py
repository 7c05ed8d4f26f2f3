"""The comparison's plots: accuracy against trainable parameters, training time and training
examples, one panel per task, drawn from result documents only (matplotlib: the ``plots`` extra)."""

from __future__ import annotations

from pathlib import Path

from softprompt.provenance import pyplot, save_figure

PLOTS = (
    ("params", "accuracy vs trainable parameters"),
    ("time", "accuracy vs training time"),
    ("size", "accuracy vs training examples"),
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
def doc_name(doc: dict) -> str:
    """The run's tag (its file is compare_<tag>.json), or its task."""
    return doc.get("tag") or doc["task"]


def _x(r: dict, kind: str) -> float:
    if kind == "params":
        return max(1.0, r["trainable_params"])
    if kind == "time":
        return r.get("train_time_s") or 0.0
    return max(1, r["n_train"])


def plot(docs: list[dict], out: Path, stem: str) -> list[tuple[str, str]]:
    """Three PNGs (one panel per task); [(file name, title)]."""
    plt = pyplot()
    made = []
    cols = min(3, len(docs))  # panels wrap after three tasks
    rows = -(-len(docs) // cols)
    for kind, title in PLOTS:
        fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4 * rows), squeeze=False)
        for ax, doc in zip(axes.flat, docs):
            _panel(ax, doc, kind)
        for ax in list(axes.flat)[len(docs) :]:
            ax.set_visible(False)
        fig.suptitle(title)
        fig.tight_layout()
        name = f"{stem}_{kind}.png"
        save_figure(fig, out / name)
        plt.close(fig)
        made.append((name, title))
    return made


def _panel(ax, doc: dict, kind: str) -> None:
    rows = doc["summary"]
    largest = max(r["n_train"] for r in rows)
    for method in COLORS:
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["n_train"])
        if not rs:
            continue
        if kind == "size" and method == "zero-shot":
            ax.axhline(100 * rs[0]["accuracy_mean"], color=COLORS[method], ls="--", label=method)
            continue
        if kind != "size":
            rs = [r for r in rs if r["n_train"] in (largest, 0)]
        xs = [_x(r, kind) for r in rs]
        ys = [100 * r["accuracy_mean"] for r in rs]
        es = [100 * r["accuracy_std"] for r in rs]
        ax.errorbar(
            xs,
            ys,
            yerr=es,
            marker="o",
            capsize=3,
            color=COLORS[method],
            label=method,
            ls="-" if kind == "size" else "none",
        )
    if kind in ("params", "size"):
        ax.set_xscale("log")
    if kind == "size":
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        ax.set_xticks(sorted({max(1, r["n_train"]) for r in rows if r["method"] != "zero-shot"}))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())  # only the measured sizes are labelled
    ax.set_xlabel(
        {
            "params": "trainable parameters (log; 0 drawn at 1)",
            "time": "training time (s)",
            "size": "training examples (log)",
        }[kind]
    )
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{doc_name(doc)} (n={largest})" if kind != "size" else doc_name(doc))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


