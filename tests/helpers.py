"""Helpers several test modules share (fixtures are in ``conftest.py``, server helpers in
``serving.py``); a test module never imports another test module (``test_layout.py`` checks)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from softprompt.config import DataConfig
from softprompt.splits import load_splits


def file_examples(tokenizer, cfg: DataConfig, path: str | Path, limit: int | None = None) -> list:
    """Every example of one data file under ``cfg``'s settings (its first ``limit`` rows; no dev
    carved off), read the one way data is read (``splits.load_splits``)."""
    one = replace(cfg, path=str(path), limit=limit, dev_fraction=0.0, eval_path=None, files=None)
    return load_splits(tokenizer, one).train
