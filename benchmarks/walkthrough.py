"""The PEFT prompt-tuning walk-through, done the usual PEFT way and with softprompt.

Data: the ``prompt`` column of the first 50 rows of ``awesome-chatgpt-prompts/prompts.csv``,
language modelling on every token, truncated to 256 tokens. Both sides: 4 virtual tokens,
random init, lr 5e-3, 5 epochs, batch 8, seed 0.

* PEFT: ``get_peft_model(PromptTuningConfig(CAUSAL_LM, RANDOM, 4))`` + ``transformers.Trainer``
  with ``DataCollatorForLanguageModeling(mlm=False)`` and ``auto_find_batch_size=True``;
  timed around ``trainer.train()`` only.
* softprompt: ``softprompt.training.tune.train`` (see ``run_softprompt``); timed around the call.

    python benchmarks/walkthrough.py                 # both sides, ~3-4 min on 2 cores
    python benchmarks/walkthrough.py --only peft     # the PEFT half only
    python benchmarks/walkthrough.py --quick         # tiny random Llama, seconds
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402

ROWS, MAX_LENGTH, N_VIRTUAL, LR, EPOCHS, BATCH = 50, 256, 4, 5e-3, 5, 8
QUICK = {"max_length": 64, "epochs": 1}
TARGETS = {"speedup": 2.0, "loss": "softprompt final loss <= PEFT final loss"}


def prompts_csv(quick: bool) -> Path:
    """The shared CSV; with ``--quick`` and no shared data, a synthetic one in a temp folder."""
    path = common.data_root() / "awesome-chatgpt-prompts" / "prompts.csv"
    if path.is_file() or not quick:
        return path
    out = Path(tempfile.mkdtemp(prefix="sp-bench-")) / "prompts.csv"
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["act", "prompt"])
    w.writerows([[f"act {i}", s] for i, s in enumerate(common.synthetic_sentences(ROWS))])
    return common.atomic_write(out, buf.getvalue())


def epoch_means(losses: list[float], epochs: int) -> list[float]:
    """Mean step loss of each epoch (steps split evenly, as both trainers do)."""
    per = math.ceil(len(losses) / epochs)
    return [statistics.fmean(losses[i : i + per]) for i in range(0, len(losses), per)]


def loss_summary(step_losses: list[float], epochs: int) -> dict:
    per_epoch = epoch_means(step_losses, epochs)
    return {"steps": len(step_losses), "mean_loss_all_steps": statistics.fmean(step_losses),
            "last_epoch_mean_loss": per_epoch[-1], "last_step_loss": step_losses[-1],
            "epoch_mean_losses": per_epoch, "step_losses": step_losses}


def timing(meter: common.Meter) -> dict:
    return {"train_time_s": meter.wall_s, "cpu_utilisation": meter.utilisation,
            "foreign_cores": meter.foreign_cores}


def gated(run: Callable[[], dict], gate: common.QuietGate) -> dict:
    """Start a side when the machine is quiet; redo it if other processes loaded it meanwhile."""
    for attempt in range(gate.retries + 1):
        gate.wait()
        res = run()
        if gate.accept(res["foreign_cores"], attempt):
            break
    return {**res, "attempts": attempt + 1}


# ---------------------------------------------------------------- PEFT + Trainer


def peft_trainer(model, tokenizer, texts: list[str], max_length: int, epochs: int, out_dir: str):
    from peft import PromptTuningConfig, get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    torch.manual_seed(common.SEED)  # the RANDOM prompt init happens here, before the Trainer
    cfg = PromptTuningConfig(task_type="CAUSAL_LM", prompt_tuning_init="RANDOM", num_virtual_tokens=N_VIRTUAL)
    peft_model = get_peft_model(model, cfg)
    dataset = [dict(tokenizer(t, truncation=True, max_length=max_length)) for t in texts]
    args = TrainingArguments(output_dir=out_dir, learning_rate=LR, num_train_epochs=epochs,
                             per_device_train_batch_size=BATCH, auto_find_batch_size=True, report_to=[],
                             save_strategy="no", logging_steps=1, seed=common.SEED, disable_tqdm=True)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return Trainer(model=peft_model, args=args, train_dataset=dataset, data_collator=collator)


def run_peft(lm, texts: list[str], max_length: int, epochs: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="sp-bench-peft-") as out_dir:
        trainer = peft_trainer(common.separate_copy(lm.model), lm.tokenizer, texts, max_length, epochs, out_dir)
        with common.Meter() as meter:
            out = trainer.train()
    steps = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {**timing(meter), "trainer_train_loss": out.training_loss,
            "batch_size_used": trainer._train_batch_size, **loss_summary(steps, epochs)}


# ---------------------------------------------------------------- softprompt


def run_softprompt(lm, csv_path: Path, max_length: int, epochs: int) -> dict:
    """softprompt.training.tune.train on the same rows; dev_fraction=0 so it trains on all 50 rows as PEFT does."""
    from softprompt.config import DataConfig, PromptConfig, TrainConfig
    from softprompt.training.tune import train

    data_cfg = DataConfig(path=str(csv_path), text_column="prompt", limit=ROWS, max_length=max_length,
                          dev_fraction=0.0)
    prompt_cfg = PromptConfig(num_virtual_tokens=N_VIRTUAL, init="random")
    train_cfg = TrainConfig(lr=LR, epochs=epochs, batch_size=BATCH, seed=common.SEED, patience=None)
    with common.Meter() as meter:
        res = train(lm, data_cfg, prompt_cfg, train_cfg, name=None)
    steps = [h["loss"] for h in res.history]
    return {**timing(meter), "fit_time_s": res.train_time_s, "final_train_loss": res.final_train_loss,
            "train_config": train_cfg.to_dict(), **loss_summary(steps, epochs)}


# ---------------------------------------------------------------- report


def compare(peft: dict, ours: dict) -> dict:
    return {
        "speedup_peft_over_softprompt": peft["train_time_s"] / ours["train_time_s"],
        "speedup_vs_softprompt_fit_time": peft["train_time_s"] / ours["fit_time_s"],
        "last_epoch_loss_diff_softprompt_minus_peft": ours["last_epoch_mean_loss"] - peft["last_epoch_mean_loss"],
        "mean_loss_diff_softprompt_minus_peft": ours["mean_loss_all_steps"] - peft["mean_loss_all_steps"],
        "speed_target_met": peft["train_time_s"] / ours["train_time_s"] >= TARGETS["speedup"],
        "loss_target_met": ours["last_epoch_mean_loss"] <= peft["last_epoch_mean_loss"],
    }


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def markdown(res: dict) -> str:
    sides = {k: res[k] for k in ("peft", "softprompt") if k in res}
    keys = ["train_time_s", "cpu_utilisation", "foreign_cores", "attempts", "steps", "mean_loss_all_steps", "last_epoch_mean_loss", "last_step_loss"]
    table = common.md_table(["", *sides], [[k, *(s[k] for s in sides.values())] for k in keys])
    cmp = res.get("comparison")
    cmp_md = common.md_table(["metric", "value"], [[k, v] for k, v in cmp.items()]) if cmp else "(one side only)\n"
    peft = res.get("peft", {})
    mach = ", ".join(f"{k} {v}" for k, v in res["machine"].items())
    return f"""# Prompt-tuning walk-through: PEFT + Trainer vs softprompt{' (--quick)' if res['quick'] else ''}

Model: {res['model']}. Data: `prompt` column, first {ROWS} rows of `{res['data']}`, language
modelling on every token, max_length {res['config']['max_length']}. N={N_VIRTUAL} virtual tokens,
random init, lr {LR}, {res['config']['epochs']} epochs, batch {BATCH}, seed {res['seed']}.
Machine: {mach}.

Each side starts only once other processes use < {common.QUIET_CORES} core (from `/proc/stat`), and is
redone if they loaded the machine while it ran (`foreign_cores`: their mean load in cores).

{table}
PEFT: `trainer.train()` wall time; Trainer's reported mean training loss (all steps):
{_num(peft.get('trainer_train_loss'))}; batch size used: {peft.get('batch_size_used', 'n/a')}.
softprompt: wall time of the `train()` call (includes tokenisation and init; the fit loop alone
took {_num(res.get('softprompt', {}).get('fit_time_s'))} s).

{cmp_md}
Known differences beyond the forward pass: PEFT's RANDOM init is N(0, 1) per entry, ours is
scaled to the embedding table's mean/std; the Trainer decays lr linearly with no warm-up and
samples batches at random, softprompt warms up over the first 6% of steps and uses
length-bucketed batches. Both clip gradients at 1.0 and predict every token, including the first
(from the last virtual token).
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random Llama, one epoch (smoke test)")
    ap.add_argument("--only", choices=["peft", "softprompt", "both"], default="both")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 2; 1 with --quick)")
    ap.add_argument("--max-wait", type=float, default=None,
                    help="seconds in all to wait for other processes to go quiet (default 3600; 0 with --quick)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default benchmarks/results; a temp folder with --quick)")
    return ap.parse_args(argv)


def run(a: argparse.Namespace) -> dict:
    common.setup_torch(a.quick, threads=a.threads)
    max_length, epochs = (QUICK["max_length"], QUICK["epochs"]) if a.quick else (MAX_LENGTH, EPOCHS)
    lm, path = common.load_lm(a.quick), prompts_csv(a.quick)
    res = {"benchmark": "walkthrough", "quick": a.quick, "seed": common.SEED, "model": lm.name, "data": str(path),
           "config": {"rows": ROWS, "max_length": max_length, "epochs": epochs, "lr": LR, "batch_size": BATCH,
                      "num_virtual_tokens": N_VIRTUAL},
           "machine": common.machine_info(), "targets": TARGETS}
    gate = common.QuietGate(a.max_wait if a.max_wait is not None else (0.0 if a.quick else 3600.0), retries=2)
    texts = common.read_csv_column(path, "prompt", ROWS)
    sides = {"peft": lambda: run_peft(lm, texts, max_length, epochs),
             "softprompt": lambda: run_softprompt(lm, path, max_length, epochs)}
    for side, fn in sides.items():
        if a.only in (side, "both"):
            res[side] = gated(fn, gate)
            print(f"{side}: {res[side]['train_time_s']:.1f}s last-epoch loss {res[side]['last_epoch_mean_loss']:.4f} "
                  f"(other processes' load {res[side]['foreign_cores']:.2f} cores)", flush=True)
    res["machine"].update(quiet_gate=gate.report(), loadavg_at_end=os.getloadavg())
    if "peft" in res and "softprompt" in res:
        res["comparison"] = compare(res["peft"], res["softprompt"])
    return res


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    res = run(a)
    name = "walkthrough_quick" if a.quick else "walkthrough"
    js, md = common.write_results(name, res, markdown(res), common.out_dir(a.out, a.quick))
    print(f"wrote {js} and {md}")
    return res


if __name__ == "__main__":
    main()
