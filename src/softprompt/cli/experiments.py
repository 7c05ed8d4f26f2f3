"""Command line for many tasks over time: ``train-multitask``, ``continual``, ``inspect``.

Same rules as ``cli.py``: each command parses, builds configs, calls ONE library function and
prints. Kept apart from ``cli.py`` so that each file stays readable top to bottom.
"""

from __future__ import annotations

import json
from pathlib import Path

from softprompt.cli import _default, add_model_args
from softprompt.config import PromptConfig, TrainConfig, UserError


def _names(text: str, what: str) -> tuple[str, ...]:
    out = tuple(t.strip() for t in text.split(",") if t.strip())
    if not out:
        raise UserError(f"{what} needs a comma-separated list")
    return out


def _train_flags(p, lr: float | None = None) -> None:
    g = p.add_argument_group("prompt and training")
    g.add_argument("--num-virtual-tokens", type=int, default=_default(PromptConfig, "num_virtual_tokens"), help="N (default %(default)s)")
    g.add_argument("--init", default="vocab", help="random | text | vocab | prompt:NAME (default %(default)s)")
    g.add_argument("--init-text", help="text for --init text")
    for name in ("lr", "epochs", "steps", "batch_size", "seed", "patience"):
        default = lr if (name == "lr" and lr is not None) else _default(TrainConfig, name)
        g.add_argument("--" + name.replace("_", "-"), type=float if name == "lr" else int, default=default, help=f"(default {default})")
    g.add_argument("--quiet", action="store_true", help="no progress display")


def _configs(a) -> tuple[PromptConfig, TrainConfig]:
    pcfg = PromptConfig(num_virtual_tokens=a.num_virtual_tokens, init=a.init, init_text=a.init_text)
    tcfg = TrainConfig(lr=a.lr, epochs=a.epochs, steps=a.steps, batch_size=a.batch_size, seed=a.seed, patience=a.patience)
    return pcfg, tcfg


# ---------------------------------------------------------------- train-multitask


def cmd_train_multitask(a) -> int:
    from softprompt import models
    from softprompt.training import multitask as MT

    mcfg = MT.MultitaskConfig(tasks=_names(a.tasks, "--tasks"), per_task=None if a.per_task == 0 else a.per_task,
                              eval_per_task=a.eval_per_task)
    pcfg, tcfg = _configs(a)
    res = MT.train_multitask(models.load(a.model), mcfg, pcfg, tcfg, a.name, resume=a.resume, progress=not a.quiet)
    print(f"\nmultitask   {', '.join(res.tasks)}  ({sum(res.n_train.values())} training rows, mixed batches)")
    print(f"training    {len(res.fit.history)} steps in {res.fit.train_time_s:.1f}s, {res.fit.stopped}")
    for e in res.fit.epochs:
        accs = "  ".join(f"{k[9:]} {v:.3f}" for k, v in e.items() if k.startswith("eval_acc_"))
        print(f"  epoch {e['epoch']:>3}  train loss {e['train_loss']:.4f}  dev {accs}")
    for name, path in res.paths.items():
        print(f"saved       {name:<24} {path}")
    print(f"new task    softprompt train --task NEW --init prompt:{a.name}")
    return 0


def add_multitask_parser(sub) -> None:
    m = sub.add_parser("train-multitask", help="one shared prompt + a rank-one modulation per task, mixed-task batches")
    add_model_args(m)
    m.add_argument("--tasks", required=True, help="comma list of task recipes, e.g. sst2,trec,agnews")
    m.add_argument("--name", default="multitask", help="store name of the shared prompt; tasks get NAME-TASK (default %(default)s)")
    m.add_argument("--per-task", type=int, default=256, help="training rows per task, seeded sample; 0 = all (default %(default)s)")
    m.add_argument("--eval-per-task", type=int, default=64, help="dev rows per task (default %(default)s)")
    m.add_argument("--resume", action="store_true", help="continue from the last epoch checkpoint of --name")
    _train_flags(m)
    m.set_defaults(func=cmd_train_multitask)


# ---------------------------------------------------------------- inspect


def cmd_inspect(a) -> int:
    from softprompt import models
    from softprompt.experiments import interpret as I

    against = list(_names(a.against, "--against")) if a.against else None
    report = I.inspect_prompt(models.load(a.model), a.name, against, a.top_k, a.eval_limit, not a.no_importance)
    print("\n".join(I.table(report)))
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        if "similarity" in report:
            report["similarity"]["png"] = str(I.heatmap(report["similarity"]["names"], report["similarity"]["matrix"],
                                                        out / f"inspect_{a.name}.png"))
        path = out / f"inspect_{a.name}.json"
        path.write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nwrote {path}")
    return 0


def add_inspect_parser(sub) -> None:
    i = sub.add_parser("inspect", help="look inside a stored prompt: nearest tokens, norms, similarity, token importance")
    add_model_args(i)
    i.add_argument("name", help="stored prompt")
    i.add_argument("--against", help="comma list of other stored prompts to compare with (similarity matrix)")
    i.add_argument("--top-k", type=int, default=5, help="nearest vocabulary tokens per virtual token (default %(default)s)")
    i.add_argument("--eval-limit", type=int, default=64, help="evaluation rows for token importance (default %(default)s)")
    i.add_argument("--no-importance", action="store_true", help="skip the ablation (needs no data)")
    i.add_argument("--out", help="folder for inspect_NAME.json and, with --against, inspect_NAME.png")
    i.set_defaults(func=cmd_inspect)


def add_parsers(sub) -> None:
    """Register this module's subcommands on ``sub`` (argparse sub-parsers)."""
    add_multitask_parser(sub)
    add_continual_parser(sub)
    add_inspect_parser(sub)


# ---------------------------------------------------------------- continual


def cmd_continual(a) -> int:
    from softprompt import models
    from softprompt.cli import _command_line
    from softprompt.experiments import continual as C

    if a.report:
        return _continual_report(Path(a.report))
    if not a.tasks:
        raise UserError("continual needs --tasks A,B,... (or --report FILE to re-render a result)")
    ccfg = C.ContinualConfig(tasks=_names(a.tasks, "--tasks"), methods=_names(a.methods, "--methods"),
                             per_task=None if a.per_task == 0 else a.per_task,
                             test_per_task=None if a.test_per_task == 0 else a.test_per_task,
                             steps=a.stage_steps, lr_full=a.lr_full)
    pcfg, tcfg = _configs(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = C.run(models.load(a.model), ccfg, pcfg, tcfg, say=(lambda m: None) if a.quiet else print)
    doc["command"] = _command_line(a)
    stem = out / f"continual_{a.tag}"
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
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
    from softprompt.experiments import continual as C

    md = C.markdown(doc, doc["command"])
    try:
        C.plot(doc, stem.with_suffix(".png"))
        md += f"\n![accuracy per task across stages]({stem.name}.png)\n"
    except ImportError:
        print("(no plot: pip install 'softprompt[plots]')")
    stem.with_suffix(".md").write_text(md)
    print("\n" + md)
    print(f"wrote {stem}.json, .md and .png")
    return 0


def add_continual_parser(sub) -> None:
    from softprompt.experiments.continual import METHODS, ContinualConfig

    d = {k: _default(ContinualConfig, k) for k in ("methods", "per_task", "test_per_task", "steps", "lr_full")}
    c = sub.add_parser("continual", help="learn tasks one after another; accuracy matrix and forgetting per method")
    add_model_args(c)
    c.add_argument("--tasks", help="comma list of task recipes in learning order, e.g. sst2,trec,subj,agnews,cr")
    c.add_argument("--report", metavar="FILE", help="no runs: write the Markdown and plot again from a continual_*.json")
    c.add_argument("--methods", default=",".join(d["methods"]), help=f"comma list from {','.join(METHODS)} (default %(default)s)")
    c.add_argument("--per-task", type=int, default=d["per_task"], help="training rows per task; 0 = all (default %(default)s)")
    c.add_argument("--test-per-task", type=int, default=d["test_per_task"], help="test rows per task; 0 = all (default %(default)s)")
    c.add_argument("--stage-steps", type=int, default=d["steps"], help="optimiser steps per stage (default %(default)s)")
    c.add_argument("--lr-full", type=float, default=d["lr_full"], help="full fine-tuning lr (default %(default)s)")
    c.add_argument("--out", default="continual-results", help="folder for continual_TAG.json/.md/.png (default %(default)s)")
    c.add_argument("--tag", default="run", help="result name (default %(default)s)")
    _train_flags(c)
    c.set_defaults(func=cmd_continual, compare_parser=c)  # compare_parser: what _command_line reads
