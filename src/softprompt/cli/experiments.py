"""The experiment commands: ``compare``, ``train-multitask``, ``continual``, ``inspect``.

Same rules as ``commands.py``: each command parses, builds configs from the flags (defaults in
``config.py``), calls ONE library function and prints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from softprompt.cli.commands import load_model
from softprompt.cli.flags import (
    EVAL_DATA,
    PROMPT_FLAGS,
    PROMPT_RENAME,
    add_data_flags,
    add_flags,
    add_model_flags,
    add_old_flag,
    add_prompt_train_flags,
    command_line,
    data_config,
    data_given,
    from_args,
    given,
    names,
    prompt_train_configs,
)
from softprompt.config import (
    COMPARE_PROMPT_KINDS,
    CompareConfig,
    ContinualConfig,
    InspectConfig,
    MultitaskConfig,
    PromptConfig,
    TrainConfig,
    UserError,
)

# ---------------------------------------------------------------- compare

REPORT_METAVAR = "FILE[,FILE...]"  # --report means the same in compare and continual: re-render result files

COMPARE_DATA = ("path", "eval_path", "template", "target_column", "verbalizer", "max_length", "limit")
COMPARE_TRAIN = ("epochs", "schedule", "warmup_ratio")  # every trained method's, so the budgets stay the same
COMPARE_PROMPT = ("num_virtual_tokens", "init", "dropout", "freeze_first", "memory")  # the prompt methods' levers


def add_compare_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("compare", help="compare hand-written prompts, prompt tuning, LoRA and full fine-tuning")
    add_model_flags(c)
    add_data_flags(c, COMPARE_DATA, "data (a classification task)",
                   helps={"path": "training file (.csv, .tsv, .jsonl or '<label> <text>' lines); dev is carved from it",
                          "eval_path": "test data for --data (not given: a seeded 20% carved from --data)"},
                   rename={"eval_path": "test-data"}, old={"eval_path": "eval-data"})
    r = c.add_argument_group("comparison")
    add_flags(r, CompareConfig, skip=("lr_sweep",), old={"dev_sample": "eval-limit", "test_sample": "test-limit"})
    sweep = CompareConfig().lr_sweep
    r.add_argument("--lr-sweep", dest="lr_sweep", action="append", metavar="METHOD=LR[/LR...]",
                   help="learning rates to sweep for a method (repeatable); "
                   + "; ".join(f"{k} {'/'.join(f'{v:g}' for v in vs)}" for k, vs in sweep.items()) + " by default")
    add_old_flag(r, "--lr", "--lr-sweep", "lr_sweep", append=True)
    add_flags(r, TrainConfig, only=COMPARE_TRAIN, helps={"epochs": "epochs per run without --budget"})
    add_flags(r, PromptConfig, only=COMPARE_PROMPT, rename=PROMPT_RENAME)
    r.add_argument("--quick", action="store_true", help="smoke test: one lr per method, 3 steps, a few rows")
    o = c.add_argument_group("output")
    o.add_argument("--out", default="compare-results", help="folder for compare_<tag>.json/.md/.png (default %(default)s)")
    o.add_argument("--tag", help="result name (default: the task or data file name)")
    o.add_argument("--notes", help="a Markdown file with a hand-written reading of the numbers, put into the report")
    o.add_argument("--report", metavar=REPORT_METAVAR,
                   help="no runs: render compare_*.json result files together into <out>/comparison.md and plots")
    o.add_argument("--quiet", action="store_true", help="no progress display")
    o.add_argument("--resume", action="store_true", help="continue an interrupted comparison: runs already "
                   "finished (recorded in <out>/compare_<tag>.runs.jsonl) are not run again")
    c.set_defaults(func=cmd_compare, text_column=None, parser=c)


def compare_config(a: argparse.Namespace) -> CompareConfig:
    from softprompt.experiments.compare import quick

    sweep = dict(CompareConfig().lr_sweep)
    for item in a.lr_sweep or []:
        method, sep, lrs = item.partition("=")
        try:
            sweep[method.strip()] = tuple(float(x) for x in lrs.split("/"))
        except ValueError:
            raise UserError(f"--lr-sweep {item!r}: expected METHOD=LR[/LR...], e.g. lora=1e-3/3e-4") from None
        if not sep or method.strip() not in sweep:
            raise UserError(f"--lr-sweep {item!r}: METHOD must be one of {', '.join(sweep)}")
    cfg = from_args(CompareConfig, a, lr_sweep=sweep)
    return quick(cfg) if a.quick else cfg


def cmd_compare(a: argparse.Namespace) -> int:
    from softprompt import recipes
    from softprompt.experiments import compare, compare_report
    from softprompt.provenance import write_json

    notes = None
    if a.notes:
        if not os.path.isfile(a.notes):
            raise UserError(f"--notes: no such file {a.notes}")
        notes = open(a.notes, encoding="utf-8").read()
    out, command = Path(a.out), command_line(a)
    if a.report:
        docs = [compare_report.read_json(p) for p in names(a.report, "--report")]
        print(f"wrote {compare_report.write_report(docs, out, 'comparison', command, notes)}")
        return 0
    ccfg = compare_config(a)
    dcfg = data_config(a, held_out=True)
    if dcfg.verbalizer is None and not a.task:
        raise UserError("compare needs a classification task: give --verbalizer (and --template, --target-column)")
    tcfg, levers = from_args(TrainConfig, a, COMPARE_TRAIN), given(PromptConfig, a, COMPARE_PROMPT)
    try:  # the prompt methods' shared fields (each method sets its kind), recorded with the default kind ...
        pcfg = PromptConfig(**levers)
    except UserError as e:  # ... unless a lever needs another (--prefix-memory: deep): the first prompt method's
        first = next((m for m in ccfg.methods if m in COMPARE_PROMPT_KINDS), None)
        if first is None:
            raise UserError(f"--methods {','.join(ccfg.methods)}: no prompt method to take the prompt flags ({e})") from None
        pcfg = compare.method_prompt(levers, first)

    def say(msg: str) -> None:
        if not a.quiet:
            print(msg, file=sys.stderr, flush=True)

    lm = load_model(a)
    tag = a.tag or recipes.task_name(a.task, dcfg.path)
    journal = out / f"compare_{tag}.runs.jsonl"
    doc = compare.run(lm, dcfg, a.task, ccfg, tcfg, pcfg, progress=not a.quiet, say=say, journal=journal, resume=a.resume,
                      label={"tag": tag, "command": command}, store=a.store)
    doc["tag"], doc["command"] = tag, command
    path = write_json(doc, out / f"compare_{tag}.json")
    journal.unlink()  # the result is written: the finished runs are in it
    compare.partial_path(journal).unlink(missing_ok=True)
    md = compare_report.write_report([doc], out, f"compare_{tag}", command, notes)
    print("\n".join(compare_report.table(doc)))
    print(f"wrote {path} and {md}")
    return 0


# ---------------------------------------------------------------- train-multitask

MANY_TASK_TRAIN = ("lr", "epochs", "steps", "batch_size", "seed", "patience")


def add_multitask_parser(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("train-multitask", help="one shared prompt + a rank-one modulation per task, mixed-task batches")
    add_model_flags(m)
    add_flags(m, MultitaskConfig)
    m.add_argument("--name", default="multitask", help="store name of the shared prompt; tasks get NAME-TASK (default %(default)s)")
    m.add_argument("--resume", action="store_true", help="continue from the last epoch checkpoint of --name")
    add_prompt_train_flags(m, MANY_TASK_TRAIN)
    m.set_defaults(func=cmd_train_multitask)


def cmd_train_multitask(a: argparse.Namespace) -> int:
    from softprompt.training import multitask as MT

    if not a.tasks:
        raise UserError("train-multitask needs --tasks A,B,...")
    mcfg = from_args(MultitaskConfig, a)
    pcfg, tcfg = prompt_train_configs(a)
    res = MT.train_multitask(load_model(a), mcfg, pcfg, tcfg, a.name, resume=a.resume, progress=not a.quiet,
                             store=a.store)
    print(f"\nmultitask   {', '.join(res.tasks)}  ({sum(res.n_train.values())} training rows, mixed batches)")
    print(f"training    {len(res.fit.history)} steps in {res.fit.train_time_s:.1f}s, {res.fit.stopped}")
    for e in res.fit.epochs:
        accs = "  ".join(f"{k[9:]} {v:.3f}" for k, v in e.items() if k.startswith("eval_acc_"))
        print(f"  epoch {e['epoch']:>3}  train loss {e['train_loss']:.4f}  dev {accs}")
    for name, path in res.paths.items():
        print(f"saved       {name:<24} {path}")
    print(f"new task    softprompt train --task NEW --init prompt:{a.name}")
    return 0


# ---------------------------------------------------------------- continual


def add_continual_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("continual", help="learn tasks one after another; accuracy matrix and forgetting per method")
    add_model_flags(c)
    add_flags(c, ContinualConfig)
    c.add_argument("--report", metavar=REPORT_METAVAR,
                   help="no runs: write each continual_*.json result file's Markdown and plot again, beside it")
    c.add_argument("--out", default="continual-results", help="folder for continual_TAG.json/.md/.png (default %(default)s)")
    c.add_argument("--tag", default="run", help="result name (default %(default)s)")
    add_prompt_train_flags(c, tuple(f for f in MANY_TASK_TRAIN if f != "steps"))
    c.set_defaults(func=cmd_continual, parser=c)


def cmd_continual(a: argparse.Namespace) -> int:
    from softprompt.experiments import continual
    from softprompt.provenance import write_json
    from softprompt.training.auto import method_kind

    if a.report:
        for path in names(a.report, "--report"):
            _continual_report(Path(path))
        return 0
    if not a.tasks:
        raise UserError("continual needs --tasks A,B,... (or --report FILE[,FILE...] to re-render results)")
    ccfg = from_args(ContinualConfig, a)
    pcfg = method_kind(from_args(PromptConfig, a, PROMPT_FLAGS), "continual")  # prompt, progressive: shallow
    tcfg = from_args(TrainConfig, a, ("lr", "epochs", "batch_size", "seed", "patience"))
    doc = continual.run(load_model(a), ccfg, pcfg, tcfg, say=(lambda m: None) if a.quiet else print, root=a.store.data_root)
    doc["command"] = command_line(a)
    stem = Path(a.out) / f"continual_{a.tag}"
    write_json(doc, stem.with_suffix(".json"))
    return _continual_write(doc, stem)


def _continual_report(path: Path) -> int:
    """``continual --report FILE``: Markdown and plot again from a result file, no runs."""
    try:
        doc = json.loads(path.read_text())
        doc["results"], doc["command"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"--report {path}: not a continual result file ({e})") from None
    return _continual_write(doc, path.with_suffix(""))


def _continual_write(doc: dict, stem: Path) -> int:
    from softprompt.experiments import continual
    from softprompt.provenance import atomic_write

    md = continual.markdown(doc, doc["command"])
    try:
        continual.plot(doc, stem.with_suffix(".png"))
        md += f"\n![accuracy per task across stages]({stem.name}.png)\n"
    except ImportError:
        print("(no plot: pip install 'softprompt[plots]')")
    atomic_write(stem.with_suffix(".md"), md)
    print("\n" + md)
    print(f"wrote {stem}.json, .md and .png")
    return 0


# ---------------------------------------------------------------- inspect


def add_inspect_parser(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser("inspect", help="look inside a stored prompt: nearest tokens, norms, similarity, token importance")
    add_model_flags(i)
    i.add_argument("name", help="stored prompt")
    i.add_argument("--against", help="comma list of other stored prompts to compare with (similarity matrix)")
    # the first K dev rows, as --dev-limit is in train (it was --eval-limit)
    add_flags(i, InspectConfig, rename={"eval_limit": "dev-limit"}, old={"eval_limit": "eval-limit"})
    add_data_flags(i, EVAL_DATA, "data for token importance (default: what the prompt's metadata names)",
                   helps={"path": "evaluation data for importance: a file or datasets data set"})
    i.add_argument("--out", help="folder for inspect_NAME.json and, with --against, inspect_NAME.png")
    i.set_defaults(func=cmd_inspect)


def cmd_inspect(a: argparse.Namespace) -> int:
    from softprompt.experiments import interpret
    from softprompt.provenance import write_json

    cfg = from_args(InspectConfig, a)
    against = list(names(a.against, "--against")) if a.against else None
    data = data_given(a, EVAL_DATA)
    report = interpret.inspect_prompt(load_model(a), a.name, against, cfg.top_k, cfg.eval_limit, cfg.importance,
                              task=a.task, data=data, store=a.store)
    print("\n".join(interpret.table(report)))
    if a.out:
        out = Path(a.out)
        if "similarity" in report:
            out.mkdir(parents=True, exist_ok=True)
            report["similarity"]["png"] = str(interpret.heatmap(report["similarity"]["names"], report["similarity"]["matrix"],
                                                        out / f"inspect_{a.name}.png"))
        print(f"\nwrote {write_json(report, out / f'inspect_{a.name}.json')}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register this module's subcommands on ``sub`` (argparse sub-parsers)."""
    add_compare_parser(sub)
    add_multitask_parser(sub)
    add_continual_parser(sub)
    add_inspect_parser(sub)
