"""Benchmark ablation: the deep prompt against each prompt lever on one task's dev set.

Every arm trains through ``softprompt train``'s own path (``tune.train``) on the same rows,
batches and budget (``--steps``, one seed), and is scored on the first ``--dev`` rows of the
task's dev split (label accuracy and loss, the evaluator training uses). Arms:

* ``deep``: the recommended deep prompt (``--kind deep --init labels --lr 0.03``), the baseline;
* ``deep+dropout``, ``deep+sink``, ``deep+cosine``, ``deep+all``: P-tuning v2's levers on it
  (prefix dropout 0.1, a frozen first virtual token, cosine decay after 10% warm-up, all three);
* ``deep+memory``, ``deep+memory@1e-4``, ``deep+memory@1e-5``: PrefixMemory, the deep prompt
  plus the per-head memory (memory lr 1e-3, 1e-4, 1e-5);
* ``shallow``: the shallow prompt with label init; ``dept``: DePT, a shorter shallow prompt
  (N=10) plus a rank-8 input offset, prompt lr 0.1 and offset lr 1e-3 (two groups);
* ``deep@N10``, ``deep@N40``, ``deep@N100``: P-tuning v2's prefix length, the deep prompt with
  10, 40 or 100 virtual tokens instead of 20;
* ``deep@lr0.1``: the deep prompt at lr 0.1 (its sweep stops at 0.03 from the label init);
* ``deep+mlp@1e-3``, ``deep+mlp@3e-4``, ``deep+mlp@1e-4``: prefix tuning's MLP
  reparameterisation of the deep prompt (``--reparam mlp``, folded before saving) at lower lrs than
  the 0.01 that did not learn.

Results (JSON + Markdown) go to benchmarks/results/ablation_<task>.{json,md}; every finished arm
is written at once, and ``--resume`` skips the arms already there.

    nice -n 19 python benchmarks/ablation.py --task trec --steps 200 --dev 200
"""

from __future__ import annotations

import argparse
import json
import os
import time

import common

from softprompt.config import DataConfig, PromptConfig, TrainConfig

ARMS = {  # name -> (PromptConfig fields, TrainConfig fields)
    "deep": ({"kind": "deep", "init": "labels"}, {"lr": 0.03}),
    "deep+dropout": ({"kind": "deep", "init": "labels", "dropout": 0.1}, {"lr": 0.03}),
    "deep+sink": ({"kind": "deep", "init": "labels", "freeze_first": True}, {"lr": 0.03}),
    "deep+cosine": ({"kind": "deep", "init": "labels"}, {"lr": 0.03, "schedule": "cosine", "warmup_ratio": 0.1}),
    "deep+all": ({"kind": "deep", "init": "labels", "dropout": 0.1, "freeze_first": True},
                 {"lr": 0.03, "schedule": "cosine", "warmup_ratio": 0.1}),
    "deep+memory": ({"kind": "deep", "init": "labels", "memory": True}, {"lr": 0.03, "group_lr": {"memory": 1e-3}}),
    "deep+memory@1e-4": ({"kind": "deep", "init": "labels", "memory": True},
                         {"lr": 0.03, "group_lr": {"memory": 1e-4}}),
    "deep+memory@1e-5": ({"kind": "deep", "init": "labels", "memory": True},
                         {"lr": 0.03, "group_lr": {"memory": 1e-5}}),
    "shallow": ({"kind": "shallow", "init": "labels"}, {"lr": 0.1}),
    "dept": ({"kind": "shallow", "init": "labels", "num_virtual_tokens": 10, "offset_rank": 8},
             {"lr": 0.1, "group_lr": {"offset": 1e-3}}),
    "deep@N10": ({"kind": "deep", "init": "labels", "num_virtual_tokens": 10}, {"lr": 0.03}),
    "deep@N40": ({"kind": "deep", "init": "labels", "num_virtual_tokens": 40}, {"lr": 0.03}),
    "deep@N100": ({"kind": "deep", "init": "labels", "num_virtual_tokens": 100}, {"lr": 0.03}),
    "deep@lr0.1": ({"kind": "deep", "init": "labels"}, {"lr": 0.1}),
    "deep+mlp@1e-3": ({"kind": "deep", "init": "labels", "reparam": "mlp"}, {"lr": 1e-3}),
    "deep+mlp@3e-4": ({"kind": "deep", "init": "labels", "reparam": "mlp"}, {"lr": 3e-4}),
    "deep+mlp@1e-4": ({"kind": "deep", "init": "labels", "reparam": "mlp"}, {"lr": 1e-4}),
}


def run_arm(lm, task: str, name: str, steps: int, dev: int, seed: int) -> dict:
    from softprompt.training import tune as TR

    pkw, tkw = ARMS[name]
    pcfg = PromptConfig(**pkw)
    tcfg = TrainConfig(steps=steps, seed=seed, patience=None, **tkw)
    t0 = time.perf_counter()
    from softprompt import recipes

    dcfg = recipes.resolve(DataConfig(eval_limit=dev), task, common.data_root())
    res = TR.train(lm, dcfg, pcfg, tcfg, task=task, save=False, store=common.store())
    best = res.best or {}
    return {"arm": name, "prompt": pcfg.to_dict(), "training": tcfg.to_dict(), "dev_accuracy": best.get("accuracy"),
            "dev_loss": best.get("loss"), "n_train": res.n_train, "n_dev": res.n_eval,
            "train_time_s": res.train_time_s, "wall_s": time.perf_counter() - t0,
            "final_train_loss": res.final_train_loss, "loadavg_at_end": os.getloadavg()}


def settings(arm: str) -> str:
    """The arm's flags in words (``ARMS``)."""
    pkw, tkw = ARMS.get(arm, ({}, {}))
    words = [f"{k.replace('_', '-')} {v}" for k, v in pkw.items() if v is not True] + [
        k.replace("_", "-") for k, v in pkw.items() if v is True]
    words += [f"{k.replace('_', '-')} " + (",".join(f"{g}={x:g}" for g, x in v.items()) if isinstance(v, dict) else f"{v:g}"
              if isinstance(v, float) else str(v)) for k, v in tkw.items()]
    return ", ".join(words)


def markdown(task: str, payload: dict) -> str:
    rows = payload["arms"]
    base = next((r["dev_accuracy"] for r in rows if r["arm"] == "deep"), None)
    table = common.md_table(
        ["arm", "settings", "dev accuracy", "vs deep (points)", "dev loss", "final train loss", "train s", "s/step"],
        [[r["arm"], settings(r["arm"]), 100 * r["dev_accuracy"], "" if base is None else 100 * (r["dev_accuracy"] - base),
          r["dev_loss"], r["final_train_loss"], r["train_time_s"], r["train_time_s"] / payload["steps"]] for r in rows])
    n_dev = rows[0]["n_dev"] if rows else 0
    se = 100 * (0.25 / max(1, n_dev)) ** 0.5  # the largest standard error of an accuracy on n_dev rows
    return (f"# Prompt levers on {task} (dev set)\n\n{payload['steps']} steps, seed {payload['seed']}, batch 8, "
            f"the first {n_dev} dev rows, the default model, {payload.get('threads', common.THREADS)} torch thread(s) under `nice -n 19`. One seed on {n_dev} rows: a difference under "
            f"~{2 * se:.1f} points (two standard errors, at most {se:.1f} each) is noise.\n\n{table}\n"
            + payload["load_note"] + _arm_loads(rows))


def _arm_loads(rows: list[dict]) -> str:
    """The 1-minute load average at the end of each arm (recorded since resumed runs share a file)."""
    loads = {r["arm"]: r["loadavg_at_end"][0] for r in rows if r.get("loadavg_at_end")}
    return ("" if not loads else "Load average (1 min) at the end of each arm: "
            + ", ".join(f"{k} {v:.1f}" for k, v in loads.items()) + ".\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="trec")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--dev", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--tag", default="", help="suffix of the result name (a second process writes its own file)")
    ap.add_argument("--resume", action="store_true", help="keep the arms already in the result file")
    ap.add_argument("--threads", type=int, default=common.THREADS,
                    help="torch threads (1 when another job holds one of the 2 cores)")
    ap.add_argument("--merge", default="", help="comma-separated result names (in benchmarks/results) whose arms to add")
    a = ap.parse_args()
    common.setup_torch(threads=a.threads)
    info = common.machine_info()
    name = f"ablation_{a.task}{a.tag}"
    machine = info
    done, earlier = [], ""  # arms kept from the result file, and its note on the load they ran under
    path = common.RESULTS / f"{name}.json"
    if a.resume and path.is_file():
        kept = json.loads(path.read_text())
        done, earlier = kept["arms"], kept.get("load_note", "")
        machine = kept.get("machine", info)
    for other in filter(None, a.merge.split(",")):  # arms run by another process (--tag), kept in ARMS order
        kept = json.loads((common.RESULTS / f"{other}.json").read_text())
        new = [r for r in kept["arms"] if r["arm"] not in {d["arm"] for d in done}]
        done += new
        if new:  # their load, as that process saw it
            earlier += f" Arms from {other} ({', '.join(r['arm'] for r in new)}): {kept.get('load_note', '')}"
    done.sort(key=lambda r: list(ARMS).index(r["arm"]))
    todo = [x for x in a.arms.split(",") if x not in {r["arm"] for r in done}]
    lm = common.load_lm(False) if todo else None
    payload = {"task": a.task, "steps": a.steps, "seed": a.seed, "dev_rows": a.dev, "threads": a.threads,
               "machine": info if todo else machine, "arms": done}  # a merge only keeps the file's machine

    def note() -> str:  # the earlier runs' note, then this run's
        now = common.load_note(info, "arms").replace("arms ran interleaved", "arms ran one after another")
        return earlier + (f"This run ({', '.join(todo)}): " if earlier else "") + now

    for arm in todo:
        payload["arms"].append(run_arm(lm, a.task, arm, a.steps, a.dev, a.seed))
        payload["load_note"] = note()
        common.write_results(name, payload, markdown(a.task, payload))
        print(json.dumps(payload["arms"][-1]), flush=True)
    if not todo and a.merge:  # only arms of other files to add (their loads are listed per arm)
        payload["load_note"] = earlier
        common.write_results(name, payload, markdown(a.task, payload))


if __name__ == "__main__":
    main()
