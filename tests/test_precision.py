"""Precision: run-time detection of native bf16, the auto choice, bf16 training on the CPU, and
the choice reported in the training summary and in softprompt.json."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from batches import batch_of
from conftest import sharpen

from softprompt import precision
from softprompt.config import DataConfig, PromptConfig, TrainConfig, UserError
from softprompt.training import tune as TR

CPU = torch.device("cpu")
CPUINFO = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx512f {extra}\n"


@pytest.mark.parametrize(("extra", "native"), [("avx512_bf16", True), ("amx_bf16 amx_tile", True), ("avx2", False)])
def test_native_bf16_from_cpu_flags(extra, native):
    flags = precision.cpu_flags(CPUINFO.format(extra=extra))
    assert "avx512f" in flags
    assert precision.native_bf16(CPU, flags)[0] is native
    chosen = precision.resolve("auto", CPU, torch.float32, flags)
    assert chosen["used"] == ("bf16" if native else "fp32") and chosen["requested"] == "auto"
    assert precision.resolve("fp32", CPU, torch.float32, flags)["used"] == "fp32"
    assert precision.resolve("bf16", CPU, torch.float32, flags)["used"] == "bf16"
    assert precision.cpu_model(CPUINFO.format(extra=extra)) == "Some CPU"


def test_a_low_precision_model_is_used_as_loaded():
    """--dtype bfloat16 keeps working: the model's own dtype wins, no autocast on top."""
    chosen = precision.resolve("auto", CPU, torch.bfloat16, {"avx512_bf16"})
    assert chosen["used"] == "bfloat16"
    with precision.autocast(chosen["used"], CPU):
        assert not torch.is_autocast_enabled("cpu")


def test_bad_precision_is_a_user_error():
    with pytest.raises(UserError, match="--precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(UserError, match="--precision"):
        precision.resolve("fp8", CPU, torch.float32)


@pytest.mark.slow
def test_bf16_training_on_cpu_lowers_the_loss(tiny_lm, toy_csv, monkeypatch, sp_store):
    lm = sharpen(tiny_lm)
    cfg = DataConfig(path=str(toy_csv), template="{text}", target_column="label",
                     verbalizer={"0": "negative", "1": "positive"}, dev_fraction=0.0)
    tcfg = TrainConfig(lr=0.3, epochs=4, batch_size=16, patience=None, precision="bf16")
    seen = []
    real = torch.autocast.__enter__

    def spy(self):
        seen.append(self.fast_dtype)
        return real(self)

    monkeypatch.setattr(torch.autocast, "__enter__", spy)
    res = TR.train(lm, cfg, PromptConfig(num_virtual_tokens=4, init="vocab"), tcfg, save=False, store=sp_store)
    losses = [e["train_loss"] for e in res.epochs]
    assert torch.bfloat16 in seen  # the steps did run under bf16 autocast
    assert res.meta["precision"]["used"] == "bf16"
    assert res.meta["precision"]["logits"] == "fp32"  # label words: the loss takes float32 logits
    assert res.prompt.dtype == torch.float32  # the master prompt stays float32
    assert losses[-1] < 0.8 * losses[0]


def test_precision_choice_in_summary_and_softprompt_json(capsys, sp_home, tiny_model_dir, toy_csv, cli_main):
    expected = precision.resolve("auto", CPU, torch.float32)
    expected["logits"] = "bf16" if expected["used"] == "bf16" else "fp32"  # LM mode keeps autocast's logits
    code = cli_main(["train", "--model", str(tiny_model_dir("llama")), "--data", str(toy_csv), "--text-column", "text",
                 "--limit", "16", "--epochs", "1", "--num-virtual-tokens", "2", "--name", "prec"])
    out = capsys.readouterr().out
    assert code == 0
    logits = "; loss logits bf16" if expected["used"] == "bf16" else ""
    assert f"precision   {expected['used']} (asked auto: {expected['reason']}){logits}\n" in out
    meta = json.loads((sp_home / "prompts" / "prec" / "softprompt.json").read_text())
    assert meta["precision"] == expected
    assert meta["training"]["precision"] == "auto"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", ["shallow", "deep"])
def test_frozen_weights_cast_once_give_the_same_loss_and_gradient(tiny_model_dir, arch, kind):
    """The bf16 copies swapped in (``FrozenCasts``) == autocast casting every product itself,
    bit for bit, in the loss and the prompt gradient; the model gets its own parameters back."""
    from conftest import sharpen

    from softprompt import models
    from softprompt.prompt import make_deep_prompt, make_prompt
    from softprompt.training.methods import DeepPromptMethod, PromptMethod

    lm = sharpen(models.load(str(tiny_model_dir(arch))))
    before = {n: (p, p.detach().clone()) for n, p in lm.model.named_parameters()}
    make = make_deep_prompt if kind == "deep" else make_prompt
    init = make(lm.model, lm.tokenizer, 5, "random", seed=1) * (1 if kind == "deep" else 5)
    cls = DeepPromptMethod if kind == "deep" else PromptMethod
    batch = batch_of(lm.tokenizer)
    results = []
    for swap in (False, True):
        m = cls(lm.model, init, precision="bf16")
        if not swap:
            m.casts = None  # autocast casts each product itself
        else:
            assert m.casts.slots, "nothing to swap"
        loss = m.loss(batch)
        loss.backward()
        results.append((loss.detach(), m.prompt.grad.clone()))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1) and torch.equal(g0, g1)
    assert g0.abs().sum() > 0
    after = dict(lm.model.named_parameters())
    assert set(after) == set(before)
    for n, (p, value) in before.items():
        assert after[n] is p and p.dtype == value.dtype and torch.equal(p, value), n


# ---------------------------------------------------------------- --dtype auto (serve, generate, eval)


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
@pytest.mark.parametrize("command", ["generate", "eval", "serve"])
def test_dtype_auto_follows_native_bf16_and_is_what_the_model_runs_in(
        command, native, expected, monkeypatch, caplog, capsys, cli_main, tiny_model_dir, toy_csv):
    """The default ``--dtype`` of serve, generate and eval is auto: bfloat16 where bf16 is native
    (detection patched both ways), float32 elsewhere; the model the command runs is in that dtype
    and the choice is logged once."""
    import uvicorn

    from softprompt import models

    monkeypatch.setattr(precision, "native_bf16", lambda device, flags=None: (native, "patched flags"))
    real, loaded = models.load, []
    monkeypatch.setattr(models, "load", lambda *a, **k: loaded.append(real(*a, **k)) or loaded[-1])
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    model = str(tiny_model_dir("llama"))
    argv = {"generate": ["generate", "--model", model, "--max-new-tokens", "2", "the movie"],
            "eval": ["eval", "--model", model, "--data", str(toy_csv), "--limit", "4", "--template", "{text}",
                     "--target-column", "label", "--verbalizer", "0=bad,1=good"],
            "serve": ["serve", "--model", model, "--engine", "native", "--port", "8123"]}[command]
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:  # serve installs its JSON log handler on the root logger: put the test's back each time
        with caplog.at_level(logging.INFO, logger="softprompt.models"):
            assert cli_main(argv) == 0
        root.handlers[:], root.level = handlers, level
        assert len(loaded) == 1 and next(loaded[0].model.parameters()).dtype == expected
        printed = capsys.readouterr()
        json_lines = [json.loads(x) for x in printed.err.splitlines() if x.startswith("{")]  # serve's
        said = [m for m in [r.getMessage() for r in caplog.records] + [e["msg"] for e in json_lines]
                if m.startswith("dtype auto:")]
        name = str(expected).removeprefix("torch.")
        assert said == [f"dtype auto: {name} (patched flags)"]
        if command == "eval":  # eval's result names the dtype its scores were computed in
            assert json.loads(printed.out.splitlines()[-1])["dtype"] == name and f"model in {name}" in printed.out
        loaded.clear()
        assert cli_main([*argv, "--dtype", "float32"]) == 0  # an explicit dtype is used as asked
        assert next(loaded[0].model.parameters()).dtype == torch.float32
    finally:
        root.handlers[:], root.level = handlers, level


def test_model_dtype_auto_from_cpu_flags():
    assert precision.model_dtype("auto", CPU, {"avx512_bf16"}) == ("bfloat16", "cpu flags avx512_bf16")
    assert precision.model_dtype("auto", CPU, {"avx2"})[0] == "float32"
    assert precision.model_dtype("float16", CPU, {"avx512_bf16"}) == ("float16", "asked for")


def test_loss_logits_are_the_float32_logits_under_autocast(tiny_lm):
    """The logits every loss and log-probability takes (``loss_logits``) are, under bf16 autocast,
    the float32 model's own logits bit for bit; the head's product under autocast rounds them."""
    from softprompt.forward.decoder import lm_logits, loss_logits

    torch.manual_seed(0)
    hidden = torch.randn(5, tiny_lm.model.config.hidden_size) * 8
    ref = lm_logits(tiny_lm.model, hidden).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_logits(tiny_lm.model, hidden)
        rounded = lm_logits(tiny_lm.model, hidden).float()
    assert got.dtype == torch.float32 and torch.equal(got, ref)
    assert not torch.equal(rounded, ref)


def test_bad_logits_choice_is_refused():
    with pytest.raises(ValueError, match="logits 'fp16'"):
        precision.autocast("bf16", CPU, logits="fp16")


@pytest.mark.parametrize("levers", [{"kind": "shallow"}, {"kind": "deep"}, {"kind": "deep", "memory": True},
                                    {"kind": "shallow", "offset_rank": 2}])
def test_every_method_is_built_with_the_logits_choice(levers, tiny_lm, monkeypatch):
    """``prompt_method`` hands the logits choice to the constructor of every kind and lever (the
    forward reads it from there); a choice outside ``precision.LOGITS`` is refused there, before
    the frozen weights are cast."""
    from softprompt.training import prompt_method as PM
    cfg = PromptConfig(num_virtual_tokens=4, **levers)
    init = TR.initial_prompt(tiny_lm, cfg, DataConfig(), 0)
    for logits in precision.LOGITS:
        assert TR.prompt_method(tiny_lm, init, cfg, True, 0, used="bf16", logits=logits).logits == logits
    casts = []
    monkeypatch.setattr(PM, "FrozenCasts", lambda model: casts.append(model))
    with pytest.raises(ValueError, match="logits 'fp16'"):
        TR.prompt_method(tiny_lm, init, cfg, True, 0, used="bf16", logits="fp16")
    assert casts == []


@pytest.mark.parametrize(("mode", "used", "logits"), [("lm", "bf16", "bf16"), ("target", "bf16", "fp32"),
                                                      ("lm", "fp32", "fp32"), ("target", "fp32", "fp32")])
def test_logits_follow_the_data_mode(mode, used, logits, toy_csv):
    """LM mode (every token a target) keeps autocast's bf16 logits; input -> target data takes
    float32 ones; float32 training has nothing to choose."""
    cfg = DataConfig(path=str(toy_csv), text_column="text") if mode == "lm" else \
        DataConfig(path=str(toy_csv), template="{text}", target_column="label")
    assert cfg.mode == mode
    assert TR.with_logits({"used": used}, cfg) == {"used": used, "logits": logits}
