"""Deep prompts (per-layer keys/values): the forward against PEFT's prefix tuning, the PEFT format
both ways, mixed batches of shallow, deep and no-prompt rows, initialisations and refusals.

Relational throughout: our fast path vs PEFT's forward (loss, gradient, logits), mixed batch vs
single runs (after checking that the prompts differ), cached vs reference engine path.
"""

from __future__ import annotations

import json

import pytest
import torch
from batches import deep_batch, peft_prefix_model
from engine_helpers import make_mixed_engine, mixed_deep_requests
from helpers import TEXTS

from softprompt import forward as FW
from softprompt import models, store
from softprompt.config import GenerateConfig, UserError
from softprompt.forward import deep
from softprompt.inference.engine import Engine, EngineConfig, GenerateRequest, ScoreRequest
from softprompt.prompt import kv_of_embeddings, make_deep_prompt, make_prompt

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=["llama", "gpt2"])
def lm(request, tiny_model_dir, sp_home):
    return models.load(str(tiny_model_dir(request.param)))


def test_kv_shape_respects_grouped_query_attention(tiny_model_dir, sp_home):
    llama = models.load(str(tiny_model_dir("llama")))  # 4 attention heads, 2 key/value heads, d 16
    gpt2 = models.load(str(tiny_model_dir("gpt2")))
    assert llama.kv_shape == (2, 2, 16) and gpt2.kv_shape == (2, 4, 16)
    p = make_deep_prompt(llama.model, llama.tokenizer, 5, "random")
    assert p.shape == (2, 2, 2, 5, 16) and p.dtype == torch.float32


def test_fast_path_equals_peft_prefix_tuning_in_loss_and_gradient(lm):
    pytest.importorskip("peft")
    n = 4
    kv = make_deep_prompt(lm.model, lm.tokenizer, n, "random", seed=1).requires_grad_(True)
    b = deep_batch(lm)
    ours = FW.prompt_loss(lm.model, kv, b)
    ours.backward()
    pm = peft_prefix_model(lm, n)
    weight = pm.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        weight.copy_(store.deep_to_peft(kv.detach()))
    theirs = pm(**b).loss
    theirs.backward()
    assert abs(float(ours) - float(theirs)) < 1e-5 * max(1.0, abs(float(theirs)))
    torch.testing.assert_close(store.deep_to_peft(kv.grad), weight.grad, atol=1e-6, rtol=1e-4)
    assert float(kv.grad.abs().sum()) > 0
    naive = FW.prompt_loss(lm.model, kv.detach(), b, fast=False)  # our own reference agrees too
    assert abs(float(naive) - float(theirs)) < 1e-5 * max(1.0, abs(float(theirs)))


def test_scoring_equals_the_loss_path(lm):
    kv = make_deep_prompt(lm.model, lm.tokenizer, 3, "random", seed=2)
    b = deep_batch(lm)
    lp = FW.sequence_logprobs(lm.model, kv, **b)  # (B,)
    count = (b["labels"][:, 1:] != -100).sum()
    assert abs(float(-lp.sum() / count) - float(FW.prompt_loss(lm.model, kv, b))) < 1e-5


def test_saved_deep_prompt_loads_in_peft_with_our_logits(lm, tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kv = make_deep_prompt(lm.model, lm.tokenizer, 5, "vocab", seed=3)
    path = store.save_prompt(tmp_path / "deep", kv, {"kind": "deep", "reparam": None}, str(lm.path))
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PREFIX_TUNING" and cfg["num_attention_heads"] == lm.kv_shape[1]
    sp = store.read_prompt_dir(path)
    assert sp.kind == "deep" and torch.equal(sp.kv, kv) and sp.meta == {"kind": "deep", "reparam": None}
    base = AutoModelForCausalLM.from_pretrained(str(lm.path), local_files_only=True)
    pm = PeftModel.from_pretrained(base, str(path)).eval()
    b = deep_batch(lm)
    with torch.no_grad():
        theirs = pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        ours = lm.model.get_output_embeddings()(deep.deep_forward_hidden(lm.model, kv, b["input_ids"], b["attention_mask"]))
    sel = b["attention_mask"].bool()
    torch.testing.assert_close(ours[sel], theirs[sel], atol=1e-5, rtol=0)


def test_peft_trained_prefix_imports_and_gives_peft_logits(lm, tmp_path, capsys, cli_main, sp_store):
    pytest.importorskip("peft")
    pm = peft_prefix_model(lm, 4, projection=True)  # PEFT stores the projected prefix
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    b = deep_batch(lm)
    for _ in range(2):  # a trained prefix, not PEFT's init
        opt.zero_grad()
        pm(**b).loss.backward()
        opt.step()
    pm.save_pretrained(str(tmp_path / "peft-prefix"))
    code = cli_main(["prompts", "import", str(tmp_path / "peft-prefix"), "--name", "imp", "--model", str(lm.path)])
    assert code == 0 and "deep" in capsys.readouterr().out
    sp = sp_store.load_prompt("imp")
    assert sp.kind == "deep" and sp.meta["reparam"] == "mlp" and sp.meta["base_model"]["fingerprint"] == lm.fingerprint
    with torch.no_grad():
        theirs = pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    eng = Engine(lm, store=sp_store)
    sel = b["attention_mask"].bool()
    for i, text in enumerate(TEXTS[:3]):
        g = eng.generate([GenerateRequest(text, "imp", GenerateConfig(max_new_tokens=1))], return_logits=True)[0]
        torch.testing.assert_close(g.logits[0], theirs[i][sel[i]][-1], atol=1e-5, rtol=0)


def test_mixed_shallow_deep_and_plain_rows_equal_single_runs(lm):
    eng = make_mixed_engine(lm)
    same = [GenerateRequest(TEXTS[0], p, GenerateConfig(max_new_tokens=1)) for p in ("s0", "s1", "d0", "d1", None)]
    firsts = [g.logits[0] for g in eng.generate(same, return_logits=True)]
    for a in range(len(firsts)):  # the prompts really differ
        for c in range(a + 1, len(firsts)):
            assert (firsts[a] - firsts[c]).abs().max() > 1e-2
    reqs = mixed_deep_requests()
    mixed = eng.generate(reqs, return_logits=True)
    naive = make_mixed_engine(lm, EngineConfig(use_prefix_cache=False)).generate(reqs, return_logits=True)
    for r, m, nv in zip(reqs, mixed, naive, strict=True):
        single = eng.generate([r], return_logits=True)[0]
        assert m.token_ids == single.token_ids == nv.token_ids
        torch.testing.assert_close(m.logits, single.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(m.logits, nv.logits, atol=1e-5, rtol=0)
    scored = eng.score([ScoreRequest(TEXTS[0], (" good", " bad film"), p) for p in ("d0", "s1", None)])
    for p, s in zip(("d0", "s1", None), scored, strict=True):
        single = eng.score([ScoreRequest(TEXTS[0], (" good", " bad film"), p)])[0]
        torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(single.logprobs), atol=1e-5, rtol=0)


def test_deep_prompt_bytes_are_counted(tiny_lm):
    eng = make_mixed_engine(tiny_lm)
    kv = eng.bank.get("d1")[0].kv
    assert eng.stats()["prompt_bytes"] == sum(eng.bank.get(n)[0].nbytes for n in ("s0", "s1", "d0", "d1"))
    eng.generate([GenerateRequest(TEXTS[0], "d1", GenerateConfig(max_new_tokens=1))])
    assert eng.stats()["prefix_cache"]["bytes"] == kv.numel() * kv.element_size()


def test_deep_inits(tiny_lm):
    model, tok = tiny_lm.model, tiny_lm.tokenizer
    text = make_deep_prompt(model, tok, 4, "text", text="the movie was good and great")
    ids = tok("the movie was good and great", add_special_tokens=False)["input_ids"][:4]
    assert torch.allclose(text, kv_of_embeddings(model, model.get_input_embeddings().weight[ids]))
    shallow = make_prompt(model, tok, 4, "vocab", seed=5)
    from_shallow = make_deep_prompt(model, tok, 4, "prompt:x", source=shallow)
    cache, _ = FW.prefix_cache(model, shallow)  # the shallow prompt's computed prefix
    torch.testing.assert_close(from_shallow[:, 0], torch.stack([ly.keys[0] for ly in cache.layers]))
    torch.testing.assert_close(from_shallow[:, 1], torch.stack([ly.values[0] for ly in cache.layers]))
    rand = make_deep_prompt(model, tok, 64, "random", seed=0)
    real = kv_of_embeddings(model, make_prompt(model, tok, 64, "vocab", seed=9))
    ratio = rand.std(3).mean() / real.std(3).mean()
    assert 0.7 < float(ratio) < 1.4  # the random init has the scale of real keys/values
    longer = make_deep_prompt(model, tok, 6, "prompt:y", source=text)
    assert torch.equal(longer[:, :, :, :4], text) and longer.shape[3] == 6


def test_t5_and_bad_shapes_are_refused_in_one_line(tiny_model_dir, sp_home, tiny_lm, sp_store):
    t5 = models.load(str(tiny_model_dir("t5")))
    with pytest.raises(UserError, match="decoder-only"):
        make_deep_prompt(t5.model, t5.tokenizer, 4, "random")
    assert t5.kv_shape is None
    kv = make_deep_prompt(tiny_lm.model, tiny_lm.tokenizer, 4, "random")
    with pytest.raises(UserError, match="no decoder-only key/value cache"):
        Engine(t5, store=sp_store).add_prompt("d", kv)
    with pytest.raises(UserError, match="another model"):
        Engine(tiny_lm, store=sp_store).add_prompt("d", kv[:, :, :1])  # one kv head instead of two
    with pytest.raises(UserError, match="deep prompt has no token"):
        eng = Engine(tiny_lm, store=sp_store)
        eng.add_prompt("d", kv)
        eng.generate([GenerateRequest("", "d")])
    with pytest.raises(UserError, match="encoder-decoder"):
        FW.prompt_loss(t5.model, kv, deep_batch(tiny_lm))


def test_deep_prompt_for_another_model_is_refused_on_import(tiny_model_dir, sp_home, tmp_path, capsys, cli_main, sp_store):
    llama, gpt2 = (models.load(str(tiny_model_dir(a))) for a in ("llama", "gpt2"))
    path = store.save_prompt(tmp_path / "for-gpt2", make_deep_prompt(gpt2.model, gpt2.tokenizer, 4, "random"), {})
    capsys.readouterr()
    code = cli_main(["prompts", "import", str(path), "--name", "x", "--model", str(llama.path)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "another model" in err
    assert sp_store.list_prompts() == []
