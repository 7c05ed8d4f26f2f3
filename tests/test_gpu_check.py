"""scripts/gpu_check.sh's dry run: the whole GPU check on the CPU with a tiny config, so that the
prepared command cannot rot while no GPU is at hand. It must install the project without
network, run the CUDA-marked tests (here on the CPU) and the benchmark, and write its results;
its figures are not published (benchmarks/gpu_report.py refuses a dry run).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


@pytest.mark.slow
def test_gpu_check_dry_run_passes_and_writes_its_results(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--device", "cpu", "--tiny", "--no-wheels",
                          "--out", str(out), "--python", sys.executable],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    for name in ("check.log", "pytest.log", "pytest.xml", "gpu_bench.json", "gpu_bench.md", "gpu_check.json", "gpu_check.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    check = json.loads((out / "gpu_check.json").read_text())
    assert check["passed"] and check["device"] == "cpu" and check["tiny"]
    c = check["correctness"]
    assert c["passed"] == len(c["tests"]) >= 10 and c["failed"] == c["skipped"] == 0
    assert {t["test"].split("::")[1].split("[")[0] for t in c["tests"]} >= {
        "test_prefix_fast_path_equals_peft_concatenation", "test_deep_prompt_equals_peft_prefix_tuning",
        "test_mixed_batch_equals_single_runs", "test_engine_decode_equals_model_generate",
        "test_server_answers_a_mixed_burst"}
    bench = json.loads((out / "gpu_bench.json").read_text())
    assert set(bench["train"]["methods"]) == {"peft_n20", "softprompt_n20", "peft_n100", "softprompt_n100", "floor",
                                              "deep_n20", "deep_n100", "lora"}
    assert all(0 < m["roofline"]["fraction_of_peak"] for m in bench["train"]["methods"].values())
    assert {f"engine 8 prompts B={b}" for b in (8, 32)} | {f"generate B={b}" for b in (1, 8, 32)} <= set(bench["decode"]["methods"])
    assert len(check["speed"]["targets"]) == 4 and "Dry run" in (out / "gpu_check.md").read_text()
    # a dry run is not published into benchmarks/results
    import gpu_report

    with pytest.raises(SystemExit, match="dry run"):
        gpu_report.publish(out, gpu_report.common.RESULTS, allow_dry_run=True)
    copied = gpu_report.publish(out, tmp_path / "published", allow_dry_run=True)
    assert sorted(p.name for p in copied) == sorted(gpu_report.FILES)


def test_gpu_check_refuses_a_bad_command_line(tmp_path):
    for args in (["--device", "tpu"], ["--bogus"]):
        run = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), *args, "--out", str(tmp_path / "x")],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and len(run.stderr.strip().splitlines()) <= 2, run.stderr
