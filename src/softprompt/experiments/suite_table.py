"""The six-task suite's summary table (``benchmarks/suite.sh``), rendered from its result files.

One Markdown table, one row per task: the test accuracy of the deep prompt, LoRA and the
shallow prompt at the curve's last step (600), mean ± sample sd over the seeds that finished,
the seeds per cell, the test set's standard error, the best prompt kind minus LoRA in points, and
what ``softprompt train`` with no method flags (``--kind auto``) scored on the same test rows
(``benchmarks/auto_suite.py``: ``auto_suite.json``) minus that best prompt kind; then the means
over the tasks that have LoRA and a prompt kind, and one sentence saying which results are partial. Invariants: every number comes from a result file
(``compare_suite_<task>.json``, else the runs so far in ``compare_suite_<task>.partial.json``);
a cell with no finished run says "running", never a number; the same files give the same text
(no dates), so a test can hold README.md to it. Under the table, where ``benchmarks/suite.sh full``
has run, one sentence gives full fine-tuning at the same budget and the best prompt kind's mean
against it over those tasks (the stretch target); where ``benchmarks/suite.sh lr`` ran a method
at another lr, its cell takes the lr ahead on dev and one sentence names the choices; where ``benchmarks/suite.sh epoch`` has run,
one sentence gives the deep prompt and LoRA at one epoch (each at its lr ahead on dev where another lr
ran: ``benchmarks/suite.sh epoch-lr``) and their mean difference. ``write_readme`` replaces only the text between
the two markers, whole or not at all, and leaves the file as it was when a marker is missing.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from softprompt.config import UserError
from softprompt.experiments import compare_curve, compare_report
from softprompt.provenance import atomic_write

TASKS = {"sst2": "SST-2", "trec": "TREC", "mr": "MR", "subj": "Subj", "mpqa": "MPQA", "agnews": "AG News"}
METHODS = {"deep-prompt": "deep prompt", "lora": "LoRA", "prompt-tuning": "shallow prompt"}
PROMPTS = ("deep-prompt", "prompt-tuning")
STEP = 600  # the suite's last curve point
EPOCH_METHODS = ("deep-prompt", "lora")  # the one-epoch point's methods
START, END = "<!-- suite-table:start -->", "<!-- suite-table:end -->"


def result_file(results: Path, task: str) -> Path | None:
    """The task's finished result, else its runs so far, else None (no run has finished)."""
    for name in (f"compare_suite_{task}.json", f"compare_suite_{task}.partial.json"):
        if (results / name).is_file():
            return results / name
    return None


def load(results: Path, suffix: str = "") -> dict[str, dict | None]:
    """Every suite task's result document (None: no file yet), in the suite's task order; ``suffix``
    names another run of the task (``compare_suite_<task><suffix>.json``)."""
    return {t: (compare_report.read_json(p) if (p := result_file(results, t + suffix)) else None) for t in TASKS}


def load_full(results: Path) -> dict[str, dict]:
    """Full fine-tuning at the suite's budget (``compare_suite_<task>_full[.partial].json``:
    ``benchmarks/suite.sh full``), per task where it ran."""
    return {t: d for t, d in load(results, "_full").items() if d is not None}


def other_lrs(results: Path, stem: str) -> list[dict]:
    """The finished documents of a suite run's task at other lrs (``compare_<stem>_<method><lr>.json``), sorted by name."""
    return [compare_report.read_json(p) for p in sorted(results.glob(f"compare_{stem}_*.json"))
            if not p.name.endswith(".partial.json")]


def load_lrs(results: Path) -> dict[str, list[dict]]:
    """Per task, the suite's budget at other lrs, one method each (``compare_suite_<task>_lr_<method><lr>.json``:
    ``benchmarks/suite.sh lr``): the table takes each method's lr ahead on dev."""
    return {t: others for t in TASKS if (others := other_lrs(results, f"suite_{t}_lr"))}


def load_epoch(results: Path) -> dict[str, dict]:
    """The deep prompt and LoRA trained for one whole epoch (``compare_suite_<task>_epoch[.partial].json``:
    ``benchmarks/suite.sh epoch``), per task where it ran; the same epoch at other lrs
    (``compare_suite_<task>_epoch_<method><lr>.json``: ``benchmarks/suite.sh epoch-lr``) ride along,
    finished ones only, as ``"other_lrs"``."""
    return {t: {**d, "other_lrs": other_lrs(results, f"suite_{t}_epoch")}
            for t, d in load(results, "_epoch").items() if d is not None}


def _lrs(doc: dict, method: str) -> str:
    return "/".join(f"{x:g}" for x in sorted({r["lr"] for r in doc["runs"] if r["method"] == method}))


def on_dev(docs: list[dict], method: str, base: str) -> tuple[dict, dict, str]:
    """The method's cell at the lr with the highest mean dev accuracy at the last point among
    ``docs`` (the first, ``base``'s, on a tie, said so; a document whose last point is at another
    step count is no candidate), the document it came from, and the choice in words ("" where one
    lr ran): its lr chosen on dev."""
    found = [(c, d) for d in docs if (c := cells(d, (method,)).get(method))]
    found = [(c, d) for c, d in found if c["steps"] == found[0][0]["steps"]]
    def dev(c: dict) -> float:  # one rounding for the choice and the tie, so they cannot disagree
        return round(c["dev_mean"], 9)

    cell, chosen = max(found, key=lambda x: dev(x[0]))  # max keeps the first of equals
    if len(found) == 1:
        return cell, chosen, ""
    others = [(dev(c) == dev(cell), _lrs(d, method)) for c, d in found if d is not chosen]
    ahead, tied = ([lr for t, lr in others if t == want] for want in (False, True))
    said = " and ".join([f"ahead of {', '.join(ahead)}"] * bool(ahead) + [f"tied with {', '.join(tied)}"] * bool(tied))
    kept = f", {base}'s lr kept" if tied else ""
    return cell, chosen, f"{METHODS[method]} at lr {_lrs(chosen, method)}, {said} on dev{kept}; "


def load_auto(results: Path) -> dict[str, dict]:
    """auto_suite's summary per task (``auto_mean``, ``auto_sd``, ``auto_seeds``); {} before its first run."""
    path = results / "auto_suite.json"
    return {s["task"]: s for s in json.loads(path.read_text())["summary"]} if path.is_file() else {}


def cells(doc: dict, methods: tuple[str, ...] = tuple(METHODS)) -> dict[str, dict]:
    """Per method that has finished runs: its curve's last point summarised over seeds
    (``compare_curve.summarize``: steps, seeds, test_mean, test_std, test_se)."""
    out = {}
    for method in methods:
        runs = [r for r in doc["runs"] if r["method"] == method]
        curve = compare_curve.summarize(runs, doc["data"]["test"])
        if curve:
            out[method] = curve[-1]
    return out


def _mean_sd(c: dict) -> str:
    return f"{100 * c['test_mean']:.1f}" + (f" ± {100 * c['test_std']:.1f}" if c["seeds"] > 1 else "")


def _acc(c: dict | None, running: bool) -> str:
    if c is None:
        return "running" if running else "-"
    return _mean_sd(c) if c["steps"] == STEP else f"{_mean_sd(c)} (at {c['steps']} steps)"


def best_prompt(cs: dict[str, dict]) -> str | None:
    """The prompt kind with the highest mean test accuracy among ``cells``; None without one."""
    kinds = [m for m in PROMPTS if m in cs]
    return max(kinds, key=lambda m: cs[m]["test_mean"]) if kinds else None


def _gap(cs: dict[str, dict]) -> tuple[float, str] | None:
    """The best prompt kind's mean minus LoRA's, in points, and that kind; None without both."""
    best = best_prompt(cs)
    if "lora" not in cs or best is None:
        return None
    return 100 * (cs[best]["test_mean"] - cs["lora"]["test_mean"]), METHODS[best]


def _auto(a: dict | None, cs: dict[str, dict]) -> tuple[str, float | None]:
    """The auto cell (mean ± sd over its seeds, minus the best prompt kind) and that difference."""
    if a is None:
        return "not run", None
    n = len(a["auto_seeds"])
    text = f"{a['auto_mean']:.1f}" + (f" ± {a['auto_sd']:.1f}" if n > 1 else "") + f" ({n} seed{'s' if n > 1 else ''})"
    best = best_prompt(cs)
    if best is None:
        return text, None
    diff = a["auto_mean"] - 100 * cs[best]["test_mean"]
    return f"{text}, {diff:+.1f}", diff


def suite_cells(doc: dict, others: list[dict]) -> tuple[dict[str, dict], str]:
    """The suite run's cells, each method's at its lr ahead on dev where ``others`` (``load_lrs``)
    ran it at another, and those choices in words ("" where none ran)."""
    cs, said = cells(doc), ""
    for m in [m for m in METHODS if m in cs and any(r["method"] == m for o in others for r in o["runs"])]:
        cs[m], _, words = on_dev([doc, *others], m, "the suite run")
        said += words
    return cs, said


def _row(task: str, doc: dict | None, auto: dict | None, cs: dict[str, dict]) -> tuple[str, dict[str, dict]]:
    """One task's table row and its cells (``suite_cells``; empty when no run has finished)."""
    if doc is None:
        return f"| {TASKS[task]} | running | running | running | - | - | - | {_auto(auto, {})[0]} |", {}
    n = doc["data"]["test"]
    running = bool(doc.get("partial"))
    seeds = " / ".join(str(cs[m]["seeds"]) if m in cs else "0" for m in METHODS)
    se = compare_curve.binomial_se(statistics.mean(c["test_mean"] for c in cs.values()), n) if cs else None
    size = f"{n:,}" + (f" of {doc['data']['test_sampled_from']:,}" if n < doc["data"].get("test_sampled_from", n) else "")
    gap = _gap(cs)
    return (f"| {TASKS[task]} | {' | '.join(_acc(cs.get(m), running) for m in METHODS)} | {seeds} "
            f"| {'-' if se is None else f'{100 * se:.1f}'} ({size} rows) "
            f"| {'-' if gap is None else f'{gap[0]:+.1f} ({gap[1]})'} | {_auto(auto, cs)[0]} |"), cs


def _mean_row(tasks: list[dict[str, dict]], autos: list[float]) -> str:
    """Means over the tasks with LoRA and a prompt kind; a method's count when it has fewer; auto's
    mean difference over the tasks it ran on."""
    both = [cs for cs in tasks if _gap(cs) is not None]
    auto = f"{statistics.mean(autos):+.1f} ({len(autos)} task{'s' if len(autos) > 1 else ''})" if autos else "-"
    if not both:
        return f"| mean | {' | '.join('-' for _ in METHODS)} | - | - | - | {auto} |"
    out = []
    for m in METHODS:
        accs = [cs[m]["test_mean"] for cs in both if m in cs]
        note = "" if len(accs) == len(both) else f" ({len(accs)} of {len(both)} tasks)"
        out.append(f"{100 * statistics.mean(accs):.1f}{note}" if accs else "-")
    gaps = [g[0] for cs in both if (g := _gap(cs))]
    return (f"| mean of {len(both)} task{'s' if len(both) > 1 else ''} | {' | '.join(out)} | - | - "
            f"| {statistics.mean(gaps):+.1f} | {auto} |")


def _full_line(full: dict[str, dict], tasks: dict[str, dict[str, dict]]) -> str:
    """The stretch target's sentence: full fine-tuning's step-600 mean ± sd on the tasks where it
    ran, and the best prompt kind's mean against full fine-tuning's over those tasks ("" if none)."""
    got = {t: c["full"] for t, d in full.items() if "full" in (c := cells(d, ("full",)))}
    if not got:
        return ""
    said = ", ".join(f"{TASKS[t]} {_acc(c, False)}" for t, c in got.items())
    best = {t: tasks[t][m]["test_mean"] for t in got if (m := best_prompt(tasks.get(t, {})))}
    head = f"Full fine-tuning, the same budget, curve and seeds (`compare_suite_<task>_full.json`): {said}"
    if not best:
        return head + "."
    ours = statistics.mean(100 * a for a in best.values())
    theirs = statistics.mean(100 * got[t]["test_mean"] for t in best)
    return (f"{head}; "
            f"mean over {', '.join(TASKS[t] for t in best)}: best prompt kind {ours:.1f}, full fine-tuning "
            f"{theirs:.1f} ({ours - theirs:+.1f}).")


def _epoch_steps(doc: dict | None) -> int | None:
    """Optimiser steps in one epoch of the task's training pool (None when the document lacks it)."""
    pool, batch = (doc or {}).get("data", {}).get("pool"), (doc or {}).get("train_config", {}).get("batch_size")
    return -(-pool // batch) if pool and batch else None


def collapsed(doc: dict, method: str) -> list[dict]:
    """The method's runs that predicted one label for every test row (their test confusion
    matrix, rows the true labels, has one non-zero column): a run that diverged."""
    return [r for r in doc["runs"] if r["method"] == method and r.get("confusion")
            and sum(any(row[j] for row in r["confusion"]) for j in range(len(r["confusion"][0]))) == 1]


def _epoch_line(epoch: dict[str, dict], docs: dict[str, dict | None]) -> str:
    """The learning curve's third point: the deep prompt and LoRA at one epoch where that ran, the
    runs that collapsed to one label named, the deep prompt's mean minus LoRA's over those tasks
    (and over the tasks without a collapsed run, where some have one), a task whose runs are not all
    finished named as partial, and the tasks without it ("" if none ran)."""
    got, chosen, why = {}, {}, {}
    for t, d in epoch.items():
        if all(cells(d, (m,)) for m in EPOCH_METHODS):
            picks = {m: on_dev([d, *d.get("other_lrs", ())], m, "the epoch run") for m in EPOCH_METHODS}
            got[t] = {m: p[0] for m, p in picks.items()}
            chosen[t], why[t] = {m: p[1] for m, p in picks.items()}, "".join(p[2] for p in picks.values())
    if not got:
        return ""
    gaps = {t: 100 * (cs["deep-prompt"]["test_mean"] - cs["lora"]["test_mean"]) for t, cs in got.items()}
    broke = {t: [f"{METHODS[m]} seed {r['seed']} ({100 * r['test_accuracy']:.1f})"
                 for m, doc in chosen[t].items() for r in collapsed(doc, m)] for t in got}
    part = {t: f"; partial: {_so_far(epoch[t])}" if epoch[t].get("partial") else "" for t in got}
    said = "; ".join(f"{TASKS[t]} ({cs['lora']['steps']:,} steps{part[t]}) {_mean_sd(cs['deep-prompt'])} against "
                     f"{_mean_sd(cs['lora'])} ({why[t]}{gaps[t]:+.1f}"
                     + (f"; predicted one label for every test row: {', '.join(broke[t])}" if broke[t] else "") + ")"
                     for t, cs in got.items())
    clean = [g for t, g in gaps.items() if not broke[t]]
    mean = (f"The deep prompt minus LoRA, mean over {len(got)} task{'s' if len(got) > 1 else ''}: "
            f"{statistics.mean(gaps.values()):+.1f}")
    if len(clean) < len(got):
        mean += (f"; over the {len(clean)} without a collapsed run: {statistics.mean(clean):+.1f}" if clean
                 else "; every task has a collapsed run")
    rest = [TASKS[t] + (f" (one epoch: {n:,} steps)" if (n := _epoch_steps(docs.get(t))) else "")
            for t in TASKS if t not in got]
    return (f"One epoch, the deep prompt against LoRA (`compare_suite_<task>_epoch.json`: the schedule spans the "
            f"epoch; the same seeds and test rows): {said}. {mean}."
            + (f" No one-epoch run: {', '.join(rest)}." if rest else ""))


def _lr_line(said: dict[str, str]) -> str:
    """Which lr each method's cell took where another lr ran at the suite's budget (``suite_cells``'
    words per task; "" where none did)."""
    said = {t: w for t, w in said.items() if w}
    if not said:
        return ""
    return (f"Learning rates at step {STEP} chosen on dev where a method also ran at another lr "
            f"(`compare_suite_<task>_lr_<method><lr>.json`; the cells above take the choice): "
            + "; ".join(f"{TASKS[t]}: {w.removesuffix('; ')}" for t, w in said.items()) + ".")


def _so_far(doc: dict) -> str:
    """A partial document's runs so far: "2 of 4 runs"."""
    return f"{doc['partial']['finished']} of {doc['partial']['planned']} runs"


def _status(docs: dict[str, dict | None]) -> str:
    """The generated sentence: which tasks are finished, partial (runs so far) or without a run."""
    done = [f"{TASKS[t]} ({len(d['runs'])} runs)" for t, d in docs.items() if d is not None and not d.get("partial")]
    part = [f"{TASKS[t]} ({_so_far(d)})"
            for t, d in docs.items() if d is not None and d.get("partial")]
    none = [TASKS[t] for t, d in docs.items() if d is None]
    said = [f"Finished: {', '.join(done)}." if done else "No task has finished yet.",
            f"Partial, with runs still to come: {', '.join(part)}." if part else "",
            f"No run finished yet: {', '.join(none)}." if none else ""]
    return " ".join(s for s in said if s)


def render(docs: dict[str, dict | None], auto: dict[str, dict] | None = None,
           full: dict[str, dict] | None = None, epoch: dict[str, dict] | None = None,
           lrs: dict[str, list[dict]] | None = None) -> str:
    """The table, the lr, full fine-tuning and one-epoch sentences where they ran, and the status
    sentence (Markdown, no trailing newline); ``auto``: ``load_auto``; ``full``: ``load_full``;
    ``epoch``: ``load_epoch``; ``lrs``: ``load_lrs``."""
    auto, lrs = auto or {}, lrs or {}
    picked = {t: suite_cells(d, lrs.get(t, [])) for t, d in docs.items() if d is not None}
    rows = [_row(t, docs.get(t), auto.get(t), picked[t][0] if t in picked else {}) for t in TASKS]
    diffs = [d for t, (_, cs) in zip(TASKS, rows) if (d := _auto(auto.get(t), cs)[1]) is not None]
    head = [
        "| task | deep prompt | LoRA | shallow prompt | seeds (deep / LoRA / shallow) | test SE | best prompt minus LoRA "
        "| defaults (`--kind auto`), minus best prompt |",
        "|---|---:|---:|---:|:---:|---:|---:|---:|",
    ]
    return "\n".join([
        "<!-- generated by benchmarks/suite.sh report from benchmarks/results/compare_suite_<task>.json "
        "(else .partial.json) and _lr_<method><lr>.json, compare_suite_<task>_full.json, "
        "compare_suite_<task>_epoch[_<method><lr>].json and auto_suite.json; "
        "do not edit by hand -->",
        f"Test accuracy (%) at step {STEP}, mean ± sd over the seeds that finished (one seed: its value); "
        "test SE: the test set's binomial standard error at the row's mean accuracy; differences in "
        "points; \"running\": no run of that method has finished yet. Defaults: `softprompt train --task T` "
        "with no method flags (bf16 where the CPU has it), scored on the same test rows "
        "(`benchmarks/auto_suite.py`); \"not run\": not measured yet.",
        "",
        *head,
        *[r for r, _ in rows],
        _mean_row([cs for _, cs in rows], diffs),
        "",
        *([line, ""] if (line := _lr_line({t: p[1] for t, p in picked.items()})) else []),
        *([line, ""] if (line := _full_line(full or {}, dict(zip(TASKS, (cs for _, cs in rows))))) else []),
        *([line, ""] if (line := _epoch_line(epoch or {}, docs)) else []),
        _status(docs),
    ])


def replace_block(text: str, block: str, name: str = "README.md") -> str:
    """``text`` with everything between START and END replaced by ``block``."""
    i, j = text.find(START), text.find(END)
    if i < 0 or j < i:
        raise UserError(f"{name}: no {START} ... {END} markers; nothing written")
    return f"{text[:i]}{START}\n{block}\n{text[j:]}"


def generated_block(text: str) -> str | None:
    """What sits between the markers now (None without them)."""
    i, j = text.find(START), text.find(END)
    return text[i + len(START):j].strip("\n") if 0 <= i < j else None


def block(results: Path) -> str:
    """The README block the result files in ``results`` give (``render`` of every loader)."""
    return render(load(results), load_auto(results), load_full(results), load_epoch(results), load_lrs(results))


def write_readme(readme: Path, results: Path) -> Path:
    """Rewrite ``readme``'s suite block from the result files in ``results`` (atomic)."""
    text = readme.read_text(encoding="utf-8")
    return atomic_write(readme, replace_block(text, block(results), readme.name))
