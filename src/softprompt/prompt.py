"""The soft prompt: an ``(N, H)`` matrix and the initialisations from the literature.

A prompt is a plain tensor. Creating it (this module) and combining it with inputs
(``forward/``) are separate, so at train time it is a Parameter and at serve time it is data
gathered per row. Initialisations:

* ``random``: normal with the mean and std of the model's embedding matrix (Lester et al. 2021
  found N(0, 1)-style inits far worse; matching the embedding scale is what makes them usable).
* ``text``: the embeddings of a text's tokens, cycled or truncated to N.
* ``vocab``: embeddings of tokens sampled from the common part of the vocabulary (BPE
  vocabularies are built by merge order, so low ids are the frequent pieces).
* ``labels``: the embeddings of the task's label words first, then ``vocab`` for the rest.
* ``prompt:<name>``: a copy of a stored prompt (same H required).
"""

from __future__ import annotations

import torch

from softprompt.config import UserError
from softprompt.data import encode

COMMON_VOCAB = 5000  # sample vocab init from the first ids: frequent BPE pieces


def embedding_matrix(model) -> torch.Tensor:
    return model.get_input_embeddings().weight.detach()  # (V, H)


def init_random(model, n: int, gen: torch.Generator) -> torch.Tensor:
    emb = embedding_matrix(model).float()
    std, mean = emb.std(), emb.mean()
    return torch.randn(n, emb.shape[1], generator=gen) * std + mean  # (N, H)


def init_text(model, tokenizer, n: int, text: str) -> torch.Tensor:
    ids = encode(tokenizer, text)
    if not ids:
        raise UserError("--init-text tokenises to nothing; give a non-empty text")
    ids = (ids * (n // len(ids) + 1))[:n]  # cycle, then truncate to N
    return embedding_matrix(model)[torch.tensor(ids)].float().clone()  # (N, H)


def init_vocab(model, n: int, gen: torch.Generator) -> torch.Tensor:
    emb = embedding_matrix(model)
    top = min(COMMON_VOCAB, emb.shape[0])
    ids = torch.randperm(top, generator=gen)[:n]
    if n > top:  # tiny vocabularies: sample with replacement
        ids = torch.randint(0, top, (n,), generator=gen)
    return emb[ids].float().clone()


def init_labels(model, tokenizer, n: int, label_words: list[str], gen: torch.Generator) -> torch.Tensor:
    """Each label word's mean token embedding first, then vocab samples."""
    if not label_words:
        raise UserError("--init labels needs a verbalizer (label words) for the task")
    emb = embedding_matrix(model).float()
    rows = []
    for word in label_words[:n]:
        ids = encode(tokenizer, " " + word.strip())
        rows.append(emb[torch.tensor(ids)].mean(0))
    out = init_vocab(model, n, gen)
    out[: len(rows)] = torch.stack(rows)
    return out


def make_prompt(
    model,
    tokenizer,
    n: int,
    init: str,
    *,
    seed: int = 0,
    text: str | None = None,
    label_words: list[str] | None = None,
    source: torch.Tensor | None = None,
) -> torch.Tensor:
    """Build an (N, H) float32 prompt. ``source`` is the stored prompt for ``prompt:<name>``."""
    if n <= 0:
        raise UserError(f"number of virtual tokens must be positive, got {n}")
    gen = torch.Generator().manual_seed(seed)
    if init == "random":
        return init_random(model, n, gen)
    if init == "text":
        return init_text(model, tokenizer, n, text or "")
    if init == "vocab":
        return init_vocab(model, n, gen)
    if init == "labels":
        return init_labels(model, tokenizer, n, label_words or [], gen)
    if init.startswith("prompt:"):
        if source is None:
            raise UserError(f"--init {init}: no stored prompt given")
        H = embedding_matrix(model).shape[1]
        if source.shape[1] != H:
            raise UserError(f"--init {init}: prompt has hidden size {source.shape[1]}, model has {H}")
        rows = source.float().clone()
        if rows.shape[0] >= n:
            return rows[:n].clone()
        return torch.cat([rows, init_vocab(model, n - rows.shape[0], gen)])
    raise UserError(f"unknown --init {init!r}")
