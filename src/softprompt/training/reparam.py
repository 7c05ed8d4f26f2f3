"""Training-time reparameterisations of a prompt, folded away before saving.

A reparameterisation is a module whose ``forward()`` returns the prompt the model sees: a
shallow (N, H) or a deep (L, 2, kv, N, d) tensor. Training moves the module's parameters; the
saved artifact is ``fold()``, the plain tensor it computes, so serving, mixing and the PEFT
format never see the module.

* ``residual`` (shallow; Razdaibiedina et al. 2023, residual prompt tuning): ``P + LN(up(relu(down(P))))``.
  The LayerNorm's gain starts at the prompt's own scale (LN output has unit scale per row, which
  would swamp embeddings of std ~0.1), so the initial prompt is the init plus a same-scale term.
* ``mlp`` / ``lstm`` (shallow; PEFT's p-tuning prompt encoder): ``P0 + head(encoder(E))`` with
  trainable inputs E (N, H) started at the init, a two-layer MLP or a bidirectional LSTM, and a
  zero-initialised last layer, so training starts exactly at the chosen init ``P0``.
* ``mlp`` (deep; prefix tuning, Li & Liang 2021): ``KV0 + MLP(E)``, E (N, H), ``tanh`` MLP to
  L*2*kv*d per position (PEFT's ``prefix_projection``), last layer zero-initialised.
"""

from __future__ import annotations

import torch
from torch import nn

from softprompt.config import REPARAMS, UserError
from softprompt.prompt import is_deep

HIDDEN = 512  # hidden width of every reparameterisation network


def check_reparam(kind: str, reparam: str | None) -> None:
    """One line if ``reparam`` is not one the prompt kind supports."""
    if reparam is not None and reparam not in REPARAMS.get(kind, ()):
        raise UserError(f"--reparam {reparam} is not supported for --kind {kind} "
                        f"(choose {', '.join(REPARAMS.get(kind, ())) or 'none'})")


class ResidualReparam(nn.Module):
    """Residual prompt tuning: the prompt plus a LayerNorm'd bottleneck MLP of itself."""

    def __init__(self, init: torch.Tensor, hidden: int = HIDDEN):
        super().__init__()
        H = init.shape[1]
        self.prompt = nn.Parameter(init.detach().clone().float())  # (N, H)
        self.down, self.up = nn.Linear(H, hidden), nn.Linear(hidden, H)
        self.norm = nn.LayerNorm(H)
        with torch.no_grad():
            self.norm.weight.fill_(float(init.float().std()))

    def forward(self) -> torch.Tensor:
        return self.prompt + self.norm(self.up(torch.relu(self.down(self.prompt))))  # (N, H)


class EncoderReparam(nn.Module):
    """``base + head(encoder(E))``: PEFT's p-tuning encoder (shallow) or prefix-tuning MLP (deep)."""

    def __init__(self, base: torch.Tensor, inputs: torch.Tensor, style: str, hidden: int = HIDDEN):
        super().__init__()
        self.register_buffer("base", base.detach().clone().float())  # (N, H) or (L, 2, kv, N, d)
        self.inputs = nn.Parameter(inputs.detach().clone().float())  # E (N, H)
        n, H = inputs.shape
        out = base.numel() // n  # per virtual token: H, or L*2*kv*d
        self.style = style
        if style == "lstm":
            self.lstm = nn.LSTM(H, hidden, num_layers=2, bidirectional=True, batch_first=True)
            self.head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, out))
        else:
            act = nn.Tanh() if is_deep(base) else nn.ReLU()
            self.head = nn.Sequential(nn.Linear(H, hidden), act, nn.Linear(hidden, out))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self) -> torch.Tensor:
        x = self.inputs.unsqueeze(0)  # (1, N, H)
        if self.style == "lstm":
            x = self.lstm(x)[0]  # (1, N, 2*hidden)
        delta = self.head(x)[0]  # (N, out)
        if is_deep(self.base):
            L, two, kv, n, d = self.base.shape
            delta = delta.reshape(n, L, two, kv, d).permute(1, 2, 3, 0, 4)  # (L, 2, kv, N, d)
        return self.base + delta


def make_reparam(reparam: str, init: torch.Tensor, embed_std: float, gen: torch.Generator) -> nn.Module:
    """The module for ``reparam`` over the initial prompt ``init`` (shallow or deep)."""
    kind = "deep" if is_deep(init) else "shallow"
    check_reparam(kind, reparam)
    if reparam == "residual":
        return ResidualReparam(init)
    if kind == "shallow":
        return EncoderReparam(init, init, reparam)
    n = init.shape[3]
    H = init.shape[2] * init.shape[4]  # E per position: kv*d wide, as PEFT's prefix embedding
    return EncoderReparam(init, torch.randn(n, H, generator=gen) * embed_std, reparam)


@torch.no_grad()
def fold(module: nn.Module) -> torch.Tensor:
    """The plain prompt a reparameterisation computes (what is saved and served)."""
    return module().detach().float().cpu().clone()
