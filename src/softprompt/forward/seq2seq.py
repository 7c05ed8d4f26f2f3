"""Encoder-decoder models (the T5 family): the soft prompt goes in front of the encoder input.

The encoder is bidirectional, so the prompt's keys/values depend on the input and there is no
prefix cache: every row runs ``[P_i][x_i]`` through the encoder (right-padded; T5's relative
position bias makes the padding side irrelevant to real tokens). The decoder never sees the
prompt. Used by training (``seq2seq_loss``, dispatched from ``forward.prompt_loss``), scoring
and the engine's decode loop (``Seq2SeqState``).

A training/eval batch comes from ``data.collate``: right-padded rows of ``source + target``
with labels -100 on the source. Here each row is split back: source tokens feed the encoder,
target tokens are the decoder's labels. A row with neither prompt nor source gets one EOS token
as encoder input (an encoder cannot attend over nothing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import DynamicCache, EncoderDecoderCache

from softprompt.compat import cache_kw, returned_cache
from softprompt.data import IGNORE

if TYPE_CHECKING:
    from softprompt.models import Model


def _start_id(model: Model) -> int:
    start = model.config.decoder_start_token_id
    return int(start if start is not None else model.config.pad_token_id)


def encoder_inputs(model: Model, prompts: list[torch.Tensor | None], ids: list[list[int]]):
    """Right-padded encoder embeddings ``[P_i][x_i][pad]`` (B, L, H) and mask (B, L)."""
    emb = model.get_input_embeddings()
    eos = model.config.eos_token_id
    rows = []
    for p, x in zip(prompts, ids):
        x = x if (x or p is not None) else [eos]
        e = emb(torch.tensor(x, dtype=torch.long)) if x else emb.weight[:0]  # (T, H)
        rows.append(e if p is None else torch.cat([p.to(e.dtype), e]))  # (N+T, H)
    L = max(r.shape[0] for r in rows)
    H = rows[0].shape[1]
    x = rows[0].new_zeros(len(rows), L, H)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = 1
    return x, mask


def encode(model: Model, prompts, ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder hidden states (B, L, H) and the encoder mask (B, L)."""
    x, mask = encoder_inputs(model, prompts, ids)
    return model.get_encoder()(inputs_embeds=x, attention_mask=mask).last_hidden_state, mask


def right_pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    T = max(1, max(len(s) for s in seqs))
    out = torch.full((len(seqs), T), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def target_logprobs(model: Model, enc_hidden, enc_mask, targets: list[list[int]],
                    choices: torch.Tensor | None = None) -> torch.Tensor:
    """Summed log-probability of each row's target token sequence, (B,); with ``choices``
    (B, L) and one-token targets, each choice's log-probability (B, L)."""
    from softprompt.forward.decoder import choice_logprobs

    labels = right_pad(targets, IGNORE)  # (B, C)
    dec = torch.cat([labels.new_full((labels.shape[0], 1), _start_id(model)), labels[:, :-1]], 1)
    dec = dec.masked_fill(dec == IGNORE, model.config.pad_token_id)
    logits = model(encoder_outputs=(enc_hidden,), attention_mask=enc_mask, decoder_input_ids=dec,
                   use_cache=False).logits  # (B, C, V)
    sel = labels != IGNORE
    rows = sel.nonzero()[:, 0]
    logp = F.log_softmax(logits[sel].float(), -1)  # (M, V)
    if choices is not None:
        return choice_logprobs(logp, rows, choices)
    lp = logp.gather(-1, labels[sel].unsqueeze(-1))[:, 0]
    out = torch.zeros(labels.shape[0])
    return out.index_add_(0, rows, lp)


def split_batch(batch: dict) -> tuple[list[list[int]], list[list[int]]]:
    """Right-padded ``source + target`` rows -> (source ids, target ids) per row."""
    src, tgt = [], []
    for ids, mask, lab in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        m = mask.bool()
        ids, lab = ids[m], lab[m]
        src.append(ids[lab == IGNORE].tolist())
        tgt.append(lab[lab != IGNORE].tolist())
    return src, tgt


def seq2seq_loss(model: Model, prompt: torch.Tensor | None, batch: dict) -> torch.Tensor:
    """Mean cross-entropy over target tokens with the prompt in front of the encoder input."""
    src, tgt = split_batch(batch)
    x, mask = encoder_inputs(model, [prompt] * len(src), src)
    labels = right_pad(tgt, IGNORE)
    logits = model(inputs_embeds=x, attention_mask=mask, labels=labels, use_cache=False).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)


@torch.no_grad()
def seq2seq_logprobs(model: Model, prompt: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                     choices: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row summed log-probability of the target tokens, (B,) (cf. forward.sequence_logprobs)."""
    src, tgt = split_batch({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    hidden, mask = encode(model, [prompt] * len(src), src)
    return target_logprobs(model, hidden, mask, tgt, choices)


class Seq2SeqState:
    """Decoder state of a batch for the engine's decode loop: one token per row per step."""

    def __init__(self, model: Model, enc_hidden: torch.Tensor, enc_mask: torch.Tensor):
        self.model = model
        self.enc_hidden, self.enc_mask = enc_hidden, enc_mask  # (B, L, H), (B, L)
        cfg = model.config
        self.cache = EncoderDecoderCache(DynamicCache(config=cfg), DynamicCache(config=cfg))

    def start_tokens(self) -> torch.Tensor:
        return torch.full((self.enc_hidden.shape[0],), _start_id(self.model), dtype=torch.long)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,), return next-token logits (B, V)."""
        out = self.model(encoder_outputs=(self.enc_hidden,), attention_mask=self.enc_mask,
                         decoder_input_ids=tokens[:, None], **cache_kw(self.model, self.cache), use_cache=True)
        self.cache = returned_cache(out)
        return out.logits[:, -1]

    def take(self, rows: list[int]) -> None:
        """Keep only ``rows`` (finished rows leave the batch)."""
        idx = torch.tensor(rows, dtype=torch.long)
        self.enc_hidden, self.enc_mask = self.enc_hidden[idx], self.enc_mask[idx]
        self.cache.batch_select_indices(idx)
