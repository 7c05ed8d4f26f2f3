"""Continual learning: tasks one after another, every task seen so far evaluated after each stage.

Methods (all trained through ``loop.fit``, all scored by label words on each task's test rows):

* ``prompt``: a new prompt per task on the frozen model. Earlier prompts and the model never
  change, so forgetting is exactly zero: earlier tasks' label scores are bit-identical after
  every later stage. The run checks this and records it (``bit_identical``).
* ``progressive``: Progressive Prompts (Razdaibiedina et al. 2023): task i's prompt is trained
  *after* the frozen prompts of tasks 0..i-1 (concatenated), so it can reuse them; task j is
  served with ``[P_0 .. P_j]``. Also zero forgetting by construction.
* ``full``: sequential full fine-tuning of one copy of the model, the contrast: it forgets.

The result is an accuracy matrix per method (rows = stage, columns = task; ``None`` for tasks
not yet seen), the average accuracy after the last stage and the forgetting (Chaudhry et al.
2018: per earlier task, its best accuracy at any earlier stage minus its final accuracy, averaged).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from softprompt.config import (
    CONTINUAL_METHODS,
    ContinualConfig,
    PromptConfig,
    TrainConfig,
)
from softprompt.forward import sequence_logprobs
from softprompt.training import methods
from softprompt.training import multitask as MT
from softprompt.training import tune as TR
from softprompt.training.loop import fit
from softprompt.training.methods import ProgressiveMethod

if TYPE_CHECKING:
    from softprompt.models import LoadedModel

log = logging.getLogger(__name__)

METHODS = CONTINUAL_METHODS


@dataclass
class _Task:
    data: MT.TaskData
    test: list


def _stage_cfg(tcfg: TrainConfig, ccfg: ContinualConfig, lr: float) -> TrainConfig:
    return replace(tcfg, steps=ccfg.stage_steps, lr=lr, patience=None)


class _Learner:
    """One method's state across stages: train on task i, then score any seen task."""

    def __init__(self, kind: str, lm: LoadedModel, pcfg: PromptConfig, tcfg: TrainConfig, ccfg: ContinualConfig):
        self.kind, self.lm, self.pcfg, self.tcfg, self.ccfg = kind, lm, pcfg, tcfg, ccfg
        self.prompts: list[torch.Tensor] = []  # per task: what it is served with
        self.full = methods.FullMethod(lm.model) if kind == "full" else None

    def learn(self, i: int, task: _Task) -> dict:
        cfg = _stage_cfg(self.tcfg, self.ccfg, self.ccfg.lr_full if self.full else self.tcfg.lr)
        if self.full is not None:
            method = self.full
        else:
            init = TR.initial_prompt(self.lm, self.pcfg, task.data.cfg, self.tcfg.seed + i)
            frozen = self.prompts[-1] if (self.kind == "progressive" and self.prompts) else None
            method = ProgressiveMethod(self.lm.model, frozen, init)
        res = fit(method, task.data.train, cfg, self.lm.tokenizer.pad_token_id, None, progress=False)
        method.load_state(res.state)
        if self.full is None:
            self.prompts.append(method.full_prompt().detach().clone())
        return {"steps": len(res.history), "train_time_s": res.train_time_s, "final_train_loss": res.final_train_loss}

    @torch.no_grad()
    def score(self, j: int, task: _Task) -> tuple[float, torch.Tensor]:
        if self.full is not None:
            return MT.accuracy(None, None, self.lm.tokenizer, task.test, task.data.cfg,
                               scorer=lambda b: sequence_logprobs(self.full.model, None, **b))
        return MT.accuracy(self.lm.model, self.prompts[j], self.lm.tokenizer, task.test, task.data.cfg)


def forgetting(matrix: list[list[float | None]]) -> float | None:
    """Mean over all but the last task of (best accuracy before the last stage - final accuracy)."""
    T = len(matrix)
    if T < 2:
        return None
    drops = [max(matrix[i][j] for i in range(j, T - 1)) - matrix[T - 1][j] for j in range(T - 1)]
    return sum(drops) / len(drops)


def worst_drop(matrix: list[list[float | None]]) -> float | None:
    """The largest fall of any earlier task below its accuracy when it was learned, at any later
    stage. ``forgetting`` looks at the last stage only, so a task that drops and then recovers
    (a later, similar task re-teaching it) is invisible there; this shows it."""
    T = len(matrix)
    if T < 2:
        return None
    return max(matrix[j][j] - matrix[i][j] for j in range(T - 1) for i in range(j + 1, T))


def run_method(kind: str, lm: LoadedModel, tasks: list[_Task], pcfg, tcfg, ccfg, say=log.info) -> dict:
    learner = _Learner(kind, lm, pcfg, tcfg, ccfg)
    T = len(tasks)
    matrix: list[list[float | None]] = []
    first_scores: dict[int, torch.Tensor] = {}
    identical, max_change, stages = True, 0.0, []
    for i, task in enumerate(tasks):
        t0 = time.perf_counter()
        info = learner.learn(i, task)
        row: list[float | None] = [None] * T
        for j in range(i + 1):
            row[j], scores = learner.score(j, tasks[j])
            if j in first_scores:
                identical &= torch.equal(scores, first_scores[j])
                max_change = max(max_change, float((scores - first_scores[j]).abs().max()))
            else:
                first_scores[j] = scores
        matrix.append(row)
        stages.append({**info, "task": task.data.name, "stage_time_s": time.perf_counter() - t0})
        say(f"{kind} stage {i + 1}/{T} ({task.data.name}): " + "  ".join(
            f"{tasks[j].data.name} {row[j]:.3f}" for j in range(i + 1)))
    final = matrix[-1]
    return {
        "method": kind, "matrix": matrix, "stages": stages,
        "average_accuracy": sum(final) / T, "forgetting": forgetting(matrix), "worst_drop": worst_drop(matrix),
        "bit_identical": identical, "max_abs_score_change": max_change,
        "trainable_parameters": learner.full.trainable_parameters() if learner.full else pcfg.num_virtual_tokens * lm.model.config.hidden_size,
    }


def run(lm: LoadedModel, ccfg: ContinualConfig, pcfg: PromptConfig, tcfg: TrainConfig, say=log.info,
        root: Path | None = None) -> dict:
    """Every method over the task sequence (files under the data root ``root``); the result
    document (see ``continual_report``)."""
    from softprompt.experiments.compare import weights_digest

    tok = lm.tokenizer
    tasks = []
    for t, cfg in zip(ccfg.tasks, [MT.task_config(t, root) for t in ccfg.tasks], strict=True):  # the recipes, once
        td = MT.load_task(tok, t, cfg, ccfg.per_task, ccfg.test_per_task or 200, tcfg.seed)
        tasks.append(_Task(td, MT.load_test(td, ccfg.test_per_task, tcfg.seed)))
    before = weights_digest(lm.model)
    t0 = time.perf_counter()
    results = [run_method(kind, lm, tasks, pcfg, tcfg, ccfg, say) for kind in ccfg.methods]
    return {
        "schema": "softprompt.continual/1",
        "tasks": [t.data.name for t in tasks],
        "n_train": [len(t.data.train) for t in tasks], "n_test": [len(t.test) for t in tasks],
        "config": ccfg.to_dict(), "prompt_config": pcfg.to_dict(), "train_config": tcfg.to_dict(),
        "results": results, "base_model_unchanged": weights_digest(lm.model) == before,
        "total_time_s": time.perf_counter() - t0, **provenance(lm),
    }


def provenance(lm: LoadedModel) -> dict:
    """Revision, versions, machine and model: what every result document records."""
    from softprompt.provenance import git_revision, machine, stamp, versions

    return {"created": stamp(), "git": git_revision(), "versions": versions(), "machine": machine(),
            "model": {"name": lm.name, "fingerprint": lm.fingerprint}}


# ---------------------------------------------------------------- report


def _cell(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.1f}"


def _points(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f} points"


def markdown(doc: dict, command: str) -> str:
    tasks = doc["tasks"]
    stage_steps = doc["config"].get("stage_steps", doc["config"].get("steps"))  # "steps" in older result files
    out = [f"# Continual learning over {len(tasks)} tasks", "",
           f"Generated by `{command}`; do not edit by hand (rerun the command).", "",
           f"- tasks in order: {', '.join(tasks)}; training rows {doc['n_train']}; test rows {doc['n_test']}",
           f"- {stage_steps} optimiser steps per stage; prompt lr {doc['train_config']['lr']:g}, "
           f"N={doc['prompt_config']['num_virtual_tokens']}, init {doc['prompt_config']['init']}; "
           f"full fine-tuning lr {doc['config']['lr_full']:g}; seed {doc['train_config']['seed']}",
           f"- model {doc['model']['name']}; git {(doc['git'].get('revision') or '?')[:10]}"
           f"{' (dirty)' if doc['git'].get('dirty') else ''}; {doc['created']}; whole run {doc['total_time_s'] / 60:.1f} min",
           f"- frozen base model unchanged after the prompt methods: {'yes' if doc['base_model_unchanged'] else 'NO'}", "",
           "| method | trainable params | average accuracy after the last stage | forgetting | worst drop of an earlier task | earlier tasks' scores bit-identical |",
           "|---|---:|---:|---:|---:|:---:|"]
    for r in doc["results"]:
        same = "yes" if r["bit_identical"] else f"no (max change {r['max_abs_score_change']:.3g})"
        drop = worst_drop(r["matrix"])  # recomputed: older result files lack the field
        out.append(f"| {r['method']} | {r['trainable_parameters']:,} | {_cell(r['average_accuracy'])} | "
                   f"{_points(r['forgetting'])} | {_points(drop)} | {same} |")
    out += ["", "Forgetting: for each earlier task, its best accuracy before the last stage minus its "
            "accuracy after it, averaged (Chaudhry et al. 2018). Worst drop: the largest fall of any earlier "
            "task below its accuracy when it was learned, at any later stage."]
    for r in doc["results"]:
        out += ["", f"**{r['method']}**: test accuracy (%) after each stage (rows) on each task (columns)", "",
                "| after stage | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
        out += [f"| {i + 1}. {tasks[i]} | " + " | ".join(_cell(v) for v in row) + " |" for i, row in enumerate(r["matrix"])]
    return "\n".join(out) + "\n"


def plot(doc: dict, path) -> None:
    """Accuracy of every task across stages, one panel per method."""
    from softprompt.provenance import pyplot, save_figure

    plt = pyplot()
    tasks, res = doc["tasks"], doc["results"]
    fig, axes = plt.subplots(1, len(res), figsize=(4.2 * len(res), 3.4), sharey=True, squeeze=False)
    for ax, r in zip(axes[0], res, strict=True):
        for j, name in enumerate(tasks):
            xs = [i + 1 for i in range(len(tasks)) if r["matrix"][i][j] is not None]
            ax.plot(xs, [100 * r["matrix"][i - 1][j] for i in xs], marker="o", label=name)
        ax.set_title(f"{r['method']} (forgetting {_points(r['forgetting'])})")
        ax.set_xlabel("after stage")
        ax.set_xticks(range(1, len(tasks) + 1))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
