"""Engines and request mixes several test modules run: an engine with shallow prompts of different
N, one with shallow and deep prompts, the mixed requests for each (greedy rows that finish at
different steps, sampling, no text at all), and stepping a ``StepBatch`` by hand."""

from __future__ import annotations

import torch
from helpers import TEXTS

from softprompt.config import GenerateConfig
from softprompt.inference.engine import Engine, EngineConfig, GenerateRequest
from softprompt.prompt import make_deep_prompt


def make_engine(lm, cfg: EngineConfig | None = None, sizes=(3, 5, 8)) -> Engine:
    eng = Engine(lm, cfg)
    g = torch.Generator().manual_seed(7)
    for k, n in enumerate(sizes):  # prompts of different N, at the scale of the embeddings
        eng.add_prompt(f"p{k}", torch.randn(n, lm.hidden_size, generator=g))
    return eng


def mixed_requests() -> list[GenerateRequest]:
    greedy = [GenerateConfig(max_new_tokens=n) for n in (3, 7, 5, 9)]  # rows finish at different steps
    sample = GenerateConfig(max_new_tokens=6, temperature=0.8, top_p=0.9, seed=3)
    penal = GenerateConfig(max_new_tokens=6, repetition_penalty=1.3)
    return [GenerateRequest(TEXTS[0], "p0", greedy[0]), GenerateRequest(TEXTS[1], "p1", greedy[1]),
            GenerateRequest(TEXTS[2], None, greedy[2]), GenerateRequest(TEXTS[3], "p2", greedy[3]),
            GenerateRequest(TEXTS[2], "p2", sample), GenerateRequest(TEXTS[0], None, penal),
            GenerateRequest("", "p1", greedy[1])]  # a prompt and no text at all


def run_steps(eng, chunk, joins: dict[int, list[GenerateRequest]], widths: list | None = None):
    """``StepBatch`` with ``prefill_chunk=chunk``; ``joins``: decode step -> requests added then.
    Returns {(step, index): (tokens, logits, the step its last token came)}."""
    from softprompt.inference import fused
    from softprompt.inference.kv import DecoderState
    from softprompt.inference.steps import StepBatch

    batch, out, where, step = StepBatch(eng, keep_logits=True, prefill_chunk=chunk), {}, {}, 0
    hidden, run = DecoderState.hidden, fused.run
    if widths is not None:  # every forward's width, run alone or fused into the decode step's forward
        DecoderState.hidden = lambda self, ids, tmask: widths.append(ids.shape[1]) or hidden(self, ids, tmask)
        fused.run = lambda model, fwds: widths.extend(f.ids.shape[1] for f in fwds) or run(model, fwds)
    try:
        while len(batch) or any(s >= step for s in joins):
            for k, r in enumerate(joins.get(step, [])):
                where[batch.add([r])[0]] = (step, k)
                out[step, k] = ([], [], [])
            for e in batch.step():
                if e.token is not None:
                    out[where[e.rid]][0].append(e.token)
                out[where[e.rid]][1].append(e.logits)
                out[where[e.rid]][2].append(step)
            step += 1
    finally:
        DecoderState.hidden, fused.run = hidden, run
    return {k: (t, torch.stack(lg), s[-1]) for k, (t, lg, s) in out.items()}


def make_mixed_engine(lm, cfg: EngineConfig | None = None, store=None) -> Engine:
    eng = Engine(lm, cfg, store=store)
    g = torch.Generator().manual_seed(7)
    for k, n in enumerate((3, 6)):
        eng.add_prompt(f"s{k}", torch.randn(n, lm.hidden_size, generator=g))
        eng.add_prompt(f"d{k}", make_deep_prompt(lm.model, lm.tokenizer, n + 1, "random", seed=k))
    return eng


def mixed_deep_requests() -> list[GenerateRequest]:
    greedy = [GenerateConfig(max_new_tokens=n) for n in (3, 7, 5, 9, 4)]
    sample = GenerateConfig(max_new_tokens=6, temperature=0.8, top_p=0.9, seed=3)
    return [GenerateRequest(TEXTS[0], "d0", greedy[0]), GenerateRequest(TEXTS[1], "s1", greedy[1]),
            GenerateRequest(TEXTS[2], None, greedy[2]), GenerateRequest(TEXTS[3], "d1", greedy[3]),
            GenerateRequest(TEXTS[2], "d1", sample), GenerateRequest("", "s0", greedy[4]),
            GenerateRequest(TEXTS[1], "s0", greedy[0])]
