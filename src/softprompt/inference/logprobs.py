"""Per-token log-probabilities for the OpenAI ``logprobs`` fields (generated and echoed tokens).

A token's log-probability is taken from the model's own next-token distribution: the raw
logits the decode loop samples from, log-softmaxed in float32, BEFORE repetition penalty,
temperature and top-p. So the numbers describe the model (and the soft prompt), not the
sampling settings of one request, and equal the engine's scoring path (``Engine.score_rows``)
for the same prefix. (vLLM's default ``raw_logprobs`` makes the same choice.)

``top`` holds the k most likely tokens of that distribution, most likely first (k <= 20, as
OpenAI allows); the chosen token may or may not be among them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token, logprob) of the k most likely, best first


def pick_logprobs(logp: torch.Tensor, tokens: list[int], ks: list[int]) -> list[TokenLogprob]:
    """Row j's chosen token ``tokens[j]`` and its ``ks[j]`` best alternatives from (M, V) log-probs."""
    if not tokens:
        return []
    idx = torch.tensor(tokens, dtype=torch.long, device=logp.device)
    chosen = logp.gather(-1, idx[:, None])[:, 0].tolist()  # (M,)
    k = min(max(ks), logp.shape[-1])
    top_v, top_i = logp.topk(k, -1) if k > 0 else (logp[:, :0], logp[:, :0].long())  # (M, k)
    top_v, top_i = top_v.tolist(), top_i.tolist()
    return [TokenLogprob(t, c, tuple(zip(ti[:kj], tv[:kj], strict=True)))
            for t, c, ti, tv, kj in zip(tokens, chosen, top_i, top_v, ks, strict=True)]


def step_logprobs(logits: torch.Tensor, rows: list[int], tokens: list[int], ks: list[int]) -> list[TokenLogprob]:
    """The decode step's ``logits`` (B, V), for the state rows ``rows`` that chose ``tokens``."""
    if not rows:
        return []
    sel = logits[torch.tensor(rows, dtype=torch.long, device=logits.device)]  # (M, V)
    return pick_logprobs(F.log_softmax(sel.float(), -1), tokens, ks)
