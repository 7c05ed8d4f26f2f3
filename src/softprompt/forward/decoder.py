"""The prompted forward pass.

Two ways to compute the loss of a batch under a soft prompt ``P`` (N, H):

* ``naive_loss``: concatenate ``P`` in front of every row's input embeddings and run the whole
  model, the way PEFT does it. Simple, and the reference every fast path is tested against.
* ``prefix_loss`` (decoder-only): attention is causal and the virtual tokens come first, so their
  hidden states (and so their keys/values in every layer) do not depend on the input. Run the
  model once on ``P`` alone (batch 1), hand the resulting key/value cache to all B rows as a
  shared prefix (``expand``: no copy, and autograd sums the B gradient contributions), and
  compute vocabulary logits only where there are labels, a chunk at a time (``chunked_ce``). The last virtual token's logit predicts
  the first real token; it is the same for every row, so it is computed once from the prefix pass.

Both return the mean cross-entropy over target tokens, so they agree to float rounding.
Rows are right-padded; ``labels`` uses -100 for positions without a target.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from softprompt.compat import cache_kw, returned_cache
from softprompt.data import IGNORE
from softprompt.forward.chunked_ce import linear_cross_entropy
from softprompt.offset import add_offset
from softprompt.precision import logits_context

if TYPE_CHECKING:
    from softprompt.models import Model


def embed(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model.get_input_embeddings()(input_ids)  # (B, T, H)


def lm_logits(model: Model, hidden: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits (..., V) of hidden states (..., H), as the model's own forward computes
    them: the output head, then Gemma's final logit soft-capping where the config has one."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if not cap else torch.tanh(logits / cap) * cap


def loss_logits(model: Model, hidden: torch.Tensor) -> torch.Tensor:
    """``lm_logits`` as losses and log-probabilities take them, float32: under bf16 autocast the
    head's float32 product unless the forward asked for bf16 logits (``precision.logits_context``).
    Outside autocast, the same as ``lm_logits(...).float()``."""
    head = model.get_output_embeddings()
    with logits_context(hidden.device):
        return lm_logits(model, hidden.to(head.weight.dtype)).float()


def naive_loss(model: Model, prompt: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
               offset: torch.Tensor | None = None) -> torch.Tensor:
    """Reference path: [P][x] for every row, full forward, full logits. ``prompt`` is (N, H),
    shared by every row, or (B, N, H), one per row; ``offset`` (T_max, H) is added to the input
    embeddings (``offset.py``)."""
    x = embed(model, input_ids)  # (B, T, H)
    x = x if offset is None else add_offset(x, offset)
    B = x.shape[0]
    if prompt is not None:
        N = prompt.shape[-2]
        rows = prompt if prompt.dim() == 3 else prompt.unsqueeze(0).expand(B, -1, -1)  # (B, N, H)
        x = torch.cat([rows.to(x.dtype), x], dim=1)  # (B, N+T, H)
        attention_mask = torch.cat([attention_mask.new_ones(B, N), attention_mask], dim=1)
        labels = torch.cat([labels.new_full((B, N), IGNORE), labels], dim=1)
    logits = model(inputs_embeds=x, attention_mask=attention_mask, use_cache=False).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE
    )


def prefix_cache(model: Model, prompt: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """Run the decoder on P alone: (per-layer keys/values for N positions, last hidden (H,))."""
    base = model.base_model
    cache = DynamicCache(config=model.config)
    out = base(
        inputs_embeds=prompt.unsqueeze(0),  # (1, N, H)
        attention_mask=torch.ones(1, prompt.shape[0], dtype=torch.long, device=prompt.device),
        **cache_kw(base, cache),
        use_cache=True,
    )
    return returned_cache(out), out.last_hidden_state[0, -1]  # cache (1, kv, N, d), (H,)


def expand_cache(cache: DynamicCache, batch: int, config) -> DynamicCache:
    """A view of a batch-1 cache as batch B (no copy; gradients flow back to the prefix)."""
    layers = [(layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1)) for layer in cache.layers]
    return DynamicCache(ddp_cache_data=layers, config=config)


def prefix_forward_hidden(model: Model, prompt, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache=None, offset=None):
    """Hidden states (B, T, H) of the real tokens under the shared prompt prefix; ``offset``
    (T_max, H) added to their input embeddings (``offset.py``)."""
    B, T = input_ids.shape
    N = prompt.shape[0]
    if cache is None:
        cache, _ = prefix_cache(model, prompt)
    past = expand_cache(cache, B, model.config)
    mask = torch.cat([attention_mask.new_ones(B, N), attention_mask], dim=1)  # (B, N+T)
    pos = torch.arange(N, N + T, device=input_ids.device).unsqueeze(0).expand(B, -1)  # (B, T)
    x = embed(model, input_ids)
    out = model.base_model(
        inputs_embeds=x if offset is None else add_offset(x, offset),
        attention_mask=mask,
        position_ids=pos,
        **cache_kw(model.base_model, past),
        use_cache=True,
    )
    return out.last_hidden_state  # (B, T, H)


def _shifted_ce_sum(model: Model, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of labels[:, 1:] predicted from hidden[:, :-1], and the count."""
    tgt = labels[:, 1:]  # (B, T-1); position t predicts labels[t+1]
    sel = tgt != IGNORE
    h = hidden[:, :-1][sel]  # (M, H): only positions with a target get logits, in chunks
    if getattr(model.config, "final_logit_softcapping", None):  # Gemma: the soft-cap needs whole logits
        total = F.cross_entropy(loss_logits(model, h), tgt[sel], reduction="sum")
    else:
        total = linear_cross_entropy(h, model.get_output_embeddings(), tgt[sel]).sum()
    return total, sel.sum()


def prefix_loss(model: Model, prompt: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, offset=None) -> torch.Tensor:
    """Fast exact path: shared prefix, logits only at labelled positions."""
    cache, last = prefix_cache(model, prompt)
    hidden = prefix_forward_hidden(model, prompt, input_ids, attention_mask, cache, offset)  # (B, T, H)
    total, count = _shifted_ce_sum(model, hidden, labels)
    first = labels[:, 0]  # (B,) predicted by the last virtual token
    has_first = first != IGNORE
    if has_first.any():
        logp = F.log_softmax(loss_logits(model, last), dim=-1)  # (V,), once for all rows
        total = total - logp[first[has_first]].sum()
        count = count + has_first.sum()
    return total / count.clamp(min=1)


def mixed_prefix_loss(model: Model, prompts: torch.Tensor, task_ids: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                      reduction: str = "mean") -> torch.Tensor:
    """Rows of different tasks in one batch: row b is prompted by ``prompts[task_ids[b]]``.

    ``prompts`` (K, N, H) run through the decoder once each (batch K); the per-row prefix is a
    gather of their keys/values, so gradients reach every task's prompt. Exact: the same as
    ``naive_loss`` with per-row prompts (tests/test_multitask.py). ``reduction`` "sum" gives
    the summed target cross-entropy, "mean" divides by the number of target tokens.
    """
    K, N, _ = prompts.shape
    B, T = input_ids.shape
    out = model.base_model(
        inputs_embeds=prompts,
        attention_mask=torch.ones(K, N, dtype=torch.long, device=prompts.device),
        **cache_kw(model.base_model, DynamicCache(config=model.config)),
        use_cache=True,
    )
    layers = [(layer.keys.index_select(0, task_ids), layer.values.index_select(0, task_ids))
              for layer in returned_cache(out).layers]  # each (B, kv, N, d)
    mask = torch.cat([attention_mask.new_ones(B, N), attention_mask], dim=1)  # (B, N+T)
    pos = torch.arange(N, N + T, device=input_ids.device).unsqueeze(0).expand(B, -1)  # (B, T)
    hidden = model.base_model(
        inputs_embeds=embed(model, input_ids), attention_mask=mask, position_ids=pos,
        **cache_kw(model.base_model, DynamicCache(ddp_cache_data=layers, config=model.config)), use_cache=True,
    ).last_hidden_state  # (B, T, H)
    total, count = _shifted_ce_sum(model, hidden, labels)
    first = labels[:, 0]
    has = first != IGNORE
    if has.any():
        logp = F.log_softmax(loss_logits(model, out.last_hidden_state[:, -1]), dim=-1)  # (K, V)
        total = total - logp[task_ids[has], first[has]].sum()
        count = count + has.sum()
    return total if reduction == "sum" else total / count.clamp(min=1)


def plain_loss(model: Model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The frozen model on the real tokens only, target-only logits (no prompt)."""
    hidden = model.base_model(
        inputs_embeds=embed(model, input_ids), attention_mask=attention_mask, use_cache=False
    ).last_hidden_state
    tgt = labels[:, 1:]
    sel = tgt != IGNORE
    return F.cross_entropy(loss_logits(model, hidden[:, :-1][sel]), tgt[sel])


def prompt_loss(model: Model, prompt, batch: dict, fast: bool = True, offset=None) -> torch.Tensor:
    """Decoder-only loss under a shared prompt (and input ``offset``): the fast prefix path, or
    the naive reference."""
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    return prefix_loss(model, prompt, *args, offset=offset) if fast else naive_loss(model, prompt, *args, offset=offset)


def labelled_logprobs(model: Model, hidden: torch.Tensor, labels: torch.Tensor, choices: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row summed log-probability (B,) of labels[:, 1:] predicted from hidden (B, T, H), or
    with ``choices`` the (B, L) choice log-probabilities at each row's one labelled position."""
    tgt = labels[:, 1:]
    sel = tgt != IGNORE
    rows = sel.nonzero()[:, 0]
    logp = F.log_softmax(loss_logits(model, hidden[:, :-1][sel]), dim=-1)  # (M, V)
    if choices is not None:
        return choice_logprobs(logp, rows, choices)
    out = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    return out.index_add_(0, rows, logp.gather(-1, tgt[sel].unsqueeze(-1))[:, 0])


def choice_logprobs(logp: torch.Tensor, rows: torch.Tensor, choices: torch.Tensor) -> torch.Tensor:
    """(B, L) log-probabilities of ``choices`` (B, L) from ``logp`` (M, V), the distributions at
    the labelled positions of rows ``rows`` (M,): each row must have exactly one."""
    if rows.numel() != choices.shape[0] or not torch.equal(rows, torch.arange(choices.shape[0], device=rows.device)):
        raise ValueError("choices need exactly one labelled position per row")
    return logp.gather(-1, choices.to(logp.device))


@torch.no_grad()
def sequence_logprobs(model: Model, prompt: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                      choices: torch.Tensor | None = None, prefix=None, offset=None) -> torch.Tensor:
    """Per-row summed log-probability of the labelled tokens, (B,). Right-padded rows.

    With ``choices`` (B, L) token ids, each row having one labelled token after its first
    position: (B, L), the log-probability of every choice at that position. One forward then
    scores L single-token label words, where scoring them one by one takes L rows. ``prefix`` is
    ``prefix_cache(model, prompt)`` computed once by a caller that scores many batches under a
    fixed prompt (decoder-only; it is what this function would compute itself).
    """
    if prompt is None:
        hidden = model.base_model(
            inputs_embeds=embed(model, input_ids), attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        first_lp = None
    else:
        cache, last = prefix if prefix is not None else prefix_cache(model, prompt)
        hidden = prefix_forward_hidden(model, prompt, input_ids, attention_mask, cache, offset)
        first_lp = F.log_softmax(loss_logits(model, last), dim=-1)  # (V,)
    out = labelled_logprobs(model, hidden, labels, choices)
    if choices is not None:
        return out
    if first_lp is not None:
        first = labels[:, 0]
        has = first != IGNORE
        out[has] += first_lp[first[has]]
    return out
