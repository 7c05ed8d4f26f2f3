"""Data-parallel training (torch.distributed, gloo on this CPU): K processes launched by
``torchrun`` (and ``accelerate launch``) train exactly the prompt that one process trains on the
same global batches and seed, with the frozen model replicated or sharded by FSDP; only rank 0
writes the store and the checkpoint.

Every run goes through the real command line (``python -m softprompt train``). The batch size (7)
leaves a last micro-batch of one row, so one rank runs a zero-weight row there; grad-accum 2 and
an evaluation set (early stopping, best-epoch selection) are on as well.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from softprompt import store
from softprompt.store import Store

pytestmark = pytest.mark.slow  # torchrun and accelerate launch: several processes


VERB = "0=negative,1=positive"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(model_dir, csv, *extra) -> list[str]:
    return ["train", "--model", str(model_dir), "--data", str(csv), "--template", "{text}",
            "--target-column", "label", "--verbalizer", VERB, "--limit", "24", "--batch-size", "7",
            "--grad-accum", "2", "--epochs", "3", "--num-virtual-tokens", "4",
            "--name", "toy", "--quiet", "--precision", "fp32", *extra]  # fp32: equal to 1e-6 across process counts


def run(cmd: list[str], home, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "SOFTPROMPT_HOME": str(home), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(free_port()), "-m", "softprompt"]


def stored(home) -> tuple[torch.Tensor, dict]:
    sp = Store(home).load_prompt("toy")
    return sp.embeddings, sp.meta


@pytest.fixture(scope="module")
def single(tiny_model_dir, tmp_path_factory):
    """The reference: one process, same options."""
    home = tmp_path_factory.mktemp("single")
    csv = toy_file(tmp_path_factory.mktemp("data"))
    run([sys.executable, "-m", "softprompt", *train_args(tiny_model_dir("llama"), csv)], home)
    prompt, meta = stored(home)
    return prompt, meta, csv


def toy_file(folder):
    p = folder / "toy.csv"
    rows = ["text,label"] + [f"the movie was {'good and great' if i % 2 else 'bad and boring'},{i % 2}" for i in range(48)]
    p.write_text("\n".join(rows) + "\n")
    return p


def check_equal(single, home, world: int, fsdp: bool) -> None:
    ref, ref_meta, _ = single
    prompt, meta = stored(home)
    assert meta["distributed"] == {"world_size": world, "fsdp": fsdp}
    assert not torch.equal(prompt, torch.zeros_like(prompt))
    print(f"world {world} fsdp {fsdp}: max |prompt - single| = {(prompt - ref).abs().max():.2e}")
    assert torch.allclose(prompt, ref, atol=1e-6, rtol=0), (prompt - ref).abs().max()
    # float rounding differs between 1 and K processes (the rows' losses are summed in another order)
    assert [e["train_loss"] for e in meta["epochs"]] == pytest.approx([e["train_loss"] for e in ref_meta["epochs"]], abs=1e-5)
    assert [e.get("eval_accuracy") for e in meta["epochs"]] == [e.get("eval_accuracy") for e in ref_meta["epochs"]]
    assert store.load_checkpoint(home / "runs" / "toy" / "checkpoint") is not None  # rank 0 wrote it


def test_two_processes_equal_one(single, tiny_model_dir, tmp_path):
    home = tmp_path / "home"
    out = run([*torchrun(2), *train_args(tiny_model_dir("llama"), single[2])], home)
    check_equal(single, home, 2, fsdp=False)
    assert out.stdout.count("saved ") == 1  # only rank 0 reports and saves
    assert sorted(p for p in os.listdir(home / "prompts") if not p.startswith(".")) == ["toy"]  # one name
    assert len([p for p in os.listdir(home / "prompts") if "@v-" in p]) == 1  # one version, no leftovers


def test_fsdp_sharded_model_equals_one_process(single, tiny_model_dir, tmp_path):
    """The frozen decoder layers sharded over 2 processes (FSDP2 on gloo), the prompt replicated."""
    home = tmp_path / "home"
    run([*torchrun(2), *train_args(tiny_model_dir("llama"), single[2], "--fsdp")], home)
    check_equal(single, home, 2, fsdp=True)


@pytest.mark.skipif(shutil.which("accelerate", path=os.path.dirname(sys.executable)) is None,
                    reason="accelerate's launcher is not installed")
def test_accelerate_launch_equals_one_process(single, tiny_model_dir, tmp_path):
    home = tmp_path / "home"
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    # accelerate's own multi-CPU mode needs MPI; --multi_gpu starts the same torchrun-style workers
    # (RANK/WORLD_SIZE set) on a CPU-only machine too, and the backend follows --device (gloo here)
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "softprompt",
           *train_args(tiny_model_dir("llama"), single[2])]
    run(cmd, home)
    check_equal(single, home, 2, fsdp=False)


def test_fsdp_without_a_launcher_is_a_user_error(tiny_model_dir, tmp_path):
    env = {**os.environ, "SOFTPROMPT_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    csv = toy_file(tmp_path)
    out = subprocess.run([sys.executable, "-m", "softprompt", *train_args(tiny_model_dir("llama"), csv, "--fsdp")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "torchrun" in out.stderr and "Traceback" not in out.stderr


def test_shard_weights_rebuild_the_global_mean():
    """Unit check of the sharding rule: token-weighted local means sum to the global mean."""
    from softprompt.data import Example
    from softprompt.training.distributed import Dist

    ex = [Example(input_ids=[1] * 4, labels=[-100] * (4 - k) + [7] * k, source_len=4 - k) for k in (1, 2, 3)]
    idx = [0, 1, 2]
    shares = [Dist(r, 2, r).shard(ex, idx) for r in range(2)]
    assert shares[0] == ([0, 2], 4 / 6) and shares[1] == ([1], 2 / 6)
    assert Dist(1, 2, 1).shard(ex, [0]) == ([0], 0.0)  # no row for rank 1: a zero-weight forward
