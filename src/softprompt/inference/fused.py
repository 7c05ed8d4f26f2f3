"""One forward for several decoder-only batches: the decode groups, a prefill piece and a scoring
slice of one scheduler step go through the model together.

Why: on a CPU (and for small batches on any device) a forward's cost is mostly reading the
weights, whatever the number of tokens. A prefill piece or a scoring slice run as a forward of
its own beside the decode step therefore costs about a whole decode step more, and every
healthy stream's next token waits for it. Run in the decode step's forward, the same tokens cost
only their arithmetic.

How: every ``Forward`` (a ``DecoderState`` and its (B, C) tokens with their mask) is embedded
(with its rows' DePT offsets) and flattened, and the tokens of all of them go through the model
as ONE row of N tokens with explicit positions, so every linear layer runs once over all N.
Attention is the only place where rows meet. ``attention``, registered through transformers'
public ``AttentionInterface`` (as ``memory.py`` does), cuts the N queries, keys and values back
into each batch's (B, heads, C, d), appends the new keys/values to that batch's cache of the
layer, and runs transformers' own SDPA attention over [its cache][its tokens] with the mask its
own forward would build (its padding, causal among its new tokens), plus the PrefixMemory term
of its rows. So each row's attention is exactly the computation of its own batch's forward;
only the matrix products of the linear layers see other shapes (equal up to float rounding;
tests compare greedy tokens and logits with the separate forwards).

All or nothing: each layer's new keys/values are appended as the forward goes (so its peak
memory is an ordinary forward's), and a failed forward cuts every layer it reached back to its
columns before it, and writes masks and positions only after success; so a failed fused
forward changes nothing and ``run`` retries every forward on its own (all or nothing too),
where a failure belongs to its owner alone. A model family is fused
only if it is known to hand keyword arguments down to its attention (``FAMILIES``) and has no
sliding window; a fused forward that does not reach every layer switches fusing off for that
model (and is retried apart), so nothing is ever computed without its cache.
"""

from __future__ import annotations

import contextvars
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from softprompt import memory as MEM
from softprompt.forward import embed
from softprompt.offset import gather_offsets

if TYPE_CHECKING:
    from softprompt.inference.kv import DecoderState

log = logging.getLogger(__name__)

ATTN = "softprompt_fused"  # the attention implementation's registered name
KEY = "softprompt_fused"  # the forward keyword argument that carries the plan to the attention
_FUSING = contextvars.ContextVar("softprompt_fusing", default=False)  # a fused forward is running
FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2"})  # SDPA attention, kwargs handed down


@dataclass(eq=False)
class Forward:
    """(B, C) tokens (``tmask`` 0 = right padding) to run after ``state``'s cache; after ``run``,
    ``out`` holds their hidden states (B, C, H), or ``error`` what failed."""

    state: DecoderState
    ids: torch.Tensor
    tmask: torch.Tensor
    out: torch.Tensor | None = None
    error: BaseException | None = None

    def run(self) -> torch.Tensor:
        """This forward alone: all or nothing where the model fuses, else ``DecoderState.hidden``."""
        self.out = self.error = None
        if can_fuse(self.state.model):
            _fused(self.state.model, [self])
        else:
            self.out = self.state.hidden(self.ids, self.tmask)
        return self.hidden

    @property
    def hidden(self) -> torch.Tensor:
        """``out``, once run."""
        if self.out is None:
            raise RuntimeError("this forward has not run")
        return self.out


@dataclass(eq=False)
class _Part:
    fwd: Forward
    allowed: torch.Tensor  # (B, 1, C, L + C) bool: the keys each new token attends to
    before: list[int] = field(default_factory=list)  # per layer reached: its cache columns before this forward


@dataclass(eq=False)
class _Plan:
    parts: list[_Part]


def can_fuse(model) -> bool:
    cfg = model.config
    if getattr(model, "_softprompt_unfused", False) or cfg.model_type not in FAMILIES:
        return False
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return False
    return getattr(cfg, "_attn_implementation", None) in ("sdpa", MEM.ATTN, ATTN)


def attention(module, query, key, value, attention_mask, **kwargs):
    """Without a plan: ``memory.memory_attention`` (SDPA, plus the PrefixMemory term when the call
    carries one). With one: each batch's attention over its own cache (module docstring)."""
    plan: _Plan | None = kwargs.pop(KEY, None)
    if plan is None:
        return MEM.memory_attention(module, query, key, value, attention_mask, **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("prefix_memory", None)
    layer, outs, at = module.layer_idx, [], 0
    for part in plan.parts:
        st, (B, C) = part.fwd.state, part.fwd.ids.shape
        sl = slice(at, at + B * C)
        q, k, v = (t[0, :, sl].unflatten(1, (B, C)).transpose(0, 1) for t in (query, key, value))  # (B, h, C, d)
        past: Any = st.cache.layers[layer]
        if not past.is_initialized:
            past.lazy_initialization(k, v)
        part.before.append(past.keys.shape[2] if past.keys.dim() == 4 else 0)
        if part.before[-1]:
            k, v = torch.cat([past.keys, k], 2), torch.cat([past.values, v], 2)
        else:  # its own copy: a view would keep the whole step's keys alive in this cache
            k, v = k.contiguous(), v.contiguous()
        past.keys, past.values = k, v  # the old tensors go now (peak memory as an ordinary forward); undone on failure
        out, _ = sdpa_attention_forward(module, q, k, v, part.allowed, **kwargs)  # (B, C, h, d)
        if st.memory is not None:
            m = st.memory[:, layer].to(q.dtype)  # (B, h, d, d)
            out = out + (MEM.phi(q) @ m).transpose(1, 2).to(out.dtype)
        outs.append(out.reshape(B * C, *out.shape[2:]))
        at += B * C
    return torch.cat(outs)[None], None


def enable(model) -> None:
    """Register ``attention`` and switch ``model`` to it (idempotent; it is SDPA attention
    unchanged for every forward that carries no plan, and handles PrefixMemory like
    ``memory.memory_attention``)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if model.config._attn_implementation == ATTN:
        return

    def mask(*args, **kwargs):  # a fused forward builds its own masks: none of N x N for the flattened row
        return None if _FUSING.get() else sdpa_mask(*args, **kwargs)

    AttentionInterface.register(ATTN, attention)
    AttentionMaskInterface.register(ATTN, mask)
    MEM.COMPATIBLE.add(ATTN)
    model.set_attn_implementation(ATTN)


def run(model, forwards: list[Forward]) -> None:
    """Run every forward: fused into one when there are several and the model allows it, else
    (or if the fused one fails) each on its own. Each gets ``out`` or ``error``; a failure of one
    forward run on its own is its own alone."""
    for f in forwards:
        f.out = f.error = None
    if len(forwards) > 1 and can_fuse(model):
        try:
            _fused(model, forwards)
            return
        except Exception:  # noqa: BLE001 - nothing was written: every forward is retried on its own below
            log.debug("fused forward failed; running its parts apart", exc_info=True)
    for f in forwards:
        try:
            f.run()
        except Exception as e:  # noqa: BLE001 - this forward's owner fails alone
            f.error = e


def _fused(model, forwards: list[Forward]) -> None:
    enable(model)
    parts, xs, ps = [], [], []
    for f in forwards:
        st, (B, C) = f.state, f.ids.shape
        pos = st.next_pos[:, None] + (f.tmask.cumsum(1) - 1).clamp(min=0)  # as ``DecoderState.hidden``
        x = embed(model, f.ids)
        if st.offsets is not None and st.start is not None:
            x = x + gather_offsets(st.offsets, pos - st.start[:, None]).to(x.dtype)
        L, dev = st.mask.shape[1], f.ids.device
        keys = torch.cat([st.mask, f.tmask], 1).bool()  # (B, L + C)
        qpos = L + torch.arange(C, device=dev)
        allowed = keys[:, None, :] & (torch.arange(L + C, device=dev)[None, :] <= qpos[:, None])[None]
        allowed[:, torch.arange(C, device=dev), qpos] = True  # a pad query sees itself: finite, never read
        parts.append(_Part(f, allowed[:, None]))
        xs.append(x.reshape(B * C, -1))
        ps.append(pos.reshape(-1))
    plan = _Plan(parts)
    token = _FUSING.set(True)
    try:
        out = model.base_model(inputs_embeds=torch.cat(xs)[None], position_ids=torch.cat(ps)[None], use_cache=False,
                               **{KEY: plan})
        n_layers = len(forwards[0].state.cache.layers)
        if any(len(p.before) != n_layers for p in parts):
            model._softprompt_unfused = True  # this model does not hand the plan to every layer's attention
            log.warning("the %s model's layers do not all take the fused forward; its batches run apart",
                        model.config.model_type)
            raise RuntimeError("fused forward did not reach every layer")
    except BaseException:
        _undo(parts)
        raise
    finally:
        _FUSING.reset(token)
    h, at = out.last_hidden_state[0], 0
    for p in parts:  # the forward succeeded: masks, positions and outputs
        f, st = p.fwd, p.fwd.state
        B, C = f.ids.shape
        st.mask = torch.cat([st.mask, f.tmask], 1)
        st.next_pos = st.next_pos + f.tmask.sum(1)
        f.out = h[at : at + B * C].view(B, C, -1)
        at += B * C


def _undo(parts: list[_Part]) -> None:
    """Cut every cache layer a failed forward reached back to its columns before it."""
    for p in parts:
        layers: list[Any] = list(p.fwd.state.cache.layers)
        for layer, n in zip(layers, p.before, strict=False):
            layer.keys, layer.values = layer.keys[:, :, :n], layer.values[:, :, :n]
