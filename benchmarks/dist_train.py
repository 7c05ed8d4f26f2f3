"""Data-parallel prompt tuning on this machine: 1 process vs 2 processes (torch.distributed, gloo).

SST-2 (the ``sst2`` task recipe: template, verbalizer, loss on the label word only), N = 20,
global batch 8 (2 processes: 4 rows each), a fixed number of optimiser steps, no checkpoint.
Configurations, run interleaved (one round each, in this order, ``--rounds`` times):

* ``1 proc x 1 thread``: ``python -m softprompt``-equivalent single process, 1 torch thread;
* ``1 proc x 2 threads``: the same with 2 torch threads (what one process can get from 2 cores);
* ``2 procs x 1 thread``: ``torchrun --nproc-per-node 2``, each rank 1 thread, gloo all-reduce.

Each run is this script launched as a worker (``--worker``), calling ``softprompt.training.tune.train``
with the same options; the worker records the training time (``train_time_s``: the optimiser
steps, without loading and evaluation), the tokens processed, and, under torch.distributed, the
time spent inside the one all-reduce per step and its payload (``Dist.bytes_per_step``).

    python benchmarks/dist_train.py --quick    # tiny random model, ~1 min, writes results/dist_train_tiny.*
    python benchmarks/dist_train.py            # default model, a few steps, ~4 min, results/dist_train.*
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CONFIGS = [("1 proc x 1 thread", 1, 1), ("1 proc x 2 threads", 1, 2), ("2 procs x 1 thread", 2, 1)]


def worker(a) -> None:
    """One training run (one rank of it under torchrun); rank 0 appends a JSON line to --result."""
    import torch

    from softprompt import models, recipes
    from softprompt.config import DataConfig, PromptConfig, TrainConfig
    from softprompt.training import distributed
    from softprompt.training import tune as TR

    torch.set_num_threads(a.threads)
    reduce_s = [0.0]
    real = distributed.Dist.all_reduce

    def timed(self, params, loss, tokens):
        t0 = time.perf_counter()
        out = real(self, params, loss, tokens)
        reduce_s[0] += time.perf_counter() - t0
        return out

    distributed.Dist.all_reduce = timed
    lm = models.load(a.model, store=common.store(), local_rank=common.ENV.launch.local_rank)
    dcfg = recipes.resolve(DataConfig(limit=a.rows, eval_limit=8), "sst2", common.data_root())
    tcfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, seed=0, patience=None)
    launch = common.ENV.launch  # torchrun's RANK / WORLD_SIZE / LOCAL_RANK, read at the edge
    res = TR.train(lm, dcfg, PromptConfig(num_virtual_tokens=20), tcfg, task="sst2", save=False, store=common.store(),
                   launch=launch)
    if launch.is_main:
        world = launch.world_size
        prompt = torch.nn.Parameter(res.prompt)
        with open(a.result, "a") as f:
            f.write(json.dumps({"world": world, "threads": a.threads, "steps": len(res.history),
                                "train_time_s": res.train_time_s, "tokens": sum(h["tokens"] for h in res.history),
                                "allreduce_s": reduce_s[0] if world > 1 else 0.0,
                                "bytes_per_step": distributed.Dist.bytes_per_step([prompt]) if world > 1 else 0,
                                "final_loss": res.history[-1]["loss"]}) + "\n")
    distributed.teardown()


def launch(model: str, world: int, threads: int, a, result: Path) -> None:
    args = [__file__, "--worker", "--model", model, "--threads", str(threads), "--steps", str(a.steps),
            "--rows", str(a.rows), "--batch-size", str(a.batch_size), "--result", str(result)]
    if world > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
               "--master-port", str(port), *args]
    else:
        cmd = [sys.executable, *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(common.REPO / "src")}
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def tiny_folder() -> str:
    """The --quick model: the benchmarks' tiny Llama saved as a folder every process can load."""
    return str(common.tiny_folder(Path(tempfile.mkdtemp(prefix="sp-dist-tiny-"))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="optimiser steps per run (default 6; quick 30)")
    ap.add_argument("--rows", type=int, default=256, help="training rows read (default %(default)s)")
    ap.add_argument("--batch-size", type=int, default=8, help="global batch (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 1; quick 2)")
    ap.add_argument("--result", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    a.steps = a.steps or (30 if a.quick else 6)
    rounds = a.rounds or (2 if a.quick else 1)
    model = tiny_folder() if a.quick else "smollm2-135m"
    info = common.machine_info()
    result = Path(tempfile.mkdtemp(prefix="sp-dist-")) / "runs.jsonl"
    t0 = time.perf_counter()
    for r in range(rounds):
        for name, world, threads in CONFIGS:
            launch(model, world, threads, a, result)
            print(f"round {r + 1}: {name} done", flush=True)
    runs = [json.loads(line) for line in result.read_text().splitlines()]
    report(a, info, "tiny" if a.quick else model, runs, rounds, time.perf_counter() - t0)


def report(a, info, model: str, runs: list[dict], rounds: int, total: float) -> None:
    rows, by = [], {}
    for (name, _, _), run in zip(CONFIGS * rounds, runs):
        by.setdefault(name, []).append(run)
    base = sum(r["tokens"] / r["train_time_s"] for r in by[CONFIGS[0][0]]) / len(by[CONFIGS[0][0]])
    for name, _, _ in CONFIGS:
        rs = by[name]
        tok_s = sum(r["tokens"] / r["train_time_s"] for r in rs) / len(rs)
        step_s = sum(r["train_time_s"] / r["steps"] for r in rs) / len(rs)
        red = sum(r["allreduce_s"] / r["steps"] for r in rs) / len(rs)
        rows.append([name, len(rs), rs[0]["steps"], step_s, tok_s, tok_s / base, red * 1000, rs[0]["bytes_per_step"]])
    payload = {"benchmark": "dist_train", "model": model, "seed": 0, "machine": info, "total_seconds": total,
               "setup": {"task": "sst2", "rows": a.rows, "global_batch": a.batch_size, "steps": a.steps,
                         "num_virtual_tokens": 20, "backend": "gloo", "rounds": rounds},
               "runs": runs, "loadavg_at_end": os.getloadavg()}
    md = (f"# dist_train ({model})\n\nPrompt tuning on SST-2, N=20, global batch {a.batch_size}, {a.steps} optimiser "
          f"steps per run, {rounds} interleaved round(s); {info['cpu']} ({info['cores']} cores, shared: load "
          f"average {info['loadavg_at_start'][0]:.1f} at start). Time = the optimiser steps only (no loading, no "
          "evaluation). All-reduce: one per step, the prompt gradient plus (loss, tokens), gloo over loopback.\n\n"
          + common.md_table(["configuration", "runs", "steps", "s/step", "tokens/s", "vs 1x1", "all-reduce ms/step",
                             "all-reduce payload bytes/step"], rows)
          + f"\nWhole run: {total:.0f}s.\n")
    print(md)
    print("wrote", *common.write_results(f"dist_train{'_tiny' if a.quick else ''}", payload, md, a.out or common.RESULTS))


if __name__ == "__main__":
    main()
