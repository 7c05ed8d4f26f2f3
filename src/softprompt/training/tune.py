"""ONE training loop, shared by prompt tuning and (through ``Method``) any other method.

``fit`` knows nothing about prompts: it asks a ``Method`` for its trainable parameters, its
loss on a batch and its state. Prompt tuning, LoRA and full fine-tuning differ only there, so a
comparison between them runs literally the same loop, schedule, batches and evaluation.

Determinism: the model stays in eval mode (no dropout) and the batch order of epoch ``e`` is a
function of ``(seed, e)``; a checkpoint written after each epoch therefore resumes to exactly
the run that was never interrupted.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import torch

from softprompt import data as D
from softprompt import store
from softprompt.config import TrainConfig
from softprompt.forward import prompt_loss, sequence_logprobs
from softprompt.training import distributed
from softprompt.training.checkpoint import restore as _resume
from softprompt.training.checkpoint import save as _save_ckpt

log = logging.getLogger(__name__)


class Method(Protocol):
    def parameters(self) -> list[torch.nn.Parameter]: ...
    def loss(self, batch: dict) -> torch.Tensor: ...
    def state(self) -> dict[str, torch.Tensor]: ...
    def load_state(self, state: dict[str, torch.Tensor]) -> None: ...


class PromptMethod:
    """Prompt tuning: the only trainable tensor is the (N, H) prompt."""

    def __init__(self, model, prompt: torch.Tensor, fast: bool = True):
        self.model = model
        device = next(model.parameters()).device  # the prompt lives with the model, in float32
        self.prompt = torch.nn.Parameter(prompt.detach().clone().float().to(device))
        self.fast = fast

    def parameters(self):
        return [self.prompt]

    def _cast(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """The prompt in the model's dtype (autograd keeps the float32 master), the batch on its device."""
        p = self.prompt if self.model.dtype == self.prompt.dtype else self.prompt.to(self.model.dtype)
        return p, {k: v.to(self.prompt.device) for k, v in batch.items()}

    def loss(self, batch):
        prompt, batch = self._cast(batch)
        return prompt_loss(self.model, prompt, batch, fast=self.fast)

    def state(self):
        return {"prompt": self.prompt.detach().cpu().clone()}

    def load_state(self, state):
        with torch.no_grad():
            self.prompt.copy_(state["prompt"])

    def score(self, batch) -> torch.Tensor:
        prompt, batch = self._cast(batch)
        return sequence_logprobs(self.model, prompt.detach(), **batch).cpu()


@dataclass
class FitResult:
    state: dict  # the kept state (best on eval when there is an eval set, else last)
    history: list[dict] = field(default_factory=list)  # one entry per optimiser step
    epochs: list[dict] = field(default_factory=list)  # one entry per epoch: train loss + eval
    train_time_s: float = 0.0
    stopped: str = "completed"  # completed | early-stopped | non-finite loss
    best: dict | None = None  # eval metrics of the kept state

    @property
    def final_train_loss(self) -> float:
        return self.epochs[-1]["train_loss"] if self.epochs else float("nan")


def _schedule(opt, total: int, warmup_ratio: float):
    warm = max(1, int(total * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


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
) -> FitResult:
    """Train ``method`` on ``examples``; evaluate and checkpoint after each epoch.

    ``dist``: data-parallel over a process group (``distributed.py``); each rank trains on its
    rows of every batch, the trainable gradients are summed, only rank 0 writes checkpoints.
    """
    params = method.parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_batches = len(D.bucketed_batches(examples, cfg.batch_size, cfg.seed, 0))
    total, n_epochs = plan_steps(n_batches, cfg)
    sched = _schedule(opt, total, cfg.warmup_ratio)
    res = FitResult(state=method.state())
    start_epoch, step, best_score, bad = 0, 0, None, 0
    if resume and checkpoint is not None:
        start_epoch, step, best_score, bad = _resume(checkpoint, method, opt, sched, cfg, res)
    if dist is not None:
        dist.broadcast(params)
    bar = _progress(total, step, progress)
    for epoch in range(start_epoch, n_epochs):
        if step >= total or res.stopped != "completed":
            break
        t0 = time.perf_counter()
        losses, step = _run_epoch(method, examples, cfg, pad_id, opt, sched, epoch, step, total, res, bar, dist)
        res.train_time_s += time.perf_counter() - t0
        if res.stopped != "completed":
            res.state = method.state() if evaluate is None else res.state  # the failing step was not applied
            break
        row = {"epoch": epoch + 1, "step": step, "train_loss": sum(losses) / max(1, len(losses))}
        if evaluate is not None:
            metrics = evaluate()
            row.update({f"eval_{k}": v for k, v in metrics.items()})
            if _better(metrics["score"], best_score):
                best_score, bad, res.state, res.best = metrics["score"], 0, method.state(), metrics
            else:
                bad += 1
        else:
            res.state = method.state()
        res.epochs.append(row)
        log.info("epoch %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
        if cfg.patience is not None and evaluate is not None and bad >= cfg.patience:
            res.stopped = "early-stopped"
        if checkpoint is not None and (dist is None or dist.is_main):
            _save_ckpt(checkpoint, method, opt, sched, res, cfg, epoch + 1, step, best_score, bad)
    if bar is not None:
        bar.close()
    return res


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def _run_epoch(method, examples, cfg, pad_id, opt, sched, epoch, step, total, res, bar, dist=None):
    batches = D.bucketed_batches(examples, cfg.batch_size, cfg.seed, epoch)
    losses: list[float] = []
    params = method.parameters()
    for g in range(0, len(batches), cfg.grad_accum):
        if step >= total:
            break
        t0, tokens, step_loss = time.perf_counter(), 0, 0.0
        group = batches[g : g + cfg.grad_accum]
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
    return losses, step


def _non_finite(opt, res: FitResult, losses: list[float], step: int) -> tuple[list[float], int]:
    log.error("non-finite loss at step %d; stopping and keeping the last good state", step + 1)
    opt.zero_grad(set_to_none=True)
    res.stopped = "non-finite loss"
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


# ---------------------------------------------------------------- prompt tuning, end to end


@dataclass
class TrainResult:
    name: str
    prompt: torch.Tensor  # (N, H), the kept prompt
    path: Path | None  # where it was saved in the store
    history: list[dict]
    epochs: list[dict]
    train_time_s: float
    final_train_loss: float
    best: dict | None
    stopped: str
    n_train: int
    n_eval: int
    meta: dict


def load_task_or_data(tokenizer, data_cfg, task: str | None, seed: int):
    """(train examples, eval examples, DataConfig actually used)."""
    if task:
        data_cfg, recipe = D.task_data_config(task, **_overrides(data_cfg))
        train = D.load_split(tokenizer, data_cfg, recipe["train"], limit=data_cfg.limit)
        if data_cfg.eval_path:
            ev = D.load_file(tokenizer, data_cfg, data_cfg.eval_path, data_cfg.eval_limit)
        elif recipe.get("eval"):
            ev = D.load_split(tokenizer, data_cfg, recipe["eval"], limit=data_cfg.eval_limit)
        else:
            return (*D.split_dev(train, data_cfg, seed), data_cfg)
        return train, ev, data_cfg
    train, ev = D.load_train_eval(tokenizer, data_cfg, seed)
    return train, ev, data_cfg


def _overrides(cfg) -> dict:
    """User options that override a task recipe (those different from the defaults)."""
    from softprompt.config import DataConfig

    default = DataConfig()
    return {k: v for k, v in cfg.to_dict().items() if v != getattr(default, k)}


def make_evaluator(method, tokenizer, eval_examples, data_cfg, cfg: TrainConfig, pad_id: int):
    """Eval-set metrics after each epoch; 'score' (higher is better) drives early stopping."""
    from softprompt import evaluate as E

    if not eval_examples:
        return None

    def run() -> dict:
        loss = eval_loss(method, eval_examples, pad_id, cfg.eval_batch_size)
        out = E.loss_metrics(loss)
        out["score"] = -loss
        if data_cfg.verbalizer:
            acc = E.classify_metrics(method.score, tokenizer, eval_examples, data_cfg.verbalizer, pad_id, cfg.eval_batch_size)
            out["accuracy"] = acc["accuracy"]
            out["score"] = acc["accuracy"] - 1e-6 * loss  # ties broken by loss
        return out

    return run


def initial_prompt(lm, prompt_cfg, data_cfg, seed: int, force: bool = False) -> torch.Tensor:
    from softprompt.prompt import make_prompt

    source = None
    if prompt_cfg.init.startswith("prompt:"):
        stored = store.load_prompt(prompt_cfg.init.split(":", 1)[1])
        store.check_compatible(stored, lm.fingerprint, force=force)
        source = stored.embeddings
    words = list((data_cfg.verbalizer or {}).values())
    return make_prompt(lm.model, lm.tokenizer, prompt_cfg.num_virtual_tokens, prompt_cfg.init,
                       seed=seed, text=prompt_cfg.init_text, label_words=words, source=source)


def prompt_metadata(lm, data_cfg, prompt_cfg, train_cfg, fit_res: FitResult, task: str | None) -> dict:
    import platform

    import transformers

    from softprompt import __version__

    return {
        "format": 1,
        "base_model": {"name": lm.name, "path": str(lm.path), "fingerprint": lm.fingerprint},
        "task": task,
        "mode": data_cfg.mode,
        "template": data_cfg.template,
        "text_column": data_cfg.text_column,
        "target_column": data_cfg.target_column,
        "verbalizer": data_cfg.verbalizer,
        "data": data_cfg.to_dict(),
        "prompt": prompt_cfg.to_dict(),
        "training": train_cfg.to_dict(),
        "seed": train_cfg.seed,
        "metrics": {"final_train_loss": fit_res.final_train_loss, "best_eval": fit_res.best,
                    "stopped": fit_res.stopped, "train_time_s": fit_res.train_time_s},
        "epochs": fit_res.epochs,
        "versions": {"softprompt": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def runs_dir(name: str) -> Path:
    from softprompt.config import home

    return home() / "runs" / store.check_name(name)


def train(lm, data_cfg, prompt_cfg, train_cfg: TrainConfig, name: str | None = None, task: str | None = None,
          resume: bool = False, save: bool = True, progress: bool = False, force: bool = False,
          fsdp: bool = False) -> TrainResult:
    """Prompt tuning end to end: data -> init -> fit -> save. Nothing is written on bad input.

    Under ``torchrun`` / ``accelerate launch`` this is one rank of a data-parallel run
    (``distributed.py``; ``fsdp`` shards the frozen model): only rank 0 saves.
    """
    torch.manual_seed(train_cfg.seed)
    dist = distributed.setup(lm, fsdp)  # None unless launched by torchrun / accelerate launch
    main = dist is None or dist.is_main
    if name is not None:
        store.check_name(name)
    tok = lm.tokenizer
    train_ex, eval_ex, data_cfg = load_task_or_data(tok, data_cfg, task, train_cfg.seed)
    ranking = None
    if prompt_cfg.init == "transfer":  # SPoT-style: the stored prompt that suits this data best
        from softprompt.training.transfer import rank_sources

        ranking = rank_sources(lm, train_ex, exclude={name} if name else set(), force=force)
        prompt_cfg = replace(prompt_cfg, init=f"prompt:{ranking[0]['name']}")
    fast = train_cfg.fast_forward and not fsdp  # FSDP: one forward per layer (distributed.shard_model)
    method = PromptMethod(lm.model, initial_prompt(lm, prompt_cfg, data_cfg, train_cfg.seed, force), fast=fast)
    evaluator = make_evaluator(method, tok, eval_ex, data_cfg, train_cfg, tok.pad_token_id)
    ckpt = runs_dir(name) / "checkpoint" if (save and name) else None
    res = fit(method, train_ex, train_cfg, tok.pad_token_id, evaluator, ckpt, resume, progress and main, dist)
    prompt = res.state["prompt"]
    meta = prompt_metadata(lm, data_cfg, prompt_cfg, train_cfg, res, task)
    if ranking is not None:
        meta["transfer"] = {"source": ranking[0]["name"], "ranking": ranking}
    if dist is not None:
        meta["distributed"] = {"world_size": dist.world, "fsdp": dist.fsdp}
    path = None
    if save and name and main:
        path = store.save_prompt(store.prompt_path(name), prompt, meta, str(lm.path), lm.model.config)
    return TrainResult(name=name or "", prompt=prompt, path=path, history=res.history, epochs=res.epochs,
                       train_time_s=res.train_time_s, final_train_loss=res.final_train_loss, best=res.best,
                       stopped=res.stopped, n_train=len(train_ex), n_eval=len(eval_ex), meta=meta)
