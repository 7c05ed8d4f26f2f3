"""``--kind auto`` against the six-task suite: what ``softprompt train`` with no method flags scores.

For each suite task with a result (``benchmarks/results/compare_suite_<task>.json``, else the runs
so far in ``.partial.json``) and each seed, exactly what a user types::

    softprompt train --task T --name T-sS --seed S

(auto's choice, bf16 where the CPU computes it natively, as ``softprompt train`` trains by default;
the dev set it carves from train is its own). The stored prompt is then scored as the suite scores
its methods: the same test rows (the suite's, AG News's seeded 1,000-row sample included, checked
by the files' sha256), the same scorer (``metrics.classify_metrics``), the model in float32.

Target (#19): auto's mean test accuracy within 0.5 points of the suite's best prompt method on every
task. Each finished (task, seed) is one line of ``auto_suite.runs.jsonl`` beside the results, so a
rerun continues where the last one stopped; the JSON and Markdown are rewritten after every run.

    python benchmarks/auto_suite.py                      # every suite task with a result, seeds 0,1
    python benchmarks/auto_suite.py --tasks trec --seeds 0
    python benchmarks/auto_suite.py --quick              # tiny model, a synthetic task, seconds
    python benchmarks/auto_suite.py --render             # the committed runs against the suite's cells now:
                                                         # JSON and Markdown (benchmarks/suite.sh report)
    python benchmarks/auto_suite.py --tasks subj --precision fp32   # the same, trained in float32 as the
                                                         # suite trains: auto_suite_fp32.json/.md

``--precision`` separates auto's own settings from the defaults' bf16: its runs go to a journal and
results of their own (``auto_suite_<precision>``), never mixed with what the defaults score.
"""

from __future__ import annotations

import argparse
import atexit
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MARGIN = 0.5  # points: auto >= the best prompt method - margin
NAME = "auto_suite"


def suite_doc(results: Path, task: str) -> dict | None:
    from softprompt.experiments import compare_report, suite_table

    path = suite_table.result_file(results, task)
    return None if path is None else compare_report.read_json(path)


def data_cfg(task: str, root: Path):
    from softprompt import recipes
    from softprompt.config import DataConfig

    return recipes.resolve(DataConfig(), task, root, held_out=True)


def test_rows(lm, task: str, root: Path, doc: dict) -> tuple[object, list]:
    """The suite's test examples of ``task`` (its sample, its files: one line when they differ)."""
    from softprompt.experiments.compare_data import compare_splits

    cfg, d = data_cfg(task, root), doc["data"]
    sample = d["test"] if d["test"] < d["test_sampled_from"] else None  # AG News: 1,000 of 7,600
    sp = compare_splits(lm.tokenizer, cfg, test_sample=sample, dev_fraction=doc["config"].get("dev_fraction", 0.1),
                        data_seed=d["data_seed"])
    if set(sp.info["files"].values()) != set(doc["data"]["files"].values()):
        raise SystemExit(f"auto_suite: {task}: the data files differ from the suite's (sha256)")
    test = sp.examples()[2]
    if len(test) != doc["data"]["test"]:
        raise SystemExit(f"auto_suite: {task}: {len(test)} test rows, the suite scored {doc['data']['test']}")
    return cfg, test


def score(lm, store, name: str, kind: str, cfg, test: list) -> float:
    """Test accuracy of the stored prompt ``name`` (of ``kind``), scored as ``softprompt compare`` scores a method."""
    from softprompt import metrics
    from softprompt.config import PromptConfig, TrainConfig
    from softprompt.training import tune as TR

    pcfg = PromptConfig(kind=kind, init=f"prompt:{name}")
    m = TR.prompt_method(lm, TR.initial_prompt(lm, pcfg, cfg, 0, store=store), pcfg, True, 0)
    pad = lm.tokenizer.pad_token_id
    return metrics.classify_metrics(m.score, lm.tokenizer, test, cfg.verbalizer, pad,
                                    TrainConfig().eval_max_batch_rows)["accuracy"]


def run_one(task: str, arg: str, seed: int, model_args: list[str], extra: list[str], env: dict, home: Path) -> dict:
    """``softprompt train --task ARG`` with no method flags; what it chose, its steps and time."""
    name = f"{task}-s{seed}"
    t0 = time.time()
    out = common.cli(["train", *model_args, "--task", arg, "--name", name, "--seed", str(seed),
                      "--home", str(home), "--quiet", *extra], env)
    meta = json.loads((home / "prompts" / name / "softprompt.json").read_text())
    return {"task": task, "seed": seed, "name": name, "train_s": round(time.time() - t0, 1),
            "auto_line": next((ln for ln in out.splitlines() if ln.startswith("auto:")), ""),
            "auto": meta.get("auto", {}), "steps": meta["epochs"][-1]["step"] if meta.get("epochs") else None,
            "precision": meta.get("precision", {}).get("used"), "logits": meta.get("precision", {}).get("logits"),
            "kind": meta["kind"]}


def eval_cli(arg: str, name: str, model_args: list[str], env: dict, home: Path, limit: list[str]) -> dict:
    """The stored prompt scored by ``softprompt eval --task ARG --prompt NAME`` as a user runs it: at
    its default ``--dtype auto`` (bfloat16 where the CPU computes bf16 natively) and at float32, on
    the same rows (the recipe's test split; ``limit``: its first rows)."""
    out = {}
    for dtype in ("auto", "float32"):
        text = common.cli(["eval", *model_args, "--task", arg, "--prompt", name, "--home", str(home),
                           "--dtype", dtype, *limit], env)
        res = json.loads(text.strip().splitlines()[-1])
        out[dtype] = {k: res[k] for k in ("dtype", "accuracy", "n", "seconds")}
    return out


def eval_cell(run: dict) -> str:
    """``91.2 (bfloat16) / 91.4``: ``softprompt eval`` at --dtype auto / float32 (``eval_cli``)."""
    e = run.get("eval_cli")
    if not e:
        return "-"
    return f"{100 * e['auto']['accuracy']:.1f} ({e['auto']['dtype']}) / {100 * e['float32']['accuracy']:.1f} (n {e['auto']['n']})"


def cpu_of(machine: dict) -> str:
    """The CPU the runs train on, with its bf16 flags (``common.machine_info``, read once)."""
    return f"{machine['cpu']} ({machine['cpu_bf16_detail']})"


def journal_rows(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def summarize(rows: list[dict], results: Path, tasks: list[str]) -> list[dict]:
    """Per task: auto's runs against the suite's cells at its last step, each method's at its lr
    chosen on dev where the suite ran another (``suite_table.suite_cells``: the README's cells)."""
    from softprompt.experiments import suite_table

    out, lrs = [], suite_table.load_lrs(results)
    for task in tasks:
        mine = [r for r in rows if r["task"] == task]
        doc = suite_doc(results, task)
        if not mine or doc is None:
            continue
        cs, lr_choice = suite_table.suite_cells(doc, lrs.get(task, []))
        best = suite_table.best_prompt(cs)
        accs = [100 * r["test_accuracy"] for r in mine]
        row = {"task": task, "auto_mean": statistics.fmean(accs),
               "auto_sd": statistics.stdev(accs) if len(accs) > 1 else 0.0, "auto_seeds": [r["seed"] for r in mine],
               "suite_partial": bool(doc.get("partial")), "lr_choice": lr_choice.rstrip("; "), "suite": {m: {k: cs[m][k] for k in ("test_mean", "test_std", "seeds", "steps")}
                                                                     for m in cs}}
        if best is not None:
            gap = row["auto_mean"] - 100 * cs[best]["test_mean"]
            row.update(best=best, minus_best=gap, met=gap >= -MARGIN)  # unrounded: the README formats the same float
        out.append(row)
    return out


def precision_cell(run: dict) -> str:
    """``bf16, fp32 logits``: the precision and, under bf16, the loss's logits (``precision.logits_context``);
    runs from before the float32 logits record none and took autocast's bf16 ones."""
    return run["precision"] if run["precision"] != "bf16" else f"bf16, {run.get('logits') or 'bf16'} logits"


def markdown(res: dict) -> str:
    from softprompt.experiments import suite_table

    runs = [[suite_table.TASKS.get(r["task"], r["task"]), r["seed"], f"{100 * r['test_accuracy']:.1f}", r["steps"],
             precision_cell(r), r.get("cpu") or "-", r["train_s"], eval_cell(r), r["auto_line"].replace("|", "/")]
            for r in res["runs"]]

    def cell(s: dict, m: str) -> str:
        c = s["suite"].get(m)
        return "-" if c is None else f"{100 * c['test_mean']:.1f}" + (f" ± {100 * c['test_std']:.1f}" if c["seeds"] > 1 else "") \
            + f" ({c['seeds']})"

    rows = [[suite_table.TASKS.get(s["task"], s["task"]) + (" (suite partial)" if s["suite_partial"] else ""),
             f"{s['auto_mean']:.1f}" + (f" ± {s['auto_sd']:.1f}" if len(s["auto_seeds"]) > 1 else "") + f" ({len(s['auto_seeds'])})",
             cell(s, "deep-prompt"), cell(s, "prompt-tuning"), cell(s, "lora"),
             f"{s['minus_best']:+.1f} ({suite_table.METHODS[s['best']]})" if "best" in s else "-",
             ("met" if s["met"] else "not met") if "best" in s else "-"] for s in res["summary"]]
    flags = "".join(f" {f}" for f in res.get("flags", []))
    chosen = [f"{suite_table.TASKS.get(s['task'], s['task'])}: {s['lr_choice']}" for s in res["summary"] if s.get("lr_choice")]
    lr_words = f": {'; '.join(chosen)}" if chosen else ""
    return f"""# {res['benchmark']}: `softprompt train` with no method flags{flags and ' but' + flags} on the suite's tasks{' (--quick)' if res['quick'] else ''}

Each run is `softprompt train --task T --name T-sS --seed S{flags}` (`--kind auto`, its own budget and
precision: {', '.join(sorted({str(r['precision']) for r in res['runs']}))}), scored as the suite scores its
methods (the suite's test rows, float32). The suite's cells are its methods at its last step, each at
its lr chosen on dev where the suite ran it at another (the README's cells{lr_words}), mean ± sd over
seeds (the count in brackets), float32 training. Under bf16 the loss takes float32
vocabulary logits (``precision.logits_context``); runs from before took autocast's bf16 ones: the
runs table gives each run's logits and CPU. Its `softprompt eval` column is what a user sees: the
stored prompt scored by `softprompt eval --task T` at its default `--dtype auto` (the model in the
dtype shown) and at `--dtype float32`, on the recipe's test split (AG News: its first 1,000 rows;
n rows); runs from before it have none. {res['machine_note']}

{common.md_table(['task', 'auto', 'deep prompt (suite)', 'shallow prompt (suite)', 'LoRA (suite)',
                  'auto minus best prompt', f'within {MARGIN:g}'], rows)}
Runs:

{common.md_table(['task', 'seed', 'test acc. %', 'steps', 'precision', 'CPU', 'train s',
                  'softprompt eval: auto / float32', 'auto chose'], runs)}"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="trec,sst2,mr,subj,mpqa,agnews", help="suite tasks (default %(default)s)")
    ap.add_argument("--seeds", default="0,1", help="run seeds (default %(default)s)")
    ap.add_argument("--no-eval-check", dest="eval_check", action="store_false",
                    help="skip scoring each prompt with softprompt eval at --dtype auto and float32 (eval_cli)")
    ap.add_argument("--quick", action="store_true", help="tiny random Llama on a synthetic task and suite, 3 steps")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                    help="train at this precision instead of the defaults' (results: auto_suite_<precision>.*)")
    common.output_flags(ap)
    a = ap.parse_args()
    name, flags = (NAME, []) if a.precision is None else (f"{NAME}_{a.precision}", ["--precision", a.precision])
    if a.render:  # the recorded runs against the suite's cells now (its lr runs arrive later), JSON and Markdown
        res = json.loads((common.RESULTS / f"{name}.json").read_text())
        res["summary"] = summarize(res["runs"], common.RESULTS, [s["task"] for s in res["summary"]])
        print("wrote", *common.write_results(name, res, markdown(res)))
        return
    from softprompt import models

    folder = Path(tempfile.mkdtemp(prefix="sp-auto-suite-"))
    atexit.register(shutil.rmtree, folder, True)  # the store's prompts; the journal lives in --out
    home, out = folder / "home", common.out_dir(a.out, a.quick)
    home.mkdir()
    tasks, seeds = {t: t for t in a.tasks.split(",")}, [int(s) for s in a.seeds.split(",")]
    model_args, extra, root, results = [], list(flags), common.data_root(), common.RESULTS
    env = common.cli_env()
    if a.quick:
        model_args, extra = ["--model", str(common.tiny_folder(folder / "tiny"))], ["--steps", "3", *flags]
        root, results, tasks, seeds = quick_suite(folder, model_args, env, home)
        env["SOFTPROMPT_DATA"] = str(root)
    else:
        (home / "models").symlink_to(common.store().models, target_is_directory=True)  # never written
    store = common.store(home)
    lm = models.load(model_args[1] if model_args else models.DEFAULT_MODEL, "float32", store=store)
    journal = out / f"{name}.runs.jsonl"
    rows, started = journal_rows(journal), time.time()
    machine = common.machine_info()
    for task, arg in tasks.items():
        doc = suite_doc(results, task)
        if doc is None:
            print(f"auto_suite: {task}: no suite result yet, skipped")
            continue
        cfg, test = test_rows(lm, arg, root, doc)
        for seed in seeds:
            if any(r["task"] == task and r["seed"] == seed for r in rows):
                print(f"auto_suite: {task} seed {seed}: from the journal")
                continue
            run = run_one(task, arg, seed, model_args, extra, env, home)
            run["cpu"] = cpu_of(machine)  # bf16 results differ between CPUs
            t0 = time.time()
            run["test_accuracy"] = score(lm, store, run["name"], run["kind"], cfg, test)
            run["eval_s"] = round(time.time() - t0, 1)
            if a.eval_check:
                run["eval_cli"] = eval_cli(arg, run["name"], model_args, env, home,
                                           ["--limit", "1000"] if task == "agnews" else [])
            rows.append(run)
            with open(journal, "a", encoding="utf-8") as f:
                f.write(json.dumps(run) + "\n")
            print(f"auto_suite: {task} seed {seed}: {100 * run['test_accuracy']:.1f} ({run['auto_line']})")
            write(name, flags, out, journal, results, a.quick, machine, started)
    js, md = write(name, flags, out, journal, results, a.quick, machine, started)
    print(f"wrote {js} and {md}")


def write(name: str, flags: list[str], out: Path, journal: Path, results: Path, quick: bool, machine: dict,
          started: float) -> tuple[Path, Path]:
    """The JSON and Markdown from every run in the journal (another process's included), the
    suite's tasks in its order."""
    from softprompt.experiments import suite_table

    rows = journal_rows(journal)
    tasks = sorted({r["task"] for r in rows}, key=lambda t: (list(suite_table.TASKS) + [t]).index(t))
    res = {"benchmark": name, "flags": flags, "quick": quick, "margin": MARGIN, "runs": rows,
           "summary": summarize(rows, results, tasks), "machine": machine,
           "machine_note": (f"Load average (1 min) at the start of the last session {machine['loadavg_at_start'][0]:.1f} "
                            f"on {machine['cores']} cores: accuracy does not depend on load, the seconds do."),
           "session_s": round(time.time() - started, 1)}
    return common.write_results(name, res, markdown(res), out)


def quick_suite(folder: Path, model_args: list[str], env: dict, home: Path) -> tuple[Path, Path, dict, list[int]]:
    """--quick: a synthetic two-label task (a recipe file) and its suite result from ``compare --quick``."""
    root, results = folder / "data", folder / "results"
    (root / "syn").mkdir(parents=True)
    lines = [f"{i % 2} {s}" for i, s in enumerate(common.synthetic_sentences(96))]
    random.Random(0).shuffle(lines)
    (root / "syn" / "train.txt").write_text("\n".join(lines[:72]) + "\n")
    (root / "syn" / "test.txt").write_text("\n".join(lines[72:]) + "\n")
    recipe = {"train": {"path": "syn/train.txt"}, "test": {"path": "syn/test.txt"}, "template": "Review: {text}\nSentiment:",
              "target_column": "label", "verbalizer": {"0": "negative", "1": "positive"}, "max_length": 256}
    task = folder / "syn.json"
    task.write_text(json.dumps(recipe))
    common.cli(["compare", *model_args, "--task", str(task), "--methods", "deep-prompt,lora,prompt-tuning", "--quick",
                "--curve", "2,3", "--seeds", "0", "--out", str(results), "--tag", "suite_syn", "--home", str(home),
                "--data-root", str(root), "--quiet"], env)
    return root, results, {"syn": str(task)}, [0]


if __name__ == "__main__":
    main()
