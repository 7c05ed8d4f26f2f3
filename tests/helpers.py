"""Helpers several test modules share: texts, a relative difference, a target-mode data config,
resumed == uninterrupted training, a DePT prompt in the store, the CLI run in-process. Fixtures
are in ``conftest.py``; batches in ``batches.py``, engines in ``engine_helpers.py``, server helpers
in ``serving.py``, upload helpers in ``upload_helpers.py``. A test module never imports another
test module (``test_layout.py`` checks)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from softprompt.config import DataConfig
from softprompt.splits import load_splits
from softprompt.training import tune as TR


def file_examples(tokenizer, cfg: DataConfig, path: str | Path, limit: int | None = None) -> list:
    """Every example of one data file under ``cfg``'s settings (its first ``limit`` rows; no dev
    carved off), read the one way data is read (``splits.load_splits``)."""
    one = replace(cfg, path=str(path), limit=limit, dev_fraction=0.0, eval_path=None, files=None)
    return load_splits(tokenizer, one).train


TEXTS = ["the movie was", "a wonderful film with a great story", "who wrote the book", "positive negative"]
VERB = {"0": "negative", "1": "positive"}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def target_cfg(csv, **kw) -> DataConfig:
    return DataConfig(path=str(csv), template="{text}", target_column="label", verbalizer=VERB, **kw)


def uninterrupted_and_resumed(sp_store, lm, cfg, pcfg, tcfg, monkeypatch):
    """(a run named "full", the same run named "part" stopped by Ctrl-C at epoch 2, then resumed)."""
    # imported here: conftest imports serving, which imports this module
    from conftest import interrupt_at_epoch

    full = TR.train(lm, cfg, pcfg, tcfg, name="full", store=sp_store)
    undo = interrupt_at_epoch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        TR.train(lm, cfg, pcfg, tcfg, name="part", store=sp_store)
    undo()
    resumed = TR.train(lm, cfg, pcfg, tcfg, name="part", resume=True, store=sp_store)
    assert torch.equal(resumed.prompt, full.prompt) and resumed.history == full.history
    return full, resumed


def save_dept(sp_store, lm, name: str, n: int, length: int, rank: int, seed: int, offset: bool = True):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randn(n, lm.hidden_size, generator=g)
    off = (torch.randn(length, rank, generator=g), torch.randn(rank, lm.hidden_size, generator=g) * 0.5)
    meta = {"base_model": {"name": lm.name, "fingerprint": lm.fingerprint}}
    sp_store.save_prompt(name, prompt, meta, offset=off if offset else None)
    return prompt, (off[0] @ off[1] if offset else None)


def random_memory(lm, seed: int, scale: float = 0.3) -> torch.Tensor:
    from softprompt import memory as MEM

    L, h, d = MEM.memory_shape(lm.model)
    return torch.randn(L, h, d, d, generator=torch.Generator().manual_seed(seed)) * scale


def deep_prompt(lm, n: int, seed: int) -> torch.Tensor:
    L, kv, d = lm.kv_shape
    return torch.randn(L, 2, kv, n, d, generator=torch.Generator().manual_seed(seed))


def save_memory(sp_store, lm, name: str, n: int, seed: int, memory: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    kv, mem = deep_prompt(lm, n, seed), random_memory(lm, seed + 100) if memory else None
    sp_store.save_prompt(name, kv, {"base_model": {"fingerprint": lm.fingerprint}}, memory=mem)
    return kv, mem


# ---------------------------------------------------------------- the command line, run in-process


def store_entries(sp_home: Path) -> list[str]:
    """Everything in the prompt store and the run checkpoints."""
    out = []
    for sub in ("prompts", "runs"):
        d = sp_home / sub
        if d.exists():
            out += [str(p.relative_to(sp_home)) for p in d.rglob("*")]
    return out


def run_cli(capsys, main, args: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what fixtures printed (e.g. building the tiny model)
    rc = main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_user_error(capsys, main, sp_home, args, match: str) -> str:
    rc, out, err = run_cli(capsys, main, args)
    lines = err.strip("\n").splitlines()
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("softprompt: error:")
    assert "Traceback" not in err and out == ""
    assert match in lines[0], lines[0]
    assert store_entries(sp_home) == []
    return lines[0]
