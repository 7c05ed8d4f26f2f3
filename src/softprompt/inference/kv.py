"""Decoder-only batch state: per-row key/value prefixes, left padding, rows joining and leaving.

Layout of row i (prefix length N_i, T_i input tokens), built per layer:

    cache columns  [pad x (maxN - N_i)][prefix keys/values of row i]    (B, kv, maxN, d)
    token block    [pad x (maxT - T_i)][tokens of row i]                (B, maxT)

Pads carry attention_mask 0 and positions are explicit (``next_pos``), so each row computes
exactly ``[its prefix][its tokens]``: columns that are masked contribute nothing to attention,
which makes padding, dropping rows (``DecoderState.take``) and stacking batches
(``merge_states``) exact.

A row whose prompt has DePT's input offset (``offset.py``) carries it, (T_max, H), in the
state's per-row ``offsets`` (B, max T_max, H; zero rows for the others) with ``start``, the
position of its first real token: every token fed at position p gets ``offset[p - start]``,
in prefill and in every decode step, as target tokens got it in training. A row whose deep
prompt has a PrefixMemory (``memory.py``) carries its (L, heads, d, d) memory in ``memory``
(B, L, heads, d, d; zeros for the others, whose term is then exactly 0), handed to every forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from softprompt import memory as MEM
from softprompt.compat import cache_kw, returned_cache
from softprompt.config import UserError
from softprompt.forward import embed, lm_logits
from softprompt.inference.bank import PrefixKV
from softprompt.offset import gather_offsets, stack_offsets

if TYPE_CHECKING:
    from softprompt.models import Model


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


def row_extras(model: Model, rows) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(the rows' DePT input offsets stacked, or None; each row's start: the position of its first
    real token, ``row.n``; their PrefixMemory memories stacked, or None) for a ``DecoderState``;
    ``rows`` are the engine's (``.offset``, ``.n``, ``.memory``)."""
    w = model.get_input_embeddings().weight
    return (stack_offsets([r.offset for r in rows], w), torch.tensor([r.n for r in rows], device=w.device),
            stack_memories(model, [r.memory for r in rows]))


def stack_memories(model: Model, memories: list[torch.Tensor | None]) -> torch.Tensor | None:
    """Rows' (L, heads, d, d) memories as one (B, L, heads, d, d), zeros for rows without; None if none has one."""
    if all(m is None for m in memories):
        return None
    shape = MEM.memory_shape(model)
    bad = next((m for m in memories if m is not None and tuple(m.shape[:3]) != shape), None)
    if bad is not None:
        raise UserError(f"a prefix memory of shape {tuple(bad.shape)} does not fit this model ({(*shape, shape[2])})")
    MEM.enable(model)
    w = model.get_input_embeddings().weight
    out = torch.zeros(len(memories), *shape, shape[2], device=w.device, dtype=w.dtype)
    for i, m in enumerate(memories):
        if m is not None:
            out[i] = m.to(w.device, w.dtype)
    return out


def memory_kw(memory: torch.Tensor | None) -> dict:
    return {} if memory is None else {"prefix_memory": memory}


class DecoderState:
    """Cache, attention mask (B, L) and next position (B,) of a decoder-only batch; per-row input
    offsets (B, T_max, H) and their start positions (B,), or None (module docstring)."""

    def __init__(self, model: Model, cache: DynamicCache, mask: torch.Tensor, next_pos: torch.Tensor,
                 offsets: torch.Tensor | None = None, start: torch.Tensor | None = None,
                 memory: torch.Tensor | None = None):
        self.model, self.cache, self.mask, self.next_pos = model, cache, mask, next_pos
        self.offsets, self.start, self.memory = offsets, start, memory

    def hidden(self, ids: torch.Tensor, tmask: torch.Tensor) -> torch.Tensor:
        """Run (B, C) tokens after the cache (``tmask`` 0 = right padding); hidden (B, C, H)."""
        pos = self.next_pos[:, None] + (tmask.cumsum(1) - 1).clamp(min=0)  # (B, C); pads: any value
        mask = torch.cat([self.mask, tmask], 1)
        x = embed(self.model, ids)
        if self.offsets is not None:
            x = x + gather_offsets(self.offsets, pos - self.start[:, None]).to(x.dtype)
        out = self.model.base_model(inputs_embeds=x, attention_mask=mask,
                                    position_ids=pos, **cache_kw(self.model.base_model, self.cache),
                                    use_cache=True, **memory_kw(self.memory))
        self.cache, self.mask = returned_cache(out), mask
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
        pick = (None if t is None else t[idx] for t in (self.offsets, self.start, self.memory))
        return DecoderState(self.model, cache, mask[:, cols], self.next_pos[idx], *pick)

    def take(self, rows: list[int]) -> None:
        """Keep (or repeat) ``rows`` in place (``gather``)."""
        kept = self.gather(rows)
        self.cache, self.mask, self.next_pos = kept.cache, kept.mask, kept.next_pos
        self.offsets, self.start, self.memory = kept.offsets, kept.start, kept.memory


def with_layers(state: DecoderState, kv_shape: tuple[int, int, int], dtype: torch.dtype) -> DecoderState:
    """``state`` with a zero-width key/value layer per decoder layer where its cache has none yet
    (rows without a prompt, before any token), so that ``merge_states`` can stack it."""
    if state.cache.layers and all(ly.is_initialized for ly in state.cache.layers):
        return state
    L, kv, d = kv_shape
    empty = state.mask.new_zeros(state.mask.shape[0], kv, 0, d, dtype=dtype)
    cache = DynamicCache(ddp_cache_data=[(empty, empty.clone()) for _ in range(L)], config=state.model.config)
    return DecoderState(state.model, cache, state.mask, state.next_pos, state.offsets, state.start, state.memory)


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
    offsets, start = _merge_offsets(a, b)
    return DecoderState(a.model, cache, mask, torch.cat([a.next_pos, b.next_pos]), offsets, start, _merge_memory(a, b))


def _merge_memory(a: DecoderState, b: DecoderState) -> torch.Tensor | None:
    """Both batches' per-row memories stacked (zeros for rows without)."""
    if a.memory is None and b.memory is None:
        return None
    ref = a.memory if a.memory is not None else b.memory
    return torch.cat([s.memory if s.memory is not None else ref.new_zeros(s.next_pos.shape[0], *ref.shape[1:])
                      for s in (a, b)])


def _merge_offsets(a: DecoderState, b: DecoderState) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Both batches' per-row offsets stacked (zero-padded to the longer T_max; zeros for rows without)."""
    if a.offsets is None and b.offsets is None:
        return None, None
    ref = a.offsets if a.offsets is not None else b.offsets
    tm = max(s.offsets.shape[1] for s in (a, b) if s.offsets is not None)

    def rows(s: DecoderState) -> torch.Tensor:
        if s.offsets is None:
            return ref.new_zeros(s.next_pos.shape[0], tm, ref.shape[2])
        return F.pad(s.offsets, (0, 0, 0, tm - s.offsets.shape[1]))

    start = torch.cat([s.start if s.start is not None else s.next_pos for s in (a, b)])
    return torch.cat([rows(a), rows(b)]), start
