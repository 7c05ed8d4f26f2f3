"""The PEFT prompt-tuning walk-through, done the usual PEFT way and with softprompt.

Data: the ``prompt`` column of the first 50 rows of ``awesome-chatgpt-prompts/prompts.csv``,
language modelling on every token, truncated to 256 tokens. Both sides: 4 virtual tokens,
random init, lr 5e-3, 5 epochs, batch 8, seed 0.

* PEFT: ``get_peft_model(PromptTuningConfig(CAUSAL_LM, RANDOM, 4))`` + ``transformers.Trainer``
  with ``DataCollatorForLanguageModeling(mlm=False)`` and ``auto_find_batch_size=True``;
* softprompt: ``softprompt.training.tune.train`` with its defaults (see ``run_softprompt``).

The two run interleaved, one optimiser step each in turn (``Lockstep``), in one process.

    python benchmarks/walkthrough.py                 # both sides, a few minutes on 2 cores
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
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402

ROWS, MAX_LENGTH, N_VIRTUAL, LR, EPOCHS, BATCH = 50, 256, 4, 5e-3, 5, 8
QUICK = {"max_length": 64, "epochs": 1}
TARGETS = {"speedup": 2.5, "loss_margin": 0.02}  # per-step speed-up; last-epoch loss at most PEFT's + margin


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


class Lockstep:
    """Two trainings in two threads take turns, one optimiser step each, so that both see the
    same machine load: a burst from another process lands on both sides alike. Each turn is
    timed (wall and process CPU: only one side runs at a time, so the process CPU seconds of a
    turn are that side's). A side's first turn includes its setup and is reported apart."""

    SIDES = ("peft", "softprompt")

    def __init__(self):
        self.cv = threading.Condition()
        self.turn, self.done = "peft", set()
        self.wall = {s: [] for s in self.SIDES}
        self.cpu = {s: [] for s in self.SIDES}
        self._t: dict[str, tuple[float, float]] = {}

    def begin(self, side: str) -> None:
        """Wait for ``side``'s first turn, then start its clock."""
        with self.cv:
            self.cv.wait_for(lambda: self.turn == side)
        self._t[side] = (time.perf_counter(), time.process_time())

    def end_step(self, side: str) -> None:
        """``side`` finished an optimiser step: record it, hand over, wait for the next turn."""
        t, c = self._t[side]
        self.wall[side].append(time.perf_counter() - t)
        self.cpu[side].append(time.process_time() - c)
        other = self.SIDES[1 - self.SIDES.index(side)]
        with self.cv:
            if other not in self.done:
                self.turn = other
                self.cv.notify_all()
                self.cv.wait_for(lambda: self.turn == side or other in self.done)
        self._t[side] = (time.perf_counter(), time.process_time())

    def finish(self, side: str) -> None:
        with self.cv:
            self.done.add(side)
            self.turn = self.SIDES[1 - self.SIDES.index(side)]
            self.cv.notify_all()

    def per_step(self, side: str) -> dict:
        """Median wall and CPU seconds per step, the first (setup) step left out."""
        w, c = self.wall[side][1:] or self.wall[side], self.cpu[side][1:] or self.cpu[side]
        return {"steps_timed": len(self.wall[side]), "step_wall_s_median": statistics.median(w),
                "step_cpu_s_median": statistics.median(c), "first_step_wall_s": self.wall[side][0],
                "train_wall_s": sum(self.wall[side]), "train_cpu_s": sum(self.cpu[side])}


# ---------------------------------------------------------------- PEFT + Trainer


def peft_trainer(model, tokenizer, texts: list[str], max_length: int, epochs: int, out_dir: str, lock: Lockstep,
                 shapes: list[tuple[int, int, int]]):
    from peft import PromptTuningConfig, get_peft_model
    from transformers import (
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    class Turns(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            lock.end_step("peft")

    torch.manual_seed(common.SEED)  # the RANDOM prompt init happens here, before the Trainer
    cfg = PromptTuningConfig(task_type="CAUSAL_LM", prompt_tuning_init="RANDOM", num_virtual_tokens=N_VIRTUAL)
    peft_model = get_peft_model(model, cfg)
    dataset = [dict(tokenizer(t, truncation=True, max_length=max_length)) for t in texts]
    args = TrainingArguments(output_dir=out_dir, learning_rate=LR, num_train_epochs=epochs,
                             per_device_train_batch_size=BATCH, auto_find_batch_size=True, report_to=[],
                             save_strategy="no", logging_steps=1, seed=common.SEED, disable_tqdm=True)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)

    def collate(rows):  # the Trainer's own collator; the batch shapes are kept for the FLOP count
        batch = collator(rows)
        shapes.append((*batch["input_ids"].shape, int(batch["attention_mask"].sum())))
        return batch

    return Trainer(model=peft_model, args=args, train_dataset=dataset, data_collator=collate, callbacks=[Turns()])


def run_peft(lm, texts: list[str], max_length: int, epochs: int, lock: Lockstep) -> dict:
    shapes: list[tuple[int, int, int]] = []
    with tempfile.TemporaryDirectory(prefix="sp-bench-peft-") as out_dir:
        trainer = peft_trainer(common.separate_copy(lm.model), lm.tokenizer, texts, max_length, epochs, out_dir,
                               lock, shapes)
        lock.begin("peft")
        try:
            out = trainer.train()
        finally:
            lock.finish("peft")
    steps = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    flops = sum(common.train_flops(lm.model.config, B * (N_VIRTUAL + T), common.causal_pairs([N_VIRTUAL + T] * B),
                                   B * (N_VIRTUAL + T)) for B, T, _ in shapes)
    return {"trainer_train_loss": out.training_loss, "batch_size_used": trainer._train_batch_size,
            "precision": "fp32", "gflop_total": flops / 1e9, "tokens_real": sum(r for *_, r in shapes),
            "tokens_computed": sum(B * (N_VIRTUAL + T) for B, T, _ in shapes), **loss_summary(steps, epochs)}


# ---------------------------------------------------------------- softprompt


def run_softprompt(lm, csv_path: Path, max_length: int, epochs: int, lock: Lockstep, out: dict) -> None:
    """softprompt.training.tune.train, its defaults, on the same rows (dev_fraction=0: all 50 rows
    as PEFT). Runs in its own thread; an optimiser step hook hands the turn over after each step."""
    from softprompt.config import DataConfig, PromptConfig, TrainConfig
    from softprompt.training.tune import train

    data_cfg = DataConfig(path=str(csv_path), text_column="prompt", limit=ROWS, max_length=max_length,
                          dev_fraction=0.0)
    prompt_cfg = PromptConfig(num_virtual_tokens=N_VIRTUAL, init="random")
    train_cfg = TrainConfig(lr=LR, epochs=epochs, batch_size=BATCH, seed=common.SEED, patience=None)
    me = threading.current_thread()

    def after_step(opt, args, kwargs):
        if threading.current_thread() is me:
            lock.end_step("softprompt")

    from torch.optim.optimizer import register_optimizer_step_post_hook

    hook = None
    try:
        hook = register_optimizer_step_post_hook(after_step)
        lock.begin("softprompt")
        res = train(lm, data_cfg, prompt_cfg, train_cfg, name=None)
    finally:
        if hook is not None:
            hook.remove()
        lock.finish("softprompt")
    steps = [h["loss"] for h in res.history]
    out.update({"fit_time_s": res.train_time_s, "final_train_loss": res.final_train_loss,
                "precision": res.meta.get("precision", {}).get("used", "fp32"), "precision_detail": res.meta.get("precision"),
                "train_config": train_cfg.to_dict(), **softprompt_work(lm, data_cfg, train_cfg, epochs),
                **loss_summary(steps, epochs)})


def softprompt_work(lm, data_cfg, train_cfg, epochs: int) -> dict:
    """FLOPs of softprompt's steps, from its batches (recomputed: deterministic in seed and epoch)."""
    from softprompt import data as D
    from softprompt.forward import packing
    from softprompt.splits import load_splits

    ex = load_splits(lm.tokenizer, data_cfg, train_cfg.seed).train
    flops, real, computed = 0.0, 0, 0
    for epoch in range(epochs):
        for idx in D.bucketed_batches(ex, train_cfg.batch_size, train_cfg.seed, epoch):
            b = D.collate([ex[i] for i in idx], lm.tokenizer.pad_token_id)
            lengths = b["attention_mask"].sum(1).tolist()
            tokens = packing.pack(b["input_ids"], b["attention_mask"], b["labels"]).ids.numel() \
                if getattr(train_cfg, "pack", False) else b["input_ids"].numel()
            targets = int((b["labels"] != D.IGNORE).sum())
            flops += common.train_flops(lm.model.config, N_VIRTUAL, common.causal_pairs([N_VIRTUAL]), 1)
            flops += common.train_flops(lm.model.config, tokens, common.causal_pairs(lengths, N_VIRTUAL), targets)
            real, computed = real + sum(lengths), computed + tokens
    return {"gflop_total": flops / 1e9, "tokens_real": real, "tokens_computed": computed}


# ---------------------------------------------------------------- report


def compare(res: dict, lock: Lockstep, peaks: dict) -> dict:
    peft, ours = res["peft"], res["softprompt"]
    for side, r in (("peft", peft), ("softprompt", ours)):
        r.update(lock.per_step(side))
        per_step = r["train_wall_s"] / max(1, r["steps_timed"])
        r["roofline"] = common.roofline(r["gflop_total"] * 1e9 / max(1, r["steps_timed"]), per_step,
                                        peaks["bf16" if r["precision"] == "bf16" else "fp32"])
    paired = [a / b for a, b in zip(lock.wall["peft"][1:], lock.wall["softprompt"][1:])]
    paired_cpu = [a / b for a, b in zip(lock.cpu["peft"][1:], lock.cpu["softprompt"][1:])]
    speed = peft["step_wall_s_median"] / ours["step_wall_s_median"]
    loss_diff = ours["last_epoch_mean_loss"] - peft["last_epoch_mean_loss"]
    return {
        "speedup_per_step_wall_median": speed,
        "speedup_per_step_paired_median": statistics.median(paired),
        "speedup_per_step_cpu_median": peft["step_cpu_s_median"] / ours["step_cpu_s_median"],
        "speedup_per_step_cpu_paired_median": statistics.median(paired_cpu),
        "speedup_whole_training_wall": peft["train_wall_s"] / ours["train_wall_s"],
        "last_epoch_loss_diff_softprompt_minus_peft": loss_diff,
        "mean_loss_diff_softprompt_minus_peft": ours["mean_loss_all_steps"] - peft["mean_loss_all_steps"],
        "speed_target_met": statistics.median(paired) >= TARGETS["speedup"],
        "loss_target_met": loss_diff <= TARGETS["loss_margin"],
    }


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def markdown(res: dict) -> str:
    sides = {k: res[k] for k in ("peft", "softprompt") if k in res}
    keys = ["precision", "step_wall_s_median", "step_cpu_s_median", "first_step_wall_s", "train_wall_s",
            "train_cpu_s", "steps", "tokens_real", "tokens_computed", "mean_loss_all_steps", "last_epoch_mean_loss",
            "last_step_loss"]
    table = common.md_table(["", *sides], [[k, *(s.get(k) for s in sides.values())] for k in keys])
    roof = common.md_table(["", "GFLOP / step", "achieved GFLOPS", "matmul peak GFLOPS (its precision)", "fraction of peak"],
                           [[k, s["roofline"]["gflop"], s["roofline"]["achieved_gflops"], s["roofline"]["peak_gflops"],
                             s["roofline"]["fraction_of_peak"]] for k, s in sides.items() if "roofline" in s])
    cmp = res.get("comparison")
    cmp_md = common.md_table(["metric", "value"], [[k, v] for k, v in cmp.items()]) if cmp else "(one side only)\n"
    m, p = res["machine"], res["peaks_gflops"]
    return f"""# Prompt-tuning walk-through: PEFT + Trainer vs softprompt{' (--quick)' if res['quick'] else ''}

Model: {res['model']}. Data: `prompt` column, first {ROWS} rows of `{res['data']}`, language
modelling on every token, max_length {res['config']['max_length']}. N={N_VIRTUAL} virtual tokens,
random init, lr {LR}, {res['config']['epochs']} epochs, batch {BATCH}, seed {res['seed']}.
Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, bf16 native:
{m['cpu_bf16_native']} ({m['cpu_bf16_detail']}); torch {m['torch']}, transformers {m['transformers']},
peft {m['peft']}; load average at start {m['loadavg_at_start']}, at end {m.get('loadavg_at_end')}.
Measured matmul peak ({p['threads']} threads): fp32 {p['fp32']:.0f} GFLOPS, bf16 {p['bf16']:.0f} GFLOPS.

**Interleaved in one run**: PEFT's `Trainer` (main thread) and softprompt's `train()` (its own
thread) take turns, one optimiser step each, so both meet the same machine load. Each turn is
timed in wall seconds and in process CPU seconds (one side runs at a time). A side's first step
includes its setup and is left out of the medians. "Paired" = median over steps of PEFT's step k
over softprompt's step k.

{table}
{roof}
{cmp_md}
FLOPs are counted from the model's shapes (`common.train_flops`): PEFT computes every padded
position of its random batches with full logits; softprompt its batches' positions plus the
prompt once per step, logits where there are targets (here: every token). PEFT's mean training
loss as `Trainer` reports it: {_num(sides.get('peft', {}).get('trainer_train_loss'))}; softprompt's precision choice:
{sides.get('softprompt', {}).get('precision_detail')}.

Known differences beyond the forward pass: PEFT's RANDOM init is N(0, 1) per entry, ours is
scaled to the embedding table's mean/std; the Trainer decays lr linearly with no warm-up and
samples batches at random, softprompt warms up over the first 6% of steps and uses
length-bucketed batches. Both clip gradients at 1.0 and predict every token, including the first
(from the last virtual token).
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random Llama, one epoch (smoke test)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 2; 1 with --quick)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default benchmarks/results; a temp folder with --quick)")
    return ap.parse_args(argv)


def run(a: argparse.Namespace) -> dict:
    common.setup_torch(a.quick, threads=a.threads)
    max_length, epochs = (QUICK["max_length"], QUICK["epochs"]) if a.quick else (MAX_LENGTH, EPOCHS)
    lm, path = common.load_lm(a.quick), prompts_csv(a.quick)
    peaks = common.matmul_peaks()
    res = {"benchmark": "walkthrough", "quick": a.quick, "seed": common.SEED, "model": lm.name, "data": str(path),
           "config": {"rows": ROWS, "max_length": max_length, "epochs": epochs, "lr": LR, "batch_size": BATCH,
                      "num_virtual_tokens": N_VIRTUAL},
           "machine": common.machine_info(), "peaks_gflops": peaks, "targets": TARGETS}
    texts = common.read_csv_column(path, "prompt", ROWS)
    lock, ours = Lockstep(), {}
    worker = threading.Thread(target=run_softprompt, args=(lm, path, max_length, epochs, lock, ours), daemon=True)
    worker.start()
    res["peft"] = run_peft(lm, texts, max_length, epochs, lock)
    worker.join()
    if not ours:
        raise RuntimeError("the softprompt side failed (see its traceback above)")
    res["softprompt"] = ours
    res["machine"]["loadavg_at_end"] = os.getloadavg()
    res["comparison"] = compare(res, lock, peaks)
    c = res["comparison"]
    print(f"per step: PEFT/softprompt {c['speedup_per_step_paired_median']:.2f}x (paired wall), "
          f"{c['speedup_per_step_cpu_paired_median']:.2f}x (paired CPU); last-epoch loss diff "
          f"{c['last_epoch_loss_diff_softprompt_minus_peft']:+.4f}", flush=True)
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
