"""P-tuning v2's levers through the one training loop: prefix dropout (training only), a frozen
first virtual token (attention sink), warm-up + cosine schedule, per-group learning rates.

Relational checks: base weights unchanged bit for bit, resumed == uninterrupted, evaluation
deterministic and dropout-free, the frozen token bit-identical after training and outside the
trained parameters, the schedule equal to its formula."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_user_error, run_cli, target_cfg, uninterrupted_and_resumed

from softprompt import data as D
from softprompt.config import PromptConfig, TrainConfig, UserError
from softprompt.splits import load_splits
from softprompt.training import loop
from softprompt.training import tune as TR

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ["shallow", "deep"]


def a_batch(lm, csv, rows: int = 8) -> dict:
    examples = load_splits(lm.tokenizer, target_cfg(csv, dev_fraction=0.0)).train
    return D.collate(examples[:rows], lm.tokenizer.pad_token_id)


def method_for(lm, csv, **pkw):
    pcfg = PromptConfig(num_virtual_tokens=4, **pkw)
    init = TR.initial_prompt(lm, pcfg, target_cfg(csv), 0)
    return TR.prompt_method(lm, init, pcfg, fast=True, seed=0), init


@pytest.mark.parametrize("kind", KINDS)
def test_levers_train_only_the_prompt_and_keep_the_first_token(tiny_lm, toy_csv, kind, sp_store):
    before = {k: v.detach().clone() for k, v in tiny_lm.model.state_dict().items()}
    pcfg = PromptConfig(num_virtual_tokens=4, kind=kind, dropout=0.1, freeze_first=True)
    tcfg = TrainConfig(epochs=2, batch_size=8, lr=0.05, weight_decay=0.1, schedule="cosine", warmup_steps=2)
    res = TR.train(tiny_lm, target_cfg(toy_csv, limit=24), pcfg, tcfg, name="lev", store=sp_store)
    for k, v in tiny_lm.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in tiny_lm.model.parameters())
    init = TR.initial_prompt(tiny_lm, pcfg, target_cfg(toy_csv), 0)
    axis = 3 if kind == "deep" else 0
    first, rest = (lambda t: t.narrow(axis, 0, 1)), (lambda t: t.narrow(axis, 1, t.shape[axis] - 1))
    assert torch.equal(first(res.prompt), first(init))  # frozen, even under weight decay
    assert not torch.allclose(rest(res.prompt), rest(init))  # the others trained
    assert torch.equal(sp_store.load_prompt("lev").tensor, res.prompt)  # saved whole, sink in front, no dropout
    assert sp_store.load_prompt("lev").meta["prompt"]["freeze_first"] is True


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_first_token_gets_no_gradient(tiny_lm, toy_csv, kind):
    method, init = method_for(tiny_lm, toy_csv, kind=kind, freeze_first=True)
    axis = 3 if kind == "deep" else 0
    (p,) = method.parameters()
    assert p.shape[axis] == init.shape[axis] - 1  # the sink is no parameter
    seen = method.current().detach().requires_grad_(True)  # the whole prompt, as a leaf: its gradient
    method.loss(a_batch(tiny_lm, toy_csv)).backward()
    assert method.sink.grad is None and not method.sink.requires_grad
    assert p.grad is not None and p.grad.abs().sum() > 0
    from softprompt.forward import prompt_loss

    prompt_loss(tiny_lm.model, seen, a_batch(tiny_lm, toy_csv)).backward()
    assert seen.grad.narrow(axis, 0, 1).abs().sum() > 0  # the token matters to the loss ...
    assert torch.equal(method.current().narrow(axis, 0, 1), init.narrow(axis, 0, 1))  # ... yet never moves


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_only_while_training_and_deterministic_per_step(tiny_lm, toy_csv, kind):
    plain, _ = method_for(tiny_lm, toy_csv, kind=kind)
    drop, _ = method_for(tiny_lm, toy_csv, kind=kind, dropout=0.3)
    batch = a_batch(tiny_lm, toy_csv)
    with torch.no_grad():
        ref = plain.loss(batch)
        assert torch.equal(drop.loss(batch), ref)  # eval mode (no step): no dropout
        assert torch.equal(drop.score(batch), plain.score(batch))
        drop.set_step(3)
        a, a2 = drop.loss(batch), drop.loss(batch)  # two micro-batches of step 3: two masks
        drop.set_step(3)
        again = drop.loss(batch)
        drop.set_step(4)
        other = drop.loss(batch)
        drop.set_step(None)
        after = drop.loss(batch)
    assert not torch.equal(a, ref) and not torch.equal(a, a2) and not torch.equal(a, other)
    assert torch.equal(a, again)  # the mask is a function of (seed, step, micro-batch)
    assert torch.equal(after, ref)


def test_fit_leaves_the_method_in_eval_mode(tiny_lm, toy_csv):
    method, _ = method_for(tiny_lm, toy_csv, dropout=0.5)
    examples = load_splits(tiny_lm.tokenizer, target_cfg(toy_csv, dev_fraction=0.0, limit=16)).train
    seen = []
    evaluate = lambda: seen.append(method._step) or {"score": 0.0}  # noqa: E731
    loop.fit(method, examples, TrainConfig(epochs=2, batch_size=8), tiny_lm.tokenizer.pad_token_id, evaluate,
             progress=False)
    assert seen == [None, None] and method._step is None


@pytest.mark.parametrize("kind", KINDS)
def test_resumed_equals_uninterrupted_with_every_lever(tiny_lm, toy_csv, monkeypatch, kind, sp_store):
    cfg = target_cfg(toy_csv, limit=24)
    pcfg = PromptConfig(num_virtual_tokens=4, kind=kind, dropout=0.2, freeze_first=True)
    tcfg = TrainConfig(epochs=3, batch_size=8, lr=0.05, patience=None, schedule="cosine", warmup_steps=3)
    full, _ = uninterrupted_and_resumed(sp_store, tiny_lm, cfg, pcfg, tcfg, monkeypatch)
    nodrop = TR.train(tiny_lm, cfg, PromptConfig(num_virtual_tokens=4, kind=kind, freeze_first=True), tcfg, name="nd", store=sp_store)
    assert not torch.equal(nodrop.prompt, full.prompt)  # the dropout did act in training


def test_cosine_schedule_with_warmup_steps_follows_its_formula(tiny_lm, toy_csv, sp_store):
    total, warm, lr = 9, 3, 0.05
    res = TR.train(tiny_lm, target_cfg(toy_csv, limit=24), PromptConfig(num_virtual_tokens=4),
                   TrainConfig(steps=total, batch_size=8, lr=lr, schedule="cosine", warmup_steps=warm, patience=None),
                   save=False, store=sp_store)
    want = [lr * loop.lr_factor(s, total, warm, "cosine") for s in range(1, total + 1)]  # lr after each step
    assert [h["lr"] for h in res.history] == pytest.approx(want)
    assert loop.lr_factor(0, total, warm, "cosine") == pytest.approx(1 / 3)
    assert loop.lr_factor(warm, total, warm, "cosine") == pytest.approx(1.0)
    mid = warm + (total - warm) // 2
    assert loop.lr_factor(mid, total, warm, "cosine") == pytest.approx(0.5 * (1 - math.cos(math.pi * 0.5)))
    assert loop.lr_factor(total, total, warm, "cosine") == pytest.approx(0.0)
    assert loop.lr_factor(mid, total, warm, "linear") == pytest.approx(0.5)


def test_group_lr_sets_each_groups_lr_and_refuses_unknown_groups(tiny_lm, toy_csv):
    method, _ = method_for(tiny_lm, toy_csv)
    opt = loop.make_optimizer(method, TrainConfig(lr=0.05, group_lr={"prompt": 0.2}))
    assert [(g["name"], g["lr"]) for g in opt.param_groups] == [("prompt", 0.2)]
    with pytest.raises(UserError, match="--group-lr: no parameter group offset"):
        loop.make_optimizer(method, TrainConfig(group_lr={"offset": 1e-3}))


@pytest.mark.parametrize("extra,match", [
    (["--prompt-dropout", "1.5"], "--prompt-dropout must be in [0, 1)"),
    (["--schedule", "step"], "argument --schedule: invalid choice: 'step'"),
    (["--warmup-steps", "-1"], "--warmup-steps must be >= 0"),
    (["--group-lr", "offset=x"], "--group-lr: 'x' is not a number"),
    (["--group-lr", "offset=0.001"], "--group-lr: no parameter group offset"),
    (["--num-virtual-tokens", "1", "--freeze-first-token"], "--freeze-first-token needs at least 2 virtual tokens"),
    (["--kind", "deep", "--offset-rank", "4"], "--offset-rank (DePT's input offset) goes with --kind shallow"),
])
def test_bad_lever_flags_are_one_line(capsys, sp_home, tiny_model_dir, toy_csv, extra, match, cli_main):
    args = ["train", "--model", str(tiny_model_dir("llama")), "--quiet", "--data", str(toy_csv), "--template",
            "{text}", "--target-column", "label", "--name", "x", *extra]
    assert_user_error(capsys, cli_main, sp_home, args, match)


@pytest.mark.parametrize("extra,side", [
    (["--offset-rank", "2", "--offset-length", "16", "--group-lr", "offset=0.01"], "input_offset.safetensors"),
    (["--kind", "deep", "--prefix-memory", "--group-lr", "memory=0.01"], "prefix_memory.safetensors"),
])
def test_cli_trains_and_generates_with_side_tensors(capsys, sp_home, tiny_model_dir, toy_csv, extra, side, cli_main, sp_store):
    tiny = str(tiny_model_dir("llama"))
    rc, _, err = run_cli(capsys, cli_main, ["train", "--model", tiny, "--quiet", "--data", str(toy_csv), "--template", "{text}",
                                  "--target-column", "label", "--name", "lev", "--steps", "2", "--num-virtual-tokens",
                                  "3", "--prompt-dropout", "0.1", "--schedule", "cosine", "--warmup-steps", "1", *extra])
    assert rc == 0, err
    sp = sp_store.load_prompt("lev")
    assert (sp.path / side).is_file() and sp.meta["training"]["group_lr"]
    g = torch.Generator().manual_seed(0)  # the trained side tensors, scaled up: their effect must show
    sides = {"offset": (sp.offset[0], torch.randn(sp.offset[1].shape, generator=g))} if sp.offset else \
        {"memory": torch.randn(sp.memory.shape, generator=g) * 0.5}
    sp_store.save_prompt("lev2", sp.tensor, sp.meta, **sides)
    rc, out, err = run_cli(capsys, cli_main, ["generate", "--model", tiny, "--prompt", "lev2", "--max-new-tokens", "6", "hello"])
    from softprompt import models
    from softprompt.config import GenerateConfig
    from softprompt.inference.engine import Engine, GenerateRequest, generate

    lm = models.load(tiny)
    want = Engine(lm, store=sp_store).generate([GenerateRequest("hello", "lev2", GenerateConfig(max_new_tokens=6))])[0].text
    assert rc == 0 and out == want + "\n", err  # the CLI serves the side tensor too
    assert generate(lm, sp.tensor, "hello", GenerateConfig(max_new_tokens=6)).text != want  # ... which matters
