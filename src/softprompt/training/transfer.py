"""Prompt transfer: start a new task from the stored prompt that suits it best (``--init transfer``).

Ranking follows SPoT's evaluation-based metric (Vu et al. 2022): every compatible stored prompt
(same base model, same H) is scored by the mean target loss it gives on a sample of the new
task's training examples, with no training at all. Lower is better; the best prompt becomes
the initial prompt (cut or extended to N, as ``--init prompt:NAME``). SPoT found this ranking
more reliable than comparing prompt embeddings, and it costs one forward pass per prompt over
a few dozen rows. Candidates are shallow prompts; with ``--kind deep`` the chosen one starts the
deep prompt as its computed prefix (``prompt.make_deep_prompt``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from softprompt import data as D
from softprompt.config import UserError
from softprompt.store import Store, check_compatible
from softprompt.training.loop import eval_loss
from softprompt.training.methods import PromptMethod

if TYPE_CHECKING:
    from softprompt.models import LoadedModel, Model

log = logging.getLogger(__name__)

RANK_ROWS = 32  # new-task rows each candidate is scored on


def mean_loss(model: Model, prompt: torch.Tensor, examples: list[D.Example], pad_id: int, batch_size: int = 16) -> float:
    """Target-token-weighted mean cross-entropy of ``examples`` under ``prompt``."""
    return eval_loss(PromptMethod(model, prompt), examples, pad_id, batch_size)


def candidates(lm: LoadedModel, exclude: set[str] = frozenset(), force: bool = False, only: list[str] | None = None, *,
               store: Store) -> dict[str, torch.Tensor]:
    """Prompts of ``store`` usable on this model: name -> (N, H). Broken or foreign ones are skipped."""
    H = lm.model.get_input_embeddings().weight.shape[1]
    out = {}
    for name in only if only is not None else store.list_prompts():
        if name in exclude:
            continue
        try:
            sp = store.load_prompt(name)
            check_compatible(sp, lm.fingerprint, force=force, kv_shape=lm.kv_shape)
        except UserError as e:
            log.debug("transfer: skipping %s (%s)", name, e)
            continue
        if sp.kv is None and sp.embeddings.shape[1] == H:  # deep prompts are not ranked: shallow sources only
            out[name] = sp.embeddings.float()
    return out


def rank_sources(lm: LoadedModel, examples: list[D.Example], exclude: set[str] = frozenset(), rows: int = RANK_ROWS,
                 force: bool = False, only: list[str] | None = None, *, store: Store) -> list[dict]:
    """Stored prompts (all, or the names in ``only``) ordered best first: ``[{"name", "loss"}, ...]``,
    scored on the first ``rows`` examples."""
    if not examples:
        raise UserError("--init transfer: the new task has no training examples to rank prompts with")
    pool = candidates(lm, exclude, force, only, store=store)
    if not pool:
        raise UserError("--init transfer: no stored prompt for this base model to transfer from; "
                        "train one first or use another --init")
    sample = examples[:rows]
    pad = lm.tokenizer.pad_token_id
    ranked = [{"name": n, "loss": mean_loss(lm.model, p, sample, pad)} for n, p in pool.items()]
    ranked.sort(key=lambda r: r["loss"])
    log.info("transfer ranking: %s", ", ".join(f"{r['name']} {r['loss']:.3f}" for r in ranked[:5]))
    return ranked
