"""Packed training forward: several short rows in one sequence, no padding computed.

A right-padded batch (B, T) spends compute on every pad position. ``pack`` lays the rows out
first-fit-decreasing into S sequences ("bins") of at most ``capacity`` tokens (default: the
longest row, so a bin is never longer than the padded batch). The attention mask is 4D and
block-diagonal: a token sees the earlier tokens of its own row and the N shared prompt keys,
nothing of the other rows in its bin; positions restart at N for every row. The shared prefix
is the one of ``decoder.prefix_loss`` (the prompt run once, batch 1, its keys/values expanded
to S bins), so every packed row is computed exactly as it would be alone.

Everything goes through the public model API (``inputs_embeds``, a 4D additive
``attention_mask``, ``position_ids``, ``past_key_values``); transformers passes a 4D mask to
the attention functions as it is, eager and SDPA alike. GPT-2 adds learned position embeddings
from ``position_ids``, so the restart per row reaches it too (tested on Llama and GPT-2).

A row's last token does not predict the next row's first token: targets stop at row ends, and
each row's first token is predicted by the last virtual token, as in the unpacked path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from softprompt.compat import cache_kw
from softprompt.data import IGNORE
from softprompt.forward.chunked_ce import linear_cross_entropy
from softprompt.forward.decoder import embed, expand_cache, prefix_cache


@dataclass
class Packed:
    ids: torch.Tensor  # (S, L) token ids, pad positions hold any valid id
    row: torch.Tensor  # (S, L) source row of each position, -1 for bin padding
    col: torch.Tensor  # (S, L) position inside its row (0 for bin padding)
    targets: torch.Tensor  # (S, L) the next token of the same row, IGNORE elsewhere


def bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: row indices per bin, each bin's total length <= capacity."""
    out: list[list[int]] = []
    room: list[int] = []
    for b in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        k = next((j for j, r in enumerate(room) if r >= lengths[b]), None)
        if k is None:
            out.append([])
            room.append(capacity)
            k = len(out) - 1
        out[k].append(b)
        room[k] -= lengths[b]
    return out


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
         capacity: int | None = None) -> Packed:
    """Lay the right-padded rows (B, T) out into bins; see the module docstring."""
    lengths = attention_mask.sum(1).tolist()
    capacity = max(capacity or 0, max(lengths))
    groups = bins(lengths, capacity)
    L = max(sum(lengths[b] for b in g) for g in groups)
    row = torch.full((len(groups), L), -1, dtype=torch.long)
    col = torch.zeros((len(groups), L), dtype=torch.long)
    for s, g in enumerate(groups):
        at = 0
        for b in g:
            row[s, at : at + lengths[b]] = b
            col[s, at : at + lengths[b]] = torch.arange(lengths[b])
            at += lengths[b]
    row, col = row.to(input_ids.device), col.to(input_ids.device)
    real = row >= 0
    r = row.clamp(min=0)
    nxt = labels.new_full((labels.shape[0], labels.shape[1] + 1), IGNORE)
    nxt[:, :-1] = labels.masked_fill(attention_mask == 0, IGNORE)  # (B, T+1): IGNORE past each row's end
    targets = nxt[r, col + 1].masked_fill(~real, IGNORE)  # (S, L)
    return Packed(ids=input_ids[r, col], row=row, col=col, targets=targets)


def packed_mask(row: torch.Tensor, n_prefix: int, dtype: torch.dtype) -> torch.Tensor:
    """(S, 1, L, N+L) additive mask: 0 where a query may attend, the dtype's minimum elsewhere.

    Every query sees the N prefix keys; inside the bin, the earlier keys of its own row. Bin
    padding sees the prefix and itself, so no softmax row is empty; real tokens never see it."""
    S, L = row.shape
    same = row[:, :, None] == row[:, None, :]  # (S, L, L)
    causal = torch.ones(L, L, dtype=torch.bool, device=row.device).tril()
    allowed = torch.cat([torch.ones(S, L, n_prefix, dtype=torch.bool, device=row.device), same & causal], dim=2)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=row.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]  # (S, 1, L, N+L)


def packed_row_losses(model, prompt: torch.Tensor, input_ids, attention_mask, labels,
                      capacity: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed target cross-entropy (B,) float32 and per-row target counts (B,)."""
    B, N = input_ids.shape[0], prompt.shape[0]
    cache, last = prefix_cache(model, prompt)
    p = pack(input_ids, attention_mask, labels, capacity)
    x = embed(model, p.ids)  # (S, L, H)
    hidden = model.base_model(
        inputs_embeds=x,
        attention_mask=packed_mask(p.row, N, x.dtype),
        position_ids=p.col + N,  # (S, L): positions restart after the prefix for every row
        **cache_kw(model.base_model, expand_cache(cache, p.ids.shape[0], model.config)),
        use_cache=True,
    ).last_hidden_state  # (S, L, H)
    sel = p.targets != IGNORE
    head = model.get_output_embeddings()
    tok = linear_cross_entropy(hidden[sel], head, p.targets[sel])  # (M,)
    rows = p.row[sel]
    total = torch.zeros(B, dtype=torch.float32, device=input_ids.device).index_add(0, rows, tok)
    count = torch.zeros(B, dtype=torch.long, device=input_ids.device).index_add(0, rows, torch.ones_like(rows))
    first = labels[:, 0]  # (B,) predicted by the last virtual token, once for all rows
    has = first != IGNORE
    if has.any():
        logp = F.log_softmax(head(last).float(), dim=-1)  # (V,)
        total = total - torch.where(has, logp[first.clamp(min=0)], logp.new_zeros(()))
        count = count + has.long()
    return total, count


def packed_loss(model, prompt: torch.Tensor, input_ids, attention_mask, labels,
                capacity: int | None = None) -> torch.Tensor:
    """Mean target cross-entropy of the batch, packed; equals ``decoder.prefix_loss``."""
    total, count = packed_row_losses(model, prompt, input_ids, attention_mask, labels, capacity)
    return total.sum() / count.sum().clamp(min=1)
