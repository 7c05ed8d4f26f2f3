"""ONE training loop, shared by every method through the ``Method`` protocol.

``fit`` knows nothing about prompts: it asks a ``Method`` (``methods.py``) for its trainable
parameters, its loss on a batch and its state. Prompt tuning, LoRA and full fine-tuning differ
only there, so a comparison between them runs literally the same loop, schedule, batches and
evaluation.

Determinism: the model stays in eval mode (no dropout) and the batch order of epoch ``e`` is a
function of ``(seed, e)``; a checkpoint written after each epoch therefore resumes to exactly
the run that was never interrupted. A method with its own training-time randomness (prefix
dropout) has the optional ``set_step(step)`` hook: the loop calls it with the step before each
optimiser step and with None before anything else runs (evaluation, saving), so the method draws
from (seed, step) and is deterministic outside training.

Optimiser: AdamW over the method's named ``param_groups()`` where it has them (``--group-lr
NAME=LR`` sets a group's lr, the rest use ``--lr``); the lr warms up linearly (``warmup_steps``,
else ``warmup_ratio``) and then decays linearly or along half a cosine to 0 (``schedule``).
A run ends for one ``StopReason``; ``EPOCH_HOOKS`` are called with each epoch's index before
it runs (a caller's progress report, or a test's Ctrl-C).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

import torch

from softprompt import data as D
from softprompt.config import TrainConfig, UserError
from softprompt.training import distributed
from softprompt.training.checkpoint import restore as _resume
from softprompt.training.checkpoint import save as _save_ckpt

log = logging.getLogger(__name__)


class StopReason(str, Enum):
    """Why a training run ended; the value is what results and prompt metadata record."""

    COMPLETED = "completed"  # every planned step ran
    EARLY_STOPPED = "early-stopped"  # ``patience`` epochs without a better dev score
    NON_FINITE = "non-finite loss"  # a loss was NaN or inf; the last good state is kept
    BY_CALLER = "stopped by caller"  # ``on_step`` returned True (e.g. an lr that lost a race)

    def __str__(self) -> str:
        return self.value


# called with the 0-based epoch index before each epoch of ``fit`` runs (after resuming, only
# the epochs that run); an exception raised here ends the run as a Ctrl-C would
EPOCH_HOOKS: list[Callable[[int], None]] = []


class Method(Protocol):
    """What ``fit`` and the comparison need of a training method (``methods.py`` has them all)."""

    def parameters(self) -> list[torch.nn.Parameter]: ...  # the trainable tensors
    def loss(self, batch: dict) -> torch.Tensor: ...  # mean target cross-entropy of a batch
    def state(self) -> dict[str, torch.Tensor]: ...  # what a checkpoint keeps
    def load_state(self, state: dict[str, torch.Tensor]) -> None: ...
    def score(self, batch: dict) -> torch.Tensor: ...  # per-row log-likelihoods (label scoring)
    def trainable_parameters(self) -> int: ...  # parameters a task costs
    def save(self, path: Path) -> int: ...  # the task's real artifact; bytes of its weights file


@dataclass
class FitResult:
    state: dict  # the kept state (best on eval when there is an eval set, else last)
    history: list[dict] = field(default_factory=list)  # one entry per optimiser step
    epochs: list[dict] = field(default_factory=list)  # one entry per epoch: train loss + eval
    train_time_s: float = 0.0
    train_cpu_s: float = 0.0  # process CPU seconds of the same epochs: what machine load does not inflate
    stopped: StopReason = StopReason.COMPLETED
    best: dict | None = None  # eval metrics of the kept state

    @property
    def final_train_loss(self) -> float:
        return self.epochs[-1]["train_loss"] if self.epochs else float("nan")


def warmup_steps(total: int, cfg: TrainConfig) -> int:
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, total)
    return max(1, int(total * cfg.warmup_ratio)) if cfg.warmup_ratio > 0 else 0


def lr_factor(step: int, total: int, warm: int, schedule: str) -> float:
    """The lr multiplier at ``step``: linear warm-up over ``warm`` steps, then linear or cosine to 0."""
    if step < warm:
        return (step + 1) / warm
    left = max(0.0, (total - step) / max(1, total - warm))  # 1 right after warm-up, 0 at the end
    return left if schedule == "linear" else 0.5 * (1 - math.cos(math.pi * left))


def _schedule(opt, total: int, cfg: TrainConfig):
    warm = warmup_steps(total, cfg)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total, warm, cfg.schedule))


def check_group_lrs(method, cfg: TrainConfig) -> list:
    """The method's named parameter groups; one line when ``--group-lr`` names one it lacks."""
    groups = method.param_groups() if hasattr(method, "param_groups") else [("all", method.parameters())]
    unknown = sorted(set(cfg.group_lr or {}) - {name for name, _ in groups})
    if unknown:
        raise UserError(f"--group-lr: no parameter group {', '.join(unknown)} in this method "
                        f"(its groups: {', '.join(name for name, _ in groups)})")
    return groups


def make_optimizer(method, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the method's named parameter groups, or all its parameters; a group's lr is
    ``--group-lr``'s, else the method's default for it (``default_lrs``), else ``--lr``."""
    groups = check_group_lrs(method, cfg)
    lrs = {**getattr(method, "default_lrs", {}), **(cfg.group_lr or {})}
    return torch.optim.AdamW([{"params": ps, "lr": lrs.get(name, cfg.lr), "name": name} for name, ps in groups],
                             lr=cfg.lr, weight_decay=cfg.weight_decay)


def _set_step(method, step: int | None) -> None:
    hook = getattr(method, "set_step", None)
    if hook is not None:
        hook(step)


def plan_steps(n_batches: int, cfg: TrainConfig) -> tuple[int, int]:
    """(optimiser steps in total, epochs to run)."""
    per_epoch = math.ceil(n_batches / cfg.grad_accum)
    if cfg.steps:
        return cfg.steps, math.ceil(cfg.steps / per_epoch)
    return per_epoch * cfg.epochs, cfg.epochs


def _better(score: float, best: float | None) -> bool:
    return best is None or score > best + 1e-9


def fit(
    method: Method,
    examples: list[D.Example],
    cfg: TrainConfig,
    pad_id: int,
    evaluate: Callable[[], dict] | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    dist: distributed.Dist | None = None,
    horizon: int | None = None, on_step: Callable[[int], bool] | None = None,
) -> FitResult:
    """Train ``method`` on ``examples``; evaluate and checkpoint after each epoch.

    ``dist``: data-parallel (``distributed.py``). ``horizon``: the steps the lr schedule spans, so
    k steps under horizon H are the first k of an H-step run; ``on_step(step)``: True stops it.
    """
    params, opt = method.parameters(), make_optimizer(method, cfg)
    total, n_epochs = plan_steps(len(D.bucketed_batches(examples, cfg.batch_size, cfg.seed, 0)), cfg)
    sched = _schedule(opt, horizon or total, cfg)
    _set_step(method, None)
    res = FitResult(state=method.state())
    start_epoch, step, best_score, bad = 0, 0, None, 0
    if resume and checkpoint is not None:
        start_epoch, step, best_score, bad = _resume(checkpoint, method, opt, sched, cfg, res)
    if dist is not None:
        dist.broadcast(params)
    bar = _progress(total, step, progress)
    for epoch in range(start_epoch, n_epochs):
        if step >= total or res.stopped is not StopReason.COMPLETED:
            break
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            losses, step = _run_epoch(method, examples, cfg, pad_id, opt, sched, epoch, step, total, res, bar, dist, on_step)
        finally:
            _set_step(method, None)  # eval mode for evaluation, checkpoints and whoever gets the method next
        res.train_time_s += time.perf_counter() - t0
        res.train_cpu_s += time.process_time() - c0
        if res.stopped is StopReason.NON_FINITE:
            res.state = method.state() if evaluate is None else res.state  # the failing step was not applied
            break
        row = {"epoch": epoch + 1, "step": step, "train_loss": sum(losses) / max(1, len(losses))}
        best_score, bad = _evaluate_epoch(method, evaluate, row, res, best_score, bad)
        res.epochs.append(row)
        log.info("epoch %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
        if res.stopped is StopReason.COMPLETED and cfg.patience is not None and evaluate is not None and bad >= cfg.patience:
            res.stopped = StopReason.EARLY_STOPPED
        if checkpoint is not None and (dist is None or dist.is_main):
            _save_ckpt(checkpoint, method, opt, sched, res, cfg, epoch + 1, step, best_score, bad)
    if bar is not None:
        bar.close()
    return res


def _evaluate_epoch(method: Method, evaluate: Callable[[], dict] | None, row: dict, res: FitResult,
                    best_score: float | None, bad: int) -> tuple[float | None, int]:
    """Score the epoch just run into ``row``; keep the method's state when it is the best so far
    (every epoch's state without an evaluator). (best score, epochs without improvement)."""
    if evaluate is None:
        res.state = method.state()
        return best_score, bad
    metrics = evaluate()
    row.update({f"eval_{k}": v for k, v in metrics.items()})
    if _better(metrics["score"], best_score):
        res.state, res.best = method.state(), metrics
        return metrics["score"], 0
    return best_score, bad + 1


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def _run_epoch(method: Method, examples: list[D.Example], cfg: TrainConfig, pad_id: int, opt: torch.optim.Optimizer,
               sched: torch.optim.lr_scheduler.LambdaLR, epoch: int, step: int, total: int, res: FitResult, bar: Any,
               dist: distributed.Dist | None = None, on_step: Callable[[int], bool] | None = None,
               ) -> tuple[list[float], int]:
    for hook in EPOCH_HOOKS:
        hook(epoch)
    batches = D.bucketed_batches(examples, cfg.batch_size, cfg.seed, epoch)
    losses: list[float] = []
    params = method.parameters()
    for g in range(0, len(batches), cfg.grad_accum):
        if step >= total:
            break
        t0, tokens, step_loss = time.perf_counter(), 0, 0.0
        group = batches[g : g + cfg.grad_accum]
        _set_step(method, step)
        for idx in group:
            rows, w = (idx, 1.0) if dist is None else dist.shard(examples, idx)
            batch = D.collate([examples[i] for i in rows], pad_id)
            loss = method.loss(batch) if w == 1.0 else method.loss(batch) * w  # w: this rank's token share
            if not torch.isfinite(loss) and dist is None:  # distributed: decided after the all-reduce
                return _non_finite(opt, res, losses, step)
            (loss / len(group)).backward()
            step_loss += loss.item() / len(group)
            tokens += int(batch["attention_mask"].sum()) if w else 0
        if dist is not None:
            step_loss, tokens = dist.all_reduce(params, step_loss, tokens)
            if not math.isfinite(step_loss):
                return _non_finite(opt, res, losses, step)
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        losses.append(step_loss)
        dt = time.perf_counter() - t0
        res.history.append({"step": step, "epoch": epoch + 1, "loss": step_loss, "lr": sched.get_last_lr()[0], "tokens": tokens})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens / dt:.0f}", epoch=epoch + 1)
        if on_step is not None:
            _set_step(method, None)  # the caller evaluates in eval mode (no prefix dropout)
            if on_step(step):
                res.stopped = StopReason.BY_CALLER
                break
    return losses, step


def _non_finite(opt: torch.optim.Optimizer, res: FitResult, losses: list[float], step: int) -> tuple[list[float], int]:
    log.error("non-finite loss at step %d; stopping and keeping the last good state", step + 1)
    opt.zero_grad(set_to_none=True)
    res.stopped = StopReason.NON_FINITE
    return losses, step


# ---------------------------------------------------------------- evaluation during training


@torch.no_grad()
def eval_loss(method: Method, examples: list[D.Example], pad_id: int, batch_size: int) -> float:
    """Mean target-token cross-entropy, weighted by target tokens."""
    total, count = 0.0, 0
    for s in range(0, len(examples), batch_size):
        chunk = examples[s : s + batch_size]
        batch = D.collate(chunk, pad_id)
        n = int((batch["labels"][:, 1:] != D.IGNORE).sum()) + int((batch["labels"][:, 0] != D.IGNORE).sum())
        total += method.loss(batch).item() * n
        count += n
    return total / max(1, count)
