"""Small frozen configuration dataclasses, one per concern.

Every field has its default here and nowhere else; ``__post_init__`` validates, and every
config round-trips through JSON (``to_dict`` / ``from_dict``). The CLI derives its flags from
these classes, so a default changed here changes everywhere.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class UserError(ValueError):
    """A mistake in the user's input: shown as one line, exit code 2, never a traceback."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


class _JsonMixin:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class DataConfig(_JsonMixin):
    path: str | None = None  # training file (csv, tsv, jsonl, or "<label> <text>" lines)
    eval_path: str | None = None  # evaluation file; None carves a dev split from train
    text_column: str | None = None  # language-modelling mode: the one text column
    template: str | None = None  # input -> target mode: e.g. "Review: {text}\nSentiment:"
    target_column: str | None = None  # input -> target mode: the column holding the target
    verbalizer: dict[str, str] | None = None  # label value -> label word ("0" -> "negative")
    limit: int | None = None  # keep only the first K training rows
    eval_limit: int | None = None  # keep only the first K evaluation rows
    max_length: int = 256  # tokens per row (input + target); longer rows are truncated
    dev_fraction: float = 0.1  # share of train carved out as dev when no eval file is given
    columns: tuple[str, ...] | None = None  # names for headerless csv/tsv files
    derive: dict[str, str] | None = None  # extra columns built from templates of others
    label_map: dict[str, str] | None = None  # rewrite target values before the verbalizer

    def __post_init__(self) -> None:
        _check(self.limit is None or self.limit > 0, f"--limit must be positive, got {self.limit}")
        _check(self.max_length >= 2, f"--max-length must be at least 2, got {self.max_length}")
        _check(0 <= self.dev_fraction < 1, "dev_fraction must be in [0, 1)")
        if self.template is not None or self.target_column is not None:
            _check(
                self.template is not None and self.target_column is not None,
                "input -> target mode needs both --template and --target-column",
            )
            _check(self.text_column is None, "give either --text-column or --template, not both")
        _check(
            self.verbalizer is None or self.template is not None,
            "--verbalizer needs --template and --target-column",
        )

    @property
    def mode(self) -> str:
        return "target" if self.template is not None else "lm"


@dataclass(frozen=True)
class PromptConfig(_JsonMixin):
    num_virtual_tokens: int = 20  # N: virtual tokens in the soft prompt
    init: str = "random"  # random | text | vocab | labels | transfer | prompt:<name> (best measured, docs/tuning.md)
    init_text: str | None = None  # text for init=text

    def __post_init__(self) -> None:
        _check(
            self.num_virtual_tokens > 0,
            f"--num-virtual-tokens must be positive, got {self.num_virtual_tokens}",
        )
        kinds = ("random", "text", "vocab", "labels", "transfer")
        _check(
            self.init in kinds or self.init.startswith("prompt:"),
            f"--init must be one of {', '.join(kinds)} or prompt:NAME, got {self.init!r}",
        )
        _check(self.init != "text" or bool(self.init_text), "--init text needs --init-text")


@dataclass(frozen=True)
class TrainConfig(_JsonMixin):
    lr: float = 0.03  # AdamW learning rate for the prompt (best measured, docs/tuning.md)
    epochs: int = 3  # passes over the training data (ignored when steps is set)
    steps: int | None = None  # optimiser steps in total; overrides epochs
    batch_size: int = 8  # rows per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    warmup_ratio: float = 0.06  # share of steps with linear warm-up
    weight_decay: float = 0.0  # AdamW weight decay on the prompt
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables
    seed: int = 0  # seeds data order, init and sampling
    patience: int | None = 2  # epochs without eval improvement before stopping; None = never
    eval_batch_size: int = 16  # rows per evaluation batch
    fast_forward: bool = True  # shared-prefix forward (exact); False = the naive concat path

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"--lr must be positive, got {self.lr}")
        _check(self.epochs > 0, f"--epochs must be positive, got {self.epochs}")
        _check(self.steps is None or self.steps > 0, f"--steps must be positive, got {self.steps}")
        _check(self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}")
        _check(self.grad_accum > 0, f"--grad-accum must be positive, got {self.grad_accum}")
        _check(0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)")


@dataclass(frozen=True)
class GenerateConfig(_JsonMixin):
    max_new_tokens: int = 64  # tokens to generate at most
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling mass
    repetition_penalty: float = 1.0  # >1 discourages repeats (CTRL-style, as in transformers)
    seed: int = 0  # seeds sampling

    def __post_init__(self) -> None:
        _check(self.max_new_tokens > 0, "--max-new-tokens must be positive")
        _check(self.temperature >= 0, "--temperature must be >= 0")
        _check(0 < self.top_p <= 1, "--top-p must be in (0, 1]")
        _check(self.repetition_penalty > 0, "--repetition-penalty must be positive")


def home() -> Path:
    """Root of caches and the prompt store: ``$SOFTPROMPT_HOME`` or ``~/.cache/softprompt``."""
    return Path(os.environ.get("SOFTPROMPT_HOME", Path.home() / ".cache" / "softprompt"))


def data_root() -> Path:
    """Where task recipes find their files: ``$SOFTPROMPT_DATA`` or ``../shared/data``."""
    return Path(os.environ.get("SOFTPROMPT_DATA", "../shared/data"))


def parse_verbalizer(text: str | None) -> dict[str, str] | None:
    """``"0=negative,1=positive"`` -> ``{"0": "negative", "1": "positive"}``."""
    if not text:
        return None
    out: dict[str, str] = {}
    for part in text.split(","):
        key, sep, word = part.partition("=")
        _check(bool(sep and key.strip() and word.strip()), f"bad --verbalizer entry {part!r}; expected LABEL=WORD")
        out[key.strip()] = word.strip()
    return out


__all__ = [
    "DataConfig",
    "GenerateConfig",
    "PromptConfig",
    "TrainConfig",
    "UserError",
    "data_root",
    "field",
    "home",
    "parse_verbalizer",
]
