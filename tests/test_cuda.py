"""The suite's relational checks on a CUDA GPU, in bfloat16 and float32.

Marked ``cuda``: they skip where torch sees no GPU, with the reason; ``pytest -m cuda
--check-device cpu`` runs them on the CPU (scripts/gpu_check.sh's dry run does). The checks are
those of tests/test_forward.py, test_deep.py, test_engine.py and test_server.py (their helpers
in tests/batches.py, engine_helpers.py and serving.py), with the model loaded on the device in the
dtype under test:

* the prefix fast path (as training runs it, packed and not) == PEFT's prompt tuning, which
  concatenates the prompt to every row: loss and prompt gradient;
* a deep prompt == PEFT's prefix tuning: loss and gradient;
* a mixed batch (shallow, deep and no prompt) == each request run alone;
* the engine's decode == ``model.generate`` for the plain model;
* the server answers a mixed burst, batched.

Tolerances: float32 allows for GPU kernels that sum in another order than the CPU's (1e-4
relative); bfloat16 has 8 mantissa bits (a few 1e-2). Decoded sequences are compared step by
step: the logits agree within the tolerance, and two runs may pick different tokens only at a
near tie (the two candidates closer than the tolerance), where the comparison stops.
"""

from __future__ import annotations

import copy

import pytest
import torch
from batches import deep_batch, make_batch, peft_prefix_model, scaled_prompt
from conftest import sharpen
from engine_helpers import make_mixed_engine, mixed_deep_requests
from helpers import TEXTS, rel
from serving import BURST, check_classification, running, save_prompts, send_burst, single

from softprompt import models, store
from softprompt.config import GenerateConfig
from softprompt.inference.engine import Engine, GenerateRequest
from softprompt.prompt import make_deep_prompt
from softprompt.training.methods import PromptMethod

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("one_thread")]
DTYPES = ["bfloat16", "float32"]
TOL = {"bfloat16": 3e-2, "float32": 1e-4}  # relative, on losses, gradients and logits


def load(tiny_model_dir, device: torch.device, dtype: str, arch: str = "llama", sharp: bool = True):
    """The tiny model on ``device`` in ``dtype``; sharpened (conftest.sharpen) so that prompts
    move its outputs well past the tolerance."""
    lm = models.load(str(tiny_model_dir(arch)))
    if sharp:
        sharpen(lm)
    lm.model.to(device=device, dtype=getattr(torch, dtype))
    return lm


def on(device: torch.device, batch: dict) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    """Max-abs difference within ``tol`` of ``b``'s scale (at least 1)."""
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


def assert_same_decode(got_ids, got_logits, want_ids, want_logits, tol: float) -> None:
    """Step by step: logits agree within ``tol``; tokens may part only at a near tie in
    ``want``'s logits, after which the two runs continue from different texts (not compared)."""
    for t, (g, w) in enumerate(zip(got_ids, want_ids)):
        assert close(got_logits[t], want_logits[t], tol), f"step {t}: logits differ beyond {tol}"
        if g != w:
            lg = want_logits[t].float()
            margin = float(lg[w] - lg[g])
            assert margin <= 2 * tol * max(1.0, float(lg.abs().max())), f"step {t}: {g} != {w}, margin {margin}"
            return
    assert len(got_ids) == len(want_ids)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefix_fast_path_equals_peft_concatenation(tiny_model_dir, sp_home, check_device, dtype):
    pytest.importorskip("peft")
    from peft import PromptTuningConfig, get_peft_model

    lm = load(tiny_model_dir, check_device, dtype)
    batch = on(check_device, make_batch(lm.tokenizer, "mixed"))
    prompt = scaled_prompt(lm).float().cpu()
    pm = get_peft_model(copy.deepcopy(lm.model), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prompt.shape[0]))
    weight = pm.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        weight.copy_(prompt)
    theirs = pm(**batch).loss
    theirs.backward()
    tol = TOL[dtype]
    for pack in (False, True):  # the fast path as training runs it, rows packed or padded
        ours = PromptMethod(lm.model, prompt, pack=pack)
        loss = ours.loss(batch)
        loss.backward()
        assert abs(float(loss) - float(theirs)) <= tol * abs(float(theirs)), pack
        assert rel(ours.prompt.grad.float().cpu(), weight.grad.float().cpu()) <= tol, pack
    # the check can fail: another prompt gives a clearly different loss and gradient
    other = PromptMethod(lm.model, scaled_prompt(lm, seed=1).float().cpu())
    other.loss(batch).backward()
    assert rel(other.prompt.grad.float().cpu(), weight.grad.float().cpu()) > 10 * tol
    assert torch.isfinite(theirs) and float(weight.grad.norm()) > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_deep_prompt_equals_peft_prefix_tuning(tiny_model_dir, sp_home, check_device, dtype):
    pytest.importorskip("peft")
    lm = load(tiny_model_dir, check_device, dtype)
    b = on(check_device, deep_batch(lm))
    kv = make_deep_prompt(lm.model, lm.tokenizer, 4, "random", seed=1).float().cpu()
    pm = peft_prefix_model(lm, 4)
    weight = pm.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        weight.copy_(store.deep_to_peft(kv))
    theirs = pm(**b).loss
    theirs.backward()
    ours = PromptMethod(lm.model, kv)
    loss = ours.loss(b)
    loss.backward()
    tol = TOL[dtype]
    assert abs(float(loss) - float(theirs)) <= tol * abs(float(theirs))
    assert rel(store.deep_to_peft(ours.prompt.grad).float().cpu(), weight.grad.float().cpu()) <= tol
    other = PromptMethod(lm.model, make_deep_prompt(lm.model, lm.tokenizer, 4, "random", seed=2).float().cpu())
    other.loss(b).backward()
    assert rel(store.deep_to_peft(other.prompt.grad).float().cpu(), weight.grad.float().cpu()) > 10 * tol


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_batch_equals_single_runs(tiny_model_dir, sp_home, check_device, dtype):
    lm = load(tiny_model_dir, check_device, dtype)
    eng = make_mixed_engine(lm)
    tol = TOL[dtype]
    same = [GenerateRequest(TEXTS[0], p, GenerateConfig(max_new_tokens=1)) for p in ("s0", "s1", "d0", "d1", None)]
    firsts = [g.logits[0] for g in eng.generate(same, return_logits=True)]
    for a in range(len(firsts)):  # the prompts really differ, well past the tolerance
        for c in range(a + 1, len(firsts)):
            assert not close(firsts[a], firsts[c], 10 * tol)
    # sampled rows draw from the logits: bf16's differences may move a draw, so greedy rows only there
    reqs = [r for r in mixed_deep_requests() if dtype == "float32" or r.config.temperature == 0]
    for r, m in zip(reqs, eng.generate(reqs, return_logits=True), strict=True):
        alone = eng.generate([r], return_logits=True)[0]
        assert_same_decode(m.token_ids, m.logits, alone.token_ids, alone.logits, tol)
        assert m.token_ids


@pytest.mark.parametrize("dtype", DTYPES)
def test_engine_decode_equals_model_generate(tiny_model_dir, sp_home, check_device, dtype):
    lm = load(tiny_model_dir, check_device, dtype, sharp=False)
    n = 6
    got = Engine(lm).generate([GenerateRequest(t, None, GenerateConfig(max_new_tokens=n)) for t in TEXTS],
                              return_logits=True)  # one left-padded batch
    for t, g in zip(TEXTS, got, strict=True):
        ids = torch.tensor([lm.tokenizer(t, add_special_tokens=False)["input_ids"]], device=check_device)
        with torch.no_grad():
            hf = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                   pad_token_id=lm.tokenizer.pad_token_id, eos_token_id=lm.tokenizer.eos_token_id,
                                   output_logits=True, return_dict_in_generate=True)
        want = hf.sequences[0, ids.shape[1]:].tolist()
        assert_same_decode(g.token_ids, g.logits, want, torch.cat(hf.logits), TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_server_answers_a_mixed_burst(tiny_model_dir, sp_store, check_device, dtype):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    lm = save_prompts(load(tiny_model_dir, check_device, dtype, sharp=False), sp_store)
    ref, classify = Engine(lm, store=sp_store), ("p0", "p2")
    with running(lm, sp_store) as srv:
        answers = send_burst(srv, BURST, classify)  # every answer a 200, the decode steps batched
    for (text, prompt, m), a in zip(BURST, answers, strict=False):
        body = a.json()
        assert 0 < body["usage"]["completion_tokens"] <= m
        if dtype == "float32":  # bf16: the batch may part from a single run at a near tie (tests above)
            assert body["choices"][0]["text"] == single(ref, text, prompt, m)
    for p, a in zip(classify, answers[len(BURST):], strict=True):
        check_classification(ref, p, a.json(), atol=1e-4 if dtype == "float32" else 0.1)
