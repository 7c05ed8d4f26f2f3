"""The inference engine: mixed-task batches equal single-task runs, padding and the prefix cache
change nothing, finished rows leave the batch, and the prompt bank / prefix cache stay bounded.

Every equality is relational (mixed vs single, cached vs uncached, ours vs ``model.generate``);
the tolerance 1e-5 on float32 logits is the acceptance bar of issue 3.
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import make_engine, mixed_requests, run_steps
from helpers import TEXTS

from softprompt import forward, models
from softprompt.config import GenerateConfig, UserError
from softprompt.inference import bank, engine, steps
from softprompt.inference.engine import Engine, EngineConfig, GenerateRequest, ScoreRequest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=["llama", "gpt2"])
def lm(request, tiny_model_dir, sp_home):
    return models.load(str(tiny_model_dir(request.param)))


def test_tasks_differ_then_mixed_batch_equals_single_runs(lm):
    eng = make_engine(lm)
    # first: the tasks really differ (else "mixed == single" would prove nothing)
    same_text = [GenerateRequest(TEXTS[0], p, GenerateConfig(max_new_tokens=1)) for p in ("p0", "p1", "p2", None)]
    firsts = [g.logits[0] for g in eng.generate(same_text, return_logits=True)]
    for a in range(len(firsts)):
        for b in range(a + 1, len(firsts)):
            assert (firsts[a] - firsts[b]).abs().max() > 1e-2
    reqs = mixed_requests()
    mixed = eng.generate(reqs, return_logits=True)
    for r, m in zip(reqs, mixed):
        single = eng.generate([r], return_logits=True)[0]
        assert m.token_ids == single.token_ids
        assert m.logits.shape == single.logits.shape
        torch.testing.assert_close(m.logits, single.logits, atol=1e-5, rtol=0)
        assert m.prompt == r.prompt and m.virtual_tokens == (0 if r.prompt is None else eng.bank.get(r.prompt)[0].num_virtual_tokens)


def test_cached_prefix_equals_uncached(lm):
    cached = make_engine(lm)
    naive = make_engine(lm, EngineConfig(use_prefix_cache=False))
    reqs = mixed_requests()
    for a, b in zip(cached.generate(reqs, return_logits=True), naive.generate(reqs, return_logits=True)):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    assert cached.stats()["prefix_cache"]["entries"] == 3 and naive.stats()["prefix_cache"]["entries"] == 0


def test_left_padded_plain_batch_equals_unpadded_runs_and_hf_generate(lm, sp_store):
    eng = Engine(lm, store=sp_store)
    n = 6
    reqs = [GenerateRequest(t, None, GenerateConfig(max_new_tokens=n)) for t in TEXTS]
    batch = eng.generate(reqs, return_logits=True)
    for t, g in zip(TEXTS, batch):
        ids = torch.tensor([lm.tokenizer(t, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():  # unpadded single forward, no cache: the first step's logits
            ref = lm.model(input_ids=ids).logits[0, -1]
            hf = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                   pad_token_id=lm.tokenizer.pad_token_id, eos_token_id=lm.tokenizer.eos_token_id)
        torch.testing.assert_close(g.logits[0], ref, atol=1e-5, rtol=0)
        assert g.token_ids == hf[0, ids.shape[1]:].tolist()[: len(g.token_ids)]


def test_module_generate_keeps_its_contract(lm):
    eng = make_engine(lm)
    p = eng.bank.get("p1")[0].embeddings
    cfg = GenerateConfig(max_new_tokens=5)
    g = engine.generate(lm, p, TEXTS[0], cfg)
    assert isinstance(g, engine.Generation) and g.virtual_tokens == 5 and g.prompt is None
    assert g.token_ids == eng.generate([GenerateRequest(TEXTS[0], "p1", cfg)])[0].token_ids
    assert g.finish_reason in ("stop", "length") and g.prompt_tokens == len(lm.tokenizer(TEXTS[0])["input_ids"])
    with pytest.raises(UserError, match="empty input"):
        engine.generate(lm, None, "", cfg)


def test_finished_rows_leave_the_batch(lm):
    eng = make_engine(lm)
    rows = eng.rows([(lm.tokenizer(t)["input_ids"], p) for t, p in zip(TEXTS, ["p2", None, "p0", "p1"])])
    state, _ = eng.prefill(rows)
    width = state.mask.shape[1]
    state.take([0, 2, 3])  # row 1 (no prompt, the longest text) finished
    assert len(state.cache.layers[0].keys) == 3 and state.mask.shape[0] == 3
    assert state.mask.shape[1] < width and bool(state.mask.any(0).all())  # all-pad columns cut
    assert state.cache.layers[0].keys.shape[2] == state.mask.shape[1]


def test_mixed_scores_equal_single_and_the_training_scorer(lm):
    eng = make_engine(lm)
    reqs = [ScoreRequest(TEXTS[0], (" good", " bad and boring"), "p0"), ScoreRequest(TEXTS[2], (" the sea",), None),
            ScoreRequest(TEXTS[1], (" great", " yes"), "p2")]
    mixed = eng.score(reqs)
    for r, m in zip(reqs, mixed):
        single = eng.score([r])[0]
        torch.testing.assert_close(torch.tensor(m.logprobs), torch.tensor(single.logprobs), atol=1e-5, rtol=0)
        # an independent path: forward.sequence_logprobs on a right-padded [context][target] batch
        tok = lm.tokenizer
        ctx = tok(r.text, add_special_tokens=False)["input_ids"]
        for target, lp in zip(r.targets, m.logprobs):
            tgt = tok(target, add_special_tokens=False)["input_ids"]
            batch = {"input_ids": torch.tensor([ctx + tgt]), "attention_mask": torch.ones(1, len(ctx + tgt), dtype=torch.long),
                     "labels": torch.tensor([[-100] * len(ctx) + tgt])}
            prompt = eng.bank.get(r.prompt)[0].embeddings if r.prompt else None
            ref = forward.sequence_logprobs(lm.model, prompt, **batch)[0]
            assert abs(float(ref) - lp) < 1e-4


def test_prefix_cache_is_bounded_in_bytes_and_reused(tiny_lm):
    eng = make_engine(tiny_lm, sizes=(4, 4, 4))
    per = bank.compute_prefix(tiny_lm.model, eng.bank.get("p0")[0].embeddings).nbytes
    eng.prefixes.max_bytes = 2 * per  # room for two prefixes
    for p in ("p0", "p1", "p0", "p2"):
        eng.generate([GenerateRequest(TEXTS[0], p, GenerateConfig(max_new_tokens=1))])
    st = eng.stats()["prefix_cache"]
    assert st["entries"] == 2 and st["bytes"] == 2 * per <= st["max_bytes"]
    assert st["hits"] == 1 and st["misses"] == 3


def test_bank_loads_lazily_keeps_an_lru_bound_and_sees_changes(tiny_lm, sp_store):
    g = torch.Generator().manual_seed(0)
    for k in range(3):
        sp_store.save_prompt((f"s{k}"), torch.randn(4, tiny_lm.hidden_size, generator=g),
                          {"base_model": {"fingerprint": tiny_lm.fingerprint}})
    eng = Engine(tiny_lm, EngineConfig(max_resident_prompts=2), store=sp_store)
    assert eng.bank.resident() == []
    cfg = GenerateConfig(max_new_tokens=2)
    before = eng.generate([GenerateRequest(TEXTS[0], f"s{k}", cfg) for k in range(3)], return_logits=True)
    assert len(eng.bank.resident()) == 2
    sp_store.save_prompt(("s0"), torch.randn(6, tiny_lm.hidden_size, generator=g), {})
    after = eng.generate([GenerateRequest(TEXTS[0], "s0", cfg)], return_logits=True)[0]
    assert after.virtual_tokens == 6 and not torch.allclose(after.logits[0], before[0].logits[0])


def test_bad_requests_are_user_errors(tiny_lm):
    eng = make_engine(tiny_lm)
    with pytest.raises(UserError, match="empty input"):
        eng.generate([GenerateRequest("", None)])
    with pytest.raises(UserError, match="not found"):
        eng.generate([GenerateRequest("x", "nope")])
    with pytest.raises(UserError, match="invalid prompt name"):
        eng.generate([GenerateRequest("x", "../etc")])
    with pytest.raises(UserError, match="shape"):
        eng.add_prompt("wrong", torch.zeros(3, tiny_lm.hidden_size + 1))
    with pytest.raises(UserError, match="non-empty"):
        eng.score([ScoreRequest("x", ("",))])
    assert eng.generate([GenerateRequest("x", "p0", GenerateConfig(max_new_tokens=1))])[0].token_ids


def test_stop_ids_end_a_row_like_eos(lm):
    """A row with stop ids ends at the first of them (not emitted, finish "stop"), as at EOS; its
    tokens up to there equal the run without stop ids, and its neighbours are unaffected."""
    eng = make_engine(lm)
    cfg = GenerateConfig(max_new_tokens=9)
    free = eng.generate([GenerateRequest(TEXTS[1], "p1", cfg), GenerateRequest(TEXTS[0], None, cfg)])
    stop = free[0].token_ids[4]
    cut = free[0].token_ids[: free[0].token_ids.index(stop)]
    got = eng.generate([GenerateRequest(TEXTS[1], "p1", cfg, stop_ids=(stop,)), GenerateRequest(TEXTS[0], None, cfg)])
    assert got[0].token_ids == cut and got[0].finish_reason == "stop" and len(cut) < 9
    assert got[1].token_ids == free[1].token_ids


# ---------------------------------------------------------------- bounded memory, chunked prefill


def test_scoring_in_slices_and_label_groups_equals_one_forward(lm, monkeypatch):
    """Scoring with 3-token forwards and one (input, label) pair per group equals the
    straightforward path (one prefill forward, every pair's cache copied at once)."""
    from softprompt.inference import kv
    from softprompt.inference.engine import PromptLogprobRow

    reqs = [ScoreRequest(TEXTS[i % 4], (" good", " bad and boring", " yes it is", " no"), p)
            for i, p in enumerate(["p0", None, "p2", "p1", None, "p0"])]
    one = make_engine(lm, EngineConfig(max_forward_tokens=10**6, score_group_mb=10**6))
    small = make_engine(lm, EngineConfig(max_forward_tokens=3, score_group_mb=1e-9))
    groups = []
    gather = kv.DecoderState.gather
    monkeypatch.setattr(kv.DecoderState, "gather", lambda self, rows: groups.append(len(rows)) or gather(self, rows))
    want = one.score(reqs)
    assert max(groups) >= 12  # the straightforward path copied every pair's cache at once
    groups.clear()
    got = small.score(reqs)
    assert groups and max(groups) == 1  # one pair at a time
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), atol=1e-5, rtol=0)
    ids = tuple(lm.tokenizer(TEXTS[1], add_special_tokens=False)["input_ids"])
    echo = [PromptLogprobRow(ids, p, 2) for p in ("p1", None)]
    for x, y in zip(one.prompt_logprobs(echo), small.prompt_logprobs(echo), strict=True):
        assert [t.logprob for t in x[1:]] == pytest.approx([t.logprob for t in y[1:]], abs=1e-5)


def test_chunked_prefill_equals_one_shot_and_single_runs(lm):
    """Prompts fed 1 or 4 token slots per step, rows joining while others decode: every row's
    greedy tokens and logits equal its one-shot single run (tasks differ: see the first test)."""
    eng = make_engine(lm)
    reqs = mixed_requests()
    long = GenerateRequest(" ".join(TEXTS * 10), "p1", GenerateConfig(max_new_tokens=4))
    joins = {0: reqs[:3], 2: [long, *reqs[3:5]], 5: reqs[5:]}
    single = {(s, k): eng.generate([r], return_logits=True)[0] for s, rs in joins.items() for k, r in enumerate(rs)}
    for chunk in (1, 4):
        got = run_steps(eng, chunk, joins)
        for key, g in single.items():
            assert got[key][0] == g.token_ids, (chunk, key)
            torch.testing.assert_close(got[key][1], g.logits, atol=1e-5, rtol=0)


def test_a_long_prompt_is_fed_a_chunk_per_step_while_short_rows_decode(lm):
    """No forward is wider than the chunk, and short rows sent with a long prompt finish within
    three steps of alone (the long row's piece takes its share of the slots every step; one-shot
    prefill padded them all to the long prompt, about 8 steps of 32 tokens)."""
    eng = make_engine(lm, EngineConfig(max_forward_tokens=32))  # also 32 slots while nothing decodes
    short = [GenerateRequest(TEXTS[k % 4], None, GenerateConfig(max_new_tokens=4)) for k in range(6)]
    long = GenerateRequest(" ".join(TEXTS * 6), None, GenerateConfig(max_new_tokens=2))
    n_long = len(eng.encode(long.text))
    assert n_long > 40
    alone, widths = run_steps(eng, 32, {0: short}), []
    together = run_steps(eng, 32, {0: [*short, long]}, widths)
    assert max(widths) <= 32
    for k in range(len(short)):
        assert together[0, k][0] == alone[0, k][0] and together[0, k][2] <= alone[0, k][2] + 3
    assert together[0, len(short)][2] > max(alone[0, k][2] for k in range(len(short)))  # the long one came later
    one_shot = []
    run_steps(eng, None, {0: [*short, long]}, one_shot)
    assert max(one_shot) >= n_long  # what chunking removes: every row run as wide as the long prompt


# ---------------------------------------------------------------- decode groups, the step budget


def test_a_long_row_decodes_in_its_own_group_and_rows_equal_single_runs(lm, monkeypatch):
    eng = make_engine(lm)
    short = [GenerateRequest(TEXTS[k % 4], "p0" if k % 2 else None, GenerateConfig(max_new_tokens=64)) for k in range(4)]
    long = GenerateRequest(" ".join(TEXTS * 6), "p1", GenerateConfig(max_new_tokens=4))
    n_long = len(eng.encode(long.text))
    assert n_long > 2 * max(len(eng.encode(r.text)) for r in short) + 64 + steps.GROUP_SLACK
    seen: list[list[tuple[int, int]]] = []  # per decode step: (width, rows) of each group
    step = steps.StepBatch.step
    monkeypatch.setattr(steps.StepBatch, "step", lambda self, *a, **k: seen.append(
        sorted((g.width, len(g.rows)) for g in self.groups)) or step(self, *a, **k))
    joins = {0: short, 1: [long]}
    got = run_steps(eng, 16, joins)
    together = [s for s in seen if len(s) == 2]
    assert together, "the long row never decoded beside the short ones"
    assert all(s[0][0] < n_long // 2 and s[0][1] == len(short) and s[1][1] == 1 for s in together)
    assert len(seen[-1]) == 1  # the long row left: one group again
    for s, rs in joins.items():
        for k, r in enumerate(rs):
            want = eng.generate([r], return_logits=True)[0]
            assert got[s, k][0] == want.token_ids, (s, k)
            torch.testing.assert_close(got[s, k][1], want.logits, atol=1e-5, rtol=0)


def test_rows_join_the_group_that_fits_and_at_most_max_groups_form():
    assert steps.fits(40, 20) and steps.fits(20, 40 + steps.GROUP_SLACK)
    assert not steps.fits(20, 40 + steps.GROUP_SLACK + 1) and not steps.fits(1500, 60)


def decoding_batch(eng, n: int, chunk: int = 128) -> steps.StepBatch:
    batch = steps.StepBatch(eng, prefill_chunk=chunk)
    batch.add([GenerateRequest(TEXTS[k % 4], None, GenerateConfig(max_new_tokens=50)) for k in range(n)])
    while batch.pending:
        batch.advance()
    return batch


def test_the_step_budget_follows_the_decode_step_cost(lm):
    """Nothing decoding: ``max_forward_tokens``. While rows decode: at least MIN_SIDE_TOKENS, at
    most the chunk, more beside more decoding rows, less for tokens over a longer context."""
    eng = make_engine(lm, EngineConfig(max_forward_tokens=512))
    assert steps.StepBatch(eng, prefill_chunk=128).budget() == 512
    few, many = decoding_batch(eng, 1), decoding_batch(eng, 200, chunk=10**4)
    assert few.budget(0) == steps.MIN_SIDE_TOKENS
    assert steps.MIN_SIDE_TOKENS < many.budget(0) <= 10**4
    assert many.budget(0) > many.budget(10**5) >= steps.MIN_SIDE_TOKENS
    assert decoding_batch(eng, 200, chunk=64).budget(0) == 64
    dims = eng.dims
    want = int(steps.SIDE_SHARE * sum(len(g.rows) * dims.token_flops(g.width, head=True) for g in many.groups)) // dims.token_flops(0)
    assert many.budget(0) == max(steps.MIN_SIDE_TOKENS, min(10**4, want))
    assert many.budget(0, head=True) < many.budget(0)  # scoring's label tokens also pay the output head
