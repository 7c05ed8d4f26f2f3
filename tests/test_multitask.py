"""Multitask prompt tuning: the mixed-task forward is exact (== per-row naive, == per-task
batches summed), training through the one loop stores ordinary per-task prompts."""

from __future__ import annotations

import pytest
import torch

from softprompt import data as D
from softprompt import models
from softprompt.config import PromptConfig, TrainConfig, UserError
from softprompt.forward import mixed_prefix_loss, naive_loss, prefix_loss
from softprompt.inference.engine import Engine, ScoreRequest
from softprompt.training import multitask as MT


def _batch(lm, seed: int = 0):
    """Four right-padded rows of different lengths, targets on the last tokens."""
    g = torch.Generator().manual_seed(seed)
    V = lm.model.config.vocab_size
    lens = [7, 4, 6, 5]
    exs = []
    for n in lens:
        ids = torch.randint(3, V, (n,), generator=g).tolist()
        labels = [D.IGNORE] * (n - 2) + ids[-2:]
        exs.append(D.Example(input_ids=ids, labels=labels, source_len=n - 2))
    return D.collate(exs, lm.tokenizer.pad_token_id)


def _prompts(lm, K: int = 3, N: int = 4) -> torch.Tensor:
    H = lm.model.config.hidden_size
    return (torch.randn(K, N, H, generator=torch.Generator().manual_seed(1)) * 0.5).requires_grad_(True)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_prefix_loss_equals_naive_per_row_prompts(tiny_model_dir, sp_home, arch):
    lm = models.load(str(tiny_model_dir(arch)))
    b = _batch(lm)
    ids = torch.tensor([2, 0, 2, 1])
    P = _prompts(lm)
    fast = mixed_prefix_loss(lm.model, P, ids, b["input_ids"], b["attention_mask"], b["labels"])
    (g_fast,) = torch.autograd.grad(fast, P)
    ref = naive_loss(lm.model, P[ids], b["input_ids"], b["attention_mask"], b["labels"])
    (g_ref,) = torch.autograd.grad(ref, P)
    assert abs(fast.item() - ref.item()) < 1e-5 * abs(ref.item())
    assert torch.allclose(g_fast, g_ref, rtol=1e-4, atol=1e-7)
    assert g_fast[0].abs().sum() > 0 and g_fast[1].abs().sum() > 0  # every used task gets gradient


def test_labels_on_the_first_token_use_each_rows_own_last_virtual_token(tiny_lm):
    b = _batch(tiny_lm)
    b["labels"][:, 0] = b["input_ids"][:, 0]  # targets predicted by the last virtual token
    ids = torch.tensor([0, 1, 1, 0])
    P = _prompts(tiny_lm, K=2)
    fast = mixed_prefix_loss(tiny_lm.model, P, ids, b["input_ids"], b["attention_mask"], b["labels"])
    ref = naive_loss(tiny_lm.model, P[ids], b["input_ids"], b["attention_mask"], b["labels"])
    assert abs(fast.item() - ref.item()) < 1e-5 * abs(ref.item())


def test_mixed_batch_gradient_equals_per_task_batches_summed(tiny_lm):
    H = tiny_lm.model.config.hidden_size
    m = MT.MultitaskMethod(tiny_lm.model, torch.randn(4, H) * 0.5, n_tasks=3)
    with torch.no_grad():  # tasks must really differ, or the check proves little
        m.u.add_(torch.randn_like(m.u) * 0.3)
        m.v.add_(torch.randn_like(m.v) * 0.3)
    b = _batch(tiny_lm)
    ids = torch.tensor([2, 0, 2, 0])
    b["task_ids"] = ids
    args = lambda rows: (b["input_ids"][rows], b["attention_mask"][rows], b["labels"][rows])  # noqa: E731
    mixed = mixed_prefix_loss(tiny_lm.model, m.prompts(), ids, *args(slice(None)), reduction="sum")
    grads_mixed = torch.autograd.grad(mixed, m.parameters())
    total, per_task = 0.0, []
    for k in (0, 2):
        rows = (ids == k).nonzero()[:, 0]
        count = int((b["labels"][rows][:, 1:] != D.IGNORE).sum())
        loss_k = prefix_loss(tiny_lm.model, m.prompts()[k], *args(rows)) * count  # mean -> sum
        per_task.append(loss_k.item())
        total = total + loss_k
    assert abs(per_task[0] - per_task[1]) > 1e-3  # the two tasks' losses differ
    grads_sep = torch.autograd.grad(total, m.parameters())
    assert abs(mixed.item() - total.item()) < 1e-5 * abs(total.item())
    for a, s in zip(grads_mixed, grads_sep, strict=True):
        assert torch.allclose(a, s, rtol=1e-4, atol=1e-6)
    assert grads_mixed[1][1].abs().sum() == 0  # task 1 is not in the batch: its u gets nothing
    assert grads_mixed[1][0].abs().sum() > 0


def test_method_loss_uses_the_task_ids_of_the_batch(tiny_lm):
    H = tiny_lm.model.config.hidden_size
    m = MT.MultitaskMethod(tiny_lm.model, torch.randn(4, H), n_tasks=2)
    b = _batch(tiny_lm)
    b["task_ids"] = torch.tensor([0, 1, 1, 0])
    fast = m.loss(b)
    naive = MT.MultitaskMethod(tiny_lm.model, m.shared.detach(), n_tasks=2, fast=False).loss(b)
    assert abs(fast.item() - naive.item()) < 1e-5 * abs(naive.item())


@pytest.mark.slow
def test_train_multitask_stores_shared_and_per_task_prompts(tiny_lm, toy_tasks, sp_store):
    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    mcfg = MT.MultitaskConfig(tasks=(str(toy_tasks["mood"]), str(toy_tasks["pets"])), per_task=16, eval_per_task=8)
    res = MT.train_multitask(tiny_lm, mcfg, PromptConfig(num_virtual_tokens=4), TrainConfig(epochs=2, lr=0.1), name="mt", store=sp_store)
    assert sorted(res.paths) == ["mt", "mt-mood", "mt-pets"]
    assert res.fit.best is not None and "eval_acc_mood" in res.fit.epochs[0]
    mood = sp_store.load_prompt("mt-mood")
    assert mood.meta["task"] == "mood" and mood.meta["verbalizer"] == {"0": "negative", "1": "positive"}
    assert torch.equal(mood.embeddings, res.prompts["mood"])
    assert not torch.equal(res.prompts["mood"], res.prompts["pets"])  # each task got its own prompt
    assert sp_store.load_prompt("mt").meta["kind"] == "multitask-shared"
    # served by the engine like any other prompt, from the store, in one mixed batch
    eng = Engine(tiny_lm, store=sp_store)
    reqs = [ScoreRequest("Review: fine\nSentiment:", ("negative", "positive"), "mt-mood"),
            ScoreRequest("Text: my cat\nAnimal:", ("dog", "cat"), "mt-pets")]
    mixed = eng.score(reqs)
    alone = [eng.score([r])[0] for r in reqs]
    for m, a in zip(mixed, alone, strict=True):
        assert m.logprobs == pytest.approx(a.logprobs, rel=1e-5)
    eng.add_prompt("direct", res.prompts["mood"])
    direct = eng.score([ScoreRequest(reqs[0].text, reqs[0].targets, "direct")])[0]
    assert direct.logprobs == pytest.approx(mixed[0].logprobs, rel=1e-5)
    for k, v in tiny_lm.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the batches really mixed tasks: some training batch held rows of both
    mix = [e for t in ("mood", "pets") for e in MT.load_task(tiny_lm.tokenizer, str(toy_tasks[t]), MT.task_config(str(toy_tasks[t]), sp_store.data_root), 16, 8, 0, 0 if t == "mood" else 1).train]
    batches = D.bucketed_batches(mix, 8, 0, 0)
    assert any(len({mix[i].task for i in b}) == 2 for b in batches)


def test_multitask_config_errors():
    with pytest.raises(UserError, match="at least two"):
        MT.MultitaskConfig(tasks=("sst2",))
    with pytest.raises(UserError, match="twice"):
        MT.MultitaskConfig(tasks=("sst2", "sst2"))
