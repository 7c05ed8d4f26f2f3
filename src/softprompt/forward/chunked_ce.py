"""Cross-entropy over the vocabulary without the full logits in memory.

``linear_cross_entropy(hidden, head, targets)`` returns the per-token cross-entropy (M,) of
``head(hidden)`` against ``targets``, computing the (C, V) float32 logits for C rows at a time.
The gradient with respect to ``hidden`` is computed chunk by chunk in the forward pass
(``softmax - onehot`` times the head's weight, the textbook derivative) and kept as an (M, H)
tensor, so no (M, V) tensor is ever held: for the walk-through that is 146 MB of float32 logits,
plus as much again for their gradient, replaced by one chunk of ``CHUNK_BYTES``.

Per-token losses are independent of each other, so the upstream gradient of any weighted sum
of them scales each row of the stored (M, H) gradient: the result is exact (tested against
``F.cross_entropy`` on the full logits, tests/test_packing.py). A trainable head (LoRA on the
output layer, full fine-tuning) needs its weight gradient, which depends on the upstream
weights; that case runs each chunk under autograd with checkpointing (its logits are recomputed in the
backward pass; the result is the same).

Under bf16 autocast the logits are computed in ``precision.logits_context``: float32 products of
the float32 head, not autocast's bf16 ones, unless the training asked for bf16 logits (LM mode;
``precision.logits_context`` says why and what each costs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from softprompt.precision import float32_logits, logits_context

CHUNK_BYTES = 32 * 2**20  # float32 logits held at once (one chunk)


def chunk_rows(vocab: int, budget: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that a (rows, V) float32 block stays within ``budget`` bytes."""
    return max(1, budget // (4 * vocab))


class _FrozenHeadCE(torch.autograd.Function):
    """Per-token CE through a frozen head; d loss_i / d hidden_i computed in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows: int):  # hidden (M, H), weight (V, H)
        M = hidden.shape[0]
        losses = torch.empty(M, dtype=torch.float32, device=hidden.device)  # (M,)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None  # (M, H)
        with logits_context(hidden.device):
            for s in range(0, M, rows):
                h, t = hidden[s : s + rows].to(weight.dtype), targets[s : s + rows]
                logits = F.linear(h, weight, bias).float()  # (C, V), the only vocabulary-sized block
                lse = logits.logsumexp(-1)  # (C,)
                losses[s : s + rows] = lse - logits.gather(1, t[:, None])[:, 0]
                if grad is not None:
                    probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                    probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                    grad[s : s + rows] = probs.to(weight.dtype) @ weight  # (C, H)
        ctx.save_for_backward(grad)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):  # (M,)
        (grad,) = ctx.saved_tensors
        g = None if grad is None else grad * grad_losses[:, None].to(grad.dtype)
        return g, None, None, None, None


def autocast_once(weight: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``weight`` in autocast's dtype when autocast is on and the logits are autocast's (bf16
    logits, ``precision.logits_context``), else as it is: cast once here, the
    chunk loop's products see it already cast, where autocast would cast a frozen weight again
    at every product (it caches casts of trainable leaves only). The values are the same."""
    if torch.is_autocast_enabled(device.type) and weight.is_floating_point() and not float32_logits():
        return weight.to(torch.get_autocast_dtype(device.type))
    return weight


def linear_cross_entropy(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                         rows: int | None = None) -> torch.Tensor:
    """Per-token cross-entropy (M,) float32 of ``head(hidden)`` (M, V) against ``targets`` (M,),
    never materialising the (M, V) logits; ``rows`` per chunk (default from ``CHUNK_BYTES``)."""
    weight, bias = head.weight, getattr(head, "bias", None)
    rows = rows or chunk_rows(weight.shape[0])
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32) + hidden.sum() * 0
    if not (weight.requires_grad or (bias is not None and bias.requires_grad)):
        weight, bias = autocast_once(weight, hidden.device), None if bias is None else autocast_once(bias, hidden.device)
        return _FrozenHeadCE.apply(hidden, weight, bias, targets, rows)
    from torch.utils.checkpoint import checkpoint

    float32 = float32_logits()  # decided here: checkpointing recomputes chunks in backward, outside this context
    dtype: torch.dtype = head.weight.dtype  # type: ignore[assignment]  # a Linear's weight: a tensor

    def chunk(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with logits_context(h.device, float32):
            return F.cross_entropy(head(h.to(dtype)).float(), t, reduction="none")  # (C,)

    # trainable head: its weight gradient needs the upstream weights, so autograd runs per chunk;
    # checkpointing recomputes each chunk's logits in the backward instead of keeping them all
    return torch.cat([checkpoint(chunk, hidden[s : s + rows], targets[s : s + rows], use_reentrant=False)
                      for s in range(0, hidden.shape[0], rows)])
