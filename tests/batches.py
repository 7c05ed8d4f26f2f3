"""Batches and prompts several test modules build: right-padded rows of different lengths (LM
rows, target rows, both), the packing tests' rows, a deep prompt's batch, an embedding-scaled
random prompt and PEFT's prefix-tuning model to compare against."""

from __future__ import annotations

import copy

import torch
from helpers import TEXTS

from softprompt import data as D
from softprompt.prompt import make_prompt

N = 5

SENTENCES = [
    "the movie was good and the actors were great",
    "a terrible film",
    "who wrote the book about the sea",
    "what is the capital of france",
    "a wonderful film with a great story",
]
PACKING_SENTENCES = [*SENTENCES, "who", "no"]  # plus two short rows, so that rows share bins


def make_batch(tok, mode: str) -> dict[str, torch.Tensor]:
    """Right-padded rows of different lengths; 'mixed' alternates LM rows and target rows."""
    exs = []
    for i, s in enumerate(SENTENCES):
        ids = tok(s, add_special_tokens=False)["input_ids"]
        lm_row = mode == "lm" or (mode == "mixed" and i % 2 == 0)
        if lm_row:  # every token is a target, including position 0
            exs.append(D.Example(input_ids=ids, labels=list(ids), source_len=0))
        else:  # the last two tokens are the target, the rest is input
            k = len(ids) - 2
            exs.append(D.Example(input_ids=ids, labels=[D.IGNORE] * k + ids[k:], source_len=k))
    batch = D.collate(exs, tok.pad_token_id)
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 2, "the batch must have rows of different lengths"
    has_first = batch["labels"][:, 0] != D.IGNORE
    assert has_first.any() == (mode != "target")
    if mode == "mixed":
        assert not has_first.all()
    return batch


def scaled_prompt(lm, seed: int = 0) -> torch.Tensor:
    # embedding-scaled random init, times 5 so the prompt visibly matters for the loss
    return make_prompt(lm.model, lm.tokenizer, N, "random", seed=seed) * 5


def batch_of(tok) -> dict[str, torch.Tensor]:
    """LM rows (every token a target) and input -> target rows, right-padded, lengths differ."""
    exs = []
    for i, s in enumerate(PACKING_SENTENCES):
        ids = tok(s, add_special_tokens=False)["input_ids"]
        if i % 2 == 0:
            exs.append(D.Example(input_ids=ids, labels=list(ids), source_len=0))
        else:
            k = max(0, len(ids) - 2)
            exs.append(D.Example(input_ids=ids, labels=[D.IGNORE] * k + ids[k:], source_len=k))
    return D.collate(exs, tok.pad_token_id)


def deep_batch(lm, texts=TEXTS[:3]):
    """Right-padded rows of different lengths; labels on every real token but the first."""
    enc = lm.tokenizer(texts, padding=True, padding_side="right", add_special_tokens=False, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    assert len(set(enc["attention_mask"].sum(1).tolist())) > 1  # padding really happens
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def peft_prefix_model(lm, n: int, projection: bool = False):
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    cfg = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n, prefix_projection=projection)
    return get_peft_model(copy.deepcopy(lm.model), cfg).eval()
