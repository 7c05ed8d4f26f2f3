"""DePT (a shallow prompt plus a low-rank input offset A @ B) trained, stored, validated and served.

Relational checks: the fast path equals the naive reference in loss and gradient; base weights
unchanged; resumed == uninterrupted; save -> load -> the same logits as the reference forward;
mixed batches in the engine and the server equal single runs (after checking that the prompts
differ); uploads with an offset of the wrong shape get 422 naming the field."""

from __future__ import annotations

import pytest
import torch
from helpers import TEXTS, rel, save_dept, target_cfg, uninterrupted_and_resumed
from safetensors.torch import save_file
from serving import server_burst
from upload_helpers import prompt_dir, zipped

from softprompt import data as D
from softprompt import store
from softprompt.config import EngineConfig, GenerateConfig, PromptConfig, TrainConfig
from softprompt.forward import embed
from softprompt.inference.engine import Engine, GenerateRequest, ScoreRow
from softprompt.offset import OFFSET_FILE, add_offset
from softprompt.splits import load_splits
from softprompt.training import tune as TR

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fast_path_equals_naive_reference_in_loss_and_gradient(tiny_lm, toy_csv):
    pcfg = PromptConfig(num_virtual_tokens=4, offset_rank=3, offset_length=7)  # rows are longer than 7 tokens
    init = TR.initial_prompt(tiny_lm, pcfg, target_cfg(toy_csv), 0)
    examples = load_splits(tiny_lm.tokenizer, target_cfg(toy_csv, dev_fraction=0.0)).train
    batch = D.collate(examples[:8], tiny_lm.tokenizer.pad_token_id)
    assert batch["input_ids"].shape[1] > 7
    grads, losses = [], []
    for fast in (True, False):
        m = TR.prompt_method(tiny_lm, init, pcfg, fast=fast, seed=0)
        with torch.no_grad():
            m.offset_b.copy_(torch.randn(m.offset_b.shape, generator=torch.Generator().manual_seed(1)))
        loss = m.loss(batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in m.parameters()])
    assert abs(float(losses[0] - losses[1])) <= 1e-5 * abs(float(losses[1]))
    for g_fast, g_ref in zip(*grads, strict=True):
        assert g_ref.abs().sum() > 0 and rel(g_fast, g_ref) < 1e-5
    m0 = TR.prompt_method(tiny_lm, init, PromptConfig(num_virtual_tokens=4), fast=True, seed=0)
    assert abs(float(m0.loss(batch)) - float(losses[1])) > 1e-4  # the offset acts on the loss


def test_training_moves_prompt_and_offset_only_and_saves_both(tiny_lm, toy_csv, tmp_path, sp_store):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    before = {k: v.detach().clone() for k, v in tiny_lm.model.state_dict().items()}
    pcfg = PromptConfig(num_virtual_tokens=4, offset_rank=2, offset_length=16)
    tcfg = TrainConfig(epochs=2, batch_size=8, lr=0.05, group_lr={"offset": 0.01})
    res = TR.train(tiny_lm, target_cfg(toy_csv, limit=24), pcfg, tcfg, name="dept", store=sp_store)
    for k, v in tiny_lm.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in tiny_lm.model.parameters())
    sp = sp_store.load_prompt("dept")
    a, b = sp.offset
    assert a.shape == (16, 2) and b.shape == (2, tiny_lm.hidden_size) and b.abs().sum() > 0  # B left zero
    assert torch.equal(sp.embeddings, res.prompt) and (sp.path / OFFSET_FILE).is_file()
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_lm.path), local_files_only=True), str(sp.path))
    assert torch.equal(peft_model.get_prompt_embedding_to_save("default").float(), res.prompt)  # PEFT loads the prompt part


def test_resumed_equals_uninterrupted(tiny_lm, toy_csv, monkeypatch, sp_store):
    cfg = target_cfg(toy_csv, limit=24)
    pcfg = PromptConfig(num_virtual_tokens=4, offset_rank=2, offset_length=16, dropout=0.1)
    tcfg = TrainConfig(epochs=3, batch_size=8, lr=0.05, patience=None, group_lr={"offset": 0.01}, schedule="cosine")
    uninterrupted_and_resumed(sp_store, tiny_lm, cfg, pcfg, tcfg, monkeypatch)
    for x, y in zip(sp_store.load_prompt("part").offset, sp_store.load_prompt("full").offset, strict=True):
        assert torch.equal(x, y)


# ---------------------------------------------------------------- serving


@torch.no_grad()
def reference_greedy(lm, prompt, offset, ids: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """[P][x + offset] recomputed from scratch for every new token: no cache, no batching."""
    toks, logits = list(ids), []
    for _ in range(steps):
        x = embed(lm.model, torch.tensor([toks]))
        x = x if offset is None else add_offset(x, offset)
        out = lm.model(inputs_embeds=torch.cat([prompt[None].to(x.dtype), x], 1), use_cache=False).logits[0, -1]
        logits.append(out)
        toks.append(int(out.argmax()))
    return toks[len(ids):], logits


def test_save_load_gives_the_reference_logits_in_prefill_and_decode(tiny_lm, sp_store):
    prompt, offset = save_dept(sp_store, tiny_lm, "d1", n=3, length=6, rank=2, seed=1)  # generation runs past T_max = 6
    ids = tiny_lm.tokenizer.encode(TEXTS[0])
    want_ids, want_logits = reference_greedy(tiny_lm, prompt, offset, ids, 6)
    for cached in (True, False):
        eng = Engine(tiny_lm, EngineConfig(use_prefix_cache=cached), sp_store)
        g = eng.generate([GenerateRequest(TEXTS[0], "d1", GenerateConfig(max_new_tokens=6))], return_logits=True)[0]
        assert g.token_ids == want_ids
        assert torch.allclose(g.logits, torch.stack(want_logits), atol=1e-4, rtol=1e-4)
    plain_ids, _ = reference_greedy(tiny_lm, prompt, None, ids, 6)
    assert plain_ids != want_ids  # the offset changes the answer


def test_mixed_batch_equals_single_runs(tiny_lm, sp_store):
    save_dept(sp_store, tiny_lm, "d1", n=3, length=6, rank=2, seed=1)
    save_dept(sp_store, tiny_lm, "d2", n=5, length=40, rank=3, seed=2)
    save_dept(sp_store, tiny_lm, "d1-plain", n=3, length=6, rank=2, seed=1, offset=False)  # d1's prompt, no offset
    deep = torch.randn(*tiny_lm.kv_shape[:1], 2, tiny_lm.kv_shape[1], 4, tiny_lm.kv_shape[2],
                       generator=torch.Generator().manual_seed(3))
    sp_store.save_prompt("deep", deep, {"base_model": {"fingerprint": tiny_lm.fingerprint}})
    eng = Engine(tiny_lm, store=sp_store)
    names = ["d1", "d2", "d1-plain", "deep", None, "d1"]
    reqs = [GenerateRequest(TEXTS[i % 4], p, GenerateConfig(max_new_tokens=5 + i)) for i, p in enumerate(names)]
    single = [eng.generate([r], return_logits=True)[0] for r in reqs]
    assert len({tuple(s.token_ids) for s in single[:4]}) == 4  # the prompts really differ
    both = eng.generate(reqs, return_logits=True)
    for s, b in zip(single, both, strict=True):
        assert s.token_ids == b.token_ids and torch.allclose(s.logits, b.logits, atol=1e-5, rtol=1e-5)
    rows = [ScoreRow(tuple(eng.encode(TEXTS[i % 4])), ((5, 6, 7), (8,)), p) for i, p in enumerate(names)]
    alone = [eng.score_rows([r])[0].logprobs for r in rows]
    assert alone[0] != alone[2]  # offset vs no offset, same prompt
    for a, m in zip(alone, eng.score_rows(rows), strict=True):
        assert m.logprobs == pytest.approx(a, abs=1e-5)


def test_server_mixed_burst_equals_single_runs(tiny_lm, sp_store):
    save_dept(sp_store, tiny_lm, "d1", n=3, length=6, rank=2, seed=1)
    save_dept(sp_store, tiny_lm, "d2", n=5, length=40, rank=3, seed=2)
    want = server_burst(sp_store, tiny_lm, [(TEXTS[i % 4], ["d1", "d2", None][i % 3], 4 + i) for i in range(6)])
    assert want[0] != Engine(tiny_lm, store=sp_store).generate([GenerateRequest(TEXTS[0], "d2", GenerateConfig(max_new_tokens=4))])[0].text


# ---------------------------------------------------------------- validation


def test_offset_uploads_of_the_wrong_shape_get_422_naming_the_field(app_http, tiny_lm, tmp_path, sp_store):
    H = tiny_lm.hidden_size
    cases = {
        f"{OFFSET_FILE}:offset_b": {"offset_a": torch.ones(8, 2), "offset_b": torch.ones(2, H + 1)},
        f"{OFFSET_FILE}:offset_b ": {"offset_a": torch.ones(8, 2), "offset_b": torch.ones(3, H)},  # rank mismatch
        f"{OFFSET_FILE}:offset_a": {"offset_b": torch.ones(2, H)},
        f"{OFFSET_FILE}:offset_a ": {"offset_a": torch.full((8, 2), float("nan")), "offset_b": torch.ones(2, H)},
    }
    for i, (field, tensors) in enumerate(cases.items()):
        d = prompt_dir(tiny_lm, tmp_path / f"o{i}")
        save_file(tensors, str(d / OFFSET_FILE))
        r = app_http.put("/v1/prompts/bad", content=zipped(d))
        assert r.status_code == 422 and r.json()["error"]["param"] == field.strip(), (field, r.text)
        assert field.strip() in r.json()["error"]["message"]
    d = prompt_dir(tiny_lm, tmp_path / "ok")
    save_file({"offset_a": torch.ones(8, 2), "offset_b": torch.ones(2, H)}, str(d / OFFSET_FILE))
    assert app_http.put("/v1/prompts/good", content=zipped(d)).status_code == 201
    assert sp_store.load_prompt("good").offset[0].shape == (8, 2) and "bad" not in sp_store.list_prompts()


def test_an_offset_beside_a_deep_prompt_is_refused_naming_the_file(tiny_lm, tmp_path):
    kv = torch.zeros(tiny_lm.kv_shape[0], 2, tiny_lm.kv_shape[1], 3, tiny_lm.kv_shape[2])
    d = store.save_prompt(tmp_path / "deep", kv, {})
    save_file({"offset_a": torch.ones(8, 2), "offset_b": torch.ones(2, tiny_lm.hidden_size)}, str(d / OFFSET_FILE))
    with pytest.raises(store.InvalidPrompt, match=OFFSET_FILE) as e:
        store.read_prompt_dir(d)
    assert e.value.field == OFFSET_FILE
