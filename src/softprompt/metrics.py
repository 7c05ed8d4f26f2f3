"""Metrics shared by training, evaluation and the experiments: label-word scoring, accuracy and
confusion, loss and perplexity.

Classification compares the log-likelihood of every label word's full token sequence after the
input (optionally divided by its token count), never just the first token. A scorer
``score(batch) -> (B,)`` gives summed target log-probabilities for any method (prompt, LoRA,
full fine-tuning); with ``batch["choices"]`` it gives (B, L) single-token choice scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from softprompt import data as D

if TYPE_CHECKING:
    from softprompt.models import Tokenizer

Scorer = Callable[[dict], torch.Tensor]


def candidate_examples(tokenizer: Tokenizer, ex: D.Example, words: list[str]) -> list[D.Example]:
    """One example per label word: the example's input followed by that word."""
    src = ex.input_ids[: ex.source_len]
    out = []
    for w in words:
        tgt = D.encode(tokenizer, D.target_text(ex.source_text, w))
        out.append(D.Example(input_ids=src + tgt, labels=[D.IGNORE] * len(src) + tgt, source_len=len(src)))
    return out


def label_scores(score: Scorer, tokenizer: Tokenizer, examples: list[D.Example], words: list[str], pad_id: int,
                 batch_size: int = 16, normalize: bool = False, fast: bool = True) -> torch.Tensor:
    """(n_examples, n_labels) log-likelihood of each label word, batched over all candidates.

    Fast path, exact (tests/test_eval.py): when every label word is one token after every input,
    all label words are read off one distribution, so each example is one row instead of one row
    per label word (the scorer gets ``choices``, see ``forward.sequence_logprobs``). ``fast=False``
    scores every (example, label word) as its own row, the reference.
    """
    single = single_token_choices(tokenizer, examples, words) if fast else None
    if single is not None:
        out = []
        for s in range(0, len(examples), batch_size):
            rows, choices = single[0][s : s + batch_size], single[1][s : s + batch_size]
            out.append(score({**D.collate(rows, pad_id), "choices": choices}))
        return torch.cat(out).view(len(examples), len(words))
    cands = [c for ex in examples for c in candidate_examples(tokenizer, ex, words)]
    out = []
    for s in range(0, len(cands), batch_size):
        chunk = cands[s : s + batch_size]
        lp = score(D.collate(chunk, pad_id))
        if normalize:
            lp = lp / torch.tensor([sum(1 for t in c.labels if t != D.IGNORE) for c in chunk], dtype=lp.dtype)
        out.append(lp)
    return torch.cat(out).view(len(examples), len(words))


def single_token_choices(tokenizer: Tokenizer, examples: list[D.Example], words: list[str]):
    """(one row per example, (n, L) label token ids) when every label word is a single token after
    every input (which then has at least one token), else None."""
    rows, choices = [], []
    for ex in examples:
        ids = label_targets(tokenizer, ex, words)
        if ex.source_len < 1 or any(len(t) != 1 for t in ids):
            return None
        src = ex.input_ids[: ex.source_len]
        rows.append(D.Example(input_ids=src + [ids[0][0]], labels=[D.IGNORE] * len(src) + [ids[0][0]], source_len=len(src)))
        choices.append([t[0] for t in ids])
    return rows, torch.tensor(choices, dtype=torch.long)


def accuracy_report(scores: torch.Tensor, examples: list[D.Example], labels: list[str]) -> dict:
    """accuracy and confusion matrix (rows = gold, columns = predicted, in ``labels`` order)."""
    gold = [labels.index(e.label) for e in examples]
    return {**confusion_report(scores.argmax(-1).tolist(), gold, len(labels)), "labels": labels}


def classify_metrics(score: Scorer, tokenizer: Tokenizer, examples, verbalizer: dict[str, str], pad_id: int,
                     batch_size: int = 16, normalize: bool = False) -> dict:
    labels = list(verbalizer)
    s = label_scores(score, tokenizer, examples, [verbalizer[k] for k in labels], pad_id, batch_size, normalize)
    return accuracy_report(s, examples, labels)


def loss_metrics(mean_loss: float) -> dict:
    return {"loss": mean_loss, "perplexity": math.exp(min(mean_loss, 50.0))}



def label_targets(tokenizer: Tokenizer, ex: D.Example, words: list[str]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(D.encode(tokenizer, D.target_text(ex.source_text, w)))
                 for w in words)


def confusion_report(pred: list[int], gold: list[int], n_labels: int) -> dict:
    """accuracy and confusion matrix (rows = gold, columns = predicted) of label indices."""
    conf = [[0] * n_labels for _ in range(n_labels)]
    for g, p in zip(gold, pred, strict=True):
        conf[g][p] += 1
    return {"accuracy": sum(g == p for g, p in zip(gold, pred, strict=True)) / max(1, len(gold)), "confusion": conf}
