"""Every training method, as implementations of ``loop.Method``.

* ``PromptMethod``, ``DeepPromptMethod``, ``ProgressiveMethod``, ``OffsetPromptMethod``: the
  prompt-tuning methods (shallow, deep, progressive, DePT) with P-tuning v2's levers, in
  ``prompt_method.py`` (re-exported here);
* ``MultitaskMethod``: one shared prompt modulated per task (``multitask.py``);
* ``LoraMethod``: LoRA adapters (rank 8 on the attention projections) through ``peft``;
* ``FullMethod``: every weight of the model trains;
* ``HandPrompt``: no training; a hand-written template, optionally with k demonstrations
  (few-shot in-context learning) placed in front of every input.

Invariant: the shared frozen model is never modified. LoRA and full fine-tuning each work on
their own deep copy (``peft`` injects its layers in place, and full fine-tuning writes every
weight), so prompt tuning and the hand-written prompts, which use the shared model, see the
same weights before and after. All methods stay in eval mode (no dropout), like ``loop.fit``.

Few-shot demonstrations are a fixed token prefix, shared by every row: they are scored through
the same shared-prefix path as a soft prompt (their token embeddings as the ``(N, H)`` prefix),
which equals running the concatenated tokens (tested) while computing the prefix's keys/values
once for all batches.
"""

from __future__ import annotations

import copy
import random

import torch

from softprompt import data as D
from softprompt.config import UserError
from softprompt.forward import (
    embed,
    mixed_prefix_loss,
    naive_loss,
    plain_loss,
    prefix_cache,
    sequence_logprobs,
    supports_prefix,
)
from softprompt.training.prompt_method import (  # noqa: F401  (re-exported: the methods live together here)
    DeepPromptMethod,
    MemoryPromptMethod,
    OffsetPromptMethod,
    ProgressiveMethod,
    PromptMethod,
)


class MultitaskMethod:
    """Trainable: the shared prompt (N, H) and each task's u (N,) and v (H,)."""

    def __init__(self, model, shared: torch.Tensor, n_tasks: int, fast: bool = True):
        self.model, self.fast = model, fast
        N, H = shared.shape
        self.shared = torch.nn.Parameter(shared.detach().clone().float())  # (N, H)
        self.u = torch.nn.Parameter(torch.ones(n_tasks, N))  # (K, N)
        self.v = torch.nn.Parameter(torch.ones(n_tasks, H))  # (K, H)

    def prompts(self) -> torch.Tensor:
        return self.shared.unsqueeze(0) * (self.u.unsqueeze(2) * self.v.unsqueeze(1))  # (K, N, H)

    def parameters(self):
        return [self.shared, self.u, self.v]

    def loss(self, batch):
        ids = batch["task_ids"]  # (B,)
        args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
        if self.fast and supports_prefix(self.model):
            return mixed_prefix_loss(self.model, self.prompts(), ids, *args)
        return naive_loss(self.model, self.prompts()[ids], *args)

    def state(self):
        return {"shared": self.shared.detach().clone(), "u": self.u.detach().clone(), "v": self.v.detach().clone()}

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def score(self, batch) -> torch.Tensor:
        """Per-row log-likelihoods, each row under its own task's prompt (``task_ids``)."""
        prompts, ids = self.prompts().detach(), batch["task_ids"]
        rest = {k: v for k, v in batch.items() if k != "task_ids"}
        out = torch.zeros(ids.shape[0] if "choices" not in rest else rest["choices"].shape, dtype=torch.float32)
        for k in ids.unique().tolist():
            rows = (ids == k).nonzero()[:, 0]
            out[rows] = sequence_logprobs(self.model, prompts[k], **{n: v[rows] for n, v in rest.items()})
        return out

    def save(self, path) -> int:
        """The shared prompt as a PEFT prompt-tuning adapter directory; bytes of its weights file."""
        return PromptMethod(self.model, self.shared.detach(), self.fast).save(path)

    def load_state(self, state):
        with torch.no_grad():
            for k, p in (("shared", self.shared), ("u", self.u), ("v", self.v)):
                p.copy_(state[k])


LORA_RANK = 8
LORA_ALPHA = 16  # scale alpha / r = 2, the common choice (peft's default alpha is 8)
# attention projections by architecture family: Llama/Mistral/Qwen, GPT-2 (fused qkv), T5
LORA_TARGETS = (("q_proj", "k_proj", "v_proj", "o_proj"), ("c_attn",), ("q", "k", "v", "o"))


def model_loss(model, batch: dict) -> torch.Tensor:
    """Mean target cross-entropy of the model alone (no prompt), for any architecture."""
    if getattr(model.config, "is_encoder_decoder", False):
        from softprompt.forward.seq2seq import seq2seq_loss

        return seq2seq_loss(model, None, batch)
    return plain_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])


def unique_parameters(model) -> int:
    """All parameters, tied tensors counted once (``Module.parameters`` de-duplicates)."""
    return sum(p.numel() for p in model.parameters())


def lora_targets(model) -> list[str]:
    names = {
        n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Module)
    }
    for family in LORA_TARGETS:
        if all(t in names for t in family):
            return list(family)
    raise UserError(
        f"LoRA: no known attention projections in {type(model).__name__} "
        f"(looked for {', '.join('/'.join(f) for f in LORA_TARGETS)})"
    )


class LoraMethod:
    """LoRA rank ``r`` on the attention projections of a private copy of the model."""

    def __init__(self, model, r: int = LORA_RANK, alpha: int = LORA_ALPHA):
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise UserError(
                "the LoRA baseline needs peft: pip install 'softprompt[peft]'"
            ) from None
        inner = copy.deepcopy(model)
        task = "SEQ_2_SEQ_LM" if getattr(model.config, "is_encoder_decoder", False) else "CAUSAL_LM"
        cfg = LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=0.0,
            target_modules=lora_targets(inner),
            task_type=task,
            bias="none",
        )
        self.peft_model = get_peft_model(inner, cfg)
        self.peft_model.eval()
        self.model = self.peft_model.get_base_model()  # the copy, with LoRA layers injected
        self._names = [n for n, p in self.peft_model.named_parameters() if p.requires_grad]

    def parameters(self):
        return [p for p in self.peft_model.parameters() if p.requires_grad]

    def trainable_parameters(self) -> int:
        return int(self.peft_model.get_nb_trainable_parameters()[0])

    def loss(self, batch):
        return model_loss(self.model, batch)

    def state(self):
        params = dict(self.peft_model.named_parameters())
        return {n: params[n].detach().clone() for n in self._names}

    def load_state(self, state):
        _copy_named(self.peft_model, state)

    def score(self, batch) -> torch.Tensor:
        return sequence_logprobs(self.model, None, **batch)

    def save(self, path) -> int:
        """Write the adapter (PEFT layout); bytes of its weights file."""
        self.peft_model.save_pretrained(str(path))
        return sum(f.stat().st_size for f in path.glob("adapter_model.*"))


class FullMethod:
    """Full fine-tuning: every weight of a private copy of the model trains."""

    def __init__(self, model):
        self.model = copy.deepcopy(model)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(True)

    def parameters(self):
        return list(self.model.parameters())

    def trainable_parameters(self) -> int:
        return unique_parameters(self.model)

    def loss(self, batch):
        return model_loss(self.model, batch)

    def state(self):
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def load_state(self, state):
        _copy_named(self.model, state)

    def score(self, batch) -> torch.Tensor:
        return sequence_logprobs(self.model, None, **batch)

    def save(self, path) -> int:
        return save_weights(self.model, path)


def _copy_named(module, state: dict) -> None:
    """Copy ``state`` (parameter name -> tensor) into ``module``'s parameters of those names."""
    params = dict(module.named_parameters())
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v)


def save_weights(model, path) -> int:
    """Write all weights as one safetensors file (tied tensors once); its size in bytes."""
    from safetensors.torch import save_model

    path.mkdir(parents=True, exist_ok=True)
    f = path / "model.safetensors"
    save_model(model, str(f))
    return f.stat().st_size


# ---------------------------------------------------------------- hand-written prompts


class HandPrompt:
    """Zero-shot (no demonstrations) or few-shot: ``demos`` token ids in front of every input."""

    def __init__(self, model, demos: list[int] | None = None, text: str = ""):
        self.model = model
        self.demo_ids = list(demos or [])
        self.text = text  # the demonstrations as text (what a user would store for the task)
        self.prefix = (
            embed(model, torch.tensor(self.demo_ids)).detach() if self.demo_ids else None
        )  # (N, H)
        self._kv = None  # the demonstrations' keys/values, computed on first use

    def score(self, batch) -> torch.Tensor:
        if self.prefix is not None and self._kv is None and supports_prefix(self.model):
            with torch.no_grad():  # the model is frozen: the demonstrations' keys/values never change
                self._kv = prefix_cache(self.model, self.prefix)
        return sequence_logprobs(self.model, self.prefix, **batch, prefix=self._kv)


def demo_text(ex: D.Example, word: str) -> str:
    return ex.source_text + D.target_text(ex.source_text, word) + "\n\n"


def choose_demos(
    tokenizer, pool: list[D.Example], verbalizer: dict[str, str], budget: int, seed: int, max_k: int
) -> tuple[list[int], str, int]:
    """(token ids, text, k): label-balanced demonstrations (round robin over classes in seeded
    order) added while the total stays within ``budget`` tokens, at most ``max_k``."""
    rng = random.Random(f"demos:{seed}")
    by_label: dict[str, list[D.Example]] = {}
    for ex in rng.sample(pool, len(pool)):
        by_label.setdefault(ex.label, []).append(ex)
    queues = [by_label[k] for k in verbalizer if k in by_label]
    chosen: list[tuple[D.Example, list[int]]] = []
    used, depth = 0, 0
    while len(chosen) < max_k and any(depth < len(q) for q in queues):
        for q in queues:
            if depth >= len(q) or len(chosen) >= max_k:
                continue
            ids = D.encode(tokenizer, demo_text(q[depth], verbalizer[q[depth].label]))
            if used + len(ids) > budget:
                queues = []  # the next one does not fit: stop, keeping the classes balanced-ish
                break
            chosen.append((q[depth], ids))
            used += len(ids)
        depth += 1
    rng.shuffle(chosen)  # no class-ordered block at the end, right before the query
    ids = [t for _, d in chosen for t in d]
    text = "".join(demo_text(ex, verbalizer[ex.label]) for ex, _ in chosen)
    return ids, text, len(chosen)
