"""Compute precision of the frozen model's forward and backward: detection and choice.

``auto`` picks bfloat16 autocast where the hardware computes bf16 natively: a CUDA GPU that
supports it, or a CPU whose flags (``/proc/cpuinfo``) include ``amx_bf16`` (Intel AMX) or
``avx512_bf16`` (AVX512-BF16, e.g. AMD EPYC Zen 4). Elsewhere bf16 is emulated and slower than
float32, so ``auto`` keeps float32. Autocast runs the matrix products in bf16 and keeps norms,
softmax and the loss in float32; the prompt (the master copy) and the optimiser state stay
float32 whatever the precision. A model loaded in bf16/fp16 (``--dtype``) is used as it is:
``auto`` then adds nothing. The choice and its reason are written into the training summary
and ``softprompt.json`` (``describe``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from softprompt.config import PRECISIONS, UserError

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags of the first processor in ``/proc/cpuinfo`` (empty if unreadable)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model(cpuinfo: str | None = None) -> str:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return ""
    return next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), "")


def native_bf16(device: torch.device, flags: set[str] | None = None) -> tuple[bool, str]:
    """(whether ``device`` computes bf16 natively, why), detected at run time."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"cuda {torch.cuda.get_device_name(device)}: bf16 {'supported' if ok else 'not supported'}"
    flags = cpu_flags() if flags is None else flags
    have = [f for f in BF16_CPU_FLAGS if f in flags]
    if have:
        return True, f"cpu flags {', '.join(have)}"
    return False, f"cpu without {' or '.join(BF16_CPU_FLAGS)}"


def resolve(requested: str, device: torch.device, model_dtype: torch.dtype,
            flags: set[str] | None = None) -> dict:
    """``{"requested", "used", "reason"}``; ``used`` is ``fp32``, ``bf16`` (autocast) or the
    model's own low dtype (``bfloat16`` / ``float16`` from ``--dtype``)."""
    if requested not in PRECISIONS:
        raise UserError(f"--precision {requested!r}: choose one of {', '.join(PRECISIONS)}")
    if model_dtype != torch.float32:
        name = str(model_dtype).removeprefix("torch.")
        return {"requested": requested, "used": name, "reason": f"model loaded in {name} (--dtype)"}
    native, why = native_bf16(device, flags)
    if requested == "auto":
        return {"requested": requested, "used": "bf16" if native else "fp32", "reason": why}
    return {"requested": requested, "used": requested, "reason": "asked for" + ("" if native or requested == "fp32"
                                                                                else f" (emulated: {why})")}


def autocast(used: str, device: torch.device):
    """The context to run a forward in: bf16 autocast for ``used == "bf16"``, else nothing."""
    if used == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
