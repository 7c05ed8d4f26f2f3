"""Seeing inside a soft prompt: nearest vocabulary tokens, norms, similarity, token importance.

* **Nearest tokens**: for each virtual token, the vocabulary embeddings closest by cosine
  (Lester et al. 2021 read learned prompts this way; a prompt initialised from a text starts
  exactly on that text's tokens, cosine 1).
* **Norm** of each virtual token next to the vocabulary's typical norm: trained prompts often
  drift far from the embedding manifold, which nearest tokens alone would hide.
* **Similarity** between stored prompts: cosine of their mean virtual tokens (SPoT's "average
  tokens" measure; works across different N), as a matrix and a PNG heatmap.
* **Importance** of each virtual token: the drop in the evaluation metric when that token is
  replaced by the mean vocabulary embedding (accuracy for classification prompts, loss for
  language-modelling ones).

A deep prompt (keys/values at every layer) has no input embeddings to compare with the
vocabulary: its report gives each virtual position's key and value norms (mean over layers)
next to the norms of the model's real keys/values on common tokens, and its similarity to other
deep prompts of the same model (cosine of their mean positions); no nearest tokens, no importance.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from softprompt import data as D
from softprompt import metrics
from softprompt.config import UserError
from softprompt.forward import sequence_logprobs
from softprompt.prompt import embedding_matrix
from softprompt.splits import load_splits
from softprompt.store import Store, check_shape
from softprompt.training.transfer import mean_loss

if TYPE_CHECKING:
    from softprompt.models import LoadedModel, Model, Tokenizer

log = logging.getLogger(__name__)


def nearest_tokens(model: Model, tokenizer: Tokenizer, prompt: torch.Tensor, k: int = 5) -> list[list[tuple[str, float]]]:
    """Per virtual token, the ``k`` vocabulary tokens with the highest cosine similarity."""
    emb = F.normalize(embedding_matrix(model).float(), dim=-1)  # (V, H)
    sims = F.normalize(prompt.float(), dim=-1) @ emb.T  # (N, V)
    top = sims.topk(k, dim=-1)
    return [[(tokenizer.convert_ids_to_tokens(int(i)), float(s)) for s, i in zip(vals, ids, strict=True)]
            for vals, ids in zip(top.values, top.indices, strict=True)]


def norms(prompt: torch.Tensor) -> list[float]:
    return prompt.float().norm(dim=-1).tolist()  # (N,)


def similarity(prompts: dict[str, torch.Tensor]) -> torch.Tensor:
    """(P, P) cosine similarity of each prompt's mean virtual token."""
    means = F.normalize(torch.stack([p.float().mean(0) for p in prompts.values()]), dim=-1)  # (P, H)
    return means @ means.T


@torch.no_grad()
def importance(model: Model, tokenizer: Tokenizer, prompt: torch.Tensor, examples: list[D.Example], verbalizer: dict | None,
               batch_size: int = 16) -> tuple[str, float, list[float]]:
    """(metric name, metric with the whole prompt, drop per virtual token when it is ablated)."""
    fill = embedding_matrix(model).float().mean(0)  # (H,): the mean vocabulary embedding
    pad = tokenizer.pad_token_id

    def metric(p: torch.Tensor) -> float:
        if verbalizer:
            score = lambda b: sequence_logprobs(model, p, **b)  # noqa: E731
            return metrics.classify_metrics(score, tokenizer, examples, verbalizer, pad, batch_size)["accuracy"]
        return -mean_loss(model, p, examples, pad, batch_size)  # higher is better

    base = metric(prompt)
    drops = []
    for i in range(prompt.shape[0]):
        ablated = prompt.float().clone()
        ablated[i] = fill
        drops.append(base - metric(ablated))
    return ("accuracy" if verbalizer else "-loss"), base, drops


def eval_examples(tokenizer: Tokenizer, meta: dict, limit: int | None, root: Path | None = None) -> tuple[list[D.Example], dict | None]:
    """The evaluation rows a stored prompt's metadata points at (its task's dev split)."""
    from softprompt import recipes
    from softprompt.config import DataConfig

    data, seed = meta.get("data") or {}, int(meta.get("seed") or 0)
    if meta.get("task"):
        try:
            cfg = recipes.resolve(DataConfig(), meta["task"], root)
            dev = load_splits(tokenizer, cfg, seed).dev
        except UserError as e:
            raise UserError(f"importance: cannot load the prompt's task {meta['task']!r} ({e}); use --no-importance") from None
    elif data.get("path"):
        cfg = DataConfig.from_dict({**data, "files": None})
        dev = load_splits(tokenizer, cfg, seed).dev
    else:
        raise UserError("importance: the prompt's metadata names no task or data file; use --no-importance")
    if not dev:
        raise UserError("importance: the prompt's task has no evaluation rows; use --no-importance")
    return dev[:limit], cfg.verbalizer


def user_examples(tokenizer: Tokenizer, name: str, meta: dict, task: str | None, user: dict,
                  limit: int | None, root: Path | None = None) -> tuple[list[D.Example], dict | None]:
    """Importance rows from the user's data flags (``--data`` / ``--task``: its ``eval`` split,
    else its ``test`` split; settings the prompt's metadata lacks from the flags), as
    ``softprompt eval`` would read them."""
    from softprompt import evaluate

    cfg = evaluate.merged_data_config({name: meta}, task, user, root, ("eval", "test"), limit)
    return load_splits(tokenizer, cfg).test, cfg.verbalizer


def importance_rows(tokenizer: Tokenizer, name: str, meta: dict, task: str | None, user: dict | None,
                    limit: int | None, root: Path | None = None) -> tuple[list[D.Example] | None, dict | None, str | None]:
    """(rows, verbalizer, None), or (None, None, why) when no data is known for the prompt: then
    importance is skipped with that note instead of failing the whole report."""
    if task or (user or {}).get("path"):
        return (*user_examples(tokenizer, name, meta, task, user or {}, limit, root), None)
    if not meta.get("task") and not (meta.get("data") or {}).get("path"):
        return None, None, ("importance skipped: the prompt's metadata names no task or data file "
                            "(an imported prompt?); give --data (and --template/--target-column or --text-column) or --task")
    try:
        return (*eval_examples(tokenizer, meta, limit, root), None)
    except UserError as e:
        return None, None, f"importance skipped: {str(e).removeprefix('importance: ').removesuffix('; use --no-importance')}"


def inspect_prompt(lm: LoadedModel, name: str, against: list[str] | None = None, top_k: int = 5, eval_limit: int | None = 64,
                   with_importance: bool = True, task: str | None = None, data: dict | None = None, *,
                   store: Store) -> dict:
    """The JSON report of one prompt of ``store`` (see the module docstring). Importance is measured
    on ``task`` / ``data`` (DataConfig fields from the user) when given, else on the data the
    prompt's metadata names; without either it is skipped with a note (``report["notes"]``)."""
    sp = store.load_prompt(name)
    if sp.kind == "deep":
        return inspect_deep(lm, store, sp, against)
    prompt = sp.embeddings.float()
    if prompt.shape[1] != embedding_matrix(lm.model).shape[1]:
        raise UserError(f"prompt {name!r} has hidden size {prompt.shape[1]}, the model has {embedding_matrix(lm.model).shape[1]}")
    vocab_norm = embedding_matrix(lm.model).float().norm(dim=-1)
    near = nearest_tokens(lm.model, lm.tokenizer, prompt, top_k)
    report = {
        "name": name, "shape": list(prompt.shape), "task": sp.meta.get("task"),
        "vocab_norm": {"mean": float(vocab_norm.mean()), "std": float(vocab_norm.std())},
        "tokens": [{"index": i, "norm": n, "nearest": [{"token": t, "cosine": c} for t, c in nn]}
                   for i, (n, nn) in enumerate(zip(norms(prompt), near, strict=True))],
    }
    names = [name] + [a for a in (against or []) if a != name]
    if len(names) > 1:
        sims = similarity({n: store.load_prompt(n).shallow("similarity with a shallow prompt") for n in names})
        report["similarity"] = {"names": names, "matrix": sims.tolist()}
    examples, verbalizer, note = (importance_rows(lm.tokenizer, name, sp.meta, task, data, eval_limit, store.data_root)
                                  if with_importance else (None, None, None))
    if note:
        report["notes"] = [note]
    if examples:
        metric, base, drops = importance(lm.model, lm.tokenizer, prompt, examples, verbalizer)
        report["importance"] = {"metric": metric, "full_prompt": base, "rows": len(examples), "drop": drops}
        for t, d in zip(report["tokens"], drops, strict=True):
            t["importance"] = d
    return report


def inspect_deep(lm: LoadedModel, store: Store, sp, against: list[str] | None) -> dict:
    """The report of a deep prompt: key/value norms per position against the model's, similarity."""
    from softprompt.prompt import KV_STATS_TOKENS, init_vocab, kv_of_embeddings

    check_shape(sp, lm.hidden_size, lm.kv_shape)
    kv = sp.kv.float()  # (L, 2, kv, N, d)
    per = kv.permute(3, 0, 1, 2, 4).flatten(3).norm(dim=-1).mean(1)  # (N, 2): mean over layers of |key|, |value|
    ref = kv_of_embeddings(lm.model, init_vocab(lm.model, KV_STATS_TOKENS, torch.Generator().manual_seed(0)))
    ref_norm = ref.permute(3, 0, 1, 2, 4).flatten(3).norm(dim=-1).mean(1)  # (T, 2)
    report = {
        "name": sp.name, "kind": "deep", "shape": list(kv.shape), "task": sp.meta.get("task"),
        "model_kv_norm": {"key": float(ref_norm[:, 0].mean()), "value": float(ref_norm[:, 1].mean())},
        "tokens": [{"index": i, "key_norm": float(k), "value_norm": float(v)} for i, (k, v) in enumerate(per.tolist())],
    }
    names = [sp.name] + [a for a in (against or []) if a != sp.name]
    if len(names) > 1:
        means = {}
        for n in names:
            other = sp if n == sp.name else store.load_prompt(n)
            if other.kind != "deep" or (other.kv.shape[:3], other.kv.shape[4]) != (sp.kv.shape[:3], sp.kv.shape[4]):
                raise UserError(f"--against {n}: similarity needs deep prompts of the same model as {sp.name!r}")
            means[n] = other.kv.float().mean(3).flatten()  # mean position, every layer's keys and values
        sims = similarity({n: m.unsqueeze(0) for n, m in means.items()})
        report["similarity"] = {"names": names, "matrix": sims.tolist()}
    return report


def heatmap(names: list[str], matrix: list[list[float]], path: Path) -> Path:
    """Write the similarity matrix as a PNG heatmap."""
    from softprompt.provenance import pyplot, save_figure

    plt = pyplot()
    n = len(names)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * n, 1.0 + 0.6 * n))
    im = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="cosine of mean virtual tokens")
    ax.set_title("prompt similarity")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def table(report: dict) -> list[str]:
    """The report as terminal lines."""
    if report.get("kind") == "deep":
        return deep_table(report)
    vn = report["vocab_norm"]
    out = [f"prompt {report['name']}  {report['shape'][0]} x {report['shape'][1]}  task {report['task'] or '-'}",
           f"vocabulary embedding norm {vn['mean']:.3f} +- {vn['std']:.3f}", ""]
    has_imp = "importance" in report
    head = f"{'tok':>4} {'norm':>7} " + (f"{'drop':>7} " if has_imp else "") + "nearest vocabulary tokens (cosine)"
    out += [head, "-" * len(head)]
    for t in report["tokens"]:
        near = "  ".join(f"{n['token']!r} {n['cosine']:.2f}" for n in t["nearest"])
        imp = f"{t['importance']:>+7.3f} " if has_imp else ""
        out.append(f"{t['index']:>4} {t['norm']:>7.3f} {imp}{near}")
    if has_imp:
        imp = report["importance"]
        out += ["", f"{imp['metric']} with the whole prompt: {imp['full_prompt']:.4f} on {imp['rows']} rows; "
                f"drop = that minus the metric with the token replaced by the mean embedding"]
    out += [""] + report["notes"] if report.get("notes") else []
    return out + similarity_lines(report)


def deep_table(report: dict) -> list[str]:
    """A deep prompt's report as terminal lines."""
    ref = report["model_kv_norm"]
    out = [f"deep prompt {report['name']}  layers x K/V x kv heads x N x d = {' x '.join(map(str, report['shape']))}  "
           f"task {report['task'] or '-'}",
           f"the model's own key norm {ref['key']:.3f}, value norm {ref['value']:.3f} (mean over layers, common tokens)",
           "", f"{'pos':>4} {'|key|':>8} {'|value|':>8}"]
    out += [f"{t['index']:>4} {t['key_norm']:>8.3f} {t['value_norm']:>8.3f}" for t in report["tokens"]]
    return out + similarity_lines(report)


def similarity_lines(report: dict) -> list[str]:
    out: list[str] = []
    if "similarity" in report:
        names, m = report["similarity"]["names"], report["similarity"]["matrix"]
        w = max(len(n) for n in names)
        out += ["", "similarity (cosine of mean virtual tokens)", " " * (w + 1) + " ".join(f"{n[:7]:>7}" for n in names)]
        out += [f"{n:<{w}} " + " ".join(f"{v:>7.2f}" for v in row) for n, row in zip(names, m, strict=True)]
    return out
