"""Decoder-only batch state: per-row key/value prefixes, left padding, rows joining and leaving.

Layout of row i (prefix length N_i, T_i input tokens), built per layer:

    cache columns  [pad x (maxN - N_i)][prefix keys/values of row i]    (B, kv, maxN, d)
    token block    [pad x (maxT - T_i)][tokens of row i]                (B, maxT)

Pads carry attention_mask 0 and positions are explicit (``next_pos``), so each row computes
exactly ``[its prefix][its tokens]``: columns that are masked contribute nothing to attention,
which makes padding, dropping rows (``DecoderState.take``) and stacking batches
(``merge_states``) exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from softprompt.compat import cache_kw, returned_cache
from softprompt.forward import embed, lm_logits
from softprompt.inference.bank import PrefixKV


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and mask, each row right-aligned."""
    T = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, T - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, T - len(s) :] = 1
    return ids, mask


def batch_prefix(prefixes: list[PrefixKV | None], config) -> tuple[DynamicCache, torch.Tensor]:
    """Per-row prefix keys/values right-aligned into one cache: layers (B, kv, maxN, d), mask (B, maxN)."""
    B = len(prefixes)
    maxN = max((p.n for p in prefixes if p is not None), default=0)
    ref = next((p for p in prefixes if p is not None), None)
    mask = torch.zeros(B, maxN, dtype=torch.long, device=None if ref is None else ref.keys.device)
    if maxN == 0:
        return DynamicCache(config=config), mask
    L, kv, _, d = ref.keys.shape
    keys = ref.keys.new_zeros(L, B, kv, maxN, d)
    values = ref.values.new_zeros(L, B, kv, maxN, d)
    for i, p in enumerate(prefixes):
        if p is not None:
            keys[:, i, :, maxN - p.n :] = p.keys
            values[:, i, :, maxN - p.n :] = p.values
            mask[i, maxN - p.n :] = 1
    return DynamicCache(ddp_cache_data=list(zip(keys.unbind(0), values.unbind(0))), config=config), mask


class DecoderState:
    """Cache, attention mask (B, L) and next position (B,) of a decoder-only batch."""

    def __init__(self, model, cache: DynamicCache, mask: torch.Tensor, next_pos: torch.Tensor):
        self.model, self.cache, self.mask, self.next_pos = model, cache, mask, next_pos

    def hidden(self, ids: torch.Tensor, tmask: torch.Tensor) -> torch.Tensor:
        """Run (B, C) tokens after the cache (``tmask`` 0 = right padding); hidden (B, C, H)."""
        pos = self.next_pos[:, None] + (tmask.cumsum(1) - 1).clamp(min=0)  # (B, C); pads: any value
        self.mask = torch.cat([self.mask, tmask], 1)
        out = self.model.base_model(inputs_embeds=embed(self.model, ids), attention_mask=self.mask,
                                    position_ids=pos, **cache_kw(self.model.base_model, self.cache),
                                    use_cache=True)
        self.cache = returned_cache(out)
        self.next_pos = self.next_pos + tmask.sum(1)
        return out.last_hidden_state

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,), return next-token logits (B, V)."""
        h = self.hidden(tokens[:, None], torch.ones(tokens.shape[0], 1, dtype=torch.long, device=tokens.device))
        return lm_logits(self.model, h[:, -1])

    def gather(self, rows: list[int]) -> DecoderState:
        """A new state of ``rows`` (repeats allowed; a copy); key columns that are padding for
        every one of them are dropped. Exact: positions are explicit and masked columns
        contribute nothing to attention."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask[idx]
        cols = mask.any(0).nonzero()[:, 0]  # (L',)
        if cols.numel() == mask.shape[1]:
            cols = slice(None)
        layers = [(ly.keys[idx][:, :, cols], ly.values[idx][:, :, cols]) for ly in self.cache.layers
                  if ly.is_initialized]
        cache = DynamicCache(ddp_cache_data=layers or None, config=self.model.config)
        return DecoderState(self.model, cache, mask[:, cols], self.next_pos[idx])

    def take(self, rows: list[int]) -> None:
        """Keep (or repeat) ``rows`` in place (``gather``)."""
        kept = self.gather(rows)
        self.cache, self.mask, self.next_pos = kept.cache, kept.mask, kept.next_pos


def with_layers(state: DecoderState, kv_shape: tuple[int, int, int], dtype: torch.dtype) -> DecoderState:
    """``state`` with a zero-width key/value layer per decoder layer where its cache has none yet
    (rows without a prompt, before any token), so that ``merge_states`` can stack it."""
    if state.cache.layers and all(ly.is_initialized for ly in state.cache.layers):
        return state
    L, kv, d = kv_shape
    empty = state.mask.new_zeros(state.mask.shape[0], kv, 0, d, dtype=dtype)
    cache = DynamicCache(ddp_cache_data=[(empty, empty.clone()) for _ in range(L)], config=state.model.config)
    return DecoderState(state.model, cache, state.mask, state.next_pos)


def merge_states(a: DecoderState, b: DecoderState) -> DecoderState:
    """Stack two decoder-only batches: key columns right-aligned, the narrower one left-padded.

    Exact: the added columns have attention mask 0 and positions are explicit (``next_pos``).
    """
    La, Lb = a.mask.shape[1], b.mask.shape[1]
    L = max(La, Lb)

    def pad(t: torch.Tensor, n: int) -> torch.Tensor:  # (B, kv, n, d) -> (B, kv, L, d)
        return t if n == L else torch.cat([t.new_zeros(*t.shape[:2], L - n, t.shape[3]), t], 2)

    layers = [(torch.cat([pad(x.keys, La), pad(y.keys, Lb)]), torch.cat([pad(x.values, La), pad(y.values, Lb)]))
              for x, y in zip(a.cache.layers, b.cache.layers, strict=True)]
    mask = torch.cat([F.pad(a.mask, (L - La, 0)), F.pad(b.mask, (L - Lb, 0))])  # (Ba+Bb, L)
    cache = DynamicCache(ddp_cache_data=layers, config=a.model.config)
    return DecoderState(a.model, cache, mask, torch.cat([a.next_pos, b.next_pos]))
