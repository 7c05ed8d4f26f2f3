"""The PEFT adapter format of a stored prompt: the two ``adapter_config.json`` flavours and the
deep prompt's flat layout.

* shallow: ``PROMPT_TUNING``; ``prompt_embeddings`` is the (N, H) prompt.
* deep: ``PREFIX_TUNING`` for a decoder-only model, after PEFT's grouped-query adjustment
  (``num_attention_heads`` = key/value heads, ``token_dim`` = kv heads x head dim, no projection);
  ``prompt_embeddings`` is (N, L*2*kv*d), row n being ``[layer 0 keys, layer 0 values, layer 1
  keys, ...]``, each (kv, d) flattened, which is how ``PeftModel.get_prompt`` views it. softprompt
  holds it as (L, 2, kv, N, d) (``prompt.is_deep``).

``StoredPrompt`` is a prompt as read from such a directory, and ``check_shape`` says whether it fits
a model. Reading, validating and writing directories is ``promptdir.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch

from softprompt.config import UserError


class PromptKind(str, Enum):
    """What a soft prompt is: input embeddings, or keys/values at every layer. Equal to its value
    (``PromptKind.DEEP == "deep"``), which is what configs, metadata and flags write."""

    SHALLOW = "shallow"  # (N, H): N virtual input embeddings
    DEEP = "deep"  # (L, 2, kv, N, d): keys and values of N virtual positions at every layer (prefix tuning)

    def __str__(self) -> str:
        return self.value


def adapter_config(n: int, h: int, model_path: str, model_config=None, init: str = "RANDOM") -> dict:
    """The adapter_config.json that PEFT's PromptTuningConfig writes: a causal LM, or for an
    encoder-decoder (T5) a SEQ_2_SEQ_LM adapter whose one prompt block goes in front of the
    encoder input, where softprompt puts it (``seq2seq.py``)."""
    cfg = model_config
    seq2seq = bool(getattr(cfg, "is_encoder_decoder", False))
    return {  # the keys and defaults of PEFT's PromptTuningConfig
        "peft_type": "PROMPT_TUNING", "task_type": "SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM",
        "num_virtual_tokens": n, "token_dim": h, "num_transformer_submodules": 1,
        "num_attention_heads": getattr(cfg, "num_attention_heads", None),
        "num_layers": getattr(cfg, "num_hidden_layers", None), "prompt_tuning_init": init,
        "prompt_tuning_init_text": None, "tokenizer_name_or_path": None, "tokenizer_kwargs": None,
        "base_model_name_or_path": str(model_path), "revision": None, "inference_mode": True,
        "modules_to_save": None, "auto_mapping": None,
    }


def prefix_adapter_config(kv: torch.Tensor, model_path: str) -> dict:
    """The adapter_config.json of PEFT's PrefixTuningConfig for a decoder-only model (after PEFT's
    grouped-query adjustment: heads = key/value heads, token_dim = kv heads x head dim)."""
    L, _, h, n, d = kv.shape
    return {
        "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": int(n),
        "token_dim": int(h * d), "num_transformer_submodules": 1, "num_attention_heads": int(h),
        "num_layers": int(L), "encoder_hidden_size": int(h * d), "prefix_projection": False,
        "base_model_name_or_path": str(model_path), "revision": None, "inference_mode": True,
        "modules_to_save": None, "auto_mapping": None,
    }


def deep_to_peft(kv: torch.Tensor) -> torch.Tensor:
    """(L, 2, kv, N, d) -> PEFT's prefix-tuning ``prompt_embeddings`` (N, L*2*kv*d)."""
    L, two, h, n, d = kv.shape
    return kv.permute(3, 0, 1, 2, 4).reshape(n, L * two * h * d)


def deep_from_peft(flat: torch.Tensor, layers: int, heads: int, head_dim: int) -> torch.Tensor:
    """PEFT's (N, L*2*kv*d) -> (L, 2, kv, N, d)."""
    return flat.reshape(flat.shape[0], layers, 2, heads, head_dim).permute(1, 2, 3, 0, 4).contiguous()


def deep_tensor(cfg: dict, flat: torch.Tensor, name: str) -> torch.Tensor:
    """A PREFIX_TUNING adapter's (N, L*2*kv*d) as (L, 2, kv, N, d), checked against its config."""
    if (cfg.get("num_transformer_submodules") or 1) != 1 or cfg.get("task_type") not in (None, "CAUSAL_LM"):
        raise UserError(f"prompt {name!r}: a {cfg.get('task_type')} prefix-tuning adapter is not supported "
                        "(deep prompts are for decoder-only causal language models)")
    try:
        L, heads, dim, n = (int(cfg[k]) for k in ("num_layers", "num_attention_heads", "token_dim", "num_virtual_tokens"))
    except (KeyError, TypeError, ValueError):
        raise UserError(f"prompt {name!r}: adapter_config.json lacks num_layers, num_attention_heads, token_dim "
                        "or num_virtual_tokens") from None
    if heads <= 0 or dim % heads or tuple(flat.shape) != (n, L * 2 * dim):
        raise UserError(f"prompt {name!r}: prompt_embeddings has shape {tuple(flat.shape)}, adapter_config.json "
                        f"says ({n}, {L} layers x 2 x {dim})")
    return deep_from_peft(flat, L, heads, dim // heads)


@dataclass
class StoredPrompt:
    name: str
    path: Path
    embeddings: torch.Tensor | None  # (N, H) float32; None for a deep prompt
    meta: dict
    kv: torch.Tensor | None = None  # (L, 2, kv, N, d) float32 for a deep prompt
    config: dict = field(default_factory=dict)  # adapter_config.json
    file_bytes: int = 0  # size of the files on disk
    offset: tuple[torch.Tensor, torch.Tensor] | None = None  # DePT's input offset (A (T_max, r), B (r, H)), float32
    memory: torch.Tensor | None = None  # PrefixMemory's (L, heads, d, d) float32, beside a deep prompt

    @property
    def input_offset(self) -> torch.Tensor | None:
        """The (T_max, H) offset added to the input tokens (``offset.py``), or None."""
        return None if self.offset is None else self.offset[0] @ self.offset[1]

    @property
    def kind(self) -> PromptKind:
        return PromptKind.DEEP if self.kv is not None else PromptKind.SHALLOW

    @property
    def tensor(self) -> torch.Tensor:
        """What the forward takes: (N, H) or (L, 2, kv, N, d)."""
        return self.kv if self.kv is not None else self.rows()

    def rows(self) -> torch.Tensor:
        """The (N, H) embeddings of a shallow prompt (a stored prompt holds these or keys/values)."""
        if self.embeddings is None:
            raise ValueError(f"prompt {self.name!r} holds neither embeddings nor keys/values")
        return self.embeddings

    @property
    def peft_tensor(self) -> torch.Tensor:
        """The tensor as PEFT stores it: (N, H), or (N, L*2*kv*d)."""
        return deep_to_peft(self.kv) if self.kv is not None else self.rows()

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.kv.shape[3]) if self.kv is not None else int(self.rows().shape[0])

    @property
    def nbytes(self) -> int:
        extra = sum(t.numel() * t.element_size() for t in (*(self.offset or ()), self.memory) if t is not None)
        return self.tensor.numel() * self.tensor.element_size() + extra

    def shallow(self, what: str) -> torch.Tensor:
        """The (N, H) embeddings, or one line saying that ``what`` needs a shallow prompt."""
        if self.kv is not None:
            raise UserError(f"prompt {self.name!r} is a deep prompt (per-layer keys/values): {what} needs a shallow "
                            "(N, H) prompt")
        return self.rows()


def check_shape(stored: StoredPrompt, hidden_size: int, kv_shape: tuple[int, int, int] | None) -> None:
    """One line if the prompt's shape does not fit the model: hidden size H for a shallow prompt,
    the key/value geometry (layers, kv heads, head dim; None: no decoder-only cache, as T5) for a deep one."""
    if stored.kv is None:
        if stored.rows().shape[1] != hidden_size:
            raise UserError(f"prompt {stored.name!r} has hidden size {stored.rows().shape[1]}, the model has "
                            f"{hidden_size}; it was trained for another model")
        return
    theirs = tuple(int(stored.kv.shape[i]) for i in (0, 2, 4))
    if kv_shape is None:
        raise UserError(f"prompt {stored.name!r} is a deep prompt (per-layer keys/values); this model has no "
                        "decoder-only key/value cache to put it in")
    if theirs != tuple(kv_shape):
        raise UserError(f"prompt {stored.name!r} is a deep prompt for layers x kv heads x head dim {theirs}; "
                        f"the model has {tuple(kv_shape)}: it was trained for another model")
