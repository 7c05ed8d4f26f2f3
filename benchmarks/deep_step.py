"""Per-step training cost of a deep prompt against a shallow prompt at the same N, and against
PEFT's prefix tuning (the anchor for the deep path).

SST-2 (``<label> <sentence>`` lines), template ``"Review: {text}\\nSentiment:"``, target
``" negative"``/``" positive"``, loss on the target tokens only, batch 16, length-bucketed
batches. Each method: one AdamW step (forward, backward, update) on its trainable tensor:

* ``shallow``: an (N, H) prompt through ``forward.prompt_loss`` (the shared-prefix fast path:
  one prefix pass over P, then the rows; target-only logits);
* ``deep``: an (L, 2, kv, N, d) deep prompt through ``forward.prompt_loss`` (``forward.deep``:
  the keys/values are the prefix, no prefix pass; target-only logits);
* ``peft_prefix``: PEFT's ``PrefixTuningConfig`` model on a separate copy, ``peft_model(**batch).loss``
  (full-vocabulary logits at every position). Its loss is checked against ``deep``'s on the
  first batch.

Timing: rounds of one step per method on the same batch, order rotated each round, the first
rounds are warm-up; medians and the ratio deep / shallow (target <= 1.1).

    python benchmarks/deep_step.py            # default model, ~5 min on 2 cores
    python benchmarks/deep_step.py --quick    # tiny random Llama, seconds, results not written
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402
from train_step import sst2_examples  # noqa: E402  (the same SST-2 examples as train_step.py)

from softprompt import store  # noqa: E402
from softprompt.forward import prompt_loss  # noqa: E402
from softprompt.prompt import init_random, make_deep_prompt  # noqa: E402

BATCH_SIZE, LR = 16, 5e-3
SIZES = (20, 100)
TARGET = 1.1  # deep over shallow


class Stepper:
    """One AdamW step of a loss over one trainable tensor."""

    def __init__(self, tensor: torch.Tensor, loss):
        self.p = torch.nn.Parameter(tensor.clone())
        self.opt = torch.optim.AdamW([self.p], lr=LR)
        self.loss = loss

    def step(self, batch: dict) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(self.p, batch)
        loss.backward()
        self.opt.step()
        return float(loss)


def peft_stepper(lm, deep: torch.Tensor) -> Stepper:
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    pm = get_peft_model(common.separate_copy(lm.model), PrefixTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                                           num_virtual_tokens=deep.shape[3]))
    weight = pm.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        weight.copy_(store.deep_to_peft(deep))
    s = Stepper(weight.detach(), None)
    s.p, s.opt = weight, torch.optim.AdamW([weight], lr=LR)
    s.loss = lambda _p, b: pm(**b).loss
    return s


def steppers(lm) -> dict[str, Stepper]:
    gen = torch.Generator().manual_seed(common.SEED)
    out = {}
    for n in SIZES:
        deep = make_deep_prompt(lm.model, lm.tokenizer, n, "random", seed=common.SEED)
        out[f"shallow N={n}"] = Stepper(init_random(lm.model, n, gen), lambda p, b: prompt_loss(lm.model, p, b))
        out[f"deep N={n}"] = Stepper(deep, lambda p, b: prompt_loss(lm.model, p, b))
        out[f"peft_prefix N={n}"] = peft_stepper(lm, deep)
    return out


def batches(lm, quick: bool) -> list[dict]:
    exs = sst2_examples(lm.tokenizer, quick)
    pad = lm.tokenizer.pad_token_id
    return [common.collate([exs[i] for i in b], pad) for b in common.bucketed_batches(exs, BATCH_SIZE)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model; results are not written")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up rounds (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=12, help="measured rounds (default %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: common.setup_torch's)")
    a = ap.parse_args()
    common.setup_torch(a.quick)
    if a.threads:
        torch.set_num_threads(a.threads)
    lm = common.load_lm(a.quick)
    info = common.machine_info()
    steps = steppers(lm)
    data = batches(lm, a.quick)
    check = {n: abs(steps[f"deep N={n}"].loss(steps[f"deep N={n}"].p, data[0]).item()
                    - steps[f"peft_prefix N={n}"].loss(None, data[0]).item()) for n in SIZES}
    print("deep vs PEFT loss on the first batch, |diff|:", check, flush=True)
    names = list(steps)
    times: dict[str, list[float]] = {m: [] for m in names}
    for r in range(a.warmup + a.rounds):
        batch = data[(r * 7) % len(data)]  # spread over lengths; every method gets the same batch
        for m in names[r % len(names) :] + names[: r % len(names)]:
            t = time.perf_counter()
            steps[m].step(batch)
            if r >= a.warmup:
                times[m].append(time.perf_counter() - t)
        print(f"round {r}", {m: round(v[-1], 3) for m, v in times.items() if v}, flush=True)
    report(a, info, lm, times, check)


def report(a, info, lm, times: dict, check: dict) -> None:
    med = {m: common.summary(v) for m, v in times.items()}
    ratios = {n: {"deep_over_shallow": med[f"deep N={n}"]["median"] / med[f"shallow N={n}"]["median"],
                  "peft_prefix_over_deep": med[f"peft_prefix N={n}"]["median"] / med[f"deep N={n}"]["median"]}
              for n in SIZES}
    met = all(r["deep_over_shallow"] <= TARGET for r in ratios.values())
    payload = {"benchmark": "deep_step", "model": lm.name, "seed": common.SEED, "machine": info,
               "loadavg_at_end": os.getloadavg(),
               "setup": {"batch_size": BATCH_SIZE, "sizes": SIZES, "warmup": a.warmup, "rounds": a.rounds, "lr": LR},
               "seconds": med, "ratios": ratios, "target_deep_over_shallow": TARGET, "target_met": met,
               "deep_vs_peft_first_batch_loss_abs_diff": check}
    rows = [[m, s["median"], s["median"] / med[f"shallow N={m.split('N=')[1]}"]["median"]] for m, s in med.items()]
    md = (f"# deep_step\n\nOne AdamW training step (SST-2, batch {BATCH_SIZE}, target-only loss), model `{lm.name}`, "
          f"{info['torch_threads']} thread(s) on {info['cpu']}; medians of {a.rounds} rounds after {a.warmup} "
          "warm-up, methods interleaved on the same batches.\n\n"
          + common.md_table(["method", "seconds / step (median)", "x shallow, same N"], rows)
          + f"\nTarget: deep / shallow <= {TARGET} at the same N: {'met' if met else 'missed'} ("
          + ", ".join(f"N={n}: {r['deep_over_shallow']:.2f}" for n, r in ratios.items()) + "). "
          + "PEFT prefix tuning over ours: "
          + ", ".join(f"N={n}: {r['peft_prefix_over_deep']:.2f}x" for n, r in ratios.items())
          + ". Loss of our deep path vs PEFT's on the first batch: |diff| "
          + ", ".join(f"{v:.1e}" for v in check.values()) + ".\n"
          + "\n" + common.load_note(info, "methods"))
    print(md)
    if not a.quick:
        print("wrote", *common.write_results("deep_step", payload, md))


if __name__ == "__main__":
    main()
