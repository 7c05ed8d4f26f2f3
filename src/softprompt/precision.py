"""Compute precision of the frozen model's forward and backward: detection and choice.

``auto`` picks bfloat16 autocast where the hardware computes bf16 natively: a CUDA GPU that
supports it, or a CPU whose flags (``/proc/cpuinfo``) include ``amx_bf16`` (Intel AMX) or
``avx512_bf16`` (AVX512-BF16, e.g. AMD EPYC Zen 4). Elsewhere bf16 is emulated and slower than
float32, so ``auto`` keeps float32. Autocast runs the matrix products in bf16 and keeps norms,
softmax and the loss in float32; the loss's vocabulary logits are float32 products too, except
in language-modelling mode (``logits_context``); the prompt (the master copy) and the optimiser state stay
float32 whatever the precision. A model loaded in bf16/fp16 (``--dtype``) is used as it is:
``auto`` then adds nothing. The choice and its reason are written into the training summary
and ``softprompt.json`` (``describe``).

``model_dtype`` is the same detection for inference: ``--dtype auto`` (the default of ``serve``,
``generate`` and ``eval``) loads the frozen model in bfloat16 where bf16 is native, else float32.
"""

from __future__ import annotations

import contextlib
import contextvars
from pathlib import Path
from typing import cast

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


def model_dtype(requested: str, device: torch.device, flags: set[str] | None = None) -> tuple[str, str]:
    """``--dtype auto`` for inference (``serve``, ``generate``, ``eval``): (``bfloat16``, why) where
    ``device`` computes bf16 natively (``native_bf16``), else (``float32``, why). Any other value
    is returned as asked."""
    if requested != "auto":
        return requested, "asked for"
    native, why = native_bf16(device, flags)
    return ("bfloat16" if native else "float32"), why


LOGITS = ("fp32", "bf16")  # the loss's vocabulary logits under bf16 autocast (``autocast``)
_BF16_LOGITS: contextvars.ContextVar[bool] = contextvars.ContextVar("softprompt_bf16_logits", default=False)


def check_logits(logits: str) -> str:
    """``logits`` if it is one of ``LOGITS``, else a ValueError naming it."""
    if logits not in LOGITS:
        raise ValueError(f"logits {logits!r}: choose one of {', '.join(LOGITS)}")
    return logits


def autocast(used: str, device: torch.device, casts: FrozenCasts | None = None, logits: str = "fp32"):
    """The context to run a forward in: bf16 autocast for ``used == "bf16"`` (with ``casts``'
    weights swapped in), else nothing. ``logits``: how the loss's vocabulary logits are computed
    under it (``logits_context``): ``fp32``, the head's float32 product, or ``bf16``, autocast's."""
    check_logits(logits)
    if used != "bf16":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
    if casts is not None:
        stack.enter_context(casts.swapped())
    if logits == "bf16":
        stack.enter_context(_bf16_logits())
    return stack


@contextlib.contextmanager
def _bf16_logits():
    token = _BF16_LOGITS.set(True)
    try:
        yield
    finally:
        _BF16_LOGITS.reset(token)


def float32_logits() -> bool:
    """Whether a loss computed here takes float32 vocabulary logits (``logits_context``)."""
    return not _BF16_LOGITS.get()


def logits_context(device: torch.device, float32: bool | None = None):
    """The context a loss computes its vocabulary logits in (``forward.chunked_ce``,
    ``forward.decoder.loss_logits``): autocast off, so the head's product runs in the head's own
    dtype (float32 for the float32 model that bf16 autocast trains), unless the forward runs
    under ``autocast(..., logits="bf16")``, which leaves the product to autocast. ``float32``
    given: that choice, made where the forward ran (a checkpoint's recompute runs in backward,
    outside the forward's context).

    Autocast's bf16 product rounds every logit to bf16, 8 significant bits: between 16 and 32,
    where the default model's largest logits lie (18 to 31 on Subj's rows), values are 0.125
    apart, and the loss and its gradient are then those of the rounded logits.
    Only the labelled positions get logits, so where targets are a few tokens a row
    (classification by label words, input -> target data) the float32 product costs a few rows'
    worth; in language-modelling mode every token is a target and it costs 13-15% of a bf16
    step on the walk-through, so LM mode keeps autocast's (``docs/benchmarks.md``: ``levers``,
    ``auto_suite``)."""
    float32 = float32_logits() if float32 is None else float32  # given: decided by a caller earlier
    return torch.autocast(device.type, enabled=False) if float32 else contextlib.nullcontext()


class FrozenCasts:
    """A frozen model's matrix weights cast to bf16 once, swapped in while autocast runs.

    Autocast casts a weight to bf16 at every product that uses it and caches the cast only for
    trainable leaves, so a frozen model's weights are cast again at every step: for the default
    model that is 134M values read and written per forward (measured gain on walk-through batches:
    6-8% of a CPU training step, ``benchmarks/results/levers.md``). The cast is
    deterministic and autocast skips a weight already in bf16, so swapping in the same cast, made
    once, gives bit-identical losses and gradients (tests/test_precision.py).

    Swapped: the ``weight`` of every ``nn.Linear`` and GPT-2 ``Conv1D`` that is frozen float32
    and not shared with an embedding (a lookup is no autocast op: a tied output layer keeps its
    float32 table: the loss takes float32 logits from it, or with bf16 logits casts it once
    per call). The swap puts plain tensors in the
    modules' parameter slots, as ``torch.func.functional_call`` does, and puts the parameters
    back on exit; autograd keeps the bf16 tensors it saved, so backward after the exit is
    unchanged. Costs one bf16 copy of those weights (half the float32 model) while training.
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16):
        tables = {m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Embedding)}

        def frozen_matrix(m: torch.nn.Module) -> bool:
            w = m._parameters.get("weight")
            return ((isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")
                    and isinstance(w, torch.nn.Parameter) and not w.requires_grad and w.dtype == torch.float32
                    and w.data_ptr() not in tables)

        self.slots = [m for m in model.modules() if frozen_matrix(m)]
        self.dtype = dtype
        self.cast: list[torch.Tensor] | None = None

    @contextlib.contextmanager
    def swapped(self):
        if self.cast is None:
            self.cast = [cast(torch.Tensor, m._parameters["weight"]).detach().to(self.dtype) for m in self.slots]
        saved = [m._parameters["weight"] for m in self.slots]
        try:
            for m, w in zip(self.slots, self.cast):
                m._parameters["weight"] = cast(torch.nn.Parameter, w)  # a plain tensor in the slot, on purpose
            yield
        finally:
            for m, p in zip(self.slots, saved):
                m._parameters["weight"] = p
