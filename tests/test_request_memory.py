"""Working memory: the engine's estimates bound what it really allocates, and the classify
request that took the server down (64 long inputs x 32 labels) now runs within its budget.

Peaks are measured in a fresh process (``memory_probe.py``: the rise of the peak resident set
over the call), with large buffers mapped and unmapped as torch allocates and frees them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
MiB = 2**20


def probe(model_dir: Path, job: dict, home: Path) -> list[dict]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "SOFTPROMPT_HOME": str(home),
           "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, str(HERE / "memory_probe.py"), str(model_dir), json.dumps(job)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_estimates_bound_the_measured_peaks(tiny_model_dir, tmp_path):
    """Each estimate is at least the measured peak, and at most 3x it (+1 MiB): scoring many
    inputs x labels, a long input under a prompt, a batch of generations, long generations in one
    prefill chunk. (Two of them: one alone peaked at 0.4-1.7 MiB over six probes, as freed memory
    still resident was reused, too close to the noise floor below; two measured 2.1-3.1 MiB over
    fourteen, against an estimate of 3.9 MiB.)"""
    job = {"kind": "engine", "group_mb": 4, "cases": [
        {"name": "classify", "kind": "score", "text": "word " * 100, "rows": 64, "labels": 32},
        {"name": "long input", "kind": "score", "text": "the movie was great " * 90, "rows": 4, "labels": 8,
         "prompt": "p"},
        {"name": "generate", "kind": "generate", "text": "the movie was great " * 60, "rows": 8, "max_tokens": 30,
         "chunk": 64},
        {"name": "long generate", "kind": "generate", "text": "the movie was great " * 90, "rows": 2,
         "max_tokens": 20, "chunk": 512, "prompt": "p"}]}
    for c in probe(tiny_model_dir("llama"), job, tmp_path):
        assert c["measured"] > MiB / 2, c  # a real measurement, above the noise
        assert c["measured"] <= c["estimate"] <= 3 * c["measured"] + MiB, c


@pytest.mark.slow
def test_the_classify_reproducer_runs_within_a_scaled_down_budget(tiny_model_dir, tmp_path):
    """64 inputs of 100 words x 32 label words (the issue's request, at the tiny model's context)
    answers 200 and the server's peak stays within --max-request-mb 24. Before, each input x
    label pair copied the input's key/value cache, all at once (here ~160 MiB)."""
    body = {"prompt": "tiny", "inputs": ["word " * 100] * 64, "verbalizer": [f"w{i}" for i in range(32)]}
    [c] = probe(tiny_model_dir("llama"), {"kind": "server", "server": {"max_request_mb": 24}, "body": body}, tmp_path)
    assert c["warm_status"] == 200 and c["status"] == 200, c
    assert len(c["body"]["data"]) == 64
    assert c["measured"] <= 24 * MiB, c["measured"] / MiB
