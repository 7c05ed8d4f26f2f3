"""Sweep learning rate, init and N on the default model to choose softprompt's defaults.

Two settings, both on SmolLM2-135M (the embedded default model):
* classification (SST-2, template + verbalizer): dev accuracy after a short budget;
* language modelling (the walk-through data): final training loss after 5 epochs.
Writes benchmarks/results/sweep_defaults.{json,md} and docs/tuning.md.

    python benchmarks/sweep_defaults.py [--train-rows 512] [--eval-rows 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import common  # noqa: E402

from softprompt import models, recipes  # noqa: E402
from softprompt.cli.quickstart import walkthrough_data  # noqa: E402
from softprompt.config import DataConfig, PromptConfig, TrainConfig  # noqa: E402
from softprompt.provenance import atomic_write, write_json  # noqa: E402
from softprompt.training.tune import train  # noqa: E402

CLS_GRID = [(0.03, "random"), (0.3, "labels"), (0.3, "random"), (0.03, "labels"), (0.3, "vocab")]
LM_GRID = [(20, "vocab", 0.1), (4, "random", 5e-3), (4, "random", 0.1), (20, "vocab", 0.03)]


def sst2_config(train_rows: int, eval_rows: int) -> DataConfig:
    return recipes.resolve(DataConfig(limit=train_rows, eval_limit=eval_rows), "sst2", common.data_root())


def _done(args, task: str) -> list[dict]:
    """Rows already measured (the sweep appends each row to --rows as it finishes)."""
    path = Path(args.rows)
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["task"] == task]


def _record(args, row: dict) -> None:
    with open(args.rows, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def run_cls(lm, args) -> list[dict]:
    data = sst2_config(args.train_rows, args.eval_rows)
    rows = _done(args, "sst2")
    for lr, init in CLS_GRID:
        if any(r["lr"] == lr and r["init"] == init for r in rows):
            continue
        t0 = time.time()
        res = train(lm, data, PromptConfig(num_virtual_tokens=20, init=init),
                    TrainConfig(lr=lr, epochs=args.cls_epochs, batch_size=16, patience=None, seed=0), save=False)
        acc = [e.get("eval_accuracy") for e in res.epochs]
        rows.append({"task": "sst2", "N": 20, "init": init, "lr": lr, "dev_accuracy_per_epoch": acc,
                     "best_dev_accuracy": max(acc), "final_train_loss": res.final_train_loss, "seconds": time.time() - t0})
        _record(args, rows[-1])
    return rows


def run_lm(lm, args) -> list[dict]:
    data = walkthrough_data(common.data_root())
    rows = _done(args, "walkthrough-lm")
    for n, init, lr in LM_GRID:
        if any(r["lr"] == lr and r["init"] == init and r["N"] == n for r in rows):
            continue
        t0 = time.time()
        res = train(lm, data, PromptConfig(num_virtual_tokens=n, init=init),
                    TrainConfig(lr=lr, epochs=5, batch_size=8, patience=None, seed=0), save=False)
        rows.append({"task": "walkthrough-lm", "N": n, "init": init, "lr": lr,
                     "epoch_train_loss": [e["train_loss"] for e in res.epochs],
                     "final_train_loss": res.final_train_loss, "seconds": time.time() - t0})
        _record(args, rows[-1])
    return rows


def write(rows_cls, rows_lm, args) -> None:
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": "smollm2-135m", "seed": 0, "torch": torch.__version__, "args": vars(args)}
    write_json({"meta": meta, "classification": rows_cls, "lm": rows_lm}, out / "sweep_defaults.json", indent=2)
    lines = ["# Hyper-parameter sweep for the defaults", "",
             f"Produced by `python benchmarks/sweep_defaults.py` on SmolLM2-135M, seed 0. SST-2: first {args.train_rows} training rows, "
             f"{args.cls_epochs} epochs, batch 16, N=20; dev accuracy on the first {args.eval_rows} dev rows after each epoch.", "",
             "| init | lr | dev accuracy per epoch | best | final train loss |", "|---|---|---|---|---|"]
    for r in rows_cls:
        lines.append(f"| {r['init']} | {r['lr']} | {', '.join(f'{a:.3f}' for a in r['dev_accuracy_per_epoch'])} | "
                     f"{r['best_dev_accuracy']:.3f} | {r['final_train_loss']:.3f} |")
    lines += ["", "Language modelling on the walk-through data (50 rows, 5 epochs, batch 8):", "",
              "| N | init | lr | train loss per epoch | final |", "|---|---|---|---|---|"]
    for r in rows_lm:
        lines.append(f"| {r['N']} | {r['init']} | {r['lr']} | {', '.join(f'{x:.3f}' for x in r['epoch_train_loss'])} | {r['final_train_loss']:.3f} |")
    atomic_write(out / "sweep_defaults.md", "\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--train-rows", type=int, default=128)
    p.add_argument("--eval-rows", type=int, default=100)
    p.add_argument("--cls-epochs", type=int, default=3)
    p.add_argument("--only", choices=["cls", "lm"], default=None)
    p.add_argument("--rows", default=str(ROOT / "benchmarks" / "results" / "sweep_defaults.rows.jsonl"),
                   help="JSONL of measured rows; finished configurations are skipped on a re-run")
    p.add_argument("--report-only", action="store_true", help="write the report from --rows without training")
    args = p.parse_args()
    torch.set_num_threads(2)
    lm = None if args.report_only else models.load(store=common.store())
    rows_cls = (_done(args, "sst2") if args.report_only else run_cls(lm, args)) if args.only != "lm" else []
    rows_lm = (_done(args, "walkthrough-lm") if args.report_only else run_lm(lm, args)) if args.only != "cls" else []
    write(rows_cls, rows_lm, args)


if __name__ == "__main__":
    main()
