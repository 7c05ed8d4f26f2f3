"""The fused step forward (``inference/fused.py``): several decoder-only batches in one forward
equal each batch run on its own (hidden states, caches, masks, positions), with shallow, deep,
PrefixMemory and DePT rows; a failed fused forward changes nothing and each batch is retried
alone; a model whose layers do not take the plan is run apart; the engine and the server
produce single-run outputs while prefill pieces and scoring slices ride in the decode forward."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import make_mixed_engine
from helpers import TEXTS, save_dept, save_memory

from softprompt import models
from softprompt.config import GenerateConfig
from softprompt.inference import fused
from softprompt.inference.engine import Engine, GenerateRequest, ScoreRow
from softprompt.inference.kv import DecoderState

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=["llama", "gpt2"])
def lm(request, tiny_model_dir, sp_home):
    return models.load(str(tiny_model_dir(request.param)))


def batches(eng: Engine, names: list[str | None]) -> list[fused.Forward]:
    """Three forwards as a scheduler step has them: decode rows (one token each), a prefill piece
    (right padding) and a wider slice, each after its own prefilled rows."""
    out, g = [], torch.Generator().manual_seed(0)
    V = eng.model.get_input_embeddings().weight.shape[0]
    for k, width in enumerate((1, 5, 9)):
        rows = eng.request_rows([GenerateRequest(TEXTS[(k + i) % 4] * (1 + i), p, GenerateConfig())
                                 for i, p in enumerate(names[k::2] or names)])
        state, _ = eng.prefill(rows)
        ids = torch.randint(2, V, (len(rows), width), generator=g)
        mask = torch.ones_like(ids)
        if width > 1:
            mask[0, width // 2 :] = 0  # a shorter piece: right padding
        out.append(fused.Forward(state, ids, mask))
    return out


def copy(f: fused.Forward) -> fused.Forward:
    return fused.Forward(f.state.gather(list(range(f.ids.shape[0]))), f.ids.clone(), f.tmask.clone())


def assert_same(a: DecoderState, b: DecoderState) -> None:
    """Same mask and positions, and the same keys/values in every column any query can see
    (pad columns are masked for good, whatever they hold)."""
    assert torch.equal(a.mask, b.mask) and torch.equal(a.next_pos, b.next_pos)
    seen = a.mask.bool()
    for x, y in zip(a.cache.layers, b.cache.layers, strict=True):
        for t, u in ((x.keys, y.keys), (x.values, y.values)):
            assert t.shape == u.shape
            torch.testing.assert_close(t.transpose(1, 2)[seen], u.transpose(1, 2)[seen], atol=1e-5, rtol=0)


def real(f: fused.Forward) -> torch.Tensor:
    return f.out[f.tmask.bool()]  # pad positions' outputs are never read


def test_fused_forward_equals_each_batch_alone(lm, sp_store, monkeypatch):
    save_dept(sp_store, lm, "o1", n=3, length=6, rank=2, seed=1)  # a DePT input offset
    save_memory(sp_store, lm, "m1", 3, seed=1)  # a deep prompt with a PrefixMemory
    eng = make_mixed_engine(lm, store=sp_store)  # and shallow (s*) and deep (d*) prompts
    names = ["s0", "d1", None, "s1", "d0", "o1", "m1"]
    fwds = batches(eng, names)
    alone = [copy(f) for f in fwds]
    calls = []
    base = type(lm.model.base_model).forward
    monkeypatch.setattr(type(lm.model.base_model), "forward", lambda self, *a, **k: calls.append(1) or base(self, *a, **k))
    fused.run(lm.model, fwds)
    assert len(calls) == 1, "the three batches did not go through one forward"
    for f in alone:
        f.run()
    for f, a in zip(fwds, alone, strict=True):
        assert f.error is None
        torch.testing.assert_close(real(f), real(a), atol=1e-5, rtol=0)
        assert_same(f.state, a.state)
    assert not torch.allclose(real(fwds[0])[0], real(fwds[0])[1])  # the rows really differ


def test_a_failed_fused_forward_changes_nothing_and_each_batch_runs_alone(lm):
    eng = make_mixed_engine(lm)
    fwds = batches(eng, ["s0", "d1", None])
    bad = fwds[1]
    bad.ids[0, 0] = 10**6  # outside the vocabulary: this batch fails, alone or fused
    before = [copy(f) for f in fwds]
    fused.run(lm.model, fwds)
    assert isinstance(bad.error, IndexError) and bad.out is None
    assert_same(bad.state, before[1].state)  # the failing batch is as it was
    for k in (0, 2):
        before[k].run()
        assert fwds[k].error is None
        torch.testing.assert_close(real(fwds[k]), real(before[k]), atol=1e-5, rtol=0)
        assert_same(fwds[k].state, before[k].state)


def test_a_model_whose_layers_do_not_take_the_plan_runs_apart(lm):
    eng = make_mixed_engine(lm)
    fwds = batches(eng, ["s0", "d1", None])
    alone = [copy(f) for f in fwds]
    layers = lm.model.base_model.layers if hasattr(lm.model.base_model, "layers") else lm.model.base_model.h
    attn = layers[-1].self_attn if hasattr(layers[-1], "self_attn") else layers[-1].attn
    forward = attn.forward
    attn.forward = lambda *a, **k: forward(*a, **{x: y for x, y in k.items() if x != fused.KEY})
    try:
        fused.run(lm.model, fwds)
        assert not fused.can_fuse(lm.model)  # switched off for this model
    finally:
        del attn.forward
        lm.model._softprompt_unfused = False
    for f, a in zip(fwds, alone, strict=True):
        a.run()
        torch.testing.assert_close(real(f), real(a), atol=1e-5, rtol=0)
        assert_same(f.state, a.state)


def test_scoring_slices_and_prefill_pieces_in_the_decode_forward_equal_single_runs(lm):
    """A ``StepBatch`` stepped by hand with a scoring task's forwards as its side work: every
    generation equals its single run and every score its one-shot score."""
    from softprompt.inference.steps import StepBatch

    eng = make_mixed_engine(lm)
    gens = [GenerateRequest(TEXTS[k % 4] * (1 + 3 * (k == 2)), p, GenerateConfig(max_new_tokens=6 + k))
            for k, p in enumerate(["s0", "d1", None, "s1"])]
    rows = [ScoreRow(tuple(eng.encode(TEXTS[k % 4] * 3)), ((5, 6, 7), (8,), (9, 10)), p)
            for k, p in enumerate(["d0", None, "s1"])]
    want_g = [eng.generate([r], return_logits=True)[0] for r in gens]
    want_s = [eng.score_rows([r])[0].logprobs for r in rows]
    batch = StepBatch(eng, keep_logits=True, prefill_chunk=4)
    where = {rid: k for k, rid in enumerate(batch.add(gens))}
    task, reply, scores, sides = eng.score_task(rows, lambda: 4), None, None, 0
    toks: dict[int, list[int]] = {k: [] for k in range(len(gens))}
    logits: dict[int, list[torch.Tensor]] = {k: [] for k in range(len(gens))}
    while len(batch) or scores is None:
        side = None
        if scores is None:
            try:
                side = task.send(reply)
            except StopIteration as done:
                scores = done.value
        for e in batch.step(side):
            if e.token is not None:
                toks[where[e.rid]].append(e.token)
            logits[where[e.rid]].append(e.logits)
        if side is not None:
            assert side.error is None
            reply, sides = side.out, sides + 1
    assert sides > 3
    for k, w in enumerate(want_g):
        assert toks[k] == w.token_ids
        torch.testing.assert_close(torch.stack(logits[k]), w.logits, atol=1e-5, rtol=0)
    for got, w in zip(scores, want_s, strict=True):
        assert got.logprobs == pytest.approx(w, abs=1e-5)
