"""Next-token choice: repetition penalty, top-p, temperature; greedy rows in one argmax.

Sampling runs on the CPU with each row's own seeded ``torch.Generator``, so a row's tokens
depend only on its own config and seed, never on its neighbours in the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from softprompt.config import GenerateConfig


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


def pick_tokens(logits: torch.Tensor, cfgs: list[GenerateConfig], seen: list[list[int]],
                gens: list[torch.Generator]) -> list[int]:
    """Next token per row of (B, V) logits; plain greedy rows in one argmax, the others one by one."""
    plain = [c.temperature == 0 and c.repetition_penalty == 1.0 for c in cfgs]
    out = logits.float().argmax(-1).tolist() if any(plain) else [0] * len(cfgs)
    for j, c in enumerate(cfgs):
        if not plain[j]:
            out[j] = pick_token(logits[j].cpu(), torch.tensor(seen[j], dtype=torch.long), c, gens[j])
    return out
