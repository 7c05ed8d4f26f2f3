"""Metrics: classification by label-word scoring, exact match, loss and perplexity.

Classification compares the log-likelihood of every label word's full token sequence after
the input (optionally divided by its token count), never just the first token. The scorer is a
function ``score(batch) -> (B,)`` of summed target log-probabilities, so the same code serves
training-time evaluation, the engine and any method (prompt, LoRA, full fine-tuning).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from softprompt import data as D

Scorer = Callable[[dict], torch.Tensor]


def candidate_examples(tokenizer, ex: D.Example, words: list[str]) -> list[D.Example]:
    """One example per label word: the example's input followed by that word."""
    src = ex.input_ids[: ex.source_len]
    out = []
    for w in words:
        tgt = tokenizer(D.target_text(ex.source_text, w), add_special_tokens=False)["input_ids"]
        out.append(D.Example(input_ids=src + tgt, labels=[D.IGNORE] * len(src) + tgt, source_len=len(src)))
    return out


def label_scores(score: Scorer, tokenizer, examples: list[D.Example], words: list[str], pad_id: int,
                 batch_size: int = 16, normalize: bool = False) -> torch.Tensor:
    """(n_examples, n_labels) log-likelihood of each label word, batched over all candidates."""
    cands = [c for ex in examples for c in candidate_examples(tokenizer, ex, words)]
    out = []
    for s in range(0, len(cands), batch_size):
        chunk = cands[s : s + batch_size]
        lp = score(D.collate(chunk, pad_id))
        if normalize:
            lp = lp / torch.tensor([sum(1 for t in c.labels if t != D.IGNORE) for c in chunk], dtype=lp.dtype)
        out.append(lp)
    return torch.cat(out).view(len(examples), len(words))


def accuracy_report(scores: torch.Tensor, examples: list[D.Example], labels: list[str]) -> dict:
    """accuracy and confusion matrix (rows = gold, columns = predicted, in ``labels`` order)."""
    pred = scores.argmax(-1).tolist()
    gold = [labels.index(e.label) for e in examples]
    conf = [[0] * len(labels) for _ in labels]
    for g, p in zip(gold, pred):
        conf[g][p] += 1
    acc = sum(g == p for g, p in zip(gold, pred)) / max(1, len(gold))
    return {"accuracy": acc, "confusion": conf, "labels": labels}


def classify_metrics(score: Scorer, tokenizer, examples, verbalizer: dict[str, str], pad_id: int,
                     batch_size: int = 16, normalize: bool = False) -> dict:
    labels = list(verbalizer)
    s = label_scores(score, tokenizer, examples, [verbalizer[k] for k in labels], pad_id, batch_size, normalize)
    return accuracy_report(s, examples, labels)


def loss_metrics(mean_loss: float) -> dict:
    return {"loss": mean_loss, "perplexity": math.exp(min(mean_loss, 50.0))}
