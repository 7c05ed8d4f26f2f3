"""The decode loop (``engine.generate``) against references: HF ``generate`` for the plain model,
a cache-free step-by-step argmax over ``[P][x][generated]`` with a prompt; seeded sampling;
stopping at EOS.

The tiny random models are "sharpened" (weight matrices x10) so that next-token distributions
are peaked: with the raw 0.02-std init the logits are nearly uniform and greedy decoding would
hinge on float rounding, which makes token-for-token comparisons meaningless.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import sharpen

from softprompt import models
from softprompt.config import GenerateConfig, UserError
from softprompt.forward import embed
from softprompt.inference import engine, sampling
from softprompt.prompt import make_prompt

TEXT = "the movie was good and"


@pytest.fixture(scope="module")
def lms(tiny_model_dir):
    return {arch: sharpen(models.load(str(tiny_model_dir(arch)))) for arch in ("llama", "gpt2")}


def encode(lm, text: str) -> list[int]:
    return lm.tokenizer(text, add_special_tokens=False)["input_ids"]


def penalize(logits: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """The CTRL rule, written out independently of sampling.apply_repetition_penalty."""
    logits = logits.clone()
    for t in set(seen):
        logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
    return logits


@torch.no_grad()
def naive_greedy(
    lm, prompt: torch.Tensor | None, ids: list[int], max_new: int, penalty: float = 1.0
) -> list[int]:
    """No cache: every step runs the whole model on [P][x][generated so far] and takes the argmax."""
    model, eos = lm.model, lm.tokenizer.eos_token_id
    out: list[int] = []
    for _ in range(max_new):
        x = embed(model, torch.tensor([ids + out], dtype=torch.long))  # (1, T, H)
        if prompt is not None:
            x = torch.cat([prompt.unsqueeze(0), x], 1)  # (1, N+T, H)
        logits = model(inputs_embeds=x, use_cache=False).logits[0, -1].float()
        nxt = int(penalize(logits, ids + out, penalty).argmax())
        if nxt == eos:
            break
        out.append(nxt)
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_plain_greedy_equals_hf_generate(lms, arch, penalty):
    lm = lms[arch]
    ids = encode(lm, TEXT)
    g = engine.generate(
        lm, None, TEXT, GenerateConfig(max_new_tokens=12, repetition_penalty=penalty)
    )
    with torch.no_grad():
        hf = lm.model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=12,
            repetition_penalty=penalty,
            eos_token_id=lm.tokenizer.eos_token_id,
            pad_token_id=lm.tokenizer.pad_token_id,
        )
    want = hf[0, len(ids) :].tolist()
    if lm.tokenizer.eos_token_id in want:
        want = want[: want.index(lm.tokenizer.eos_token_id)]
    assert g.token_ids == want and len(want) > 0
    assert g.prompt_tokens == len(ids) and g.virtual_tokens == 0
    assert g.text == lm.tokenizer.decode(want, skip_special_tokens=True)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_prompted_greedy_equals_naive_reference(lms, arch, penalty):
    lm = lms[arch]
    prompt = make_prompt(lm.model, lm.tokenizer, 5, "vocab", seed=0)
    ids = encode(lm, TEXT)
    g = engine.generate(
        lm, prompt, TEXT, GenerateConfig(max_new_tokens=10, repetition_penalty=penalty)
    )
    want = naive_greedy(lm, prompt, ids, 10, penalty)
    assert g.token_ids == want and len(want) > 0
    assert g.virtual_tokens == 5
    # and the prompt matters: another prompt continues differently
    other = make_prompt(lm.model, lm.tokenizer, 5, "vocab", seed=1)
    assert naive_greedy(lm, other, ids, 10, penalty) != want


def test_plain_greedy_equals_naive_reference(lms):
    lm = lms["llama"]
    g = engine.generate(lm, None, TEXT, GenerateConfig(max_new_tokens=10))
    assert g.token_ids == naive_greedy(lm, None, encode(lm, TEXT), 10)


def test_prompt_with_empty_text_continues_from_the_last_virtual_token(lms):
    lm = lms["llama"]
    prompt = make_prompt(lm.model, lm.tokenizer, 4, "vocab", seed=2)
    g = engine.generate(lm, prompt, "", GenerateConfig(max_new_tokens=6))
    assert g.token_ids == naive_greedy(lm, prompt, [], 6) and g.prompt_tokens == 0
    with pytest.raises(UserError):
        engine.generate(lm, None, "", GenerateConfig(max_new_tokens=6))


def test_sampling_is_seeded(lms):
    lm = lms["llama"]
    prompt = make_prompt(lm.model, lm.tokenizer, 4, "vocab", seed=0)

    def sample(seed, p=prompt):
        cfg = GenerateConfig(max_new_tokens=10, temperature=1.5, top_p=0.95, seed=seed)
        return engine.generate(lm, p, TEXT, cfg).token_ids

    a = sample(0)
    assert len(a) > 0
    assert sample(0) == a
    assert sample(1) != a
    assert sample(0, None) == sample(0, None)


def test_top_p_filter_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = torch.isfinite(sampling.top_p_filter(logits, 0.7)).tolist()
    assert kept == [True, True, False, False]
    assert torch.isfinite(sampling.top_p_filter(logits, 1.0)).all()


class EosAs:
    """The tokenizer with another token playing EOS (the random model never emits the real one)."""

    def __init__(self, tok, eos_id: int):
        self._tok, self.eos_token_id = tok, eos_id

    def __call__(self, *a, **k):
        return self._tok(*a, **k)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_stops_at_eos(lms):
    lm = lms["llama"]
    cfg = GenerateConfig(max_new_tokens=8)
    full = engine.generate(lm, None, TEXT, cfg)
    assert full.finish_reason == "length" and len(full.token_ids) == 8
    # the first token that appears for the first time after position 0 becomes "EOS"
    k = next(i for i in range(1, 8) if full.token_ids[i] not in full.token_ids[:i])
    eos_lm = dataclasses.replace(lm, tokenizer=EosAs(lm.tokenizer, full.token_ids[k]))
    cut = engine.generate(eos_lm, None, TEXT, cfg)
    assert cut.finish_reason == "stop"
    assert cut.token_ids == full.token_ids[:k]  # EOS itself is not part of the output
