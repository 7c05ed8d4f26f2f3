"""PrefixMemory (a deep prompt plus phi(q)^T M per layer and head, outside the softmax) trained,
stored, validated and served.

Relational checks: the attention term equals its formula; switching the model to the memory
attention changes nothing without a memory; the fast path equals the naive reference in loss
and gradient; base weights unchanged; resumed == uninterrupted; save -> load -> the reference
logits; mixed batches in the engine and the server equal single runs (after checking that the
prompts differ); uploads with a memory of the wrong shape get 422 naming the field."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    TEXTS,
    deep_prompt,
    random_memory,
    rel,
    save_dept,
    save_memory,
    target_cfg,
    uninterrupted_and_resumed,
)
from safetensors.torch import save_file
from serving import server_burst
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from upload_helpers import zipped

from softprompt import data as D
from softprompt import memory as MEM
from softprompt import store
from softprompt.config import EngineConfig, GenerateConfig, PromptConfig, TrainConfig
from softprompt.forward.deep import deep_cache, deep_forward_hidden
from softprompt.inference.engine import Engine, GenerateRequest, ScoreRow
from softprompt.splits import load_splits
from softprompt.training import tune as TR

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_attention_term_is_its_formula_and_nothing_without_a_memory(tiny_lm):
    g = torch.Generator().manual_seed(0)
    attn = next(m for m in tiny_lm.model.modules() if hasattr(m, "layer_idx") and hasattr(m, "scaling"))
    q, k, v = (torch.randn(2, 4, 5, 16, generator=g) for _ in range(3))
    mem = torch.randn(2, 3, 4, 16, 16, generator=g)  # (B, L, heads, d, d)
    base, _ = sdpa_attention_forward(attn, q, k, v, None, is_causal=False)
    got, _ = MEM.memory_attention(attn, q, k, v, None, is_causal=False, prefix_memory=mem)
    want = base + torch.einsum("bhtd,bhde->bthe", torch.nn.functional.elu(q) + 1, mem[:, attn.layer_idx])
    assert rel(got, want) < 1e-6
    rows = [tiny_lm.tokenizer.encode(t) for t in TEXTS[:2]]  # two lengths: right padding
    ids = torch.tensor([r + [0] * (max(map(len, rows)) - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (ids.shape[1] - len(r)) for r in rows])
    kv = deep_prompt(tiny_lm, 3, 0)
    before = [tiny_lm.model(input_ids=ids, attention_mask=mask).logits, deep_forward_hidden(tiny_lm.model, kv, ids, mask)]
    MEM.enable(tiny_lm.model)
    assert tiny_lm.model.config._attn_implementation == MEM.ATTN
    after = [tiny_lm.model(input_ids=ids, attention_mask=mask).logits, deep_forward_hidden(tiny_lm.model, kv, ids, mask)]
    for b, a in zip(before, after, strict=True):  # no memory: SDPA attention and its masks, unchanged
        assert torch.equal(a[mask.bool()], b[mask.bool()])


def test_fast_path_equals_naive_reference_in_loss_and_gradient(tiny_lm, toy_csv):
    pcfg = PromptConfig(num_virtual_tokens=4, kind="deep", memory=True)
    init = TR.initial_prompt(tiny_lm, pcfg, target_cfg(toy_csv), 0)
    examples = load_splits(tiny_lm.tokenizer, target_cfg(toy_csv, dev_fraction=0.0)).train
    batch = D.collate(examples[:8], tiny_lm.tokenizer.pad_token_id)
    losses, grads = [], []
    for fast in (True, False):
        m = TR.prompt_method(tiny_lm, init, pcfg, fast=fast, seed=0)
        with torch.no_grad():
            m.memory.copy_(random_memory(tiny_lm, 1))
        loss = m.loss(batch)
        loss.backward()
        losses.append(float(loss))
        grads.append([p.grad.clone() for p in m.parameters()])
    assert abs(losses[0] - losses[1]) <= 1e-5 * abs(losses[1])
    for g_fast, g_ref in zip(*grads, strict=True):
        assert g_ref.abs().sum() > 0 and rel(g_fast, g_ref) < 1e-5
    zero = TR.prompt_method(tiny_lm, init, pcfg, fast=True, seed=0)  # M = 0: the plain deep prompt, exactly
    plain = TR.prompt_method(tiny_lm, init, PromptConfig(num_virtual_tokens=4, kind="deep"), fast=True, seed=0)
    with torch.no_grad():
        assert torch.equal(zero.loss(batch), plain.loss(batch)) and abs(float(plain.loss(batch)) - losses[0]) > 1e-4


def test_training_moves_prompt_and_memory_only_and_saves_both(tiny_lm, toy_csv, sp_store):
    before = {k: v.detach().clone() for k, v in tiny_lm.model.state_dict().items()}
    pcfg = PromptConfig(num_virtual_tokens=4, kind="deep", memory=True)
    res = TR.train(tiny_lm, target_cfg(toy_csv, limit=24), pcfg, TrainConfig(epochs=2, batch_size=8, lr=0.05,
                   group_lr={"memory": 0.01}), name="mem", store=sp_store)
    for k, v in tiny_lm.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in tiny_lm.model.parameters())
    sp = sp_store.load_prompt("mem")
    assert sp.kind == "deep" and torch.equal(sp.kv, res.prompt) and (sp.path / MEM.MEMORY_FILE).is_file()
    assert sp.memory.shape == (*MEM.memory_shape(tiny_lm.model), 16) and sp.memory.abs().sum() > 0  # M left zero


def test_a_tasks_bytes_count_the_memory_file(tiny_lm, tmp_path):
    """What ``compare`` reports as bytes per task is the saved folder's tensor files, memory included."""
    init = deep_prompt(tiny_lm, 4, 0)
    plain = TR.prompt_method(tiny_lm, init, PromptConfig(num_virtual_tokens=4, kind="deep"), fast=True, seed=0)
    mem = TR.prompt_method(tiny_lm, init, PromptConfig(num_virtual_tokens=4, kind="deep", memory=True), fast=True, seed=0)
    n_plain, n_mem = plain.save(tmp_path / "plain"), mem.save(tmp_path / "mem")
    assert n_plain == (tmp_path / "plain" / "adapter_model.safetensors").stat().st_size
    assert n_mem == n_plain + (tmp_path / "mem" / MEM.MEMORY_FILE).stat().st_size > n_plain + 4 * mem.memory.numel()


def test_the_memory_trains_at_its_own_default_lr_unless_one_is_given(tiny_lm):
    """Without ``--group-lr memory=LR`` the memory's group gets the method's default (1e-4: at a
    deep prompt's lr it collapsed on TREC), the prompt ``--lr``; a given group lr wins."""
    from softprompt.training.loop import make_optimizer

    init = deep_prompt(tiny_lm, 4, 0)
    method = TR.prompt_method(tiny_lm, init, PromptConfig(num_virtual_tokens=4, kind="deep", memory=True), fast=True, seed=0)
    lrs = {g["name"]: g["lr"] for g in make_optimizer(method, TrainConfig(lr=0.03)).param_groups}
    assert lrs == {"prompt": 0.03, "memory": 1e-4}
    given = make_optimizer(method, TrainConfig(lr=0.03, group_lr={"memory": 5e-3})).param_groups
    assert {g["name"]: g["lr"] for g in given} == {"prompt": 0.03, "memory": 5e-3}


def test_resumed_equals_uninterrupted(tiny_lm, toy_csv, monkeypatch, sp_store):
    cfg = target_cfg(toy_csv, limit=24)
    pcfg = PromptConfig(num_virtual_tokens=4, kind="deep", memory=True, dropout=0.1)
    tcfg = TrainConfig(epochs=3, batch_size=8, lr=0.05, patience=None, group_lr={"memory": 0.01})
    uninterrupted_and_resumed(sp_store, tiny_lm, cfg, pcfg, tcfg, monkeypatch)
    assert torch.equal(sp_store.load_prompt("part").memory, sp_store.load_prompt("full").memory)


@torch.no_grad()
def reference_greedy(lm, kv, mem, ids: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """The whole sequence behind the deep prompt, recomputed for every new token, memory as a forward keyword."""
    toks, logits = list(ids), []
    for _ in range(steps):
        x = torch.tensor([toks])
        mask = torch.ones(1, kv.shape[3] + x.shape[1], dtype=torch.long)
        out = lm.model(input_ids=x, attention_mask=mask, past_key_values=deep_cache(lm.model, kv, 1), use_cache=True,
                       **({} if mem is None else {"prefix_memory": mem[None]})).logits[0, -1]
        logits.append(out)
        toks.append(int(out.argmax()))
    return toks[len(ids):], logits


def test_save_load_gives_the_reference_logits_in_prefill_and_decode(tiny_lm, sp_store):
    kv, mem = save_memory(sp_store, tiny_lm, "m1", 3, seed=1)
    MEM.enable(tiny_lm.model)
    ids = tiny_lm.tokenizer.encode(TEXTS[0])
    want_ids, want_logits = reference_greedy(tiny_lm, kv, mem, ids, 6)
    for cached in (True, False):
        g = Engine(tiny_lm, EngineConfig(use_prefix_cache=cached), sp_store).generate(
            [GenerateRequest(TEXTS[0], "m1", GenerateConfig(max_new_tokens=6))], return_logits=True)[0]
        assert g.token_ids == want_ids
        assert torch.allclose(g.logits, torch.stack(want_logits), atol=1e-4, rtol=1e-4)
    assert reference_greedy(tiny_lm, kv, None, ids, 6)[0] != want_ids  # the memory changes the answer


def test_mixed_batch_equals_single_runs(tiny_lm, sp_store):
    save_memory(sp_store, tiny_lm, "m1", 3, seed=1)
    save_memory(sp_store, tiny_lm, "m2", 5, seed=2)
    save_memory(sp_store, tiny_lm, "m1-plain", 3, seed=1, memory=False)  # m1's keys/values, no memory
    save_dept(sp_store, tiny_lm, "d1", n=3, length=6, rank=2, seed=1)
    eng = Engine(tiny_lm, store=sp_store)
    names = ["m1", "m2", "m1-plain", "d1", None, "m1"]
    reqs = [GenerateRequest(TEXTS[i % 4], p, GenerateConfig(max_new_tokens=5 + i)) for i, p in enumerate(names)]
    single = [eng.generate([r], return_logits=True)[0] for r in reqs]
    assert len({tuple(s.token_ids) for s in single[:4]}) == 4  # the prompts really differ
    for s, b in zip(single, eng.generate(reqs, return_logits=True), strict=True):
        assert s.token_ids == b.token_ids and torch.allclose(s.logits, b.logits, atol=1e-5, rtol=1e-5)
    rows = [ScoreRow(tuple(eng.encode(TEXTS[i % 4])), ((5, 6, 7), (8,)), p) for i, p in enumerate(names)]
    alone = [eng.score_rows([r])[0].logprobs for r in rows]
    assert alone[0] != alone[2]
    for a, m in zip(alone, eng.score_rows(rows), strict=True):
        assert m.logprobs == pytest.approx(a, abs=1e-5)


def test_server_mixed_burst_equals_single_runs(tiny_lm, sp_store):
    save_memory(sp_store, tiny_lm, "m1", 3, seed=1)
    save_dept(sp_store, tiny_lm, "d1", n=3, length=6, rank=2, seed=1)
    want = server_burst(sp_store, tiny_lm, [(TEXTS[i % 4], ["m1", "d1", None][i % 3], 4 + i) for i in range(6)])
    assert want[0] != Engine(tiny_lm, store=sp_store).generate([GenerateRequest(TEXTS[0], None, GenerateConfig(max_new_tokens=4))])[0].text


def test_memory_uploads_of_the_wrong_shape_get_422_naming_the_field(app_http, tiny_lm, tmp_path, sp_store):
    L, h, d = MEM.memory_shape(tiny_lm.model)
    field = f"{MEM.MEMORY_FILE}:{MEM.MEMORY_KEY}"
    for i, bad in enumerate([torch.ones(L + 1, h, d, d), torch.ones(L, h, d, d + 1), torch.ones(L, h, d),
                             torch.full((L, h, d, d), float("nan"))]):
        d_ = store.save_prompt(tmp_path / f"m{i}", deep_prompt(tiny_lm, 3, i), {})
        save_file({MEM.MEMORY_KEY: bad}, str(d_ / MEM.MEMORY_FILE))
        r = app_http.put("/v1/prompts/bad", content=zipped(d_))
        assert r.status_code == 422 and r.json()["error"]["param"] == field, (i, r.text)
    shallow = store.save_prompt(tmp_path / "s", torch.ones(3, tiny_lm.hidden_size), {})
    save_file({MEM.MEMORY_KEY: torch.ones(L, h, d, d)}, str(shallow / MEM.MEMORY_FILE))
    r = app_http.put("/v1/prompts/bad", content=zipped(shallow))
    assert r.status_code == 422 and r.json()["error"]["param"] == MEM.MEMORY_FILE
    ok = store.save_prompt(tmp_path / "ok", deep_prompt(tiny_lm, 3, 9), {})
    save_file({MEM.MEMORY_KEY: torch.ones(L, h, d, d) * 0.01}, str(ok / MEM.MEMORY_FILE))
    assert app_http.put("/v1/prompts/good", content=zipped(ok)).status_code == 201
    assert sp_store.load_prompt("good").memory.shape == (L, h, d, d) and "bad" not in sp_store.list_prompts()
