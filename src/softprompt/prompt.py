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

from softprompt.compat import cache_kw, returned_cache
from softprompt.config import UserError
from softprompt.data import encode

COMMON_VOCAB = 5000  # sample vocab init from the first ids: frequent BPE pieces


def embedding_matrix(model) -> torch.Tensor:
    """The input embeddings as the model feeds them to its first layer, (V, H): Gemma's embedding
    module multiplies its rows by sqrt(H) (``embed_scale``), and a prompt sits beside those
    scaled rows (PEFT builds its text/vocab inits through the same module)."""
    emb = model.get_input_embeddings()
    scale = getattr(emb, "embed_scale", None)
    weight = emb.weight.detach()
    return weight if scale is None else weight * torch.as_tensor(scale).to(weight.dtype)


def init_random(model, n: int, gen: torch.Generator) -> torch.Tensor:
    emb = embedding_matrix(model).float()
    std, mean = emb.std().item(), emb.mean().item()  # numbers: the table may be on a GPU, the draw is on the CPU
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


# ---------------------------------------------------------------- deep prompts: per-layer keys/values
#
# A deep prompt (prefix tuning, Li & Liang 2021; P-tuning v2) is one float32 tensor
# (L, 2, kv, N, d): for every layer, keys (index 0) and values (index 1) of N virtual positions,
# kv key/value heads of size d (grouped-query attention: kv < attention heads). It is a key/value
# prefix as it stands; nothing runs to serve it. Its positions are 0..N-1, so real tokens sit at
# N, N+1, ... as behind a shallow prompt of the same N.

KV_STATS_TOKENS = 64  # common-vocabulary tokens run through the model to measure key/value statistics


def is_deep(prompt: torch.Tensor | None) -> bool:
    """A deep prompt (L, 2, kv, N, d), as opposed to a shallow (N, H) one."""
    return prompt is not None and prompt.dim() == 5


def takes_deep(model) -> bool:
    """Can ``model`` take a deep prompt (a decoder-only key/value prefix)?"""
    return not getattr(model.config, "is_encoder_decoder", False)


def check_deep(model) -> None:
    """Refuse deep prompts on a model without a decoder-only key/value prefix, in one line."""
    if not takes_deep(model):
        raise UserError(f"deep prompts need a decoder-only model with a key/value cache; "
                        f"{model.config.model_type} is an encoder-decoder model")


def deep_tokens(prompt: torch.Tensor) -> int:
    return int(prompt.shape[3])


@torch.no_grad()
def kv_of_embeddings(model, x: torch.Tensor) -> torch.Tensor:
    """Keys/values (L, 2, kv, T, d) float32 of the frozen decoder run on (T, H) input embeddings.

    A model without a key/value cache interface (encoder-decoder, or a base that takes no
    ``past_key_values``) is refused with one line: deep prompts need one.
    """
    from transformers import DynamicCache

    check_deep(model)
    w = model.get_input_embeddings().weight
    try:
        out = model.base_model(inputs_embeds=x.to(w.device, w.dtype).unsqueeze(0),
                               attention_mask=torch.ones(1, x.shape[0], dtype=torch.long, device=w.device),
                               **cache_kw(model.base_model, DynamicCache(config=model.config)), use_cache=True)
        layers = returned_cache(out).layers
    except (TypeError, AttributeError, ValueError) as e:
        raise UserError(f"deep prompts need a key/value cache; {type(model).__name__} has none usable ({e})") from None
    return torch.stack([torch.stack([ly.keys[0], ly.values[0]]) for ly in layers]).float().cpu()  # (L, 2, kv, T, d)


def kv_shape(model) -> tuple[int, int, int]:
    """(L, kv heads, head dim) of the model's key/value cache, read off a one-token run."""
    kv = kv_of_embeddings(model, embedding_matrix(model)[:1])
    return int(kv.shape[0]), int(kv.shape[2]), int(kv.shape[4])


def init_deep_random(model, n: int, gen: torch.Generator) -> torch.Tensor:
    """Normal keys/values with the per-channel mean and std the model's real keys/values have
    (measured on common-vocabulary tokens): keys carry large per-channel offsets, which a
    unit-scale init would miss."""
    ref = kv_of_embeddings(model, init_vocab(model, KV_STATS_TOKENS, gen))  # (L, 2, kv, T, d)
    mean, std = ref.mean(3, keepdim=True), ref.std(3, keepdim=True)  # (L, 2, kv, 1, d)
    L, _, kv, _, d = ref.shape
    return torch.randn(L, 2, kv, n, d, generator=gen) * std + mean  # (L, 2, kv, N, d)


def make_deep_prompt(model, tokenizer, n: int, init: str, *, seed: int = 0, text: str | None = None,
                     label_words: list[str] | None = None, source: torch.Tensor | None = None) -> torch.Tensor:
    """Build an (L, 2, kv, N, d) float32 deep prompt.

    ``random``: ``init_deep_random``. Every other init is the computed prefix of the shallow
    prompt the same init gives: ``text`` is the keys/values of the text run through the frozen
    model (as PEFT's ``initialize_kv_prefix_from_text``), ``vocab``/``labels`` those of the sampled
    or label-word embeddings, ``prompt:<name>`` of a stored shallow prompt. A stored deep prompt
    (``source`` 5-d) is copied, cut to N or extended with the random init.
    """
    if n <= 0:
        raise UserError(f"number of virtual tokens must be positive, got {n}")
    gen = torch.Generator().manual_seed(seed)
    if init == "random":
        return init_deep_random(model, n, gen)
    if is_deep(source):
        L, kv, d = kv_shape(model)
        if tuple(source.shape[i] for i in (0, 2, 4)) != (L, kv, d):
            raise UserError(f"--init {init}: deep prompt has layers x kv heads x head dim "
                            f"{tuple(source.shape[i] for i in (0, 2, 4))}, the model has {(L, kv, d)}")
        rows = source.float()[:, :, :, :n].clone()
        if rows.shape[3] == n:
            return rows
        return torch.cat([rows, init_deep_random(model, n - rows.shape[3], gen)], 3)
    shallow = make_prompt(model, tokenizer, n, init, seed=seed, text=text, label_words=label_words, source=source)
    return kv_of_embeddings(model, shallow)
