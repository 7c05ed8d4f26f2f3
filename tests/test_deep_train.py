"""Deep and reparameterised prompts through the one training loop: base weights untouched, the
artifact is the plain folded tensor (folded == unfolded), resume == uninterrupted, bad input is
one line and exit 2 with nothing written."""

from __future__ import annotations

import pytest
import torch
from conftest import interrupt_at_epoch
from helpers import assert_user_error, store_entries

from softprompt import data as D
from softprompt import models, recipes, store
from softprompt.config import DataConfig, PromptConfig, TrainConfig, UserError
from softprompt.forward import prompt_loss
from softprompt.splits import load_splits
from softprompt.training import methods
from softprompt.training import tune as TR

pytestmark = pytest.mark.usefixtures("one_thread")

VERB = {"0": "negative", "1": "positive"}


def target_cfg(csv, **kw) -> DataConfig:
    return DataConfig(path=str(csv), template="{text}", target_column="label", verbalizer=VERB, **kw)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_deep_training_moves_only_the_prompt_and_saves_a_prefix_adapter(tiny_model_dir, sp_home, toy_csv, arch, sp_store):
    lm = models.load(str(tiny_model_dir(arch)))
    before = {k: v.detach().clone() for k, v in lm.model.state_dict().items()}
    pcfg = PromptConfig(num_virtual_tokens=4, kind="deep")
    res = TR.train(lm, target_cfg(toy_csv, limit=24), pcfg, TrainConfig(epochs=2, batch_size=8, lr=0.05), name="deep", store=sp_store)
    init = TR.initial_prompt(lm, pcfg, target_cfg(toy_csv), 0, store=sp_store)
    assert res.prompt.shape == init.shape == (2, 2, lm.kv_shape[1], 4, 16) and not torch.equal(res.prompt, init)
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in lm.model.parameters())
    sp = sp_store.load_prompt("deep")
    assert sp.kind == "deep" and torch.equal(sp.kv, res.prompt) and sp.meta["kind"] == "deep"
    losses = [e["train_loss"] for e in res.epochs]
    assert losses[-1] < losses[0]


REPARAMS = [("shallow", "residual"), ("shallow", "mlp"), ("shallow", "lstm"), ("deep", "mlp")]


@pytest.mark.parametrize("kind,reparam", REPARAMS)
def test_folded_reparam_equals_unfolded(tiny_lm, toy_csv, tmp_path, kind, reparam, sp_store):
    pcfg = PromptConfig(num_virtual_tokens=4, kind=kind, reparam=reparam)
    init = TR.initial_prompt(tiny_lm, pcfg, target_cfg(toy_csv), 0, store=sp_store)
    method = TR.prompt_method(tiny_lm, init, pcfg, fast=True, seed=0)
    examples = load_splits(tiny_lm.tokenizer, target_cfg(toy_csv, dev_fraction=0.0)).train
    batch = D.collate(examples[:8], tiny_lm.tokenizer.pad_token_id)
    opt = torch.optim.AdamW(method.parameters(), lr=0.05)
    for _ in range(3):  # the module's output moves off the init: folding is not the identity
        opt.zero_grad()
        method.loss(batch).backward()
        opt.step()
    assert method.trainable_parameters() > init.numel()  # the module trains more than it saves
    with torch.no_grad():
        unfolded = method.loss(batch)  # through the module
        folded = method.state()["prompt"]
        assert folded.shape == init.shape and not torch.allclose(folded, init)
        method.save(tmp_path / "p", {"kind": kind, "reparam": reparam})
        saved = store.read_prompt_dir(tmp_path / "p").tensor
        assert torch.equal(saved, folded)
        plain = prompt_loss(tiny_lm.model, saved, batch)  # the artifact alone
    assert abs(float(unfolded) - float(plain)) < 1e-6


@pytest.mark.parametrize("kind,reparam", [("deep", None), ("deep", "mlp"), ("shallow", "residual")])
def test_resumed_equals_uninterrupted(tiny_lm, toy_csv, monkeypatch, kind, reparam, sp_store):
    cfg = target_cfg(toy_csv, limit=24)
    pcfg = PromptConfig(num_virtual_tokens=4, kind=kind, reparam=reparam)
    tcfg = TrainConfig(epochs=3, batch_size=8, lr=0.05, patience=None)
    full = TR.train(tiny_lm, cfg, pcfg, tcfg, name="full", store=sp_store)
    undo = interrupt_at_epoch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        TR.train(tiny_lm, cfg, pcfg, tcfg, name="part", store=sp_store)
    undo()
    assert "part" not in sp_store.list_prompts()
    resumed = TR.train(tiny_lm, cfg, pcfg, tcfg, name="part", resume=True, store=sp_store)
    assert torch.equal(resumed.prompt, full.prompt) and resumed.history == full.history
    assert torch.equal(sp_store.load_prompt("part").tensor, sp_store.load_prompt("full").tensor)


def test_deep_method_refuses_a_shallow_tensor_and_t5(tiny_lm, tiny_model_dir):
    with pytest.raises(UserError, match="deep prompt is"):
        methods.DeepPromptMethod(tiny_lm.model, torch.zeros(4, tiny_lm.hidden_size))
    t5 = models.load(str(tiny_model_dir("t5")))
    with pytest.raises(UserError, match="encoder-decoder"):
        methods.DeepPromptMethod(t5.model, torch.zeros(2, 2, 4, 4, 16))


@pytest.mark.parametrize("extra,match", [
    (["--kind", "deep", "--reparam", "residual"], "--reparam residual is not supported for --kind deep"),
    (["--kind", "deep", "--reparam", "lstm"], "--reparam lstm is not supported for --kind deep"),
    (["--reparam", "bogus"], "argument --reparam: invalid choice: 'bogus'"),
    (["--kind", "wide"], "argument --kind: invalid choice: 'wide'"),
])
def test_bad_kind_or_reparam_is_one_line(capsys, sp_home, tiny_model_dir, toy_csv, extra, match, cli_main):
    args = ["train", "--model", str(tiny_model_dir("llama")), "--quiet", "--data", str(toy_csv), "--text-column",
            "text", "--name", "x", *extra]
    assert_user_error(capsys, cli_main, sp_home, args, match)


def test_deep_on_t5_is_one_line_and_writes_nothing(capsys, sp_home, tiny_model_dir, toy_csv, cli_main):
    args = ["train", "--model", str(tiny_model_dir("t5")), "--quiet", "--data", str(toy_csv), "--text-column",
            "text", "--name", "x", "--kind", "deep"]
    assert_user_error(capsys, cli_main, sp_home, args, "decoder-only model with a key/value cache")
    assert store_entries(sp_home) == []


def test_transfer_multitask_and_inspect_with_deep_prompts(tiny_lm, toy_tasks, capsys, tmp_path, sp_store, cli_main):
    from softprompt.prompt import kv_of_embeddings
    from softprompt.training import multitask as MT

    tcfg = TrainConfig(epochs=1, lr=0.1, patience=None)
    task_cfg = lambda t: recipes.resolve(DataConfig(), str(toy_tasks[t]), sp_store.data_root)  # noqa: E731
    for t in ("mood", "pets"):
        TR.train(tiny_lm, task_cfg(t), PromptConfig(num_virtual_tokens=4), tcfg, name=f"{t}-src", task=str(toy_tasks[t]), store=sp_store)
    deep = TR.train(tiny_lm, task_cfg("mood"), PromptConfig(num_virtual_tokens=4, kind="deep", init="transfer"), tcfg,
                    name="mood-deep", task=str(toy_tasks["mood"]), store=sp_store)
    src = deep.meta["transfer"]["source"]
    start = TR.initial_prompt(tiny_lm, PromptConfig(num_virtual_tokens=4, kind="deep", init=f"prompt:{src}"), DataConfig(), 0, store=sp_store)
    torch.testing.assert_close(start, kv_of_embeddings(tiny_lm.model, sp_store.load_prompt(src).embeddings))
    with pytest.raises(UserError, match="is a deep prompt"):  # a shallow prompt cannot start from a deep one
        TR.initial_prompt(tiny_lm, PromptConfig(num_virtual_tokens=4, init="prompt:mood-deep"), DataConfig(), 0, store=sp_store)
    mcfg = MT.MultitaskConfig(tasks=(str(toy_tasks["mood"]), str(toy_tasks["pets"])), per_task=8, eval_per_task=4)
    with pytest.raises(UserError, match="shallow prompts only"):
        MT.train_multitask(tiny_lm, mcfg, PromptConfig(num_virtual_tokens=4, kind="deep"), tcfg, name="mt", store=sp_store)
    assert "mt" not in sp_store.list_prompts()
    TR.train(tiny_lm, task_cfg("pets"), PromptConfig(num_virtual_tokens=4, kind="deep"), tcfg, name="pets-deep",
             task=str(toy_tasks["pets"]), store=sp_store)
    model = str(tiny_lm.path)
    capsys.readouterr()
    assert cli_main(["inspect", "mood-deep", "--model", model, "--against", "pets-deep", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "deep prompt mood-deep" in out and "|key|" in out and "nearest" not in out
    report = __import__("json").loads((tmp_path / "inspect_mood-deep.json").read_text())
    assert len(report["tokens"]) == 4 and report["similarity"]["matrix"][0][0] == pytest.approx(1.0)
    assert cli_main(["inspect", "mood-deep", "--model", model, "--against", "mood-src"]) == 2
    assert "needs deep prompts" in capsys.readouterr().err


def test_a_method_tells_the_forward_its_prompts_kind(tiny_lm):
    """The kind is decided once, when the method takes its prompt, and handed to the forward pass:
    a deep prompt given to PromptMethod trains as deep (as DeepPromptMethod does), a shallow one as shallow."""
    from softprompt.adapter import PromptKind
    from softprompt.prompt import make_deep_prompt

    deep = make_deep_prompt(tiny_lm.model, tiny_lm.tokenizer, 3, "random", seed=0)
    shallow = torch.randn(3, tiny_lm.hidden_size)
    assert methods.PromptMethod(tiny_lm.model, deep).kind is PromptKind.DEEP
    assert methods.DeepPromptMethod(tiny_lm.model, deep).kind is PromptKind.DEEP
    assert methods.PromptMethod(tiny_lm.model, shallow).kind is PromptKind.SHALLOW
    batch = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "labels": torch.tensor([[-100, 6, 7]])}
    a, b = methods.PromptMethod(tiny_lm.model, deep).loss(batch), methods.DeepPromptMethod(tiny_lm.model, deep).loss(batch)
    assert torch.isfinite(a) and torch.equal(a, b)
