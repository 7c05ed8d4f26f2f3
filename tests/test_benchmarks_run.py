"""The benchmark scripts keep running as the library changes under them.

A benchmark is run by hand, rarely, so a stale call (a signature that changed, a ``store`` now
required) would otherwise surface only on the next measuring run. Three checks:

* every ``benchmarks/*.py`` compiles (fast);
* every script with a command line parses ``--help``, all in one subprocess: its imports resolve
  and its module-level code runs (slow: one interpreter importing torch, transformers and peft);
* the ``--quick`` mode (tiny random model, results in a temporary folder) of the benchmarks whose
  quick run takes under about a minute on a 2-core machine exits 0 (slow, see ``QUICK``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
SCRIPTS = sorted(BENCH.glob("*.py"))
LIBRARIES = {"common.py", "soak_mix.py"}  # imported by the scripts, no command line of their own

QUICK = [  # script and extra flags; the wall time of its quick run on the shared 2-core machine (load 7)
    "auto_suite.py --precision fp32",  # 25 s (40 s at load 2 since each run adds softprompt eval twice): compare
    # --quick for a synthetic suite, softprompt train and eval as subprocesses; --precision covers the flags
    # passed through and the results' own name
    "deep_step.py",  # 13 s
    "lever_cost.py",  # 13 s
    "mixed_batch.py",  # 27 s
    "new_user.py",  # 24 s: softprompt train, eval and compare as subprocesses on a tiny model folder
    "peft_generate_gap.py",  # 10 s
    "precision_quality.py",  # 8 s
    "prefix_cache.py",  # 26 s
    "serve_floor.py",  # 58 s: two server subprocesses
    "serve_soak.py --mix",  # 28 s: a server subprocess, healthy streams beside the hostile mix
    "train_step.py",  # 26 s
    "walkthrough.py",  # 11 s
]
QUICK_TIMEOUT_S = 180


def env() -> dict[str, str]:
    """This checkout's sources first (the venv may be installed from another tree)."""
    path = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}


def results() -> dict[str, int]:
    """benchmarks/results: each file's modification time (a quick run must change nothing there)."""
    return {p.name: p.stat().st_mtime_ns for p in (BENCH / "results").iterdir()}


def test_every_benchmark_compiles():
    assert len(SCRIPTS) > 10
    for script in SCRIPTS:
        compile(script.read_text(encoding="utf-8"), str(script), "exec")


HELP = """
import contextlib, io, runpy, sys
sys.path.insert(0, {bench!r})
bad = []
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            runpy.run_path(path, run_name="__main__")
        bad.append((path, "no exit on --help"))
    except SystemExit as e:
        if e.code not in (0, None) or "usage:" not in out.getvalue():
            bad.append((path, f"exit {{e.code}}"))
for path in {libraries!r}:
    runpy.run_path(path)  # imports resolve, nothing runs
print(bad)
sys.exit(1 if bad else 0)
"""


@pytest.mark.slow
def test_every_benchmark_parses_help():
    scripts = [str(s) for s in SCRIPTS if s.name not in LIBRARIES]
    code = HELP.format(bench=str(BENCH), libraries=[str(BENCH / n) for n in sorted(LIBRARIES)])
    run = subprocess.run([sys.executable, "-c", code, *scripts], capture_output=True, text=True, timeout=300,
                         env=env(), cwd=REPO)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("command", QUICK)
def test_quick_benchmark_runs(command, tmp_path):
    """``--quick`` exits 0 and leaves benchmarks/results alone.

    Covered (``QUICK``; times measured on the shared 2-core machine at load average about 7,
    under 4 minutes in all): auto_suite, deep_step, lever_cost, mixed_batch, new_user, peft_generate_gap,
    precision_quality, prefix_cache, serve_floor, serve_soak --mix, train_step, walkthrough.
    Not covered, because their quick run takes over a minute there: serve_load (121 s),
    serve_soak without --mix (86 s), few_shot_adapt (246 s; 138 s on two small tasks: it reads
    whole task files), dist_train (271 s: torchrun workers; its quick run also writes
    benchmarks/results/dist_train_tiny.* unless given --out), ray_serve_load (187 s: a Ray cluster).
    Without a quick mode, covered by ``--help`` only: ablation, levers, sweep_defaults (the
    default model, minutes), gpu_bench (its CPU dry run is tests/test_gpu_check.py), gpu_report
    (reads gpu_bench's results), serve_vllm (needs vLLM), suite_readme (no model; its own tests are
    tests/test_suite_table.py).
    """
    before = results()
    script, *flags = command.split()
    run = subprocess.run([sys.executable, str(BENCH / script), "--quick", *flags], capture_output=True,
                         text=True, timeout=QUICK_TIMEOUT_S, env=env(), cwd=tmp_path)
    assert run.returncode == 0, f"{command} --quick exited {run.returncode}:\n{run.stderr[-3000:]}"
    assert results() == before, f"{command} --quick wrote into benchmarks/results"
