"""The GPU check's reports: the benchmark's Markdown, the check's summary, and publishing them.

``scripts/gpu_check.sh`` runs the CUDA-marked tests (pytest writes a JUnit XML file) and
``gpu_bench.py`` (``gpu_bench.json``), then ``summarise``: ``gpu_check.json`` and
``gpu_check.md`` (the machine, each check's outcome, the speed targets) in the same folder.
``publish`` copies ``gpu_check.*`` and ``gpu_bench.*`` from such a folder into
benchmarks/results/; it refuses a dry run (a CPU, or the tiny config), whose figures say
nothing about a GPU.

    python benchmarks/gpu_report.py summarise OUT --device cuda --pytest-rc 0 --bench-rc 0
    python benchmarks/gpu_report.py publish OUT           # -> benchmarks/results/gpu_*.{json,md}
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402

FILES = ("gpu_check.json", "gpu_check.md", "gpu_bench.json", "gpu_bench.md")


def device_info(device: str | torch.device) -> dict:
    """The accelerator: name, compute capability, multiprocessors, memory, CUDA and driver versions."""
    device = torch.device(device)
    if device.type != "cuda":
        return {"device": str(device), "gpu": None}
    p = torch.cuda.get_device_properties(device)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        driver = None
    return {"device": str(device), "gpu": p.name, "capability": f"{p.major}.{p.minor}",
            "multiprocessors": p.multi_processor_count, "memory_gib": p.total_memory / 2**30,
            "cuda": torch.version.cuda, "driver": driver}


def targets(res: dict) -> list[dict]:
    """The speed targets, each with its measured value and whether it was met."""
    tr, de = res["train"]["ratios"]["n20"], res["decode"]["ratios"]["B=32"]
    rows = [("prompt-tuning step: PEFT's time over ours, N=20", tr["peft_time_over_softprompt"], ">=", 2.0),
            ("prompt-tuning step: our time over the floor's, N=20", tr["softprompt_time_over_floor"], "<=", 1.15),
            ("engine decode speed over model.generate, batch 32", de["engine_speed_over_generate"], ">=", 0.9),
            ("engine decode speed, 8 prompts mixed over 1 prompt, batch 32", de["mixed_speed_over_one_prompt"], ">=", 0.9)]
    return [{"what": w, "value": v, "target": f"{op} {t}", "met": v >= t if op == ">=" else v <= t} for w, v, op, t in rows]


def _machine_line(res: dict) -> str:
    m = res["machine"]
    where = (f"{m['gpu']} (compute capability {m['capability']}, {m['multiprocessors']} SMs, {m['memory_gib']:.0f} GiB; "
             f"CUDA {m['cuda']}, driver {m['driver']})" if m.get("gpu") else f"CPU only: {m['cpu']}, {m['torch_threads']} threads")
    return f"Machine: {where}; torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, Python {m['python']}."


def dry_run_note(res: dict) -> str:
    if res["device"].startswith("cuda") and not res["tiny"]:
        return ""
    return ("**Dry run** (device {}, {} config): it shows that the check runs end to end; its figures say "
            "nothing about a GPU.\n\n").format(res["device"], "tiny" if res["tiny"] else "full")


def bench_markdown(res: dict) -> str:
    tr, de = res["train"], res["decode"]
    train_rows = [[k, v["step_s"]["median"] * 1e3, v["roofline"]["gflop"] / len(tr["measured_T"]),
                   v["roofline"]["achieved_gflops"] / 1e3, f'{v["roofline"]["fraction_of_peak"]:.2%}'] for k, v in tr["methods"].items()]
    ratio_rows = [[n, r["peft_time_over_softprompt"], r["softprompt_time_over_floor"], r["lora_time_over_deep"],
                   r["deep_time_over_floor"]] for n, r in tr["ratios"].items()]
    decode_rows = [[k, v["seconds"]["median"], v["tokens_per_s"], f'{v["roofline"]["fraction_of_peak"]:.2%}']
                   for k, v in de["methods"].items()]
    dratio_rows = [[b, r["engine_speed_over_generate"], r["one_prompt_speed_over_plain"],
                    r.get("mixed_speed_over_one_prompt", "n/a")] for b, r in de["ratios"].items()]
    target_rows = [[t["what"], t["value"], t["target"], "met" if t["met"] else "missed"] for t in res["targets"]]
    sanity = "; ".join(f"N={n}: |loss diff| {s['loss_abs_diff']:.2g}, grad rel diff {s['grad_rel_diff']:.2g}"
                       for n, s in tr["sanity"].items())
    return f"""# GPU benchmark: training steps and decode against their anchors

{dry_run_note(res)}Model: {res['model']} ({res['shape']['num_hidden_layers']} layers, H {res['shape']['hidden_size']}, vocabulary {res['shape']['vocab_size']}).
{_machine_line(res)}
Measured bf16 matmul peak in this run ({res['peak_gflops']['matmul_n']}-square, random data): {res['peak_gflops']['bf16'] / 1e3:.1f} TFLOP/s.

## Targets

{common.md_table(["what", "measured", "target", ""], target_rows)}
## Training steps

One AdamW step each, batch {tr['batch_size']}, target-only loss, softprompt's precision {tr['precision']['used']};
{res['rounds']['train_warmup']} warm-up + {res['rounds']['train']} measured rounds, order rotated, every method
of a round on the same batch (T: {tr['measured_T']}). `peft_nN`: PEFT prompt tuning (its forward's
loss; the Trainer's bookkeeping is not counted); `softprompt_nN`: `PromptMethod`; `floor`: the frozen
model's forward + backward on the real tokens; `deep_nN`: a deep prompt; `lora`: PEFT LoRA r {tr['lora']['r']} on q, v.
PEFT vs softprompt on the first batch: {sanity}.

{common.md_table(["method", "median step (ms)", "GFLOP / step", "achieved TFLOP/s", "fraction of bf16 peak"], train_rows)}
Paired ratios (median over rounds of the same-batch ratio):

{common.md_table(["N", "PEFT time / ours", "ours / floor", "LoRA time / deep", "deep / floor"], ratio_rows)}
## Decode

{de['new_tokens']} new tokens a row, greedy, end of sequence ignored on both sides; prompts N = {de['prompt_tokens']};
{res['rounds']['decode']} rounds after one warm-up call each, order rotated. Engine tokens equal to
`model.generate`'s (plain model, bf16): {', '.join(f'batch {b}: {v:.0%}' for b, v in de['engine_tokens_equal_generate'].items())}.

{common.md_table(["configuration", "median s", "tokens/s", "fraction of bf16 peak"], decode_rows)}
{common.md_table(["batch", "engine speed / generate", "1 prompt / plain", f"{de['tasks']} prompts mixed / 1 prompt"], dratio_rows)}
FLOPs are counted from the model's shapes (benchmarks/common.py): training counts what each method
computes (PEFT and LoRA: every padded position with full logits); decode counts the useful work
(real tokens, no padding, no prefix computation).
"""


# ---------------------------------------------------------------- the check's summary


def case_outcomes(xml_path: Path) -> list[dict]:
    """Each test case of a JUnit XML file: name, outcome (passed, failed, error, skipped), seconds, message."""
    if not xml_path.is_file():
        return []
    out = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        bad = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        out.append({"test": f"{case.get('classname', '')}::{case.get('name')}", "seconds": float(case.get("time", 0)),
                    "outcome": "passed" if bad is None else {"failure": "failed"}.get(bad.tag, bad.tag),
                    "message": None if bad is None else (bad.get("message") or "")[:300]})
    return out


def summarise(out: Path, device: str, tiny: bool, pytest_rc: int, bench_rc: int, install: str = "") -> dict:
    """gpu_check.json and gpu_check.md in ``out`` from its pytest.xml and gpu_bench.json."""
    from importlib.metadata import version

    tests = case_outcomes(out / "pytest.xml")
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    bench = json.loads((out / "gpu_bench.json").read_text()) if (out / "gpu_bench.json").is_file() else None
    passed = pytest_rc == 0 and counts["passed"] > 0 and counts["passed"] == len(tests) and bench_rc == 0 and bench is not None
    res = {"check": "gpu_check", "device": device, "tiny": tiny, "passed": passed, "install": install,
           "machine": {**(device_info(device) if device.startswith("cuda") and torch.cuda.is_available() else {"device": device}),
                       "python": platform.python_version(), "torch": torch.__version__,
                       "transformers": version("transformers"), "peft": version("peft")},
           "correctness": {"pytest_rc": pytest_rc, **counts, "tests": tests},
           "speed": {"bench_rc": bench_rc, "targets": bench["targets"] if bench else None,
                     "targets_met": all(t["met"] for t in bench["targets"]) if bench else None}}
    common.write_results("gpu_check", res, check_markdown(res), out)
    return res


def check_markdown(res: dict) -> str:
    c, s, m = res["correctness"], res["speed"], res["machine"]
    where = m.get("gpu") or f"device {res['device']}"
    rows = [[t["test"].rsplit(".", 1)[-1], t["outcome"], t["seconds"], t["message"] or ""] for t in c["tests"]]
    speed = (common.md_table(["what", "measured", "target", ""], [[t["what"], t["value"], t["target"], "met" if t["met"] else "missed"]
                                                                for t in s["targets"]])
             if s["targets"] else f"The benchmark did not finish (exit status {s['bench_rc']}).\n")
    dry = dry_run_note({"device": res["device"], "tiny": res["tiny"]})
    return f"""# GPU check: {'passed' if res['passed'] else 'FAILED'}

{dry}On {where}; Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}.
Installed (no network): {res['install'] or 'n/a'}.
The tests import the softprompt the check installed; the benchmark imports the checkout's src/
(benchmarks/common.py): the same files.

**Correctness** (the CUDA-marked relational tests, tests/test_cuda.py): {c['passed']} passed, {c['failed']} failed,
{c['error']} errors, {c['skipped']} skipped (pytest exit status {c['pytest_rc']}).

{common.md_table(["test", "outcome", "seconds", "message"], rows)}
**Speed** (gpu_bench.md has the tables; a missed target is reported, it does not fail the check):

{speed}"""


def publish(out: Path, dest: Path, allow_dry_run: bool) -> list[Path]:
    """Copy the check's and the benchmark's JSON and Markdown from ``out`` to ``dest``."""
    check = json.loads((out / "gpu_check.json").read_text())
    dry = not check["device"].startswith("cuda") or check["tiny"]
    if dry and (not allow_dry_run or dest.resolve() == common.RESULTS.resolve()):
        raise SystemExit(f"{out}: a dry run (device {check['device']}, tiny {check['tiny']}); "
                         "its figures are not published (--allow-dry-run with another --dest to copy them anyway)")
    missing = [f for f in FILES if not (out / f).is_file()]
    if missing:
        raise SystemExit(f"{out}: missing {', '.join(missing)}")
    dest.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copyfile(out / f, dest / f)) for f in FILES]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("summarise", help="write gpu_check.{json,md} into OUT")
    s.add_argument("out", type=Path)
    s.add_argument("--device", required=True)
    s.add_argument("--tiny", action="store_true")
    s.add_argument("--pytest-rc", type=int, required=True)
    s.add_argument("--bench-rc", type=int, required=True)
    s.add_argument("--install", default="", help="what the install step did (scripts/gpu_check.sh)")
    p = sub.add_parser("publish", help="copy OUT's gpu_check.* and gpu_bench.* into benchmarks/results/")
    p.add_argument("out", type=Path)
    p.add_argument("--dest", type=Path, default=common.RESULTS)
    p.add_argument("--allow-dry-run", action="store_true")
    a = ap.parse_args(argv)
    if a.cmd == "summarise":
        res = summarise(a.out, a.device, a.tiny, a.pytest_rc, a.bench_rc, a.install)
        print(f"gpu check {'passed' if res['passed'] else 'FAILED'}: {a.out / 'gpu_check.md'}")
    else:
        for path in publish(a.out, a.dest, a.allow_dry_run):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
