"""Multitask prompt tuning: one shared prompt, a rank-one modulation per task, mixed-task batches.

Multitask Prompt Tuning (Wang et al. 2023): task k's prompt is the shared prompt ``P*`` (N, H)
times, element-wise, a rank-one matrix ``u_k v_k^T`` (u_k: N, v_k: H)::

    P_k = P* * (u_k v_k^T)        # (N, H); u, v start at ones, so every P_k starts as P*

Training batches mix rows of every task (``data.bucketed_batches`` shuffles the pooled
examples; each row carries its task index), and ``forward.mixed_prefix_loss`` prompts each row
with its own task's prompt in the same forward: the K prompts' keys/values are computed once
(batch K) and gathered per row. Gradients reach ``P*`` from every task, ``u_k, v_k`` from
task k only. Training runs through the one loop, ``loop.fit``.

What is stored: ``<name>`` is the shared prompt ``P*`` (the starting point for a new task:
``softprompt train --task NEW --init prompt:<name>``) and ``<name>-<task>`` is each task's
``P_k``, an ordinary prompt with that task's template and label words, served like any other.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from softprompt import data as D
from softprompt import metrics, recipes
from softprompt.config import DataConfig, MultitaskConfig, PromptConfig, TrainConfig, UserError
from softprompt.forward import sequence_logprobs
from softprompt.splits import Splits, load_splits
from softprompt.store import Store, check_name
from softprompt.training import tune as TR
from softprompt.training.auto import method_kind
from softprompt.training.loop import FitResult, fit
from softprompt.training.methods import MultitaskMethod

if TYPE_CHECKING:
    from softprompt.models import LoadedModel, Model, Tokenizer

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- data: one task at a time


@dataclass
class TaskData:
    name: str  # short name (recipe file stem)
    cfg: DataConfig  # the recipe's data settings (template, verbalizer, files, ...), resolved
    train: list[D.Example]
    dev: list[D.Example]
    splits: Splits  # where the test examples are read from (``load_test``)


def sample(examples: list, n: int | None, seed: int) -> list:
    """A seeded sample of ``n`` items in their original order (all of them when n is None)."""
    if n is None or n >= len(examples):
        return list(examples)
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


def task_config(task: str, root: Path | None) -> DataConfig:
    """A task recipe resolved once (``recipes.resolve``, files under the data root ``root``)."""
    return recipes.resolve(DataConfig(), task, root)


def load_task(tokenizer: Tokenizer, task: str, cfg: DataConfig, n_train: int | None, n_dev: int, seed: int,
              index: int | None = None) -> TaskData:
    """A task's training sample and dev sample (``cfg``: ``task_config``); examples tagged with
    ``index`` (their task id)."""
    if not cfg.verbalizer:
        raise UserError(f"task {task!r} has no verbalizer (label words); multitask and continual need classification tasks")
    splits = load_splits(tokenizer, cfg, seed)
    train, dev = sample(splits.train, n_train, seed), sample(splits.dev, n_dev, seed)
    if not train or not dev:
        raise UserError(f"task {task!r}: needs training and dev rows, got {len(train)} and {len(dev)}")
    if index is not None:
        train = [dataclasses.replace(e, task=index) for e in train]
    return TaskData(recipes.task_name(task), cfg, train, dev, splits)


def load_test(td: TaskData, limit: int | None, seed: int) -> list[D.Example]:
    """The task's test split (its dev split when it has none), a seeded sample of ``limit`` rows."""
    if not td.splits.test:
        return td.dev
    return sample(td.splits.test, limit, seed)


def accuracy(model: Model, prompt: torch.Tensor | None, tokenizer: Tokenizer, examples, cfg: DataConfig, batch_size: int = 16,
             scorer=None) -> tuple[float, torch.Tensor]:
    """(accuracy, label scores (n, labels)) of ``examples`` under ``prompt`` (None: no prompt)."""
    score = scorer or (lambda b: sequence_logprobs(model, prompt, **b))
    words = list(cfg.verbalizer.values())
    scores = metrics.label_scores(score, tokenizer, examples, words, tokenizer.pad_token_id, batch_size)
    labels = list(cfg.verbalizer)
    gold = torch.tensor([labels.index(e.label) for e in examples])
    return float((scores.argmax(-1) == gold).float().mean()), scores


# ---------------------------------------------------------------- the method


def make_evaluator(method: MultitaskMethod, tokenizer: Tokenizer, tasks: list[TaskData], batch_size: int):
    """Each task's dev accuracy under its own prompt; ``score`` is their mean."""

    @torch.no_grad()
    def run() -> dict:
        prompts = method.prompts().detach()
        out = {f"acc_{td.name}": accuracy(method.model, prompts[k], tokenizer, td.dev, td.cfg, batch_size)[0]
               for k, td in enumerate(tasks)}
        out["score"] = out["accuracy"] = sum(out.values()) / len(tasks)
        return out

    return run


# ---------------------------------------------------------------- end to end


@dataclass
class MultitaskResult:
    name: str
    tasks: list[str]
    shared: torch.Tensor  # (N, H)
    prompts: dict[str, torch.Tensor]  # task name -> (N, H)
    paths: dict[str, Path]  # stored prompt name -> folder
    fit: FitResult
    n_train: dict[str, int]


def train_multitask(lm: LoadedModel, mcfg: MultitaskConfig, prompt_cfg: PromptConfig, train_cfg: TrainConfig, name: str,
                    resume: bool = False, progress: bool = False, save: bool = True, force: bool = False,
                    store: Store | None = None) -> MultitaskResult:
    """Train the shared prompt and the task modulations on a mix of tasks (files under the store's
    data root); store every prompt in ``store``."""
    prompt_cfg = method_kind(prompt_cfg, "train-multitask")  # one shared (N, H) prompt modulated per task
    torch.manual_seed(train_cfg.seed)
    names = [recipes.task_name(t) for t in mcfg.tasks]
    for n in [name] + [f"{name}-{t}" for t in names]:
        check_name(n)
    tok = lm.tokenizer
    cfgs = [task_config(t, store.data_root if store else None) for t in mcfg.tasks]  # the recipes, once
    tasks = [load_task(tok, t, c, mcfg.per_task, mcfg.eval_per_task, train_cfg.seed, k)
             for k, (t, c) in enumerate(zip(mcfg.tasks, cfgs, strict=True))]
    mix = [e for td in tasks for e in td.train]
    if prompt_cfg.init == "labels":
        raise UserError("--init labels needs one task's label words; use random, vocab, text or prompt:NAME for a mix")
    shared = TR.initial_prompt(lm, prompt_cfg, DataConfig(), train_cfg.seed, force, store)
    method = MultitaskMethod(lm.model, shared, len(tasks), fast=train_cfg.fast_forward)
    evaluator = make_evaluator(method, tok, tasks, train_cfg.eval_max_batch_rows)
    ckpt = TR.needs_store(store, "saving prompts").run_dir(name) / "checkpoint" if save else None
    res = fit(method, mix, train_cfg, tok.pad_token_id, evaluator, ckpt, resume, progress)
    method.load_state(res.state)
    prompts = {td.name: p for td, p in zip(tasks, method.prompts().detach(), strict=True)}
    paths = _save_all(store, lm, name, tasks, prompts, method.shared.detach(), prompt_cfg, train_cfg, res, mcfg) if save else {}
    return MultitaskResult(name, names, method.shared.detach().clone(), prompts, paths, res,
                           {td.name: len(td.train) for td in tasks})


def _save_all(store: Store, lm: LoadedModel, name, tasks, prompts, shared, prompt_cfg: PromptConfig, train_cfg: TrainConfig, res, mcfg) -> dict[str, Path]:
    info = {"shared": name, "tasks": [td.name for td in tasks], "config": mcfg.to_dict(),
            "style": "MPT: P_k = P_shared * (u_k v_k^T)"}
    meta = TR.prompt_metadata(lm, DataConfig(), prompt_cfg, train_cfg, res, None)
    meta.update(kind="multitask-shared", multitask=info)
    paths = {name: store.save_prompt(name, shared, meta, str(lm.path), lm.model.config)}
    for td in tasks:
        meta = TR.prompt_metadata(lm, td.cfg, prompt_cfg, train_cfg, res, td.name)
        meta.update(kind="multitask-task", multitask=info)
        pname = f"{name}-{td.name}"
        paths[pname] = store.save_prompt(pname, prompts[td.name], meta, str(lm.path), lm.model.config)
    return paths
