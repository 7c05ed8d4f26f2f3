"""Few-shot adaptation to held-out tasks: multitask init vs vocabulary init vs transferred prompt.

1. ``multitask.train_multitask`` on a mix of tasks (default sst2, trec, agnews, subj): the shared
   prompt and one prompt per task go to the store (``bench-mt``, ``bench-mt-<task>``).
2. For each held-out task (default cr, mpqa, sst5; none of them in the mix): 32 training
   examples (seeded sample), a 64-row dev sample for the learning curve and a test sample.
   Three prompts are trained on the same 32 examples, same steps, lr and batch order, differing
   only in their start:
   * ``vocab``: sampled vocabulary embeddings (the baseline);
   * ``multitask``: the shared multitask prompt (``--init prompt:bench-mt``);
   * ``transfer``: the stored prompt ranked best for the task by ``transfer.rank_sources``
     (SPoT-style, among the multitask outputs).
   Dev accuracy is measured before training and after every epoch (4 steps); the kept prompt
   is the best on dev, scored on test.
3. Summary: mean test accuracy per init; for each task, the first step at which each init
   reaches the best dev accuracy the vocab init ever reaches ("steps to vocab's best").

    python benchmarks/few_shot_adapt.py              # the committed run (default model)
    python benchmarks/few_shot_adapt.py --quick      # smoke run: tiny random model, tiny numbers, results not written

Writes benchmarks/results/few_shot_adapt.{json,md,png}. ``--quick`` keeps its prompts in a
temporary store and its results in a temporary folder (or ``--out``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import common  # noqa: E402
import torch  # noqa: E402

from softprompt.config import PromptConfig, TrainConfig  # noqa: E402
from softprompt.provenance import atomic_write, save_figure, write_json  # noqa: E402
from softprompt.training import loop as LP  # noqa: E402
from softprompt.training import methods  # noqa: E402
from softprompt.training import multitask as MT  # noqa: E402
from softprompt.training import transfer as TF  # noqa: E402
from softprompt.training import tune as TR  # noqa: E402

INITS = ("vocab", "multitask", "transfer")


def curve_fit(lm, td: MT.TaskData, init: torch.Tensor, tcfg: TrainConfig) -> dict:
    """Train from ``init`` on the task's shots; dev accuracy before training and every epoch."""
    method = methods.PromptMethod(lm.model, init)
    ev = TR.make_evaluator(method, lm.tokenizer, td.dev, td.cfg, tcfg, lm.tokenizer.pad_token_id)
    start = ev()["accuracy"]
    res = LP.fit(method, td.train, tcfg, lm.tokenizer.pad_token_id, ev, progress=False)
    steps = [0] + [e["step"] for e in res.epochs]
    accs = [start] + [e["eval_accuracy"] for e in res.epochs]
    method.load_state(res.state)
    return {"steps": steps, "dev_accuracy": accs, "train_time_s": res.train_time_s, "prompt": method.prompt.detach()}


def first_reach(steps: list[int], accs: list[float], target: float) -> int | None:
    return next((s for s, a in zip(steps, accs, strict=True) if a >= target - 1e-9), None)


def adapt(lm, task: str, a, source: str, pcfg: PromptConfig, tcfg: TrainConfig, say, store) -> dict:
    """The three starts on one held-out task; ``store`` holds the multitask prompts (``source``...)."""
    td = MT.load_task(lm.tokenizer, task, MT.task_config(task, common.data_root()), a.shots, a.dev, a.seed)
    test = MT.load_test(td, a.test, a.seed)
    names = [source] + [f"{source}-{t}" for t in a.mix.split(",")]
    ranking = TF.rank_sources(lm, td.train, only=names, store=store)
    starts = {
        "vocab": TR.initial_prompt(lm, replace(pcfg, init="vocab"), td.cfg, a.seed),
        "multitask": TR.initial_prompt(lm, replace(pcfg, init=f"prompt:{source}"), td.cfg, a.seed, store=store),
        "transfer": TR.initial_prompt(lm, replace(pcfg, init=f"prompt:{ranking[0]['name']}"), td.cfg, a.seed,
                                      store=store),
    }
    runs = {}
    for init in INITS:
        r = curve_fit(lm, td, starts[init], tcfg)
        r["test_accuracy"] = MT.accuracy(lm.model, r.pop("prompt"), lm.tokenizer, test, td.cfg)[0]
        runs[init] = r
        say(f"  {td.name} {init:<9} dev {' '.join(f'{x:.2f}' for x in r['dev_accuracy'])}  test {r['test_accuracy']:.3f}")
    target = max(runs["vocab"]["dev_accuracy"])
    for r in runs.values():
        r["steps_to_vocab_best"] = first_reach(r["steps"], r["dev_accuracy"], target)
    return {"task": td.name, "n_train": len(td.train), "n_dev": len(td.dev), "n_test": len(test),
            "transfer_ranking": ranking, "transfer_source": ranking[0]["name"], "vocab_best_dev": target, "runs": runs}


def summarize(tasks: list[dict]) -> dict:
    out = {}
    for init in INITS:
        accs = [t["runs"][init]["test_accuracy"] for t in tasks]
        out[init] = {"mean_test_accuracy": sum(accs) / len(accs)}
    for init in ("multitask", "transfer"):
        out[init]["gain_over_vocab_points"] = 100 * (out[init]["mean_test_accuracy"] - out["vocab"]["mean_test_accuracy"])
        ratios = []
        for t in tasks:
            mine, base = t["runs"][init]["steps_to_vocab_best"], t["runs"]["vocab"]["steps_to_vocab_best"]
            ratios.append(None if mine is None or not base else mine / base)
        out[init]["steps_ratio_to_vocab_best"] = ratios
    return out


def markdown(doc: dict) -> str:
    s, tasks = doc["summary"], doc["tasks"]
    lines = ["# Few-shot adaptation: multitask and transferred prompts vs vocabulary init", "",
             f"Generated by `{doc['command']}`; do not edit by hand.", "",
             f"- model {doc['model']}; multitask mix {doc['mix']} ({doc['multitask']['steps']} steps, "
             f"{doc['multitask']['train_time_s']:.0f} s, mean dev accuracy {doc['multitask']['best_dev']:.3f})",
             f"- held-out tasks: {', '.join(t['task'] for t in tasks)}; {doc['args']['shots']} training examples each, "
             f"{doc['args']['dev']} dev rows (curve), {doc['args']['test']} test rows; {doc['args']['steps']} steps, "
             f"lr {doc['args']['lr']:g}, batch 8, N={doc['args']['n']}, seed {doc['args']['seed']}",
             f"- machine: {doc['machine']}; whole run {doc['total_time_s'] / 60:.1f} min", "",
             "| task | vocab | multitask | transfer (source) | steps to vocab's best dev acc.: vocab / multitask / transfer |",
             "|---|---:|---:|---:|---|"]
    for t in tasks:
        r = t["runs"]
        steps = " / ".join(str(r[i]["steps_to_vocab_best"]) for i in INITS)
        lines.append(f"| {t['task']} | {100 * r['vocab']['test_accuracy']:.1f} | {100 * r['multitask']['test_accuracy']:.1f} | "
                     f"{100 * r['transfer']['test_accuracy']:.1f} ({t['transfer_source']}) | {steps} |")
    lines.append(f"| **mean** | **{100 * s['vocab']['mean_test_accuracy']:.1f}** | **{100 * s['multitask']['mean_test_accuracy']:.1f}** | "
                 f"**{100 * s['transfer']['mean_test_accuracy']:.1f}** | |")
    lines += ["", f"Gain over vocab init: multitask {s['multitask']['gain_over_vocab_points']:+.1f} points, "
              f"transfer {s['transfer']['gain_over_vocab_points']:+.1f} points (target: at least +5). "
              "Steps to reach the vocab init's best dev accuracy, as a share of the vocab init's own: "
              f"multitask {s['multitask']['steps_ratio_to_vocab_best']}, transfer {s['transfer']['steps_ratio_to_vocab_best']} "
              "(target: at most 0.5; 0 = already there before training; None = never reached).", "",
              "![dev accuracy during adaptation](few_shot_adapt.png)", ""]
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = doc["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.2), sharey=True, squeeze=False)
    for ax, t in zip(axes[0], tasks, strict=True):
        for init in INITS:
            r = t["runs"][init]
            ax.plot(r["steps"], [100 * x for x in r["dev_accuracy"]], marker=".", label=init)
        ax.set_title(f"{t['task']} ({t['n_train']} examples)")
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("dev accuracy (%)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mix", default="sst2,trec,agnews,subj")
    p.add_argument("--held-out", default="cr,mpqa,sst5")
    p.add_argument("--per-task", type=int, default=256, help="multitask training rows per task")
    p.add_argument("--mt-steps", type=int, default=128, help="multitask optimiser steps")
    p.add_argument("--shots", type=int, default=32)
    p.add_argument("--dev", type=int, default=64)
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--steps", type=int, default=48, help="adaptation steps (4 per epoch at 32 shots)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny random model, tiny numbers; results not written")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default benchmarks/results; a temp folder with --quick)")
    a = p.parse_args()
    if a.quick:
        a.per_task, a.mt_steps, a.shots, a.dev, a.test, a.steps = 16, 4, 8, 8, 8, 4
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    lm = common.load_lm(a.quick)
    store = common.temp_store("sp-bench-fewshot-") if a.quick else common.store()  # quick: never the user's prompts
    pcfg = PromptConfig(num_virtual_tokens=a.n, init="vocab")
    say = lambda m: print(m, flush=True)  # noqa: E731
    mcfg = MT.MultitaskConfig(tasks=tuple(a.mix.split(",")), per_task=a.per_task, eval_per_task=a.dev)
    say(f"multitask training on {a.mix} ...")
    mt = MT.train_multitask(lm, mcfg, pcfg, TrainConfig(lr=a.lr, steps=a.mt_steps, seed=a.seed, patience=None), "bench-mt",
                            store=store)
    say(f"  {len(mt.fit.history)} steps, {mt.fit.train_time_s:.0f} s, dev {mt.fit.best}")
    tcfg = TrainConfig(lr=a.lr, steps=a.steps, seed=a.seed, patience=None)
    tasks = [adapt(lm, t, a, "bench-mt", pcfg, tcfg, say, store) for t in a.held_out.split(",")]
    doc = {
        "schema": "softprompt.few_shot_adapt/1", "command": "python benchmarks/few_shot_adapt.py " + " ".join(sys.argv[1:]),
        "args": vars(a), "model": lm.name, "mix": a.mix,
        "multitask": {"steps": len(mt.fit.history), "train_time_s": mt.fit.train_time_s,
                      "best_dev": (mt.fit.best or {}).get("accuracy", float("nan")), "epochs": mt.fit.epochs},
        "tasks": tasks, "summary": summarize(tasks), "total_time_s": time.perf_counter() - t0,
        "machine": f"{os.cpu_count()} CPUs, {a.threads} torch threads, load average at end {os.getloadavg()[0]:.1f}",
    }
    out = common.out_dir(a.out, a.quick)
    out.mkdir(parents=True, exist_ok=True)
    stem = "few_shot_adapt" + ("_quick" if a.quick else "")
    write_json(doc, out / f"{stem}.json")
    plot(doc, out / f"{stem}.png")
    atomic_write(out / f"{stem}.md", markdown(doc).replace("few_shot_adapt.png", f"{stem}.png"))
    say(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
