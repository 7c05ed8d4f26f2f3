"""The prompted forward pass: losses and log-probabilities of a batch under a soft prompt.

``decoder`` holds the decoder-only paths (the naive reference, the shared-prefix fast path,
mixed-task batches, sequence scoring); ``deep`` the paths under a deep prompt (per-layer keys and
values, ``prompt.is_deep``); ``seq2seq`` the encoder-decoder (T5) paths. This module only
dispatches on the model's kind and the prompt's, so none of them imports another's dispatch.
"""

from __future__ import annotations

import torch

from softprompt.forward import decoder, deep, packing, seq2seq
from softprompt.forward.decoder import (
    choice_logprobs,
    embed,
    expand_cache,
    lm_logits,
    mixed_prefix_loss,
    naive_loss,
    plain_loss,
    prefix_cache,
    prefix_forward_hidden,
    prefix_loss,
)
from softprompt.prompt import check_deep, is_deep

__all__ = [
    "check_deep", "choice_logprobs", "embed", "expand_cache", "is_seq2seq", "lm_logits", "mixed_prefix_loss", "naive_loss",
    "plain_loss", "prefix_cache", "prefix_forward_hidden", "prefix_loss", "prompt_loss",
    "sequence_logprobs", "supports_prefix",
]


def is_seq2seq(model) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def supports_prefix(model) -> bool:
    """The prefix path needs a decoder-only model whose base accepts a key/value cache."""
    return not is_seq2seq(model)


def prompt_loss(model, prompt, batch: dict, fast: bool = True, pack: bool = False, offset=None,
                memory=None) -> torch.Tensor:
    """Mean target cross-entropy of ``batch`` under ``prompt``: a shallow (N, H) prompt through
    ``seq2seq`` (T5 family) or the exact prefix path (``fast``; with ``pack`` the rows are
    packed into shared sequences, ``packing.py``) / the naive reference; a deep
    (L, 2, kv, N, d) prompt through ``deep`` (fast) or PEFT's way (naive). ``offset`` (T_max, H):
    DePT's input offset (``offset.py``), decoder-only shallow prompts without packing; ``memory``
    (L, heads, d, d): PrefixMemory's term (``memory.py``), with a deep prompt."""
    if offset is not None:
        if is_deep(prompt) or is_seq2seq(model) or pack:
            raise ValueError("an input offset goes with a shallow prompt on a decoder-only model, unpacked")
        return decoder.prompt_loss(model, prompt, batch, fast=fast, offset=offset)
    if is_deep(prompt):
        check_deep(model)
        args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
        return (deep.deep_loss if fast else deep.deep_naive_loss)(model, prompt, *args, memory=memory)
    if is_seq2seq(model):
        return seq2seq.seq2seq_loss(model, prompt, batch)
    if fast and pack:
        return packing.packed_loss(model, prompt, batch["input_ids"], batch["attention_mask"], batch["labels"])
    return decoder.prompt_loss(model, prompt, batch, fast=fast)


def sequence_logprobs(model, prompt: torch.Tensor | None, input_ids, attention_mask, labels,
                      choices: torch.Tensor | None = None, prefix=None, offset=None, memory=None) -> torch.Tensor:
    """Per-row summed log-probability of the labelled tokens (B,), or (B, L) with ``choices``;
    see ``decoder.sequence_logprobs``; a deep prompt goes through ``deep.deep_logprobs``."""
    if is_deep(prompt):
        check_deep(model)
        return deep.deep_logprobs(model, prompt, input_ids, attention_mask, labels, choices, memory)
    if is_seq2seq(model):
        return seq2seq.seq2seq_logprobs(model, prompt, input_ids, attention_mask, labels, choices)
    return decoder.sequence_logprobs(model, prompt, input_ids, attention_mask, labels, choices, prefix, offset)
