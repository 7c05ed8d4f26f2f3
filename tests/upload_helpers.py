"""Prompt folders and their zips for the upload tests (the ``app_http`` client that takes them is
a fixture in ``conftest.py``)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import torch

from softprompt import store

MAX_N = 16  # the server's --max-prompt-tokens in these tests


def prompt_dir(lm, path: Path, n: int = 3, value: float = 0.5, **meta) -> Path:
    meta = {"base_model": {"name": lm.name, "fingerprint": lm.fingerprint}, "value": value, **meta}
    return store.save_prompt(path, torch.full((n, lm.hidden_size), value), meta).resolve()


def zipped(path: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(path.iterdir()):
            z.write(f, f.name)
    return buf.getvalue()
