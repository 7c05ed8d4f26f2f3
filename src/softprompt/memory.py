"""PrefixMemory (PrefixMemory-Tuning / Prefix-Tuning+, ICLR 2026): a query-dependent term outside the softmax.

A prefix competes with the input inside the softmax. PrefixMemory adds, in every layer and
attention head, ``phi(q)^T M`` to the attention output, with ``phi = elu + 1`` applied to the
query and a small trainable ``M`` (head dim x head dim) per head, zero-initialised, trained
with a deep prompt. The memory is one tensor (L, heads, d, d) per task: per-row data that a
mixed batch gathers row by row, like the prompt.

How it reaches the attention: through transformers' public ``AttentionInterface``. ``enable``
registers ``memory_attention`` under ``ATTN``, with transformers' SDPA mask function for the
same name (``AttentionMaskInterface``: without one, transformers builds no mask at all for a
custom attention, losing padding and the causal offset behind a prefix), and switches the model
to it (``set_attn_implementation``); it runs transformers' own SDPA attention and, when the forward
call carries ``prefix_memory`` (B or 1, L, heads, d, d) (transformers hands extra forward
keyword arguments down to the attention function), adds the term for the layer
(``module.layer_idx``). Without ``prefix_memory`` it is SDPA attention, unchanged, so switching
the shared frozen model changes nothing for other prompts (tested). Nothing is patched or
subclassed; models whose attention is not SDPA are refused in one line.

Stored beside a deep prompt's PEFT prefix-tuning files as ``MEMORY_FILE`` (``MEMORY_KEY``:
(L, heads, d, d) float32); ``check_memory`` is the check the store applies to it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from softprompt.models import Model

MEMORY_FILE = "prefix_memory.safetensors"
MEMORY_KEY = "memory"
ATTN = "softprompt_prefix_memory"  # the attention implementation's registered name
MAX_ABS = 1e4
COMPATIBLE: set[str] = {ATTN}  # attention implementations that handle ``prefix_memory`` (``inference/fused.py`` adds its own)


def phi(q: torch.Tensor) -> torch.Tensor:
    """The feature map: elu(q) + 1 (positive, as in linear attention)."""
    return F.elu(q) + 1


def memory_attention(module, query, key, value, attention_mask: torch.Tensor, **kwargs):
    """SDPA attention plus ``phi(q) @ M[layer]`` when the call carries ``prefix_memory``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    memory = kwargs.pop("prefix_memory", None)
    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)  # out (B, T, h, d)
    if memory is None:
        return out, weights
    m = memory[:, module.layer_idx].to(query.dtype)  # (B or 1, h, d, d)
    return out + (phi(query) @ m).transpose(1, 2).to(out.dtype), weights  # query (B, h, T, d)


def enable(model: Model) -> None:
    """Register ``memory_attention`` and switch ``model`` to it (idempotent); one line if the
    model's attention is not SDPA."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from softprompt.config import UserError

    impl = getattr(model.config, "_attn_implementation", None)
    if impl in COMPATIBLE:
        return
    if impl != "sdpa":
        raise UserError(f"--prefix-memory needs SDPA attention; this {model.config.model_type} model runs {impl!r}")
    AttentionInterface.register(ATTN, memory_attention)
    AttentionMaskInterface.register(ATTN, sdpa_mask)  # without a mask function transformers would pass no mask
    model.set_attn_implementation(ATTN)


def memory_shape(model: Model) -> tuple[int, int, int]:
    """(L, attention heads, head dim) of the model's memory."""
    cfg = model.config
    heads = cfg.num_attention_heads
    return cfg.num_hidden_layers, heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // heads


def check_memory(tensors: dict, shape: tuple[int, int, int] | None) -> tuple[str, str] | None:
    """(key, problem) if ``MEMORY_KEY`` is not a finite float (L, heads, d, d) with d x d square
    (and, with ``shape``, the model's (L, heads, d)); None if it is."""
    m = tensors.get(MEMORY_KEY)
    if m is None:
        return MEMORY_KEY, "is missing"
    if not m.is_floating_point() or m.dim() != 4 or m.shape[2] != m.shape[3] or min(m.shape) < 1:
        return MEMORY_KEY, f"has shape {tuple(m.shape)}; expected (layers, heads, d, d) floats"
    if shape is not None and tuple(m.shape[:3]) != tuple(shape):
        return MEMORY_KEY, f"has shape {tuple(m.shape)}; the model needs {(*shape, shape[2])}"
    if not torch.isfinite(m.float()).all() or m.float().abs().max() > MAX_ABS:
        return MEMORY_KEY, f"holds NaN, infinite or values over {MAX_ABS:g}"
    return None
