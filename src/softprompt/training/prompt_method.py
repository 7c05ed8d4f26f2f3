"""The prompt-tuning methods of the training loop (``loop.Method``), with P-tuning v2's levers.

* ``PromptMethod``: the trainable tensor is the prompt, shallow (N, H) or deep (L, 2, kv, N, d),
  or with a training-time reparameterisation (``reparam.py``) the module that computes it;
* ``DeepPromptMethod``: the same, refused in one line on a model without a key/value prefix;
* ``ProgressiveMethod``: a new task's prompt after the frozen prompts of earlier tasks;
* ``OffsetPromptMethod``: DePT, a shallow prompt plus a low-rank input offset (``offset.py``);
* ``MemoryPromptMethod``: PrefixMemory, a deep prompt plus a per-head memory term (``memory.py``).

Levers (P-tuning v2 and PEFT's Cartridges), all options of the same methods:

* ``dropout``: prefix dropout, element-wise on the trained virtual tokens (keys/values of a deep
  prompt, as P-tuning v2 drops its ``past_key_values``; embeddings of a shallow one), only while
  the loop trains (``set_step``: between steps the method is in eval mode, so evaluation, scoring
  and the saved prompt never see it). The mask is a function of (seed, step, micro-batch), so a
  resumed run draws the masks the uninterrupted one drew.
* ``freeze_first``: the first virtual token is kept as initialised (an attention sink): it is a
  buffer, not a parameter, so it gets no gradient and no weight decay, and is saved with the rest.

Invariant: the model's weights are never modified; ``state``/``save`` see the plain prompt
(folded, without dropout), which is what serving loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from softprompt import memory
from softprompt.adapter import PromptKind
from softprompt.config import UserError
from softprompt.forward import prompt_loss, sequence_logprobs
from softprompt.offset import init_offset, offset_of
from softprompt.precision import FrozenCasts, autocast, check_logits
from softprompt.prompt import check_deep, is_deep, kind_of

if TYPE_CHECKING:
    from softprompt.models import Model

MASK_STRIDE = 1009  # micro-batches per step that get distinct dropout masks


class PromptMethod:
    """Prompt tuning: the trainable tensor is the prompt, (N, H), or deep (L, 2, kv, N, d).

    With ``reparam`` the trainable parameters are a reparameterisation module's
    (``reparam.make_reparam``) and the prompt is what it computes (``current``); ``state``,
    ``save`` and everything downstream see that plain, folded prompt (plus the module's weights
    in ``state``, so a resumed run continues the same module). ``dropout`` and ``freeze_first``:
    the module docstring.
    """

    def __init__(self, model: Model, prompt: torch.Tensor, fast: bool = True, reparam: str | None = None, seed: int = 0,
                 pack: bool = False, precision: str = "fp32", dropout: float = 0.0, freeze_first: bool = False,
                 logits: str = "fp32"):
        self.model = model
        self.logits = check_logits(logits)  # the loss's logits under bf16: "bf16" leaves them to autocast (LM mode; tune.with_logits)
        device = next(model.parameters()).device  # the prompt lives with the model, in float32
        full = prompt.detach().clone().float().to(device)
        self.kind = kind_of(full)  # decided once, here; the forward pass is told it
        self.axis = 3 if self.kind is PromptKind.DEEP else 0  # the virtual-token axis
        if freeze_first and full.shape[self.axis] < 2:
            raise UserError("--freeze-first-token needs at least 2 virtual tokens (the first stays frozen)")
        self.sink = full.narrow(self.axis, 0, 1).clone() if freeze_first else None  # the frozen first token
        trained = full.narrow(self.axis, 1, full.shape[self.axis] - 1) if freeze_first else full
        self.prompt = torch.nn.Parameter(trained.clone())
        self.fast, self.pack, self.seed = fast, pack, seed
        self.dropout, self._micro = dropout, 0
        self._step: int | None = None  # None: eval mode (no dropout)
        self.precision = precision  # "bf16": forward and backward under bf16 autocast (precision.py)
        self.casts = FrozenCasts(model) if precision == "bf16" else None  # the frozen weights cast once (after every check)
        self.reparam_name = reparam
        self.reparam = None
        if reparam is not None:
            from softprompt.training.reparam import make_reparam

            std = float(model.get_input_embeddings().weight.float().std())
            self.reparam = make_reparam(reparam, trained, std, torch.Generator().manual_seed(seed)).to(device)
            self.prompt.requires_grad_(False)  # the module's copy trains; this one is never used

    def parameters(self):
        return list(self.reparam.parameters()) if self.reparam is not None else [self.prompt]

    def param_groups(self) -> list[tuple[str, list[torch.nn.Parameter]]]:
        """Named parameter groups (``--group-lr NAME=LR``): the prompt (or its module)."""
        return [("prompt", self.parameters())]

    def set_step(self, step: int | None) -> None:
        """The loop's train/eval switch: ``step`` while an optimiser step runs, None otherwise."""
        self._step, self._micro = step, 0

    def _trained(self) -> torch.Tensor:
        return self.reparam() if self.reparam is not None else self.prompt

    def _with_sink(self, p: torch.Tensor) -> torch.Tensor:
        return p if self.sink is None else torch.cat([self.sink, p], self.axis)

    def current(self) -> torch.Tensor:
        """The prompt the model sees outside training (float32): no dropout, the sink in front."""
        return self._with_sink(self._trained())

    def _dropped(self) -> torch.Tensor:
        """The prompt of a training forward: prefix dropout on the trained tokens (module docstring)."""
        p = self._trained()
        if self.dropout and self._step is not None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self._step * MASK_STRIDE + self._micro)
            self._micro += 1
            keep = (torch.rand(p.shape, generator=g) >= self.dropout).to(p.device, p.dtype)
            p = p * keep / (1 - self.dropout)
        return self._with_sink(p)

    def _cast(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """The prompt in the model's dtype (autograd keeps the float32 master), the batch on its device."""
        p = self._dropped()
        p = p if self.model.dtype == p.dtype else p.to(self.model.dtype)
        return p, {k: v.to(self.prompt.device) for k, v in batch.items()}

    def loss(self, batch: dict[str, torch.Tensor]):
        prompt, batch = self._cast(batch)
        with autocast(self.precision, self.prompt.device, self.casts, self.logits):
            return prompt_loss(self.model, prompt, batch, fast=self.fast, pack=self.pack, kind=self.kind)

    def state(self):
        out = {"prompt": self.current().detach().cpu().clone()}
        if self.reparam is not None:
            out.update({f"reparam.{k}": v.detach().cpu().clone() for k, v in self.reparam.state_dict().items()})
        return out

    def load_state(self, state):
        full = state["prompt"].to(self.prompt.device)
        with torch.no_grad():
            if self.sink is not None:
                self.sink.copy_(full.narrow(self.axis, 0, 1))
                full = full.narrow(self.axis, 1, full.shape[self.axis] - 1)
            if self.reparam is not None:
                self.reparam.load_state_dict({k[len("reparam."):]: v for k, v in state.items() if k.startswith("reparam.")})
            else:
                self.prompt.copy_(full)

    def score(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            prompt, batch = self._cast(batch)
        with autocast(self.precision, self.prompt.device, self.casts, self.logits):
            return sequence_logprobs(self.model, prompt.detach(), **batch, kind=self.kind).float().cpu()

    def trainable_parameters(self) -> int:
        """Parameters trained (a reparameterisation's included; the saved prompt is smaller)."""
        return sum(p.numel() for p in self.parameters())

    def save(self, path, meta: dict | None = None) -> int:
        """The folded prompt as a PEFT adapter directory (prompt tuning, or prefix tuning for a
        deep prompt), with its side files (DePT's offset, PrefixMemory's memory); bytes of its
        tensor files, the side files' included (what a task costs on disk)."""
        from softprompt.promptdir import save_prompt

        cfg = self.model.config
        with torch.no_grad():
            prompt = self.current().detach()
        d = save_prompt(path, prompt, meta or {}, getattr(cfg, "name_or_path", ""), cfg, **self._extra())
        return sum(f.stat().st_size for f in d.glob("*.safetensors"))

    def _extra(self) -> dict:
        return {}


class DeepPromptMethod(PromptMethod):
    """Deep prompt tuning (prefix tuning / P-tuning v2): keys and values at every layer train.

    The prompt is a key/value prefix as it stands, so a step needs no prefix pass
    (``forward.deep``); refused in one line on a model without a decoder-only key/value cache.
    """

    def __init__(self, model: Model, prompt: torch.Tensor, fast: bool = True, reparam: str | None = None, seed: int = 0,
                 pack: bool = False, precision: str = "fp32", dropout: float = 0.0, freeze_first: bool = False,
                 logits: str = "fp32"):
        check_deep(model)
        if not is_deep(prompt):
            raise UserError(f"a deep prompt is (layers, 2, kv heads, N, head dim), got {tuple(prompt.shape)}")
        super().__init__(model, prompt, fast, reparam, seed, pack, precision, dropout, freeze_first, logits)


class ProgressiveMethod(PromptMethod):
    """Progressive prompts: the new task's prompt (N, H) trains, placed after the frozen prompts
    of earlier tasks (M, H); the model sees their concatenation (M+N, H)."""

    def __init__(self, model: Model, frozen: torch.Tensor | None, new: torch.Tensor, fast: bool = True):
        super().__init__(model, new, fast)
        self.frozen = None if frozen is None else frozen.detach().float().to(self.prompt.device)

    def full_prompt(self) -> torch.Tensor:
        return self.prompt if self.frozen is None else torch.cat([self.frozen, self.prompt])  # (M+N, H)

    def _cast(self, batch: dict) -> tuple[torch.Tensor, dict]:
        p = self.full_prompt()
        p = p if self.model.dtype == p.dtype else p.to(self.model.dtype)
        return p, {k: v.to(self.prompt.device) for k, v in batch.items()}


class OffsetPromptMethod(PromptMethod):
    """DePT: a shallow prompt (N, H) and a low-rank input offset A (T_max, r) @ B (r, H) train,
    in two parameter groups, ``prompt`` and ``offset`` (``--group-lr offset=LR``; DePT trains the
    offset at a far lower lr than the prompt). Decoder-only, unpacked (``offset.py``)."""

    def __init__(self, model: Model, prompt: torch.Tensor, rank: int, length: int, fast: bool = True,
                 reparam: str | None = None, seed: int = 0, precision: str = "fp32", dropout: float = 0.0,
                 freeze_first: bool = False, logits: str = "fp32"):
        if is_deep(prompt) or getattr(model.config, "is_encoder_decoder", False):
            raise UserError("--offset-rank goes with a shallow prompt (--kind shallow) on a decoder-only model")
        super().__init__(model, prompt, fast, reparam, seed, False, precision, dropout, freeze_first, logits)
        a, b = init_offset(length, rank, prompt.shape[1], torch.Generator().manual_seed(seed + 1))
        self.offset_a = torch.nn.Parameter(a.to(self.prompt.device))  # (T_max, r)
        self.offset_b = torch.nn.Parameter(b.to(self.prompt.device))  # (r, H)

    def parameters(self):
        return super().parameters() + [self.offset_a, self.offset_b]

    def param_groups(self):
        return [("prompt", super().parameters()), ("offset", [self.offset_a, self.offset_b])]

    def offset(self) -> torch.Tensor:
        return offset_of(self.offset_a, self.offset_b)  # (T_max, H)

    def loss(self, batch: dict[str, torch.Tensor]):
        prompt, batch = self._cast(batch)
        with autocast(self.precision, self.prompt.device, self.casts, self.logits):
            return prompt_loss(self.model, prompt, batch, fast=self.fast, offset=self.offset(), kind=self.kind)

    def score(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            prompt, batch = self._cast(batch)
            with autocast(self.precision, self.prompt.device, self.casts, self.logits):
                return sequence_logprobs(self.model, prompt, **batch, offset=self.offset(), kind=self.kind).float().cpu()

    def state(self):
        return {**super().state(), "offset_a": self.offset_a.detach().cpu().clone(),
                "offset_b": self.offset_b.detach().cpu().clone()}

    def load_state(self, state):
        super().load_state(state)
        with torch.no_grad():
            self.offset_a.copy_(state["offset_a"])
            self.offset_b.copy_(state["offset_b"])

    def _extra(self) -> dict:
        return {"offset": (self.offset_a.detach(), self.offset_b.detach())}


class MemoryPromptMethod(DeepPromptMethod):
    """PrefixMemory: a deep prompt and a per-head memory M (L, heads, d, d), zero-initialised,
    train together, in two parameter groups, ``prompt`` and ``memory`` (``memory.py``). The
    model is switched to the memory attention (``memory.enable``), which equals its SDPA
    attention for every call without a memory."""

    def __init__(self, model: Model, prompt: torch.Tensor, fast: bool = True, reparam: str | None = None, seed: int = 0,
                 precision: str = "fp32", dropout: float = 0.0, freeze_first: bool = False, logits: str = "fp32"):
        super().__init__(model, prompt, fast, reparam, seed, False, precision, dropout, freeze_first, logits)
        memory.enable(model)
        self.memory = torch.nn.Parameter(torch.zeros(*memory.memory_shape(model), memory.memory_shape(model)[2],
                                                     device=self.prompt.device))  # (L, heads, d, d)

    def parameters(self):
        return super().parameters() + [self.memory]

    default_lrs = {"memory": 1e-4}  # without --group-lr memory=LR: at a deep prompt's 0.03 (and at 1e-3) it collapsed on TREC

    def param_groups(self):
        return [("prompt", super().parameters()), ("memory", [self.memory])]

    def loss(self, batch: dict[str, torch.Tensor]):
        prompt, batch = self._cast(batch)
        with autocast(self.precision, self.prompt.device, self.casts, self.logits):
            return prompt_loss(self.model, prompt, batch, fast=self.fast, memory=self.memory, kind=self.kind)

    def score(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            prompt, batch = self._cast(batch)
            with autocast(self.precision, self.prompt.device, self.casts, self.logits):
                return sequence_logprobs(self.model, prompt, **batch, memory=self.memory, kind=self.kind).float().cpu()

    def state(self):
        return {**super().state(), "memory": self.memory.detach().cpu().clone()}

    def load_state(self, state):
        super().load_state(state)
        with torch.no_grad():
            self.memory.copy_(state["memory"])

    def _extra(self) -> dict:
        return {"memory": self.memory.detach()}
