"""Learning curves for ``softprompt compare --curve 200,600,1500``: dev and test accuracy at
several step counts of ONE training run per (method, seed), instead of one run per budget.

The lr schedule spans the curve's last point (``loop.fit``'s ``horizon``), so the state at point
k is exactly the state of a separate k-step run under that schedule (tested); points before the
last are therefore mid-schedule (the lr not yet decayed) and can understate what a run planned
for k steps reaches. The points are capped at ``--epochs`` epochs of the run's training set.

The lr sweep is a race on dev at the first point: the first lr runs the whole curve; each
later lr runs to the first point and goes on only if its dev accuracy there beats the best so
far (ties keep the earlier lr), so a sweep of m lrs costs one curve plus (m - 1) first points.
Test accuracy is measured only on the lr that is ahead at the first point.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import replace

from softprompt import data as D
from softprompt.experiments.measure import PeakMemory
from softprompt.training.loop import StopReason, fit, plan_steps


def points(curve: tuple[int, ...], train: list, tcfg, seed: int) -> list[int]:
    """The curve's step counts for this training set: sorted, each capped at ``tcfg.epochs``
    epochs of ``train`` (as ``loop.fit`` batches it)."""
    n_batches = len(D.bucketed_batches(train, tcfg.batch_size, seed, 0))
    cap = plan_steps(n_batches, replace(tcfg, steps=None))[0]
    return sorted({min(k, cap) for k in curve})


def _curve_run(ctx, m, lr: float, train, seed: int, pts: list[int], rival: float | None) -> dict:
    """One lr's run along the curve; it stops at the first point when it does not beat ``rival``
    (the best dev accuracy there so far). The row's "test" holds the last point's test metrics."""
    dev, test = ctx.splits.examples()[1:]
    cfg = replace(ctx.tcfg, seed=seed, steps=pts[-1], lr=lr)
    row: dict = {"lr": lr, "curve": [], "eval_s": 0.0, "eval_cpu_s": 0.0}

    def on_step(step: int) -> bool:
        if step not in pts:
            return False
        t0, c0 = time.perf_counter(), time.process_time()
        point = {"steps": step, "dev_accuracy": ctx.accuracy(m.score, dev)["accuracy"]}
        drop = step == pts[0] and rival is not None and not point["dev_accuracy"] > rival + 1e-12
        if not drop:
            row["test"] = ctx.accuracy(m.score, test)
            point["test_accuracy"] = row["test"]["accuracy"]
        row["curve"].append(point)
        row["eval_s"] += time.perf_counter() - t0
        row["eval_cpu_s"] += time.process_time() - c0
        test_text = "dropped (dev not above the best lr's)" if drop else f"test {point['test_accuracy']:.4f}"
        ctx.say(f"lr={lr:g} step {step}: dev {point['dev_accuracy']:.4f}, {test_text}")
        return drop

    with PeakMemory() as mem:
        res = fit(m, train, cfg, ctx.pad, None, progress=ctx.progress, horizon=pts[-1], on_step=on_step)
    row.update({
        "dev_accuracy": row["curve"][0]["dev_accuracy"] if row["curve"] else None,  # the race's criterion
        "steps": len(res.history),
        "train_time_s": res.train_time_s - row["eval_s"],  # the evaluations at the points are not training
        "train_cpu_s": res.train_cpu_s - row["eval_cpu_s"],
        "stopped": "dropped at the first point" if res.stopped is StopReason.BY_CALLER else res.stopped.value,
        "peak_mem_mb": mem.delta_mb,
        "final_train_loss": res.final_train_loss,
    })
    return row


def race(ctx, method: str, train, seed: int, make):
    """The lr race along the curve (module docstring); (kept method, its row, every lr's row).
    ``make(ctx, method, seed)`` builds a fresh method (``compare.make_method``)."""
    pts = points(ctx.ccfg.curve, train, ctx.tcfg, seed)
    rows, best = [], None  # best: (dev accuracy at the first point, method, row)
    for lr in ctx.ccfg.lr_sweep[method]:
        ctx.say(f"lr={lr:g}: curve at steps {', '.join(map(str, pts))} on {len(train)} examples")
        m = make(ctx, method, seed)
        row = _curve_run(ctx, m, lr, train, seed, pts, None if best is None else best[0])
        rows.append(row)
        first = row["dev_accuracy"] if row["dev_accuracy"] is not None else -math.inf  # diverged before it
        if best is None or first > best[0] + 1e-12:
            best = (first, m, row)
        del m
        gc.collect()  # a LoRA or full method holds a private copy of the model
    _, m, row = best
    if "test" not in row:  # diverged before the first point: the last good state is scored
        row["test"] = ctx.accuracy(m.score, ctx.splits.examples()[2])
    kept = row.pop("test")
    for r in rows:
        r.pop("test", None)
    return m, {**row, "test": kept}, rows


# ---------------------------------------------------------------- summary and report


def binomial_se(p: float, n: int) -> float:
    """The standard error of an accuracy p measured on n test rows: sqrt(p (1 - p) / n)."""
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else 0.0


def summarize(rs: list[dict], n_test: int) -> list[dict]:
    """One entry per step count of a (method, training size) group's curves: dev and test
    accuracy, mean and sample sd over seeds, and the test set's standard error at the mean."""
    by: dict[int, list[dict]] = {}
    for r in rs:
        for p in r.get("curve") or []:
            if p.get("test_accuracy") is not None:
                by.setdefault(p["steps"], []).append(p)
    out = []
    for k in sorted(by):
        devs, tests = [p["dev_accuracy"] for p in by[k]], [p["test_accuracy"] for p in by[k]]
        mean = statistics.mean(tests)
        out.append({
            "steps": k,
            "seeds": len(tests),
            "dev_mean": statistics.mean(devs),
            "dev_std": statistics.stdev(devs) if len(devs) > 1 else 0.0,
            "test_mean": mean,
            "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
            "test_se": binomial_se(mean, n_test),
        })
    return out


def table(doc: dict) -> list[str]:
    """The learning-curve table of a result document (empty without curves)."""
    rows = [r for r in doc["summary"] if r.get("curve")]
    if not rows:
        return []
    out = [
        "",
        f"Learning curves (one run per method and seed, evaluated at each step count; the lr raced on dev "
        f"at the first point; mean ± sd over seeds; SE: the test set's binomial standard error at the mean, "
        f"{doc['data']['test']} test rows):",
        "",
        "| method | train ex. | steps | seeds | dev acc. | test acc. | test SE |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for p in r["curve"]:
            out.append(
                f"| {r['method']} | {r['n_train']} | {p['steps']} | {p['seeds']} "
                f"| {100 * p['dev_mean']:.1f} ± {100 * p['dev_std']:.1f} "
                f"| {100 * p['test_mean']:.1f} ± {100 * p['test_std']:.1f} | {100 * p['test_se']:.1f} |"
            )
    return out
