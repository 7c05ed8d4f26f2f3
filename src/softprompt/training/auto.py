"""``--kind auto``: the prompt settings ``softprompt train`` chooses from the data and the model.

One decision table, ``RULES``: the first row whose conditions hold on the run's ``Facts`` (does the
task have label words and how many, how many training rows, can the model take a deep prompt) chooses the
prompt kind, init, learning rate, number of virtual tokens and training budget. Each row names
the committed measurements behind it (``benchmarks/results/``); the table is data, so later
results change a row, not the code. The table and its evidence are explained in docs/tuning.md.

Invariants:

* auto decides from the facts alone; the user's own flags then win field by field (``given``):
  ``--kind auto --lr 0.01`` trains at 0.01, and ``--epochs`` or ``--steps`` replace auto's budget;
* the resolved ``PromptConfig`` and ``TrainConfig`` are validated exactly as explicit ones are: a
  combination that fails (``--reparam lstm`` where auto chose deep) is one ``UserError`` naming the
  flag and auto's choice, raised before anything is read from or written to the store;
* what auto chose, what the user overrode, and why, is ``record`` (saved in ``softprompt.json``
  under ``"auto"``) and ``line`` (printed once when training starts).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from softprompt.config import PromptConfig, TrainConfig, UserError

if TYPE_CHECKING:
    from softprompt.config import DataConfig
    from softprompt.models import LoadedModel

RESULTS = "benchmarks/results/"

# The decision table: first match wins. "if": conditions on Facts (label_words, deep: the model
# takes deep prompts, rows_over: more training rows than this, labels_over: more distinct label
# words than this). "budget": epochs, bounded below by min_steps and above by max_steps optimiser
# steps (the bounds turn the budget into --steps).
RULES: tuple[dict, ...] = (
    {   # classification with enough rows: the most accurate prompt kind measured. The budget is the
        # suite's (1 epoch, at most 600 steps: its learning curves' last point); at least 200 steps,
        # so that 513 rows train about as long as 512 do under the next rows (3 epochs: 192 steps)
        "if": {"label_words": True, "deep": True, "rows_over": 512},
        "kind": "deep", "init": "labels", "lr": 0.03, "num_virtual_tokens": 20,
        "budget": {"epochs": 1, "min_steps": 200, "max_steps": 600},
        "evidence": ("compare_suite_trec.md", "compare_suite_sst2.md", "compare_suite_mr.md", "compare_suite_mpqa.md",
                     "compare_suite_subj.md", "compare_suite_agnews.md", "auto_suite.md", "compare_trec-deep-labels.md", "compare_sst2-deep-labels.md",
                     "deep_trec_sweep.md"),
    },
    {   # a few hundred rows of a task with more than two label words: deep wins on TREC (by 15 and 7
        # points on 256 and 512 rows), ties and then leads on AG News (-1.05 and +2.4)
        "if": {"label_words": True, "deep": True, "labels_over": 2},
        "kind": "deep", "init": "labels", "lr": 0.03, "num_virtual_tokens": 20,
        "budget": {"epochs": 3, "min_steps": 50, "max_steps": 1500},
        "evidence": ("compare_small_trec.json", "compare_small_agnews.json", "compare_small_sst2.json"),
    },
    {   # a few hundred rows of a two-way task, or a model without deep prompts (encoder-decoder)
        "if": {"label_words": True},
        "kind": "shallow", "init": "random", "lr": 0.03, "num_virtual_tokens": 20,
        "budget": {"epochs": 3, "min_steps": 50, "max_steps": 1500},
        "evidence": ("compare_small_sst2.json", "compare_small_mpqa.json", "compare_small_mr.json",
                     "compare_small_subj.json", "compare_sst2-sizes.md", "sweep_defaults.md", "compare_sst2-full.md"),
    },
    {   # language modelling or free-text targets: no label words to start from or score
        "if": {},
        "kind": "shallow", "init": "vocab", "lr": 0.1, "num_virtual_tokens": 20,
        "budget": {"epochs": 5, "max_steps": 1500},
        "evidence": ("sweep_defaults.md",),
    },
)
PROMPT_CHOICES = ("kind", "init", "num_virtual_tokens")  # PromptConfig fields a rule sets
BUDGET = ("epochs", "steps")  # TrainConfig fields of the budget: the user's replace auto's together


@dataclass(frozen=True)
class Facts:
    """What auto knows about a run before training."""

    label_words: bool  # the task has a verbalizer (classification by label words)
    rows: int  # training rows (after the dev split is carved out)
    deep: bool  # the model can take a deep prompt (decoder-only)
    mode: str = "target"  # lm (one text column) | target (input -> target rows)
    model: str = ""  # the model's type, for the printed reason
    labels: int = 0  # distinct label words (0: none, or not known)


def facts_of(lm: LoadedModel, data_cfg: DataConfig, rows: int) -> Facts:
    from softprompt.prompt import takes_deep

    words = data_cfg.verbalizer or {}
    return Facts(bool(words), rows, takes_deep(lm.model), data_cfg.mode,
                 str(getattr(lm.model.config, "model_type", "")), len(set(words.values())))


CONDITIONS = {
    "label_words": lambda f, v: f.label_words == v,
    "deep": lambda f, v: f.deep == v,
    "rows_over": lambda f, v: f.rows > v,
    "labels_over": lambda f, v: f.labels > v,
}


def rule_for(facts: Facts, kind: str | None = None) -> int:
    """Index of the first row of ``RULES`` whose conditions hold (the last row has none); with
    ``kind`` (a lever that exists for one kind only: DePT's offset, PrefixMemory), the first row of
    that kind whose conditions hold, else the first row of that kind."""
    rows = [i for i, r in enumerate(RULES) if kind is None or r["kind"] == kind]
    fits = [i for i in rows if all(CONDITIONS[k](facts, v) for k, v in RULES[i]["if"].items())]
    return (fits or rows)[0]


def budget(spec: dict, rows: int, train_cfg: TrainConfig) -> dict:
    """``{"epochs": E}``, or ``{"steps": S}`` where E epochs fall outside the step bounds (an
    epoch counted as ceil(rows / (batch size x grad accum)) optimiser steps)."""
    per_epoch = max(1, math.ceil(rows / (train_cfg.batch_size * train_cfg.grad_accum)))
    steps = spec["epochs"] * per_epoch
    if steps < spec.get("min_steps", 0):
        return {"steps": spec["min_steps"]}
    if steps > spec.get("max_steps", steps):
        return {"steps": spec["max_steps"]}
    return {"epochs": spec["epochs"]}


def changed(cfg) -> set[str]:
    """The fields of a config that differ from its dataclass defaults."""
    return {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(type(cfg)(), f.name)}


def why(facts: Facts, index: int) -> str:
    """The reason in words: the facts, and the one condition that kept an earlier row out."""
    if facts.label_words:
        parts = ["task has label words"]
    else:
        parts = [f"no label words: {'language modelling' if facts.mode == 'lm' else 'free-text targets'}"]
    parts.append(f"{facts.rows:,} training rows")
    count = "labels_over" in RULES[index]["if"]  # the label count decided: say it
    for rule in RULES[:index]:
        failed = [(k, v) for k, v in rule["if"].items() if not CONDITIONS[k](facts, v)]
        if failed == [("deep", True)]:
            parts.append(f"{facts.model or 'the model'} takes no deep prompts")
        elif len(failed) == 1 and failed[0][0] == "rows_over":
            parts[-1] += f", at most {failed[0][1]}"
        elif len(failed) == 1 and failed[0][0] == "labels_over":
            count = True
    if count:
        parts.append(f"{facts.labels} label words")
    return "; ".join(parts)


def resolve(facts: Facts, prompt_cfg: PromptConfig, train_cfg: TrainConfig,
            given: set[str] | None = None) -> tuple[PromptConfig, TrainConfig, dict]:
    """(PromptConfig, TrainConfig, record) for ``prompt_cfg.kind == "auto"``.

    ``given``: the PromptConfig / TrainConfig fields the user set, which keep their values; None
    means every field that differs from its dataclass default.
    """
    given = (changed(prompt_cfg) | changed(train_cfg)) if given is None else set(given)
    index = rule_for(facts, "shallow" if prompt_cfg.offset_rank else "deep" if prompt_cfg.memory else None)
    rule, reason = RULES[index], why(facts, index)
    chose = {k: rule[k] for k in (*PROMPT_CHOICES, "lr")} | budget(rule["budget"], facts.rows, train_cfg)
    user_budget = bool(given & set(BUDGET))
    keep = {k for k in chose if k in given or (k in BUDGET and user_budget)} - {"kind"}
    ours = {k: v for k, v in chose.items() if k not in keep}
    if not user_budget:
        ours.setdefault("steps", None)  # auto's epochs: no step count left over
    try:
        pcfg = replace(prompt_cfg, **{k: v for k, v in ours.items() if k in PROMPT_CHOICES})
        tcfg = replace(train_cfg, **{k: v for k, v in ours.items() if k not in PROMPT_CHOICES})
    except UserError as e:
        raise UserError(f"{e}; --kind auto chose a {rule['kind']} prompt ({reason}): give --kind to choose "
                        f"another") from None
    yours = {k: getattr(train_cfg, k) for k in (*BUDGET, "lr") if k in given and getattr(train_cfg, k) is not None}
    yours = dict(sorted((yours | {k: getattr(prompt_cfg, k) for k in PROMPT_CHOICES[1:] if k in given}).items()))
    record = {"chose": chose, "yours": yours, "why": reason, "facts": dataclasses.asdict(facts), "rule": index,
              "evidence": [RESULTS + f for f in rule["evidence"]]}
    return pcfg, tcfg, record


def line(prompt_cfg: PromptConfig, train_cfg: TrainConfig, record: dict) -> str:
    """The one line printed when training starts: the settings used and why."""
    if train_cfg.steps:
        span = f"{train_cfg.steps:,} steps"
    else:
        span = f"{train_cfg.epochs} epoch{'s' if train_cfg.epochs != 1 else ''}"
    yours = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in record["yours"].items())
    return (f"auto: {prompt_cfg.kind} prompt, init {prompt_cfg.init}, lr {train_cfg.lr:g}, "
            f"{prompt_cfg.num_virtual_tokens} virtual tokens, {span} ({record['why']}"
            + (f"; yours: {yours}" if yours else "") + ")")


def method_kind(prompt_cfg: PromptConfig, command: str, kind: str = "shallow") -> PromptConfig:
    """For a command whose method names its prompt kind (``train-multitask``, ``continual``):
    ``--kind auto`` means that kind; another kind, or a ``--reparam``, is one line."""
    if prompt_cfg.kind not in ("auto", kind) or prompt_cfg.reparam is not None:
        raise UserError(f"{command} trains {kind} prompts only; drop --kind {prompt_cfg.kind}"
                        + (f" / --reparam {prompt_cfg.reparam}" if prompt_cfg.reparam else ""))
    return replace(prompt_cfg, kind=kind)
