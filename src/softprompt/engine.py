"""Inference: our own decode loop with a key/value cache, the prompt's prefix computed once.

No ``generate()`` monkeypatching: the loop calls the decoder through its public arguments
(``inputs_embeds``, ``attention_mask``, ``position_ids``, ``past_key_values``). The soft
prompt's keys/values are computed once (``forward.prefix_cache``), then the input is prefilled
on top of them, then one token at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from softprompt.config import GenerateConfig, UserError
from softprompt.forward import embed, prefix_cache


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int  # real input tokens
    virtual_tokens: int  # N of the soft prompt (0 for the plain model)
    finish_reason: str  # "stop" (EOS) or "length"
    seconds: float


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL / transformers rule: positive logits divided by the penalty, negative multiplied."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(-1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(-1, seen, picked)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(descending=True)
    probs = sorted_logits.softmax(-1)
    drop = probs.cumsum(-1) - probs > top_p  # keep the smallest set whose mass reaches top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def pick_token(logits: torch.Tensor, seen: torch.Tensor, cfg: GenerateConfig, gen: torch.Generator) -> int:
    """One next token from (V,) logits."""
    logits = apply_repetition_penalty(logits.float(), seen, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return int(logits.argmax())
    logits = top_p_filter(logits / cfg.temperature, cfg.top_p)
    return int(torch.multinomial(F.softmax(logits, -1), 1, generator=gen))


@torch.no_grad()
def generate(lm, prompt: torch.Tensor | None, text: str, cfg: GenerateConfig) -> Generation:
    """Generate a continuation of ``text`` under ``prompt`` (None = the plain model)."""
    t0 = time.perf_counter()
    model, tok = lm.model, lm.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    N = 0 if prompt is None else prompt.shape[0]
    if not ids and prompt is None:
        raise UserError("empty input text: give some text to continue")
    head = model.get_output_embeddings()
    if prompt is not None:
        cache, last = prefix_cache(model, prompt.to(model.dtype))
    else:
        cache, last = DynamicCache(config=model.config), None
    gen = torch.Generator().manual_seed(cfg.seed)
    seen = list(ids)
    pos, logits = N, head(last) if last is not None else None
    feed = ids
    out: list[int] = []
    finish = "length"
    while True:
        if feed:
            T = len(feed)
            h = model.base_model(
                inputs_embeds=embed(model, torch.tensor([feed])),
                attention_mask=torch.ones(1, pos + T, dtype=torch.long),
                position_ids=torch.arange(pos, pos + T).unsqueeze(0),
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state  # (1, T, H)
            pos, logits = pos + T, head(h[0, -1])
        nxt = pick_token(logits, torch.tensor(seen, dtype=torch.long), cfg, gen)
        if nxt == tok.eos_token_id:
            finish = "stop"
            break
        out.append(nxt)
        seen.append(nxt)
        if len(out) >= cfg.max_new_tokens:
            break
        feed = [nxt]
    return Generation(text=tok.decode(out, skip_special_tokens=True), token_ids=out, prompt_tokens=len(ids),
                      virtual_tokens=N, finish_reason=finish, seconds=time.perf_counter() - t0)
