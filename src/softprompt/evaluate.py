"""Evaluation through the inference engine (``softprompt eval``): classification by label-word
scoring, exact match, loss and perplexity, of the plain model, one prompt or an ensemble.

Every example x prompt is a row of one mixed engine batch, each row scores all label words on
one copy of its context; several prompts form an ensemble (mean of label probabilities, and
majority vote). The metrics themselves (label scoring through any scorer, accuracy and
confusion) live in ``metrics.py``, which training uses too.

Data defaults come, in order, from the user's flags, the first prompt's stored metadata
(template, verbalizer, target/text column), and the task recipe.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from softprompt import data as D
from softprompt import metrics, recipes
from softprompt.config import DataConfig, EvalConfig, GenerateConfig, UserError
from softprompt.datafiles import DataFile, DataFiles
from softprompt.splits import load_splits

if TYPE_CHECKING:
    from softprompt.inference.engine import Engine
    from softprompt.models import Tokenizer

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- evaluation through the engine


META_FIELDS = ("template", "target_column", "verbalizer", "text_column", "chat", "system")


def data_config(engine: Engine, ecfg: EvalConfig, user: dict, root: Path | None = None) -> DataConfig:
    """The DataConfig to evaluate with: user flags > first prompt's metadata > task recipe (files
    under ``root``); its test file is what is evaluated."""
    metas = {p: engine.bank.get(p)[0].meta for p in ecfg.prompts}
    return merged_data_config(metas, ecfg.task, user, root, (ecfg.split,), ecfg.limit)


def merged_data_config(metas: dict[str, dict], task: str | None, user: dict, root: Path | None = None,
                       splits: tuple[str, ...] = ("test",), limit: int | None = None) -> DataConfig:
    """The DataConfig, resolved once, from the user's data flags, then the metadata of the stored
    prompts ``metas`` (name -> meta; the first one's settings are used), then ``task``'s recipe:
    its test file is ``--data`` (the first ``limit`` rows), else the first of the recipe's
    ``splits`` it has."""
    user = {k: v for k, v in user.items() if v is not None}
    if not task and not user.get("path"):
        raise UserError("give --data PATH or --task NAME to evaluate on")
    names = list(metas)
    if names and "template" not in user and "text_column" not in user:
        meta = metas[names[0]]
        stored = {k: meta.get(k) for k in META_FIELDS if meta.get(k)}
        if stored.get("template") and stored.get("target_column"):
            stored.pop("text_column", None)
        elif task:  # a language-modelling prompt on a task: the recipe's template rules
            stored = {}
        for other in names[1:]:
            m = metas[other]
            if any(m.get(k) and m.get(k) != stored.get(k) for k in META_FIELDS):
                log.warning("prompt %r was trained with other data settings than %r; using %r's", other,
                            names[0], names[0])
        user = {**stored, **user}
    if not task and not user.get("template") and not user.get("text_column"):
        raise UserError("say what to evaluate: --template TPL --target-column C (or --text-column C), "
                        "or a --prompt whose stored metadata has them")
    path = user.get("path")
    cfg = recipes.resolve(DataConfig(**user), task, root, test=() if path else splits, need_test=not path)
    if path:  # the file is the test set; with a task, the recipe gives only settings
        test = DataFile(path, cfg.columns, cfg.derive, cfg.label_map, cfg.data_split, cfg.data_config,
                        ("test", "validation"), limit=limit)
        return replace(cfg, files=DataFiles(test=test))
    files = cfg.files or DataFiles()
    return replace(cfg, files=replace(files, test=replace(files.test, limit=limit) if files.test else None))


def shown_path(f: DataFile) -> str:
    """A data file as the user knows it: a recipe's file relative to its data root."""
    if f.root and Path(f.path).is_relative_to(f.root):
        return str(Path(f.path).relative_to(f.root))
    return f.path


def engine_label_scores(engine: Engine, examples: list[D.Example], words: list[str], prompts: list[str | None],
                        normalize: bool = False) -> torch.Tensor:
    """(K prompts, n examples, L labels) label log-likelihoods, all K x n rows in one mixed batch."""
    from softprompt.inference.engine import ScoreRow

    tok = engine.lm.tokenizer
    targets = [metrics.label_targets(tok, ex, words) for ex in examples]
    rows = [ScoreRow(tuple(ex.input_ids[: ex.source_len]), t, p) for p in prompts for ex, t in zip(examples, targets)]
    res = score_in_blocks(engine, rows)
    lp = torch.tensor([r.logprobs for r in res], dtype=torch.float64)  # (K*n, L)
    if normalize:
        lp = lp / torch.tensor([r.n_tokens for r in res], dtype=torch.float64)
    return lp.view(len(prompts), len(examples), len(words))


def score_in_blocks(engine: Engine, rows: list, block: int = 512) -> list:
    """``engine.score_rows`` in blocks, logging progress (a full test set takes minutes on CPU)."""
    out = []
    for s in range(0, len(rows), block):
        out += engine.score_rows(rows[s : s + block])
        if len(rows) > block:
            log.info("scored %d/%d rows", len(out), len(rows))
    return out


def ensemble_probs(scores: torch.Tensor) -> torch.Tensor:
    """(K, n, L) label scores -> (K, n, L) probabilities over the labels, per prompt."""
    return scores.softmax(-1)


def classification_report(scores: torch.Tensor, examples, labels: list[str], names: list[str]) -> dict:
    """Metrics of (K, n, L) scores; K > 1 adds the ensemble (mean probability and majority vote)."""
    gold = [labels.index(e.label) for e in examples]
    probs = ensemble_probs(scores)  # (K, n, L)
    mean = probs.mean(0)  # (n, L)
    out = {"n": len(examples), **metrics.confusion_report(mean.argmax(-1).tolist(), gold, len(labels)), "labels": labels}
    if scores.shape[0] > 1:
        votes = torch.nn.functional.one_hot(scores.argmax(-1), len(labels)).sum(0).double()  # (n, L)
        vote_pred = (votes + 0.5 * mean).argmax(-1).tolist()  # ties broken by mean probability
        out["ensemble"] = {
            "mean_probability": metrics.confusion_report(mean.argmax(-1).tolist(), gold, len(labels)),
            "majority_vote": metrics.confusion_report(vote_pred, gold, len(labels)),
            "members": {n: metrics.confusion_report(scores[k].argmax(-1).tolist(), gold, len(labels))["accuracy"]
                        for k, n in enumerate(names)},
        }
    return out


def generation_report(engine: Engine, examples: list[D.Example], prompt: str | None, max_new_tokens: int) -> dict:
    """exact_match (greedy, first line, stripped), loss and perplexity of the target tokens."""
    from softprompt.inference.engine import ScoreRow

    tok = engine.lm.tokenizer
    rows, gen_idx = [], []
    for i, ex in enumerate(examples):
        ctx, tgt = list(ex.input_ids[: ex.source_len]), list(ex.input_ids[ex.source_len :])
        if not ctx and prompt is None:  # the plain model cannot predict a text's first token
            ctx, tgt = tgt[:1], tgt[1:]
        if tgt:
            rows.append(ScoreRow(tuple(ctx), (tuple(tgt),), prompt))
            gen_idx.append(i)
    if not rows:
        raise UserError("no example has a target token to score")
    res = score_in_blocks(engine, rows)
    n_tok = sum(r.n_tokens[0] for r in res)
    loss = -sum(r.logprobs[0] for r in res) / n_tok
    out = {"n": len(examples), **metrics.loss_metrics(loss), "target_tokens": n_tok}
    if all(ex.source_len > 0 for ex in examples):  # input -> target mode: exact match
        out["exact_match"] = _exact_match(engine, examples, prompt, max_new_tokens, tok)
    return out


def _exact_match(engine: Engine, examples, prompt, max_new_tokens, tok: Tokenizer) -> float:
    from softprompt.inference.engine import GenerateRequest

    reqs, golds = [], []
    for ex in examples:
        tgt = ex.input_ids[ex.source_len :]
        golds.append(tok.decode(tgt, skip_special_tokens=True).strip())
        cfg = GenerateConfig(max_new_tokens=min(max_new_tokens, len(tgt) + 4))
        reqs.append(GenerateRequest("", prompt, cfg, token_ids=tuple(ex.input_ids[: ex.source_len])))
    gens = engine.generate(reqs)
    hits = sum(g.text.strip().split("\n")[0].strip() == gold for g, gold in zip(gens, golds))
    return hits / max(1, len(examples))


def evaluate(engine: Engine, ecfg: EvalConfig, data_overrides: dict) -> dict:
    """``softprompt eval``: metrics of the plain model, one prompt, or an ensemble of prompts
    (a task's files are under the data root of the engine's store)."""
    t0 = time.perf_counter()
    root = engine.store.data_root if engine.store else None
    cfg = data_config(engine, ecfg, data_overrides, root)
    examples = load_splits(engine.lm.tokenizer, cfg).test
    from_task = bool(ecfg.task) and not data_overrides.get("path")
    prompts: list[str | None] = list(ecfg.prompts) or [None]
    names = [p or "plain" for p in prompts]
    if cfg.verbalizer:
        labels = list(cfg.verbalizer)
        scores = engine_label_scores(engine, examples, [cfg.verbalizer[k] for k in labels], prompts,
                                     ecfg.length_normalize)
        out = classification_report(scores, examples, labels, names)
    else:
        if len(prompts) > 1:
            raise UserError("prompt ensembles need a classification task (a --verbalizer)")
        out = generation_report(engine, examples, prompts[0], ecfg.max_new_tokens)
    dtype = str(engine.lm.model.dtype).removeprefix("torch.")  # --dtype auto's pick shows here
    out.update({"prompts": names, "task": ecfg.task, "dtype": dtype, "split": ecfg.split if from_task else None,
                "data": shown_path(cfg.files.test) if cfg.files and cfg.files.test else None,
                "template": cfg.template, "length_normalize": ecfg.length_normalize,
                "seconds": round(time.perf_counter() - t0, 2)})
    return out
