"""Does bf16 autocast train prompts as well as fp32? Same runs in both precisions, scored in fp32.

Two set-ups on the default model, each trained twice from the same initial prompt over the same
batches (same seed), once with ``--precision fp32`` and once with ``bf16`` (autocast, fp32
master prompt and AdamW state); both trained prompts are then scored by the same fp32 method:

* **SST-2** (classification, loss on the label word): N=20, random init, lr 0.03, batch 8,
  ``--steps`` optimiser steps on the training pool; accuracy on the whole test set (1,821 rows)
  and the dev loss;
* **walk-through** (language modelling on every token): the first 50 rows of the bundled
  awesome-chatgpt-prompts CSV, N=4, random init, lr 5e-3, 5 epochs of batch 8; the mean loss
  over the same rows afterwards (the walk-through has no held-out split).

Also reported: each run's training CPU seconds (the two precisions one after another, so the
CPU-time ratio is the figure to read), and the cosine between the bf16 and the fp32 gradient of
the initial prompt on the first batch. Acceptance (issue: speed toward the machine's limit):
``auto`` picks bf16 only if the final loss and accuracy are unchanged within noise.

    python benchmarks/precision_quality.py            # about 15 min on 2 idle cores
    python benchmarks/precision_quality.py --quick    # tiny random model, seconds, not written
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402

from softprompt import data as D  # noqa: E402
from softprompt import recipes  # noqa: E402
from softprompt.config import DataConfig, PromptConfig, TrainConfig  # noqa: E402
from softprompt.splits import load_splits  # noqa: E402
from softprompt.training import tune as TR  # noqa: E402
from softprompt.training.loop import eval_loss, fit  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def setups(lm, quick: bool, steps: int, names: set[str]) -> dict[str, dict]:
    """name -> data (train / score examples), configs, for the ``names`` asked for: SST-2 and the
    walk-through's LM rows."""
    out = {}
    if not quick and "sst2" in names:
        root = common.data_root()
        data_cfg = recipes.resolve(DataConfig(), "sst2", root, test=("test",), need_test=True)
        splits = load_splits(lm.tokenizer, data_cfg, common.SEED)
        train, dev, test = splits.train, splits.dev, splits.test
        out["sst2"] = {"train": train, "dev": dev[:200], "test": test, "data_cfg": data_cfg,
                       "pcfg": PromptConfig(num_virtual_tokens=20, init="random"),
                       "tcfg": TrainConfig(lr=0.03, steps=steps, batch_size=8, patience=None, seed=common.SEED)}
    if "walkthrough" not in names:
        return out
    csv = Path(__import__("softprompt").__file__).parent / "assets" / "awesome-chatgpt-prompts.csv"
    lm_cfg = DataConfig(path=str(csv), text_column="prompt", limit=8 if quick else 50, max_length=256,
                        dev_fraction=0.0)
    rows = load_splits(lm.tokenizer, lm_cfg, common.SEED).train
    out["walkthrough"] = {"train": rows, "dev": rows, "test": None, "data_cfg": lm_cfg,
                          "pcfg": PromptConfig(num_virtual_tokens=4, init="random"),
                          "tcfg": TrainConfig(lr=5e-3, epochs=1 if quick else 5, batch_size=8, patience=None,
                                              seed=common.SEED)}
    return out


def gradient_cosine(lm, init: torch.Tensor, s: dict, pad: int) -> float:
    """cos(bf16 gradient, fp32 gradient) of the initial prompt on the first training batch."""
    batch = D.collate(s["train"][:8], pad)
    grads = []
    for prec in PRECISIONS:
        m = TR.prompt_method(lm, init, s["pcfg"], True, common.SEED, used=prec)
        m.loss(batch).backward()
        grads.append(m.prompt.grad.flatten())
    return float(torch.nn.functional.cosine_similarity(grads[0], grads[1], 0))


def run(lm, name: str, s: dict, pad: int, seed: int) -> dict:
    init = TR.initial_prompt(lm, s["pcfg"], s["data_cfg"], seed)
    out = {"gradient_cosine_bf16_fp32_at_init": gradient_cosine(lm, init, s, pad)}
    for prec in PRECISIONS:
        cfg = replace(s["tcfg"], precision=prec, seed=seed)
        m = TR.prompt_method(lm, init, s["pcfg"], True, common.SEED, used=prec)
        res = fit(m, s["train"], cfg, pad, None, progress=False)
        scorer = TR.prompt_method(lm, m.current().detach(), s["pcfg"], True, common.SEED, used="fp32")
        row = {"train_cpu_s": res.train_cpu_s, "train_wall_s": res.train_time_s, "steps": len(res.history),
               "final_train_loss": res.final_train_loss,
               "score_loss_fp32": eval_loss(scorer, s["dev"], pad, cfg.eval_max_batch_rows)}
        if s["test"] is not None:
            ev = TR.make_evaluator(scorer, lm.tokenizer, s["test"], s["data_cfg"], cfg, pad)
            row["test_accuracy"] = ev()["accuracy"]
        out[prec] = row
        print(name, prec, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model; results not written")
    ap.add_argument("--steps", type=int, default=200, help="SST-2 optimiser steps (default %(default)s)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--seed", type=int, default=common.SEED, help="init and batch-order seed (default %(default)s)")
    ap.add_argument("--setups", default=None, help="comma-separated subset: sst2, walkthrough (default both)")
    ap.add_argument("--tag", default="", help="suffix of the results files (precision_quality<tag>.*)")
    ap.add_argument("--report", type=Path, default=None, help="re-render the Markdown from a results JSON")
    a = ap.parse_args()
    if a.report:
        import json

        done = json.loads(a.report.read_text())
        a.steps, a.out, a.seed = done.get("steps", a.steps), a.report.parent, done.get("seed", a.seed)
        a.tag = a.report.stem.removeprefix("precision_quality")
        return report(a, done["machine"], done["model"], done["results"], done["total_seconds"])
    common.setup_torch(a.quick)
    lm = common.load_lm(a.quick)
    info = common.machine_info()
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    t0 = time.perf_counter()
    names = set(a.setups.split(",")) if a.setups else {"sst2", "walkthrough"}
    results = {name: run(lm, name, s, pad, a.seed) for name, s in setups(lm, a.quick, a.steps, names).items()}
    info["loadavg_at_end"] = os.getloadavg()
    report(a, info, lm.name, results, time.perf_counter() - t0)


def report(a, info, model: str, results: dict, total: float) -> None:
    rows, verdicts = [], []
    for name, r in results.items():
        f, b = r["fp32"], r["bf16"]
        loss_diff = b["score_loss_fp32"] - f["score_loss_fp32"]
        acc_diff = (b["test_accuracy"] - f["test_accuracy"]) if "test_accuracy" in f else None
        n_test = r.get("n_test") or 1821
        # standard error of a difference of two accuracies on n rows, as if independent (they are
        # paired on the same rows, so this is on the safe side)
        se = math.sqrt(sum(x["test_accuracy"] * (1 - x["test_accuracy"]) for x in (f, b)) / n_test) if acc_diff is not None else None
        rows.append([name, f["score_loss_fp32"], b["score_loss_fp32"], loss_diff,
                     "-" if acc_diff is None else f"{f['test_accuracy']:.2%}",
                     "-" if acc_diff is None else f"{b['test_accuracy']:.2%}",
                     f["train_cpu_s"] / b["train_cpu_s"], r["gradient_cosine_bf16_fp32_at_init"]])
        r["loss_diff_bf16_minus_fp32"], r["accuracy_diff_bf16_minus_fp32"] = loss_diff, acc_diff
        ok = abs(loss_diff) <= 0.02 and (acc_diff is None or abs(acc_diff) <= 2 * se)
        r["unchanged_within_noise"] = ok
        verdicts.append(ok)
    payload = {"benchmark": "precision_quality", "model": model, "seed": a.seed, "machine": info, "steps": a.steps,
               "results": results, "total_seconds": total, "bf16_quality_unchanged": all(verdicts),
               "criteria": {"loss": "|bf16 - fp32| <= 0.02 on the scoring rows",
                            "accuracy": "|bf16 - fp32| <= 2 standard errors of a difference of two accuracies"}}
    md = (f"# precision_quality\n\nThe same prompt trained twice from the same initial prompt over the same batches, "
          f"with `--precision fp32` and with `bf16` (autocast; fp32 master prompt and optimiser state), then scored "
          f"by one fp32 method. Model `{model}`, {info['torch_threads']} threads on {info['cpu']} (bf16 native: "
          f"{info['cpu_bf16_native']}). SST-2: N=20, random init, lr 0.03, {a.steps} steps of batch 8, whole test set, "
          "loss on 200 dev rows; walk-through: N=4, random init, lr 5e-3, 5 epochs, loss on its 50 rows. "
          f"Seed {a.seed} (init and batch order).\n\n"
          + common.md_table(["set-up", "fp32: loss", "bf16: loss", "bf16 - fp32", "fp32: test acc.", "bf16: test acc.",
                             "training CPU time fp32 / bf16", "gradient cosine at init (bf16, fp32)"], rows)
          + f"\nbf16 leaves the trained prompt's quality unchanged within noise (loss within 0.02, accuracy within two "
          f"standard errors): **{'yes' if all(verdicts) else 'no'}**. The gradient cosine is the first batch's, "
          "from the initial prompt: a single gradient can differ widely between precisions where the loss surface "
          "is rough at the init; the trained results are what count.\n"
          + f"\nWhole run: {total:.0f} s, set-ups and precisions one after another; load average (1 min) at start "
          f"{info['loadavg_at_start'][0]:.1f}, at end "
          + (f"{info['loadavg_at_end'][0]:.1f}.\n" if info.get("loadavg_at_end") else "not recorded.\n"))
    print(md)
    if not a.quick:
        print("wrote", *common.write_results(f"precision_quality{a.tag}", payload, md, a.out or common.RESULTS))


if __name__ == "__main__":
    main()
