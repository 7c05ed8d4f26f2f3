"""Per-step training cost of prompt tuning: HF PEFT vs softprompt vs the no-prompt floor.

SST-2 (``<label> <sentence>`` lines), template ``"Review: {text}\\nSentiment:"``, target
``" negative"``/``" positive"``, loss only on the target tokens, batch 16, length-bucketed
batches shared by every method. Methods, each with AdamW on an (N, H) prompt:

* ``peft``: ``get_peft_model(PromptTuningConfig(CAUSAL_LM, RANDOM))`` on a separate copy of the
  model, forward ``peft_model(input_ids, attention_mask, labels).loss`` (prompt concatenated to
  every row, full-vocabulary logits at every position);
* ``softprompt``: ``PromptMethod.loss`` with the training defaults: shared batch-1 prefix, rows
  packed, target-only chunked logits, the auto precision (bf16 autocast where native);
* ``floor``: ``plain_loss`` on the real tokens only, no prompt, with the input embeddings made to
  require grad so that backward runs through the whole network as it does in prompt tuning;
  in softprompt's precision.

Timing: in one process, rounds of one step per method on the same batch, method order rotated
each round; the first rounds are warm-up. Per-epoch time = steps per epoch x median step time.
Peak memory: each method again in a fresh ``spawn`` subprocess (model loaded there alone);
a thread samples the resident set size (``/proc/self/statm``) every 0.5 ms during two steps on
the longest batch of the epoch; we report the peak minus the RSS just before those steps.

    python benchmarks/train_step.py            # ~10 min on 2 busy cores, writes results/train_step.*
    python benchmarks/train_step.py --quick    # tiny random Llama, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402

from softprompt.config import TrainConfig  # noqa: E402
from softprompt.forward import naive_loss, plain_loss  # noqa: E402
from softprompt.forward.packing import pack  # noqa: E402
from softprompt.precision import autocast  # noqa: E402
from softprompt.training.methods import PromptMethod  # noqa: E402

TEMPLATE = "Review: {text}\nSentiment:"
VERBALIZER = {"0": " negative", "1": " positive"}
BATCH_SIZE, MAX_LENGTH, LR = 16, 128, 5e-3
SIZES = (20, 100)
PACK = TrainConfig().pack  # softprompt's default
TARGETS = {"peft_over_softprompt": {20: 2.0, 100: 5.0}, "softprompt_over_floor": 1.1}


# ---------------------------------------------------------------- data


def sst2_examples(tokenizer, quick: bool) -> list[common.Example]:
    path = common.data_root() / "sst2" / "train.txt"
    limit = 64 if quick else None
    if path.is_file():
        rows = common.read_label_lines(path, limit)
    else:  # --quick on a machine without the shared data
        rows = [(str(i % 2), s) for i, s in enumerate(common.synthetic_sentences(limit or 64))]
    return [common.target_example(tokenizer, TEMPLATE.format(text=text), VERBALIZER[label], MAX_LENGTH)
            for label, text in rows]


# ---------------------------------------------------------------- the three methods


class Stepper:
    """One optimiser step of one method: zero grads, loss, backward, AdamW step."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=LR) if params else None

    def loss(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, batch: dict) -> float:
        for p in self.params:
            p.grad = None
        loss = self.loss(batch)
        loss.backward()
        return loss.item()

    def step(self, batch: dict) -> float:
        loss = self.backward(batch)
        if self.opt is not None:
            self.opt.step()
        return loss


class PeftStepper(Stepper):
    def __init__(self, model: torch.nn.Module, prompt: torch.Tensor):
        from peft import PromptTuningConfig, get_peft_model

        cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prompt.shape[0],
                                 prompt_tuning_init="RANDOM")
        self.model = get_peft_model(model, cfg)
        self.weight = self.model.prompt_encoder["default"].embedding.weight  # (N, H)
        with torch.no_grad():
            self.weight.copy_(prompt)  # same start as ours, so losses can be compared
        super().__init__([p for p in self.model.parameters() if p.requires_grad])

    def loss(self, batch: dict) -> torch.Tensor:
        return self.model(**batch).loss


class SoftpromptStepper(Stepper):
    """softprompt's training loss as ``PromptMethod`` computes it, with its defaults (packing,
    the auto precision) unless told otherwise."""

    def __init__(self, model: torch.nn.Module, prompt: torch.Tensor, used: str):
        self.method = PromptMethod(model, prompt, pack=PACK, precision=used)
        self.prompt = self.method.prompt
        super().__init__([self.prompt])

    def loss(self, batch: dict) -> torch.Tensor:
        return self.method.loss(batch)


class FloorStepper(Stepper):
    """The frozen model on the real tokens, backward through every layer; nothing to update."""

    def __init__(self, model: torch.nn.Module, used: str):
        self.model, self.used = model, used
        super().__init__([])

    def loss(self, batch: dict) -> torch.Tensor:
        with embeddings_require_grad(self.model), autocast(self.used, self.model.device):
            return plain_loss(self.model, **batch)


@contextlib.contextmanager
def embeddings_require_grad(model: torch.nn.Module):
    """Make the input-embedding output a grad-requiring leaf, as a prompt's gradient would need."""
    hook = model.get_input_embeddings().register_forward_hook(
        lambda _m, _inp, out: out.detach().requires_grad_(True))
    try:
        yield
    finally:
        hook.remove()


def make_stepper(kind: str, model: torch.nn.Module, prompt: torch.Tensor | None, used: str) -> Stepper:
    if kind == "peft":
        return PeftStepper(model, prompt)
    if kind == "softprompt":
        return SoftpromptStepper(model, prompt, used)
    return FloorStepper(model, used)


def initial_prompt(model: torch.nn.Module, n: int) -> torch.Tensor:
    from softprompt.prompt import init_random

    return init_random(model, n, torch.Generator().manual_seed(common.SEED + n))


# ---------------------------------------------------------------- checks and timing


def sanity_check(peft: PeftStepper, ours: SoftpromptStepper, model, batch: dict) -> dict:
    """Same prompt values, same batch, both in fp32: PEFT's loss and gradient vs ours (and the
    naive concat). The timed steps then run in softprompt's chosen precision."""
    used, ours.method.precision = ours.method.precision, "fp32"
    lp, lo = peft.backward(batch), ours.backward(batch)
    ours.method.precision = used
    gp, go = peft.weight.grad, ours.prompt.grad
    with torch.no_grad():
        ln = naive_loss(model, ours.prompt, **batch).item()
    peft.weight.grad, ours.prompt.grad = None, None
    return {"peft_loss": lp, "softprompt_loss": lo, "naive_loss": ln, "loss_abs_diff": abs(lp - lo),
            "grad_max_abs_diff": (gp - go).abs().max().item(),
            "grad_rel_diff": ((gp - go).norm() / gp.norm()).item()}


def run_round(steppers: dict[str, Stepper], order: list[str], batch: dict) -> tuple[dict, dict, dict]:
    """One step of each method in ``order``: (wall seconds, process CPU seconds, losses)."""
    wall, cpu, losses = {}, {}, {}
    for name in order:
        t0, c0 = time.perf_counter(), time.process_time()
        losses[name] = steppers[name].step(batch)
        wall[name], cpu[name] = time.perf_counter() - t0, time.process_time() - c0
    return wall, cpu, losses


def time_rounds(steppers: dict[str, Stepper], batches: list[dict], warmup: int) -> dict:
    """Rounds on the same batch, order rotated; the first ``warmup`` rounds are not kept."""
    names = list(steppers)
    out = {"times": {k: [] for k in names}, "cpu": {k: [] for k in names}, "losses": {k: [] for k in names}}
    for r, batch in enumerate(batches):
        order = names[r % len(names) :] + names[: r % len(names)]
        wall, cpu, losses = run_round(steppers, order, batch)
        for k in names:
            out["losses"][k].append(losses[k])
            if r >= warmup:
                out["times"][k].append(wall[k])
                out["cpu"][k].append(cpu[k])
        print(f"round {r + 1}/{len(batches)} T={batch['input_ids'].shape[1]} "
              + " ".join(f"{k}={wall[k]:.2f}s" for k in names), flush=True)
    return out


def method_flops(kind: str, n: int, config, batch: dict) -> float:
    """FLOPs one step of ``kind`` executes on ``batch`` (counted from the model's shapes)."""
    mask = batch["attention_mask"]
    B, T = mask.shape
    lengths = mask.sum(1).tolist()
    targets = int((batch["labels"] != common.IGNORE).sum())
    if kind == "peft":  # the prompt in every row, every padded position, full logits everywhere
        return common.train_flops(config, B * (n + T), common.causal_pairs([n + T] * B), B * (n + T))
    if kind == "floor":  # the real tokens, no prompt (plain_loss on the padded batch)
        return common.train_flops(config, B * T, common.causal_pairs(lengths), targets)
    tokens = pack(batch["input_ids"], mask, batch["labels"]).ids.numel() if PACK else B * T
    prefix = common.train_flops(config, n, common.causal_pairs([n]), 1)
    return prefix + common.train_flops(config, tokens, common.causal_pairs(lengths, n), targets)


# ---------------------------------------------------------------- peak memory (fresh process each)


def memory_worker(kind: str, n: int | None, quick: bool, threads: int | None, batch: dict, used: str) -> dict:
    """Runs in a fresh spawned process: load, build one method, two steps, report RSS."""
    common.setup_torch(quick, threads=threads)
    model = common.load_lm(quick).model
    stepper = make_stepper(kind, model, initial_prompt(model, n) if n else None, used)
    with common.PeakRss() as rss:
        for _ in range(2):
            stepper.step(batch)
    mib = 1024 * 1024
    return {"peak_rss_growth_mib": (rss.peak - rss.base) / mib, "rss_before_mib": rss.base / mib,
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure_memory(jobs: list[tuple[str, int | None]], quick: bool, threads: int | None,
                   batch: dict, used: str) -> dict[str, dict]:
    """A fresh process per method; with ``--quick`` one reused process (smoke test speed)."""
    out = {}
    fresh = None if quick else 1
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"), max_tasks_per_child=fresh) as pool:
        for kind, n in jobs:
            out[method_key(kind, n)] = pool.submit(memory_worker, kind, n, quick, threads, batch, used).result()
            print(f"memory {method_key(kind, n)}: {out[method_key(kind, n)]}", flush=True)
    return out


def method_key(kind: str, n: int | None) -> str:
    return f"{kind}_n{n}" if n else kind


# ---------------------------------------------------------------- report


def analyse(run: dict, steps_per_epoch: int, flops: dict[str, float], peaks: dict, used: str) -> dict:
    """Per method: step-time summary, epoch estimate, roofline; per N: paired (same-batch) ratios."""
    per_method = {}
    for key, ts in run["times"].items():
        s = common.summary(ts)
        peak = peaks["bf16" if used == "bf16" and not key.startswith("peft") else "fp32"]
        per_method[key] = {"step_s": s, "step_cpu_s": common.summary(run["cpu"][key]), "epoch_s": s["median"] * steps_per_epoch,
                           "roofline": common.roofline(flops[key], sum(ts), peak)}
    ratios = {}
    for n in SIZES:
        p, o, f = (run["times"][k] for k in (f"peft_n{n}", f"softprompt_n{n}", "floor"))
        pc, oc, fc = (run["cpu"][k] for k in (f"peft_n{n}", f"softprompt_n{n}", "floor"))
        ratios[n] = {
            "peft_over_softprompt_paired_median": statistics.median(a / b for a, b in zip(p, o)),
            "peft_over_softprompt_cpu_paired_median": statistics.median(a / b for a, b in zip(pc, oc)),
            "softprompt_over_floor_paired_median": statistics.median(a / b for a, b in zip(o, f)),
            "softprompt_over_floor_cpu_paired_median": statistics.median(a / b for a, b in zip(oc, fc)),
            "loss_max_abs_diff_peft_vs_softprompt": max(
                abs(a - b) for a, b in zip(run["losses"][f"peft_n{n}"], run["losses"][f"softprompt_n{n}"])),
        }
    return {"methods": per_method, "ratios": ratios}


def markdown(res: dict) -> str:
    cfg, m, mem = res["config"], res["analysis"]["methods"], res.get("memory", {})
    rows = [[key, v["step_s"]["median"], v["step_cpu_s"]["median"], v["epoch_s"], v["roofline"]["gflop"] / cfg["measured_rounds"],
             v["roofline"]["achieved_gflops"], v["roofline"]["fraction_of_peak"],
             mem.get(key, {}).get("peak_rss_growth_mib", float("nan"))] for key, v in m.items()]
    table = common.md_table(["method", "median step (s)", "median step CPU (s)", "epoch (s)", "GFLOP / step",
                             "achieved GFLOPS", "fraction of matmul peak", "peak RSS growth (MiB)"], rows)
    ratio_rows = [[n, r["peft_over_softprompt_paired_median"], r["peft_over_softprompt_cpu_paired_median"],
                   f">= {TARGETS['peft_over_softprompt'][n]}", r["softprompt_over_floor_paired_median"],
                   r["softprompt_over_floor_cpu_paired_median"], f"<= {TARGETS['softprompt_over_floor']}",
                   r["loss_max_abs_diff_peft_vs_softprompt"]] for n, r in res["analysis"]["ratios"].items()]
    ratios = common.md_table(["N", "PEFT/softprompt (wall)", "PEFT/softprompt (CPU)", "target",
                              "softprompt/floor (wall)", "softprompt/floor (CPU)", "target", "max |loss diff| over steps"],
                             ratio_rows)
    sanity = common.md_table(["N", "PEFT loss", "softprompt loss", "naive loss", "|loss diff|",
                              "max |grad diff|", "rel grad diff"], [[n, *s.values()] for n, s in res["sanity"].items()])
    mc, p, prec = res["machine"], res["peaks_gflops"], res["precision"]
    return f"""# Training step: HF PEFT vs softprompt vs floor{' (--quick)' if res['quick'] else ''}

Model: {res['model']}. Data: SST-2 train, {res['data']['rows']} rows, batch {cfg['batch_size']},
{res['data']['steps_per_epoch']} steps per epoch, template `{TEMPLATE!r}`, loss on the target
tokens only. AdamW lr {cfg['lr']}, seed {res['seed']}. {cfg['warmup_rounds']} warm-up rounds +
{cfg['measured_rounds']} measured rounds; each round runs one step of every method on the same
batch, order rotated. Measured batch lengths T: {res['data']['measured_T']}.

Machine: {mc['cpu']}, {mc['cores']} cores, {mc['torch_threads']} torch threads; bf16 native: {mc['cpu_bf16_native']}
({mc['cpu_bf16_detail']}); load average {mc['loadavg_at_start']} at start, {mc.get('loadavg_after_timing')} after.
Measured matmul peak ({p['threads']} threads): fp32 {p['fp32']:.0f} GFLOPS, bf16 {p['bf16']:.0f} GFLOPS.
softprompt's precision: **{prec['used']}** (auto: {prec['reason']}); packing {'on' if cfg['pack'] else 'off'}.
PEFT runs in fp32 (its default); the floor runs in softprompt's precision.

{table}
{ratios}
Ratios are medians over rounds of the per-round ratio (same batch for both methods), from wall
time and from process CPU time (one method runs at a time, so a busy machine stretches wall time
but adds no CPU seconds to ours). FLOPs are counted from the model's shapes
(`common.train_flops`): PEFT computes the prompt in every row and full logits at every padded
position; softprompt the prompt once and its rows' tokens (packed), logits at targets only; the
floor the real rows with no prompt. The fraction of peak is against the matmul peak of the
precision the method runs in.

**Peak memory**: each method again in a fresh `spawn` subprocess; RSS sampled every 0.5 ms
during two optimiser steps on the longest batch (T={res['data']['longest_T']}); peak minus the RSS before.

**Sanity check at step 0** (PEFT's prompt set to ours, same first batch, both in fp32):

{sanity}"""


def build_steppers(lm, prompts: dict[int, torch.Tensor], used: str) -> dict[str, Stepper]:
    steppers: dict[str, Stepper] = {}
    for n in SIZES:
        steppers[f"peft_n{n}"] = PeftStepper(common.separate_copy(lm.model), prompts[n])
        steppers[f"softprompt_n{n}"] = SoftpromptStepper(lm.model, prompts[n], used)
    steppers["floor"] = FloorStepper(lm.model, used)
    return steppers


def run(quick: bool, warmup: int, measured: int, memory: bool, threads: int | None = None,
        requested: str = "auto") -> dict:
    from softprompt import precision

    common.setup_torch(quick, threads=threads)
    machine, peaks = common.machine_info(), common.matmul_peaks()
    lm = common.load_lm(quick)
    prec = precision.resolve(requested, torch.device("cpu"), lm.model.dtype)
    examples = sst2_examples(lm.tokenizer, quick)
    order = common.bucketed_batches(examples, BATCH_SIZE)
    pad = lm.tokenizer.pad_token_id
    batches = [common.collate([examples[i] for i in idx], pad) for idx in order[: warmup + measured]]
    longest = common.collate([examples[i] for i in max(order, key=lambda b: max(len(examples[i][0]) for i in b))], pad)
    steppers = build_steppers(lm, {n: initial_prompt(lm.model, n) for n in SIZES}, prec["used"])
    sanity = {n: sanity_check(steppers[f"peft_n{n}"], steppers[f"softprompt_n{n}"], lm.model, batches[0]) for n in SIZES}
    print(f"sanity: {sanity}", flush=True)
    timing = time_rounds(steppers, batches, warmup)
    machine["loadavg_after_timing"] = os.getloadavg()
    flops = {key: sum(method_flops(key.split("_n")[0], int(key.split("_n")[1]) if "_n" in key else 0, lm.model.config, b)
                      for b in batches[warmup:]) for key in steppers}
    steps_per_epoch = math.ceil(len(examples) / BATCH_SIZE)
    res = {
        "benchmark": "train_step", "quick": quick, "seed": common.SEED, "model": lm.name,
        "machine": machine, "peaks_gflops": peaks, "precision": prec,
        "config": {"batch_size": BATCH_SIZE, "max_length": MAX_LENGTH, "lr": LR, "sizes": list(SIZES), "pack": PACK,
                   "warmup_rounds": warmup, "measured_rounds": measured, "optimizer": "AdamW"},
        "data": {"rows": len(examples), "steps_per_epoch": steps_per_epoch,
                 "measured_T": [b["input_ids"].shape[1] for b in batches[warmup:]],
                 "longest_T": longest["input_ids"].shape[1]},
        "sanity": sanity, "targets": TARGETS, "raw": timing,
        "analysis": analyse(timing, steps_per_epoch, flops, peaks, prec["used"]),
    }
    if memory:
        res["memory"] = measure_memory([(k, n) for n in SIZES for k in ("peft", "softprompt")] + [("floor", None)],
                                       quick, threads, longest, prec["used"])
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random Llama, few steps (smoke test)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 3; 1 with --quick)")
    ap.add_argument("--steps", type=int, default=None, help="measured rounds (default 20; 3 with --quick)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 2; 1 with --quick)")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                    help="softprompt's and the floor's precision (default auto, as training)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default benchmarks/results; a temp folder with --quick)")
    a = ap.parse_args(argv)
    warmup = a.warmup if a.warmup is not None else (1 if a.quick else 3)
    steps = a.steps if a.steps is not None else (3 if a.quick else 20)
    res = run(a.quick, warmup, steps, not a.no_memory, a.threads, a.precision)
    name = "train_step_quick" if a.quick else "train_step"
    js, md = common.write_results(name, res, markdown(res), common.out_dir(a.out, a.quick))
    print(f"wrote {js} and {md}")
    return res


if __name__ == "__main__":
    main()
