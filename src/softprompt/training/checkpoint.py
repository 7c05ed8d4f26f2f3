"""The epoch checkpoint of the training loop (``loop.fit``): save it, and resume from it.

A checkpoint is safetensors (the method's state, the kept "best" state, AdamW moments) plus JSON
(options, scheduler, counters, history), written atomically by ``promptdir.save_checkpoint``; a
Ctrl-C therefore leaves the last one intact, and a resumed run equals the uninterrupted one.
Tensors are saved from the CPU, so a checkpoint written on a GPU resumes anywhere.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from softprompt.config import TrainConfig, UserError
from softprompt.promptdir import load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


def _opt_state(opt) -> dict[str, torch.Tensor]:
    out = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"opt.{i}.{k}"] = torch.as_tensor(v).float().cpu()
    return out


def _load_opt_state(opt, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            sd["state"].setdefault(int(i), {})[k] = v
    opt.load_state_dict(sd)


def require(checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The checkpoint ``--resume`` continues, or one line saying there is none."""
    loaded = load_checkpoint(checkpoint)
    if loaded is None:
        raise UserError(f"--resume: no checkpoint in {checkpoint}")
    return loaded


def restore(checkpoint: Path, method, opt, sched, cfg: TrainConfig, res) -> tuple[int, int, float | None, int]:
    """Restore method, optimiser, scheduler and result from an epoch checkpoint."""
    tensors, st = require(checkpoint)
    if TrainConfig.from_dict(st["config"]).to_dict() != cfg.to_dict():  # fields added since: their defaults
        raise UserError("--resume: the training options differ from the checkpoint's; use the same options")
    saved = {k[6:]: v for k, v in tensors.items() if k.startswith("state.")}
    current = method.state()
    if set(saved) != set(current) or any(saved[k].shape != current[k].shape for k in current):
        raise UserError("--resume: the checkpoint's prompt has another shape (different --num-virtual-tokens or model); use the same options")
    method.load_state(saved)
    _load_opt_state(opt, tensors)
    sched.load_state_dict(st["scheduler"])
    for group, lr in zip(opt.param_groups, sched.get_last_lr(), strict=True):
        group["lr"] = lr  # the scheduler's state does not carry the optimiser's current lr
    res.state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    res.history, res.epochs, res.train_time_s = st["history"], st["epochs"], st["train_time_s"]
    res.best = st["best"]
    res.stopped = type(res.stopped)(st.get("stopped", res.stopped.value))  # loop.StopReason (loop imports this module)
    log.info("resumed from %s at epoch %d, step %d", checkpoint, st["epoch"], st["step"])
    return st["epoch"], st["step"], st["best_score"], st["bad"]


def save(path, method, opt, sched, res, cfg, epoch, step, best_score, bad):
    tensors = {f"state.{k}": v for k, v in method.state().items()}
    tensors.update({f"best.{k}": v for k, v in res.state.items()})
    tensors.update(_opt_state(opt))
    state = {
        "config": cfg.to_dict(), "scheduler": sched.state_dict(), "epoch": epoch, "step": step,
        "best_score": best_score, "bad": bad, "best": res.best, "history": res.history,
        "epochs": res.epochs, "train_time_s": res.train_time_s, "stopped": res.stopped.value,
    }
    save_checkpoint(path, tensors, state)
