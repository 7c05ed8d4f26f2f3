"""The training loop: base weights untouched, loss goes down, resume == uninterrupted,
non-finite losses stop training and keep a good prompt, fast and naive forward train alike."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import interrupt_at_epoch, sharpen

from softprompt import metrics, store
from softprompt.config import DataConfig, PromptConfig, TrainConfig, UserError
from softprompt.forward import sequence_logprobs
from softprompt.splits import load_splits
from softprompt.training import methods
from softprompt.training import tune as TR
from softprompt.training.loop import StopReason

VERB = {"0": "negative", "1": "positive"}


def target_cfg(csv, **kw) -> DataConfig:
    return DataConfig(
        path=str(csv), template="{text}", target_column="label", verbalizer=VERB, **kw
    )


def test_base_weights_unchanged_bit_for_bit(tiny_lm, toy_csv, sp_store):
    before = {k: v.detach().clone() for k, v in tiny_lm.model.state_dict().items()}
    res = TR.train(
        tiny_lm,
        target_cfg(toy_csv, limit=24),
        PromptConfig(num_virtual_tokens=4),
        TrainConfig(epochs=1, batch_size=8, lr=0.3),
        name="weights", store=sp_store
    )
    assert res.stopped == "completed" and len(res.history) >= 2
    init = TR.initial_prompt(tiny_lm, PromptConfig(num_virtual_tokens=4), target_cfg(toy_csv), 0, store=sp_store)
    assert not torch.equal(res.prompt, init)  # the prompt did move
    after = tiny_lm.model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert all(not p.requires_grad and p.grad is None for p in tiny_lm.model.parameters())
    assert not tiny_lm.model.training


@pytest.mark.slow
def test_loss_goes_down_and_accuracy_goes_up(tiny_lm, toy_csv, sp_store):
    lm = sharpen(tiny_lm)
    cfg = target_cfg(toy_csv, dev_fraction=0.0)
    # fp32: the same run on every machine (auto picks bf16 where the CPU has it; test_precision.py covers bf16)
    tcfg = TrainConfig(lr=0.3, epochs=5, batch_size=16, seed=0, patience=None, warmup_ratio=0.06, precision="fp32")
    pcfg = PromptConfig(num_virtual_tokens=4, init="vocab")
    examples = load_splits(lm.tokenizer, cfg).train
    probe = examples[:8]  # both classes (the toy file alternates them)
    assert {e.label for e in probe} == {"0", "1"}

    def quality(prompt):
        scorer = lambda b: sequence_logprobs(lm.model, prompt, **b)  # noqa: E731
        scores = metrics.label_scores(
            scorer, lm.tokenizer, probe, list(VERB.values()), lm.tokenizer.pad_token_id
        )
        gold = torch.tensor([int(e.label) for e in probe])
        margin = (scores.gather(1, gold[:, None]) - scores.gather(1, 1 - gold[:, None])).mean()
        acc = metrics.accuracy_report(scores, probe, list(VERB))["accuracy"]
        return float(margin), acc

    before = quality(TR.initial_prompt(lm, pcfg, cfg, tcfg.seed, store=sp_store))
    res = TR.train(lm, cfg, pcfg, tcfg, save=False, store=sp_store)
    after = quality(res.prompt)
    losses = [e["train_loss"] for e in res.epochs]
    assert len(losses) == 5 and all(math.isfinite(v) for v in losses)
    # seeded run; observed 6.99 -> 3.54 (first -> last epoch mean), accuracy 0.5 -> 1.0
    assert losses[-1] < 0.8 * losses[0]
    assert after[0] > before[0]  # the right label word gained on the wrong one
    assert after[1] > before[1]


def test_loss_goes_down_lm_mode_plain_tiny_model(tiny_lm, tmp_path, sp_store):
    """LM mode on one repeated sentence with the unmodified tiny model."""
    p = tmp_path / "rep.csv"
    p.write_text("text\n" + "the movie was good and the actors were great\n" * 16)
    res = TR.train(
        tiny_lm,
        DataConfig(path=str(p), text_column="text", dev_fraction=0.0),
        PromptConfig(num_virtual_tokens=4),
        TrainConfig(epochs=4, batch_size=8, lr=0.3, patience=None),
        save=False, store=sp_store
    )
    losses = [e["train_loss"] for e in res.epochs]
    # near-uniform model (ln 320 = 5.77): the prompt can only move the loss a little; observed ~0.1
    assert losses[-1] < losses[0] - 0.05
    assert losses == sorted(losses, reverse=True)


@pytest.mark.slow
def test_resumed_equals_uninterrupted(tiny_lm, toy_csv, monkeypatch, sp_store):
    cfg = target_cfg(toy_csv, limit=24)  # 22 train rows, 2 dev rows (eval with accuracy each epoch)
    pcfg = PromptConfig(num_virtual_tokens=4)
    tcfg = TrainConfig(epochs=4, batch_size=8, lr=0.3, patience=2)
    full = TR.train(tiny_lm, cfg, pcfg, tcfg, name="full", store=sp_store)
    assert full.stopped == "completed" and len(full.epochs) == 4 and full.n_eval > 0

    undo = interrupt_at_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        TR.train(tiny_lm, cfg, pcfg, tcfg, name="part", store=sp_store)
    undo()
    assert "part" not in sp_store.list_prompts()  # nothing half-written in the store
    ckpt = store.load_checkpoint(sp_store.run_dir("part") / "checkpoint")
    assert ckpt is not None and ckpt[1]["epoch"] == 2

    with pytest.raises(UserError, match="differ"):
        TR.train(
            tiny_lm,
            cfg,
            pcfg,
            TrainConfig(epochs=4, batch_size=8, lr=0.2, patience=2),
            name="part",
            resume=True, store=sp_store
        )
    resumed = TR.train(tiny_lm, cfg, pcfg, tcfg, name="part", resume=True, store=sp_store)

    assert resumed.stopped == full.stopped
    assert torch.equal(resumed.prompt, full.prompt)
    assert resumed.history == full.history and len(full.history) == 4 * 3
    assert resumed.epochs == full.epochs
    assert resumed.best == full.best
    assert torch.equal(sp_store.load_prompt("part").embeddings, sp_store.load_prompt("full").embeddings)


def test_resuming_an_early_stopped_run_changes_nothing(tiny_lm, toy_csv, monkeypatch, sp_store):
    def scripted_evaluator(*args, **kwargs):
        calls = {"n": 0}

        def run():  # every epoch scores worse than the one before: stop after epoch 2 (patience 1)
            calls["n"] += 1
            return {"loss": float(calls["n"]), "score": -float(calls["n"])}

        return run

    monkeypatch.setattr(TR, "make_evaluator", scripted_evaluator)
    cfg, pcfg = target_cfg(toy_csv, limit=16), PromptConfig(num_virtual_tokens=4)
    tcfg = TrainConfig(epochs=4, batch_size=8, patience=1)
    full = TR.train(tiny_lm, cfg, pcfg, tcfg, name="early", store=sp_store)
    assert full.stopped == "early-stopped" and len(full.epochs) == 2
    again = TR.train(tiny_lm, cfg, pcfg, tcfg, name="early", resume=True, store=sp_store)
    assert again.stopped is StopReason.EARLY_STOPPED  # read back from the checkpoint as the enum
    assert again.history == full.history and torch.equal(again.prompt, full.prompt)


def test_resume_without_checkpoint_is_a_user_error(tiny_lm, toy_csv, sp_store):
    with pytest.raises(UserError, match="no checkpoint"):
        TR.train(
            tiny_lm,
            target_cfg(toy_csv, limit=8),
            PromptConfig(num_virtual_tokens=2),
            TrainConfig(epochs=1),
            name="never",
            resume=True, store=sp_store
        )
    assert sp_store.list_prompts() == []


def test_non_finite_loss_stops_and_keeps_last_good_prompt(tiny_lm, toy_csv, monkeypatch, sp_store):
    seen: list[torch.Tensor] = []
    real = methods.PromptMethod.loss

    def nan_on_third_call(self, batch):
        seen.append(self.prompt.detach().clone())
        if len(seen) == 3:
            return torch.tensor(float("nan"))
        return real(self, batch)

    monkeypatch.setattr(methods.PromptMethod, "loss", nan_on_third_call)
    # no eval set, so every loss call is a training step; 48 rows / 8 = 6 steps in epoch 1
    res = TR.train(
        tiny_lm,
        target_cfg(toy_csv, dev_fraction=0.0),
        PromptConfig(num_virtual_tokens=4),
        TrainConfig(epochs=2, batch_size=8, lr=0.3),
        name="nan", store=sp_store
    )
    assert res.stopped == "non-finite loss"
    assert len(seen) == 3 and len(res.history) == 2
    assert not torch.equal(seen[2], seen[0])  # two good steps moved the prompt
    assert torch.isfinite(res.prompt).all()
    # the kept prompt is the state right before the failing step (after the 2 good steps)
    assert torch.equal(res.prompt, seen[2])
    assert torch.equal(sp_store.load_prompt("nan").embeddings, seen[2])
    assert sp_store.load_prompt("nan").meta["metrics"]["stopped"] == "non-finite loss"


def test_non_finite_loss_with_eval_keeps_the_best_evaluated_prompt(tiny_lm, toy_csv, monkeypatch, sp_store):
    seen: list[torch.Tensor] = []
    real = methods.PromptMethod.loss

    def nan_on_first_step_of_epoch_2(self, batch):
        if torch.is_grad_enabled():  # training calls only; evaluation runs without grad
            seen.append(self.prompt.detach().clone())
            if len(seen) == 7:  # 44 train rows / 8 = 6 steps per epoch
                return torch.tensor(float("inf"))
        return real(self, batch)

    monkeypatch.setattr(methods.PromptMethod, "loss", nan_on_first_step_of_epoch_2)
    res = TR.train(
        tiny_lm,
        target_cfg(toy_csv),
        PromptConfig(num_virtual_tokens=4),
        TrainConfig(epochs=3, batch_size=8, lr=0.3),
        save=False, store=sp_store
    )
    assert res.stopped == "non-finite loss" and res.n_eval == 4
    assert len(res.epochs) == 1 and res.best is not None and len(res.history) == 6
    # end of epoch 1: the best evaluated state, and the one right before the bad step
    assert torch.equal(res.prompt, seen[6])


def test_fast_and_naive_forward_train_alike(tiny_lm, toy_csv, sp_store):
    """TrainConfig.fast_forward only changes speed: a few steps give the same prompt."""
    cfg = target_cfg(toy_csv, limit=16, dev_fraction=0.0)
    pcfg = PromptConfig(num_virtual_tokens=4)
    fast = TR.train(
        tiny_lm, cfg, pcfg, TrainConfig(epochs=1, batch_size=4, fast_forward=True, precision="fp32"), save=False, store=sp_store
    )
    naive = TR.train(
        tiny_lm, cfg, pcfg, TrainConfig(epochs=1, batch_size=4, fast_forward=False, precision="fp32"), save=False, store=sp_store
    )
    init = TR.initial_prompt(tiny_lm, pcfg, cfg, 0, store=sp_store)
    moved = float((fast.prompt - init).norm())
    assert moved > 0
    assert float((fast.prompt - naive.prompt).norm()) < 1e-3 * moved
    for a, b in zip(fast.history, naive.history, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4 * abs(b["loss"])


def test_grad_accum_groups_micro_batches_into_one_step(tiny_lm, toy_csv, sp_store):
    """grad_accum=2 halves the optimiser steps and each step sees both micro-batches' tokens."""
    cfg = target_cfg(toy_csv, limit=16, dev_fraction=0.0)
    pcfg = PromptConfig(num_virtual_tokens=4)
    a = TR.train(tiny_lm, cfg, pcfg, TrainConfig(epochs=1, batch_size=4, grad_accum=1), save=False, store=sp_store)
    b = TR.train(tiny_lm, cfg, pcfg, TrainConfig(epochs=1, batch_size=4, grad_accum=2), save=False, store=sp_store)
    assert len(a.history) == 4 and len(b.history) == 2
    assert sum(h["tokens"] for h in a.history) == sum(h["tokens"] for h in b.history) > 0
    assert not torch.equal(a.prompt, b.prompt)
