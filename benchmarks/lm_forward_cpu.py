"""Language-modelling step cost, prefix path vs naive concat, on the SAME batches.

Single torch thread and process CPU time, so the figure holds on a shared machine. Isolates the
forward/backward of the walk-through (4 virtual tokens, every token a target) from batching and
Trainer overheads: in this mode every position needs vocabulary logits, so the shared prefix
saves only the N=4 virtual tokens per row.

    python benchmarks/lm_forward_cpu.py [--batches 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, md_table, write_results  # noqa: E402

from softprompt import data as D  # noqa: E402
from softprompt import forward as fw  # noqa: E402
from softprompt import models  # noqa: E402
from softprompt.cli.quickstart import walkthrough_data  # noqa: E402


def step_cpu(fn, model, prompt, batch) -> float:
    t = time.process_time()
    fn(model, prompt, **batch).backward()
    prompt.grad = None
    return time.process_time() - t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lm = models.load()
    cfg = walkthrough_data()
    ex = D.load_file(lm.tokenizer, cfg, cfg.path, cfg.limit)
    prompt = torch.nn.Parameter(torch.randn(4, lm.hidden_size) * 0.1)
    rows, tot = [], {"prefix": 0.0, "naive": 0.0}
    for idx in D.bucketed_batches(ex, 8, 0, 0)[: args.batches]:
        batch = D.collate([ex[i] for i in idx], lm.tokenizer.pad_token_id)
        a = step_cpu(fw.prefix_loss, lm.model, prompt, batch)
        b = step_cpu(fw.naive_loss, lm.model, prompt, batch)
        tot["prefix"] += a
        tot["naive"] += b
        rows.append([str(tuple(batch["input_ids"].shape)), a, b, b / a])
    ratio = tot["naive"] / tot["prefix"]
    md = ("# lm_forward_cpu\n\nWalk-through batches (N=4, LM mode, batch 8), one torch thread, process CPU "
          "seconds per forward+backward.\n\n" + md_table(["batch (B, T)", "prefix s", "naive s", "naive/prefix"], rows)
          + f"\n\nTotal naive/prefix: {ratio:.3f}\n")
    write_results("lm_forward_cpu", {"machine": machine_info(), "rows": rows, "total": tot, "ratio": ratio}, md)
    print(md)


if __name__ == "__main__":
    main()
