"""What every result records, and how every result file is written.

* ``versions``, ``git_revision``, ``machine``, ``stamp``: the provenance a saved prompt, a
  comparison, a continual run or a benchmark carries, built one way.
* ``atomic_write`` / ``write_json``: THE way the project writes a file. The bytes go to a unique
  temporary file beside the target, are flushed and fsynced, then renamed over it, so a reader
  (or a crash) never sees half a file. Whole directories (stored prompts, checkpoints,
  converted models) follow the same rule in ``durable.py``.
* ``pyplot``: matplotlib (an optional extra) with the headless backend, or one clear error;
  ``save_figure`` writes a figure with ``atomic_write``.

A base module: it imports nothing of softprompt but ``config``, so every layer may use it.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

from softprompt.config import UserError

HERE = Path(__file__).resolve().parent  # git runs here: the checkout, if any, that holds this file


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` whole or not at all (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return path


def write_json(doc, path: str | Path, indent: int | None = 1) -> Path:
    """A result document as JSON (sorted keys, anything else as ``str``), atomically."""
    return atomic_write(path, json.dumps(doc, indent=indent, sort_keys=True, default=str) + "\n")


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """A matplotlib figure rendered in memory, then written with ``atomic_write``."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", dpi=dpi)
    return atomic_write(path, buf.getvalue())


def versions() -> dict:
    """softprompt, torch, transformers, python and (if installed) peft versions."""
    import torch
    import transformers

    from softprompt import __version__

    out = {"softprompt": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version()}
    try:
        import peft

        out["peft"] = peft.__version__
    except ImportError:
        pass
    return out


def git_revision() -> dict:
    """The revision of the checkout this code runs from (None outside one) and whether it is dirty."""

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"revision": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def loadavg() -> tuple[float, float, float] | None:
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def machine(**extra) -> dict:
    """Platform, CPU count, torch threads and load average (plus ``extra``)."""
    import torch

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "loadavg_end": loadavg(), **extra}


def stamp() -> str:
    """The UTC time a result was created, ISO 8601."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def pyplot():
    """matplotlib.pyplot with the headless Agg backend; one clear error without the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plots need matplotlib: pip install 'softprompt[plots]'") from None
    return plt
