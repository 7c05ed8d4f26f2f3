"""A new user's sentiment data: the generic data flags, default settings, against LoRA on the same rows.

The data set is CR (customer reviews, `<label> <text>` lines; not one of the six suite tasks), read
from ``$SOFTPROMPT_DATA/cr/all.txt``. Its rows are shuffled (data seed 0) and cut into a training
file (``--rows``, 512) and a test file (``--test-rows``, 400), written as CSV files (``text,label``)
in a temporary folder.
``softprompt compare`` carves its dev set (10 %) from the training file; the same pool and dev rows
are written as two more files, so that both sides train and choose on the same rows:

* **defaults**: per seed, exactly what a user types, no method flags (``--kind auto``)::

      softprompt train --data pool.csv --dev-data dev.csv --template "Review: {text}\\nSentiment:" \\
          --target-column label --verbalizer 0=negative,1=positive --name cr-s0 --seed 0
      softprompt eval --prompt cr-s0 --data test.csv --template ... --verbalizer ... --dtype float32

* **LoRA** (and zero-shot): ``softprompt compare --data train.csv --test-data test.csv --template ...
  --verbalizer ... --methods zero-shot,lora --seeds ...`` with LoRA's lr raced on dev
  (``--lr-sweep``, default 1e-3/3e-3) at compare's default budget (3 epochs, at least 50 steps:
  the budget ``auto`` gives a few hundred rows).

Both are scored in float32 on the same test rows. Target: the defaults' mean test accuracy >=
LoRA's - 1 point. Prompts go to a temporary store that links the user's converted default model.

    python benchmarks/new_user.py                 # 2 seeds, about 30 minutes on 2 cores
    python benchmarks/new_user.py --quick         # tiny random Llama, synthetic rows, seconds
"""

from __future__ import annotations

import argparse
import atexit
import csv
import json
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TEMPLATE = "Review: {text}\nSentiment:"
VERBALIZER = "0=negative,1=positive"
DATA_FLAGS = ["--template", TEMPLATE, "--target-column", "label", "--verbalizer", VERBALIZER]
TARGET_MARGIN = 1.0  # points: defaults >= LoRA - margin


def rows_of(quick: bool, n: int) -> list[str]:
    """``<label> <text>`` lines: CR shuffled with data seed 0, else synthetic ones for --quick."""
    path = common.data_root() / "cr" / "all.txt"
    if path.is_file():
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    elif quick:
        lines = [f"{i % 2} {s}" for i, s in enumerate(common.synthetic_sentences(n))]
    else:
        raise SystemExit(f"new_user: {path} not found (set SOFTPROMPT_DATA)")
    random.Random(0).shuffle(lines)
    if len(lines) < n:
        raise SystemExit(f"new_user: {path} has {len(lines)} rows, {n} needed")
    return lines[:n]


def same_rows(train: Path, test: Path, model_args: list[str], home: Path, folder: Path) -> tuple[Path, Path]:
    """compare's own carve of ``train`` (pool, dev; ``test`` is its test file, as ``--test-data``),
    written as the two files ``softprompt train`` reads."""
    from softprompt import models
    from softprompt.config import DataConfig
    from softprompt.experiments.compare_data import compare_splits

    tok = models.load(model_args[1] if model_args else models.DEFAULT_MODEL, store=common.store(home)).tokenizer
    cfg = DataConfig(path=str(train), eval_path=str(test), template=TEMPLATE, target_column="label",
                     verbalizer=dict(kv.split("=") for kv in VERBALIZER.split(",")))
    sp = compare_splits(tok, cfg)  # compare's defaults: dev 10 % carved with data seed 0
    rows = read_csv(train)
    if len(sp.pool_rows) + len(sp.dev_rows) + len(sp.test_rows) != len(rows) or sp.test_rows:
        raise SystemExit("new_user: compare's carve does not map onto the training file's rows")
    pool, dev = folder / "pool.csv", folder / "dev.csv"
    write_csv(pool, [rows[i] for i in sp.pool_rows])
    write_csv(dev, [rows[i] for i in sorted(sp.dev_rows)])
    return pool, dev


def write_csv(path: Path, lines: list[str]) -> None:
    """``<label> <text>`` lines as the CSV a user would have: a header, then text,label rows."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for ln in lines:
            label, text = ln.split(" ", 1)
            w.writerow([text, label])


def read_csv(path: Path) -> list[str]:
    with open(path, encoding="utf-8", newline="") as f:
        return [f"{r['label']} {r['text']}" for r in csv.DictReader(f)]


def run_defaults(seed: int, pool: Path, dev: Path, test: Path, model_args: list[str], env: dict, home: Path) -> dict:
    name = f"cr-s{seed}"
    data = DATA_FLAGS
    t0 = time.time()
    out = common.cli(["train", *model_args, "--data", str(pool), "--dev-data", str(dev), *data, "--name", name,
               "--seed", str(seed), "--home", str(home), "--quiet"], env)
    train_s = time.time() - t0
    meta = json.loads((home / "prompts" / name / "softprompt.json").read_text())
    ev = common.cli(["eval", *model_args, "--prompt", name, "--data", str(test), *data, "--dtype", "float32",
              "--home", str(home)], env)
    acc = re.search(r"^accuracy\s+([0-9.]+)", ev, re.M)
    if not acc:
        raise SystemExit(f"new_user: no accuracy in softprompt eval's output:\n{ev}")
    line = next((ln for ln in out.splitlines() if ln.startswith("auto:")), "")
    return {"seed": seed, "test_acc": 100 * float(acc.group(1)), "train_s": round(train_s, 1),
            "auto": meta.get("auto", {}), "auto_line": line,
            "steps": meta["epochs"][-1]["step"] if meta.get("epochs") else meta.get("training", {}).get("steps")}


def run_lora(train: Path, test: Path, seeds: list[int], lrs: str, model_args: list[str], env: dict,
             home: Path, folder: Path) -> dict:
    common.cli(["compare", *model_args, "--data", str(train), "--test-data", str(test), *DATA_FLAGS, "--methods", "zero-shot,lora", "--seeds", ",".join(map(str, seeds)),
         "--lr-sweep", f"lora={lrs}", "--dev-sample", "all", "--out", str(folder), "--tag", "cr", "--quiet",
         "--home", str(home)], env)
    return json.loads((folder / "compare_cr.json").read_text())


def stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random Llama, synthetic rows, 1 seed")
    ap.add_argument("--rows", type=int, default=512, help="rows of the training file (default %(default)s)")
    ap.add_argument("--test-rows", type=int, default=400, help="test rows (default %(default)s)")
    ap.add_argument("--seeds", default="0,1", help="run seeds (default %(default)s)")
    ap.add_argument("--lora-lrs", default="1e-3/3e-3", help="LoRA's lr sweep (default %(default)s)")
    common.output_flags(ap)
    a = ap.parse_args()
    if a.render:
        return common.render("new_user", markdown)
    if a.quick:
        a.rows, a.test_rows, a.seeds = 48, 16, "0"
    seeds = [int(s) for s in a.seeds.split(",")]
    folder = Path(tempfile.mkdtemp(prefix="sp-new-user-"))
    atexit.register(shutil.rmtree, folder, True)  # the data files, the store's prompts, compare's output
    home = folder / "home"
    home.mkdir()
    model_args: list[str] = []
    if a.quick:
        model_args = ["--model", str(common.tiny_folder(folder / "tiny"))]
    else:
        (home / "models").symlink_to(common.store().models, target_is_directory=True)  # never written
    env = common.cli_env()
    lines = rows_of(a.quick, a.rows + a.test_rows)
    train, test = folder / "train.csv", folder / "test.csv"
    write_csv(train, lines[: a.rows])
    write_csv(test, lines[a.rows:])
    pool, dev = same_rows(train, test, model_args, home, folder)
    t0 = time.time()
    defaults = [run_defaults(s, pool, dev, test, model_args, env, home) for s in seeds]
    cmp = run_lora(train, test, seeds, a.lora_lrs, model_args, env, home, folder)
    runs = cmp["runs"]
    lora = [100 * r["test_accuracy"] for r in runs if r["method"] == "lora"]
    zero = [100 * r["test_accuracy"] for r in runs if r["method"] == "zero-shot"]
    mine = [d["test_acc"] for d in defaults]
    res = {
        "benchmark": "new_user", "quick": a.quick, "data": "cr/all.txt", "rows": a.rows, "pool": len(read_csv(pool)),
        "dev": len(read_csv(dev)), "test_rows": a.test_rows, "seeds": seeds, "template": TEMPLATE,
        "verbalizer": VERBALIZER, "defaults": defaults, "lora": [r for r in runs if r["method"] == "lora"],
        "zero_shot": zero, "summary": {"defaults": stats(mine), "lora": stats(lora)},
        "machine": common.machine_info(), "total_s": round(time.time() - t0, 1),
    }
    gap = statistics.mean(mine) - statistics.mean(lora)
    res["target"] = {"defaults_minus_lora": round(gap, 2), "margin": TARGET_MARGIN, "met": gap >= -TARGET_MARGIN}
    name = "new_user_quick" if a.quick else "new_user"
    js, md = common.write_results(name, res, markdown(res), common.out_dir(a.out, a.quick))
    print(f"wrote {js} and {md}")


def steps_of(r: dict) -> str:
    """Optimiser steps run; a result written before they were recorded shows auto's budget."""
    if r.get("steps"):
        return str(r["steps"])
    chose = r.get("auto", {}).get("chose", {})
    return f"{chose['epochs']} epochs" if "epochs" in chose else "-"


def markdown(res: dict) -> str:
    d, lo = res["defaults"], res["lora"]
    rows = [[f"defaults (`--kind auto`), seed {r['seed']}", f"{r['test_acc']:.1f}", steps_of(r), r["train_s"],
             r["auto_line"].replace("|", "/")] for r in d]
    rows += [[f"LoRA, seed {r['seed']}", f"{100 * r['test_accuracy']:.1f}",
              r.get("steps", ""), round(r.get("train_time_s", 0.0), 1), f"lr {r.get('lr')} (raced on dev)"] for r in lo]
    s, t = res["summary"], res["target"]
    zero = f"{statistics.mean(res['zero_shot']):.1f}" if res["zero_shot"] else "-"
    return f"""# new_user: a sentiment data set through the generic data flags, defaults vs LoRA{' (--quick)' if res['quick'] else ''}

CR (`{res['data']}`, not a suite task), shuffled with data seed 0: a training file of {res['rows']} rows
(compare carves {res['dev']} dev rows, leaving a pool of {res['pool']}: both sides train on that pool and
choose on that dev set), {res['test_rows']} test rows; template `{res['template']!r}`, verbalizer
`{res['verbalizer']}`; seeds {', '.join(map(str, res['seeds']))}; test accuracy scored in float32.
Load average (1 min) at start {res['machine']['loadavg_at_start'][0]:.1f}, with other jobs running: accuracy does not
depend on load, the seconds do (LoRA's are its chosen run's; its lr sweep trained one run per lr).

{common.md_table(['run', 'test acc. %', 'steps', 'train s', 'settings'], rows)}

| | mean ± sd |
|---|---|
| defaults (`softprompt train`, no method flags) | {s['defaults']['mean']:.1f} ± {s['defaults']['sd']:.1f} |
| LoRA (`softprompt compare`, lr raced on dev) | {s['lora']['mean']:.1f} ± {s['lora']['sd']:.1f} |
| zero-shot | {zero} |

Target: defaults >= LoRA - {t['margin']:g} point: {t['defaults_minus_lora']:+.2f} -> {'met' if t['met'] else 'not met'}.
"""


if __name__ == "__main__":
    main()
