"""--device and --dtype: a bfloat16 frozen model on this CPU (no GPU is lent to this suite).

The prompt trains in float32 against a bfloat16 model; the model's fingerprint does not depend
on the dtype (a float32 prompt stays usable); the engine runs bfloat16 end to end and agrees
with transformers' own ``generate`` for the plain model and with float32 scores within bfloat16
precision. Asking for a GPU that is not there is one clear line, exit 2.
"""

from __future__ import annotations

import pytest
import torch

from softprompt import models
from softprompt.config import DataConfig, GenerateConfig, PromptConfig, TrainConfig
from softprompt.inference.engine import Engine, GenerateRequest, ScoreRequest
from softprompt.training import tune as TR

VERB = {"0": "negative", "1": "positive"}


@pytest.fixture
def bf16(tiny_model_dir, sp_home):
    return models.load(str(tiny_model_dir("llama")), "bfloat16")


def test_bfloat16_model_keeps_a_float32_prompt(bf16, tiny_lm, toy_csv, sp_store):
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert bf16.fingerprint == tiny_lm.fingerprint  # fingerprinted before the cast
    before = {k: v.clone() for k, v in bf16.model.state_dict().items()}
    cfg = DataConfig(path=str(toy_csv), template="{text}", target_column="label", verbalizer=VERB, limit=24)
    tcfg = TrainConfig(epochs=2, batch_size=8, lr=0.3, patience=None)
    res = TR.train(bf16, cfg, PromptConfig(num_virtual_tokens=4), tcfg, name="bf16", store=sp_store)
    ref = TR.train(tiny_lm, cfg, PromptConfig(num_virtual_tokens=4), tcfg, save=False, store=sp_store)
    assert res.prompt.dtype == torch.float32 and res.path is not None
    init = TR.initial_prompt(bf16, PromptConfig(num_virtual_tokens=4), cfg, 0, store=sp_store)
    assert (res.prompt - init).abs().max() > 1e-3  # updates smaller than bfloat16's step still count
    for k, v in bf16.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the same run in float32: losses agree to bfloat16 precision (8 bits of mantissa)
    for a, b in zip(res.history, ref.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=3e-2)


def test_engine_in_bfloat16(bf16, tiny_lm, sp_store):
    eng, ref = Engine(bf16, store=sp_store), Engine(tiny_lm, store=sp_store)
    text = "the movie was"
    cfg = GenerateConfig(max_new_tokens=8)
    ids = torch.tensor([eng.encode(text)])
    hf = bf16.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             pad_token_id=bf16.tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    got = eng.generate([GenerateRequest(text, None, cfg)])[0].token_ids
    assert got == hf[: len(got)] and got
    p = torch.randn(5, bf16.hidden_size, generator=torch.Generator().manual_seed(1))
    for e in (eng, ref):
        e.add_prompt("p", p)
    reqs = [ScoreRequest(text, ("good", "bad"), "p"), ScoreRequest("a terrible film", ("good", "bad"), None)]
    for a, b in zip(eng.score(reqs), ref.score(reqs)):
        assert a.logprobs == pytest.approx(b.logprobs, rel=5e-2, abs=5e-2)
    mixed = eng.generate([GenerateRequest(text, "p", cfg), GenerateRequest(text, None, cfg)])
    assert mixed[1].token_ids == got and len(mixed[0].token_ids) > 0


def test_a_missing_gpu_is_a_user_error(capsys, tiny_model_dir, sp_home, cli_main):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    rc = cli_main(["generate", "--model", str(tiny_model_dir("llama")), "--device", "cuda", "hello"])
    err = capsys.readouterr().err
    assert rc == 2 and "no CUDA GPU" in err and len(err.strip().splitlines()) == 1
    rc = cli_main(["generate", "--model", str(tiny_model_dir("llama")), "--device", "tpu", "hello"])
    assert rc == 2


def test_cli_generate_in_bfloat16(capsys, tiny_model_dir, sp_home, cli_main):
    rc = cli_main(["generate", "--model", str(tiny_model_dir("llama")), "--dtype", "bfloat16",
                   "--max-new-tokens", "4", "the movie was"])
    assert rc == 0 and capsys.readouterr().out.strip() != ""
