"""Prompt tuning end to end (``softprompt train``): data -> initial prompt -> ``loop.fit`` -> store.

Also the pieces other entry points reuse: the initial prompt of a ``PromptConfig``, the
evaluator run after each epoch, and the metadata a stored prompt carries.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import torch

from softprompt import precision
from softprompt.config import Launch, TrainConfig, UserError
from softprompt.prompt import check_deep
from softprompt.splits import load_splits
from softprompt.store import Store, check_compatible, check_name
from softprompt.training import auto, checkpoint, distributed
from softprompt.training.loop import FitResult, StopReason, check_group_lrs, eval_loss, fit
from softprompt.training.methods import (
    DeepPromptMethod,
    MemoryPromptMethod,
    OffsetPromptMethod,
    PromptMethod,
)

if TYPE_CHECKING:
    from softprompt.config import DataConfig, PromptConfig
    from softprompt.models import LoadedModel, Tokenizer

log = logging.getLogger(__name__)


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
    stopped: StopReason
    n_train: int
    n_eval: int
    meta: dict


def make_evaluator(method, tokenizer: Tokenizer, eval_examples, data_cfg: DataConfig, cfg: TrainConfig, pad_id: int):
    """Eval-set metrics after each epoch; 'score' (higher is better) drives early stopping."""
    from softprompt import metrics

    if not eval_examples:
        return None

    def run() -> dict:
        loss = eval_loss(method, eval_examples, pad_id, cfg.eval_max_batch_rows)
        out = metrics.loss_metrics(loss)
        out["score"] = -loss
        if data_cfg.verbalizer:
            acc = metrics.classify_metrics(method.score, tokenizer, eval_examples, data_cfg.verbalizer, pad_id, cfg.eval_max_batch_rows)
            out["accuracy"] = acc["accuracy"]
            out["score"] = acc["accuracy"] - 1e-6 * loss  # ties broken by loss
        return out

    return run


def initial_prompt(lm: LoadedModel, prompt_cfg: PromptConfig, data_cfg: DataConfig, seed: int, force: bool = False, store: Store | None = None) -> torch.Tensor:
    """The initial prompt of ``prompt_cfg.kind``: shallow (N, H) or deep (L, 2, kv, N, d)
    (``prompt:NAME`` reads NAME from ``store``)."""
    from softprompt.prompt import make_deep_prompt, make_prompt

    source = None
    if prompt_cfg.init.startswith("prompt:"):
        stored = needs_store(store, "--init prompt:NAME").load_prompt(prompt_cfg.init.split(":", 1)[1])
        check_compatible(stored, lm.fingerprint, force=force, kv_shape=lm.kv_shape)
        source = stored.tensor if prompt_cfg.kind == "deep" else stored.shallow("--init prompt:NAME for a shallow prompt")
    words = list((data_cfg.verbalizer or {}).values())
    make = make_deep_prompt if prompt_cfg.kind == "deep" else make_prompt
    return make(lm.model, lm.tokenizer, prompt_cfg.num_virtual_tokens, prompt_cfg.init,
                seed=seed, text=prompt_cfg.init_text, label_words=words, source=source)


class Levers(TypedDict):
    """The keyword arguments every ``PromptMethod`` kind takes beside its own."""

    dropout: float
    freeze_first: bool
    logits: str


def prompt_method(lm: LoadedModel, init: torch.Tensor, prompt_cfg: PromptConfig, fast: bool, seed: int, pack: bool = False,
                  used: str = "fp32", logits: str = "fp32") -> PromptMethod:
    """The training method for ``prompt_cfg``'s kind, reparameterisation and levers (prefix
    dropout, frozen first token, DePT's input offset); ``pack`` and the precision ``used``
    (``precision.resolve``) as ``TrainConfig`` asks; ``logits`` as ``with_logits`` chooses."""
    levers = Levers(dropout=prompt_cfg.dropout, freeze_first=prompt_cfg.freeze_first, logits=logits)
    if prompt_cfg.offset_rank:
        if pack:
            raise UserError("--offset-rank does not go with --pack (the offset is per input position)")
        return OffsetPromptMethod(lm.model, init, prompt_cfg.offset_rank, prompt_cfg.offset_length, fast=fast,
                                  reparam=prompt_cfg.reparam, seed=seed, precision=used, **levers)
    if prompt_cfg.memory:
        if pack:
            raise UserError("--prefix-memory does not go with --pack")
        return MemoryPromptMethod(lm.model, init, fast=fast, reparam=prompt_cfg.reparam, seed=seed, precision=used,
                                  **levers)
    cls = DeepPromptMethod if prompt_cfg.kind == "deep" else PromptMethod
    return cls(lm.model, init, fast=fast, reparam=prompt_cfg.reparam, seed=seed, pack=pack, precision=used, **levers)


def with_logits(prec: dict, data_cfg: DataConfig) -> dict:
    """``prec`` (``precision.resolve``) with ``logits``, how the loss's vocabulary logits are
    computed (``precision.logits_context``): ``fp32``, except under bf16 in language-modelling
    mode, where every token is a target and the float32 head would cost 13-15% of a step (``levers``)."""
    return {**prec, "logits": "bf16" if prec["used"] == "bf16" and data_cfg.mode == "lm" else "fp32"}


def prompt_metadata(lm: LoadedModel, data_cfg: DataConfig, prompt_cfg: PromptConfig, train_cfg: TrainConfig, fit_res: FitResult, task: str | None) -> dict:
    from softprompt.provenance import stamp, versions

    return {
        "format": 1,
        "base_model": {"name": lm.name, "path": str(lm.path), "fingerprint": lm.fingerprint},
        "task": task,
        "mode": data_cfg.mode,
        "template": data_cfg.template,
        "text_column": data_cfg.text_column,
        "target_column": data_cfg.target_column,
        "verbalizer": data_cfg.verbalizer,
        "chat": data_cfg.chat,  # trained in chat form: generate and eval format the same way
        "system": data_cfg.system,
        "data": data_cfg.to_dict(),
        "kind": prompt_cfg.kind,
        "reparam": prompt_cfg.reparam,  # used in training only: the saved prompt is the folded tensor
        "prompt": prompt_cfg.to_dict(),
        "training": train_cfg.to_dict(),
        "seed": train_cfg.seed,
        "metrics": {"final_train_loss": fit_res.final_train_loss, "best_eval": fit_res.best,
                    "stopped": fit_res.stopped.value, "train_time_s": fit_res.train_time_s},
        "epochs": fit_res.epochs,
        "versions": versions(),
        "created": stamp(),
    }


def needs_store(store: Store | None, what: str) -> Store:
    """``store``, or one line saying that ``what`` reads or writes a store."""
    if store is None:
        raise UserError(f"{what} needs a prompt store (--home)")
    return store


def tell_choice(method, prompt_cfg: PromptConfig, train_cfg: TrainConfig, chosen: dict, resume_from: Path | None, say) -> None:
    """``--kind auto``'s one line (to ``say``, default the log), after the one-line errors it could
    hide: no checkpoint to resume from (``resume_from``), a ``--group-lr`` naming no group."""
    if resume_from is not None:
        checkpoint.require(resume_from)
    check_group_lrs(method, train_cfg)
    (say or log.info)(auto.line(prompt_cfg, train_cfg, chosen))


def side_tensors(state: dict) -> dict:
    """The side tensors in a method's state (``offset``, ``memory``: ``sides.py``), as ``save_prompt`` takes them."""
    return {"offset": (state["offset_a"], state["offset_b"]) if "offset_a" in state else None,
            "memory": state.get("memory")}


def train(lm: LoadedModel, data_cfg: DataConfig, prompt_cfg: PromptConfig, train_cfg: TrainConfig, name: str | None = None, task: str | None = None,
          resume: bool = False, save: bool = True, progress: bool = False, force: bool = False,
          fsdp: bool = False, store: Store | None = None, launch: Launch | None = None,
          given: set[str] | None = None, say=None) -> TrainResult:
    """Prompt tuning end to end: data -> init -> fit -> save. Nothing is written on bad input.

    ``prompt_cfg.kind == "auto"`` resolves, once the data is read, into the settings of
    ``auto.RULES``; the fields in ``given`` keep the caller's values (``auto.resolve``), and
    ``say`` (default: the log) gets the one line that tells the choice as training starts.
    Under ``torchrun`` / ``accelerate launch`` this is one rank of a data-parallel run
    (``distributed.py``, ``launch`` read at the edge; ``fsdp`` shards the frozen model): only rank 0
    saves. ``store`` receives the prompt and the checkpoint (``save`` with a ``name``) and holds the
    prompts that ``--init prompt:NAME`` / ``transfer`` read; ``data_cfg`` is resolved already
    (``recipes.resolve``), read by ``splits.load_splits``; ``task`` only names it in the metadata.
    """
    torch.manual_seed(train_cfg.seed)
    dist = distributed.setup(lm, fsdp, launch)  # None unless launched by torchrun / accelerate launch
    main = dist is None or dist.is_main
    if name is not None:
        check_name(name)
    if prompt_cfg.kind == "deep":
        check_deep(lm.model)  # one line, before any data is read or anything written
    tok = lm.tokenizer
    data = load_splits(tok, data_cfg, train_cfg.seed)
    train_ex, eval_ex = data.train, data.dev
    chosen = None
    if prompt_cfg.kind == "auto":
        prompt_cfg, train_cfg, chosen = auto.resolve(auto.facts_of(lm, data_cfg, len(train_ex)), prompt_cfg,
                                                     train_cfg, given)
    ranking = None
    if prompt_cfg.init == "transfer":  # SPoT-style: the stored prompt that suits this data best
        from softprompt.training.transfer import rank_sources

        ranking = rank_sources(lm, train_ex, exclude={name} if name else set(), force=force,
                               store=needs_store(store, "--init transfer"))
        prompt_cfg = replace(prompt_cfg, init=f"prompt:{ranking[0]['name']}")
    fast = train_cfg.fast_forward and not fsdp  # FSDP: one forward per layer (distributed.shard_model)
    init = initial_prompt(lm, prompt_cfg, data_cfg, train_cfg.seed, force, store)
    prec = with_logits(precision.resolve(train_cfg.precision, lm.model.device, lm.model.dtype), data_cfg)
    method = prompt_method(lm, init, prompt_cfg, fast, train_cfg.seed, train_cfg.pack, prec["used"], prec["logits"])
    evaluator = make_evaluator(method, tok, eval_ex, data_cfg, train_cfg, tok.pad_token_id)
    dest = needs_store(store, "saving a prompt") if (save and name) else None
    ckpt = dest.run_dir(name) / "checkpoint" if dest is not None and name else None
    if chosen is not None and main:
        tell_choice(method, prompt_cfg, train_cfg, chosen, ckpt if resume else None, say)
    res = fit(method, train_ex, train_cfg, tok.pad_token_id, evaluator, ckpt, resume, progress and main, dist)
    prompt = res.state["prompt"]
    meta = prompt_metadata(lm, data_cfg, prompt_cfg, train_cfg, res, task)
    meta["precision"] = prec  # what auto chose and why (softprompt.json, the training summary)
    if chosen is not None:
        meta["auto"] = chosen  # --kind auto: its choice, the user's overrides and why
    if ranking is not None:
        meta["transfer"] = {"source": ranking[0]["name"], "ranking": ranking}
    if dist is not None:
        meta["distributed"] = {"world_size": dist.world, "fsdp": dist.fsdp}
    path = (dest.save_prompt(name, prompt, meta, str(lm.path), lm.model.config, **side_tensors(res.state))
            if dest is not None and name and main else None)
    return TrainResult(name=name or "", prompt=prompt, path=path, history=res.history, epochs=res.epochs,
                       train_time_s=res.train_time_s, final_train_loss=res.final_train_loss, best=res.best,
                       stopped=res.stopped, n_train=len(train_ex), n_eval=len(eval_ex), meta=meta)
