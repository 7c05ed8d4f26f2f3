"""The forward pass under a deep prompt: per-layer keys/values (L, 2, kv, N, d) as the cache prefix.

A deep prompt is a key/value prefix already, so there is no prefix pass: the B rows share it
through ``expand`` (no copy; autograd sums the rows' gradient contributions), their tokens sit
at positions N, N+1, ... behind it (the positions PEFT's prefix tuning gives them: transformers
counts the cache length), and logits are computed only where there are labels.

Unlike a shallow prompt, a deep prompt has no hidden state of its own, so nothing predicts the
first real token: ``labels[:, 0]`` is never a target (as in PEFT's prefix-tuning forward).

``deep_naive_loss`` is the reference: PEFT's way, full logits at every position and positions
left to transformers. Encoder-decoder models have no decoder-only key/value prefix and are
refused with one line (``forward.prompt_loss``).

``memory`` (L, heads, d, d): PrefixMemory's per-head term (``memory.py``), handed to the
attention as the ``prefix_memory`` keyword of the forward call (the model must be ``enable``d).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from softprompt.compat import cache_kw
from softprompt.forward.decoder import IGNORE, _shifted_ce_sum, embed, labelled_logprobs


def deep_cache(model, prompt: torch.Tensor, batch: int) -> DynamicCache:
    """The deep prompt as a batch-B cache: per layer keys/values (B, kv, N, d), views of (1, kv, N, d)."""
    dtype = model.get_input_embeddings().weight.dtype
    kv = prompt.to(dtype)  # (L, 2, kv, N, d)
    layers = [(kv[i, 0].unsqueeze(0).expand(batch, -1, -1, -1), kv[i, 1].unsqueeze(0).expand(batch, -1, -1, -1))
              for i in range(kv.shape[0])]
    return DynamicCache(ddp_cache_data=layers, config=model.config)


def memory_kw(memory: torch.Tensor | None) -> dict:
    """The forward keyword that carries a (L, heads, d, d) memory, shared by the batch's rows."""
    return {} if memory is None else {"prefix_memory": memory.unsqueeze(0)}


def deep_forward_hidden(model, prompt: torch.Tensor, input_ids, attention_mask, memory=None) -> torch.Tensor:
    """Hidden states (B, T, H) of right-padded rows behind the deep prompt."""
    B, T = input_ids.shape
    N = prompt.shape[3]
    mask = torch.cat([attention_mask.new_ones(B, N), attention_mask], dim=1)  # (B, N+T)
    pos = torch.arange(N, N + T, device=input_ids.device).unsqueeze(0).expand(B, -1)  # (B, T)
    out = model.base_model(inputs_embeds=embed(model, input_ids), attention_mask=mask, position_ids=pos,
                           **cache_kw(model.base_model, deep_cache(model, prompt, B)), use_cache=True,
                           **memory_kw(memory))
    return out.last_hidden_state


def deep_loss(model, prompt: torch.Tensor, input_ids, attention_mask, labels, memory=None) -> torch.Tensor:
    """Fast exact path: shared prefix views, logits only at labelled positions; mean target CE."""
    total, count = _shifted_ce_sum(model, deep_forward_hidden(model, prompt, input_ids, attention_mask, memory), labels)
    return total / count.clamp(min=1)


def deep_naive_loss(model, prompt: torch.Tensor, input_ids, attention_mask, labels, memory=None) -> torch.Tensor:
    """Reference path (PEFT's): the prefix as ``past_key_values``, full logits, default positions."""
    B, N = input_ids.shape[0], prompt.shape[3]
    mask = torch.cat([attention_mask.new_ones(B, N), attention_mask], dim=1)
    logits = model(input_ids=input_ids, attention_mask=mask, **cache_kw(model, deep_cache(model, prompt, B)),
                   use_cache=True, **memory_kw(memory)).logits  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


@torch.no_grad()
def deep_logprobs(model, prompt: torch.Tensor, input_ids, attention_mask, labels,
                  choices: torch.Tensor | None = None, memory=None) -> torch.Tensor:
    """Per-row summed log-probability of the labelled tokens (B,), or (B, L) with ``choices``
    (see ``decoder.sequence_logprobs``); ``labels[:, 0]`` is never scored."""
    hidden = deep_forward_hidden(model, prompt, input_ids, attention_mask, memory)
    return labelled_logprobs(model, hidden, labels, choices)
