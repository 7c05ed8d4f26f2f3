"""Per-step training cost of prompt tuning: HF PEFT vs softprompt vs the no-prompt floor.

SST-2 (``<label> <sentence>`` lines), template ``"Review: {text}\\nSentiment:"``, target
``" negative"``/``" positive"``, loss only on the target tokens, batch 16, length-bucketed
batches shared by every method. Methods, each with AdamW on an (N, H) prompt:

* ``peft``: ``get_peft_model(PromptTuningConfig(CAUSAL_LM, RANDOM))`` on a separate copy of the
  model, forward ``peft_model(input_ids, attention_mask, labels).loss`` (prompt concatenated to
  every row, full-vocabulary logits at every position);
* ``softprompt``: ``softprompt.forward.prefix_loss`` (shared batch-1 prefix, target-only logits);
* ``floor``: ``plain_loss`` on the real tokens only, no prompt, with the input embeddings made to
  require grad so that backward runs through the whole network as it does in prompt tuning.

Timing: in one process, rounds of one step per method on the same batch, method order rotated
each round; the first rounds are warm-up. Per-epoch time = steps per epoch x median step time.
Peak memory: each method again in a fresh ``spawn`` subprocess (model loaded there alone);
a thread samples the resident set size (``/proc/self/statm``) every 0.5 ms during two steps on
the longest batch of the epoch; we report the peak minus the RSS just before those steps.

    python benchmarks/train_step.py            # ~10 min on 2 cores, writes results/train_step.*
    python benchmarks/train_step.py --quick    # tiny random Llama, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import resource
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402

from softprompt.forward import naive_loss, plain_loss, prefix_loss  # noqa: E402

TEMPLATE = "Review: {text}\nSentiment:"
VERBALIZER = {"0": " negative", "1": " positive"}
BATCH_SIZE, MAX_LENGTH, LR = 16, 128, 5e-3
SIZES = (20, 100)
TARGETS = {"peft_over_softprompt": {20: 3.0, 100: 5.0}, "softprompt_over_floor": 1.15}


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
    def __init__(self, model: torch.nn.Module, prompt: torch.Tensor):
        self.model = model
        self.prompt = torch.nn.Parameter(prompt.clone())
        super().__init__([self.prompt])

    def loss(self, batch: dict) -> torch.Tensor:
        return prefix_loss(self.model, self.prompt, **batch)


class FloorStepper(Stepper):
    """The frozen model on the real tokens, backward through every layer; nothing to update."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        super().__init__([])

    def loss(self, batch: dict) -> torch.Tensor:
        with embeddings_require_grad(self.model):
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


def make_stepper(kind: str, model: torch.nn.Module, prompt: torch.Tensor | None) -> Stepper:
    if kind == "peft":
        return PeftStepper(model, prompt)
    if kind == "softprompt":
        return SoftpromptStepper(model, prompt)
    return FloorStepper(model)


def initial_prompt(model: torch.nn.Module, n: int) -> torch.Tensor:
    from softprompt.prompt import init_random

    return init_random(model, n, torch.Generator().manual_seed(common.SEED + n))


# ---------------------------------------------------------------- checks and timing


def sanity_check(peft: PeftStepper, ours: SoftpromptStepper, model, batch: dict) -> dict:
    """Same prompt values, same batch: PEFT's loss and gradient vs ours (and the naive concat)."""
    lp, lo = peft.backward(batch), ours.backward(batch)
    gp, go = peft.weight.grad, ours.prompt.grad
    with torch.no_grad():
        ln = naive_loss(model, ours.prompt, **batch).item()
    peft.weight.grad, ours.prompt.grad = None, None
    return {"peft_loss": lp, "softprompt_loss": lo, "naive_loss": ln, "loss_abs_diff": abs(lp - lo),
            "grad_max_abs_diff": (gp - go).abs().max().item(),
            "grad_rel_diff": ((gp - go).norm() / gp.norm()).item()}


def run_round(steppers: dict[str, Stepper], order: list[str], batch: dict) -> tuple[dict, dict, float]:
    """One step of each method in ``order``: (seconds, losses, other processes' load in cores)."""
    times, losses = {}, {}
    with common.Meter() as meter:
        for name in order:
            t0 = time.perf_counter()
            losses[name] = steppers[name].step(batch)
            times[name] = time.perf_counter() - t0
    return times, losses, meter.foreign_cores


def time_rounds(steppers: dict[str, Stepper], batches: list[dict], warmup: int, gate: common.QuietGate) -> dict:
    """Rounds on the same batch, order rotated; a measured round run under load is redone."""
    names = list(steppers)
    out = {"times": {k: [] for k in names}, "losses": {k: [] for k in names}, "foreign_cores": []}
    for r, batch in enumerate(batches):
        order = names[r % len(names) :] + names[: r % len(names)]
        for attempt in range(gate.retries + 1):
            if r >= warmup:
                gate.wait()
            times, losses, foreign = run_round(steppers, order, batch)
            for k in names:
                out["losses"][k].append(losses[k])
            if r < warmup or gate.accept(foreign, attempt):
                break
        if r >= warmup:
            out["foreign_cores"].append(foreign)
            for k in names:
                out["times"][k].append(times[k])
        print(f"round {r + 1}/{len(batches)} T={batch['input_ids'].shape[1]} load={foreign:.2f} "
              + " ".join(f"{k}={times[k]:.2f}s" for k in names), flush=True)
    return out


# ---------------------------------------------------------------- peak memory (fresh process each)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class PeakRss:
    """Samples RSS in a thread (torch ops release the GIL) and keeps the maximum."""

    def __init__(self, interval_s: float = 0.0005):
        self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRss:
        self.base = rss_bytes()
        self.peak = self.base
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def memory_worker(kind: str, n: int | None, quick: bool, threads: int | None, batch: dict) -> dict:
    """Runs in a fresh spawned process: load, build one method, two steps, report RSS."""
    common.setup_torch(quick, threads=threads)
    model = common.load_lm(quick).model
    stepper = make_stepper(kind, model, initial_prompt(model, n) if n else None)
    with PeakRss() as rss:
        for _ in range(2):
            stepper.step(batch)
    mib = 1024 * 1024
    return {"peak_rss_growth_mib": (rss.peak - rss.base) / mib, "rss_before_mib": rss.base / mib,
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure_memory(jobs: list[tuple[str, int | None]], quick: bool, threads: int | None,
                   batch: dict) -> dict[str, dict]:
    """A fresh process per method; with ``--quick`` one reused process (smoke test speed)."""
    out = {}
    fresh = None if quick else 1
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"), max_tasks_per_child=fresh) as pool:
        for kind, n in jobs:
            out[method_key(kind, n)] = pool.submit(memory_worker, kind, n, quick, threads, batch).result()
            print(f"memory {method_key(kind, n)}: {out[method_key(kind, n)]}", flush=True)
    return out


def method_key(kind: str, n: int | None) -> str:
    return f"{kind}_n{n}" if n else kind


# ---------------------------------------------------------------- report


def analyse(run: dict, steps_per_epoch: int) -> dict:
    """Per method: step-time summary and epoch estimate; per N: paired (same-batch) ratios."""
    per_method = {}
    for key, ts in run["times"].items():
        s = common.summary(ts)
        per_method[key] = {"step_s": s, "epoch_s": s["median"] * steps_per_epoch,
                           "epoch_s_from_mean": s["mean"] * steps_per_epoch}
    ratios = {}
    for n in SIZES:
        p, o, f = (run["times"][k] for k in (f"peft_n{n}", f"softprompt_n{n}", "floor"))
        ratios[n] = {
            "peft_over_softprompt": per_method[f"peft_n{n}"]["epoch_s"] / per_method[f"softprompt_n{n}"]["epoch_s"],
            "peft_over_softprompt_paired_median": common.summary([a / b for a, b in zip(p, o)])["median"],
            "softprompt_over_floor": per_method[f"softprompt_n{n}"]["epoch_s"] / per_method["floor"]["epoch_s"],
            "softprompt_over_floor_paired_median": common.summary([a / b for a, b in zip(o, f)])["median"],
            "loss_max_abs_diff_peft_vs_softprompt": max(
                abs(a - b) for a, b in zip(run["losses"][f"peft_n{n}"], run["losses"][f"softprompt_n{n}"])),
        }
    return {"methods": per_method, "ratios": ratios}


def markdown(res: dict) -> str:
    cfg, m, mem = res["config"], res["analysis"]["methods"], res.get("memory", {})
    rows = []
    for key in [f"{k}_n{n}" for n in SIZES for k in ("peft", "softprompt")] + ["floor"]:
        s = m[key]["step_s"]
        rows.append([key, s["median"], s["mean"], m[key]["epoch_s"],
                     mem.get(key, {}).get("peak_rss_growth_mib", float("nan"))])
    table = common.md_table(["method", "median step (s)", "mean step (s)", "epoch (s, median x steps)",
                             "peak RSS growth (MiB)"], rows)
    ratio_rows = [[n, r["peft_over_softprompt"], r["peft_over_softprompt_paired_median"],
                   f">= {TARGETS['peft_over_softprompt'][n]}", r["softprompt_over_floor"],
                   r["softprompt_over_floor_paired_median"], f"<= {TARGETS['softprompt_over_floor']}",
                   r["loss_max_abs_diff_peft_vs_softprompt"]]
                  for n, r in res["analysis"]["ratios"].items()]
    ratios = common.md_table(["N", "PEFT/softprompt (epoch)", "PEFT/softprompt (paired median)", "target",
                              "softprompt/floor (epoch)", "softprompt/floor (paired median)", "target",
                              "max |loss diff| over steps"], ratio_rows)
    sanity = common.md_table(["N", "PEFT loss", "softprompt loss", "naive loss", "|loss diff|",
                              "max |grad diff|", "rel grad diff"],
                             [[n, *s.values()] for n, s in res["sanity"].items()])
    mach = ", ".join(f"{k} {v}" for k, v in res["machine"].items())
    return f"""# Training step: HF PEFT vs softprompt vs floor{' (--quick)' if res['quick'] else ''}

Model: {res['model']}. Data: SST-2 train, {res['data']['rows']} rows, batch {cfg['batch_size']},
{res['data']['steps_per_epoch']} steps per epoch, template `{TEMPLATE!r}`, loss on the target
tokens only. AdamW lr {cfg['lr']}, seed {res['seed']}. {cfg['warmup_rounds']} warm-up rounds +
{cfg['measured_rounds']} measured rounds; each round runs one step of every method on the same
batch, order rotated. Measured batch lengths T: {res['data']['measured_T']}.

Machine: {mach}.

{table}
{ratios}
Rounds start only once other processes use < {common.QUIET_CORES} core (from `/proc/stat`); a measured
round during which they loaded the machine is redone (quiet gate: {res['machine'].get('quiet_gate')};
max other-process load in the kept rounds: {res['machine'].get('max_foreign_cores_in_kept_rounds', 0):.2f} cores).
Epoch time = steps per epoch x median step time. "Paired median" = median over rounds of the
per-round ratio (same batch for both methods), which cancels batch-length differences.

**Peak memory**: each method is run again in a fresh `spawn` subprocess that loads the model
alone (PEFT wraps it there, no copy); a thread samples the process RSS from `/proc/self/statm`
every 0.5 ms during two optimiser steps on the longest batch of the epoch (T={res['data']['longest_T']});
reported is peak RSS minus the RSS just before the steps (activations, logits, autograd buffers,
gradients, optimiser state). Allocator caching makes this an upper-bound-ish measure, the same
for all methods.

**Sanity check at step 0** (PEFT's prompt embedding weight set to our prompt, same first batch):

{sanity}"""


# ---------------------------------------------------------------- main


def build_steppers(lm, prompts: dict[int, torch.Tensor]) -> dict[str, Stepper]:
    steppers: dict[str, Stepper] = {}
    for n in SIZES:
        steppers[f"peft_n{n}"] = PeftStepper(common.separate_copy(lm.model), prompts[n])
        steppers[f"softprompt_n{n}"] = SoftpromptStepper(lm.model, prompts[n])
    steppers["floor"] = FloorStepper(lm.model)
    return steppers


def run(quick: bool, warmup: int, measured: int, memory: bool, threads: int | None = None,
        max_wait_s: float = 0.0) -> dict:
    common.setup_torch(quick, threads=threads)
    machine = common.machine_info()
    lm = common.load_lm(quick)
    examples = sst2_examples(lm.tokenizer, quick)
    order = common.bucketed_batches(examples, BATCH_SIZE)
    pad = lm.tokenizer.pad_token_id
    batches = [common.collate([examples[i] for i in idx], pad) for idx in order[: warmup + measured]]
    longest = common.collate([examples[i] for i in max(order, key=lambda b: max(len(examples[i][0]) for i in b))], pad)
    steppers = build_steppers(lm, {n: initial_prompt(lm.model, n) for n in SIZES})
    sanity = {n: sanity_check(steppers[f"peft_n{n}"], steppers[f"softprompt_n{n}"], lm.model, batches[0]) for n in SIZES}
    print(f"sanity: {sanity}", flush=True)
    gate = common.QuietGate(max_wait_s)
    with common.Meter() as meter:
        timing = time_rounds(steppers, batches, warmup, gate)
    machine.update(cpu_utilisation_during_timing=meter.utilisation, quiet_gate=gate.report(),
                   max_foreign_cores_in_kept_rounds=max(timing["foreign_cores"]))
    machine["loadavg_after_timing"] = os.getloadavg()
    res = {
        "benchmark": "train_step", "quick": quick, "seed": common.SEED, "model": lm.name,
        "machine": machine,
        "config": {"batch_size": BATCH_SIZE, "max_length": MAX_LENGTH, "lr": LR, "sizes": list(SIZES),
                   "warmup_rounds": warmup, "measured_rounds": measured, "optimizer": "AdamW"},
        "data": {"rows": len(examples), "steps_per_epoch": math.ceil(len(examples) / BATCH_SIZE),
                 "measured_T": [b["input_ids"].shape[1] for b in batches[warmup:]],
                 "longest_T": longest["input_ids"].shape[1]},
        "sanity": sanity, "targets": TARGETS, "raw": timing,
        "analysis": analyse(timing, math.ceil(len(examples) / BATCH_SIZE)),
    }
    if memory:
        res["memory"] = measure_memory([(k, n) for n in SIZES for k in ("peft", "softprompt")] + [("floor", None)],
                                       quick, threads, longest)
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random Llama, few steps (smoke test)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 3; 1 with --quick)")
    ap.add_argument("--steps", type=int, default=None, help="measured rounds (default 20; 3 with --quick)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 2; 1 with --quick)")
    ap.add_argument("--max-wait", type=float, default=None,
                    help="seconds in all to wait for other processes to go quiet (default 3600; 0 with --quick)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default benchmarks/results; a temp folder with --quick)")
    a = ap.parse_args(argv)
    warmup = a.warmup if a.warmup is not None else (1 if a.quick else 3)
    steps = a.steps if a.steps is not None else (3 if a.quick else 20)
    max_wait = a.max_wait if a.max_wait is not None else (0.0 if a.quick else 3600.0)
    res = run(a.quick, warmup, steps, not a.no_memory, a.threads, max_wait)
    name = "train_step_quick" if a.quick else "train_step"
    js, md = common.write_results(name, res, markdown(res), common.out_dir(a.out, a.quick))
    print(f"wrote {js} and {md}")
    return res


if __name__ == "__main__":
    main()
