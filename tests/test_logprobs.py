"""Per-token log-probabilities (OpenAI ``logprobs`` / ``echo``) against the engine's scoring path
and against one plain full forward of ``[P][tokens]`` through the model (relational, to 1e-4)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from softprompt import models
from softprompt.config import GenerateConfig, UserError
from softprompt.forward import embed
from softprompt.inference.engine import (
    Engine,
    EngineConfig,
    GenerateRequest,
    PromptLogprobRow,
    ScoreRow,
    StepBatch,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["the movie was", "a wonderful film with a great story", "who wrote the book"]
TOL = 1e-4


@pytest.fixture(params=["llama", "gpt2"])
def lm(request, tiny_model_dir, sp_home):
    return models.load(str(tiny_model_dir(request.param)))


def engine(lm, cache: bool = True) -> Engine:
    eng = Engine(lm, EngineConfig(use_prefix_cache=cache))
    g = torch.Generator().manual_seed(7)
    for name, n in (("p0", 3), ("p1", 6)):
        eng.add_prompt(name, torch.randn(n, lm.hidden_size, generator=g))
    return eng


@torch.no_grad()
def full_forward(eng: Engine, prompt: str | None, ids: list[int]) -> torch.Tensor:
    """log-softmax (T, V) of one unbatched forward of [P][ids]; row t predicts token t+1."""
    model = eng.model
    x = embed(model, torch.tensor(ids))  # (T, H)
    n = 0
    if prompt is not None:
        p = eng.bank.get(prompt)[0].embeddings
        x, n = torch.cat([p.to(x.dtype), x]), p.shape[0]  # (N+T, H)
    return F.log_softmax(model(inputs_embeds=x[None]).logits[0, n:].float(), -1)


def test_prompt_logprobs_equal_the_scoring_path_and_a_full_forward(lm):
    for cache in (True, False):
        eng = engine(lm, cache)
        rows = [PromptLogprobRow(tuple(eng.encode(t)), p, k) for t, p, k in
                ((TEXTS[0], "p0", 5), (TEXTS[1], None, 0), (TEXTS[2], "p1", 20), (TEXTS[1], "p1", 3))]
        got = eng.prompt_logprobs(rows)
        for r, lps in zip(rows, got, strict=True):
            ids = list(r.token_ids)
            assert len(lps) == len(ids) and lps[0] is None
            scored = eng.score_rows([ScoreRow(tuple(ids[:j]), ((ids[j],),), r.prompt) for j in range(1, len(ids))])
            ref = full_forward(eng, r.prompt, ids)
            for j in range(1, len(ids)):
                tl = lps[j]
                assert tl.token == ids[j]
                assert abs(tl.logprob - scored[j - 1].logprobs[0]) < TOL
                assert abs(tl.logprob - float(ref[j - 1, ids[j]])) < TOL
                assert len(tl.top) == r.top_k
                if r.top_k:
                    v, i = ref[j - 1].topk(r.top_k)
                    assert [t for t, _ in tl.top] == i.tolist()
                    assert torch.allclose(torch.tensor([lp for _, lp in tl.top]), v, atol=TOL)


def test_prompt_logprobs_edge_rows(lm):
    eng = engine(lm)
    one = eng.encode(TEXTS[0])[:1]
    assert eng.prompt_logprobs([PromptLogprobRow(tuple(one), "p0", 2), PromptLogprobRow((), "p1", 2)]) == [[None], []]
    with pytest.raises(UserError):
        eng.prompt_logprobs([PromptLogprobRow(tuple(one) * 2, "nope")])


def test_generated_logprobs_equal_the_scoring_path(lm):
    """The chosen token's logprob and the top-k, from the logits the loop samples from, equal the
    scoring path for the same prefix; sampling settings do not change them (raw distribution)."""
    eng = engine(lm)
    cfgs = [GenerateConfig(max_new_tokens=6), GenerateConfig(max_new_tokens=5, temperature=0.7, top_p=0.9, seed=2),
            GenerateConfig(max_new_tokens=4, repetition_penalty=1.4)]
    reqs = [GenerateRequest(TEXTS[i], p, c, logprobs=k) for i, (p, c, k) in enumerate(zip(("p0", None, "p1"), cfgs, (4, 0, 20)))]
    reqs.append(GenerateRequest(TEXTS[1], "p0", cfgs[0]))  # no logprobs asked: none given
    gens = eng.generate(reqs)
    batch = StepBatch(eng)
    rids = batch.add(reqs)
    stepped: dict[int, list] = {r: [] for r in rids}
    while len(batch):
        for e in batch.step():
            if e.logprob is not None:
                stepped[e.rid].append(e.logprob)
    assert gens[3].logprobs is None and stepped[rids[3]] == []
    for r, g, rid in zip(reqs[:3], gens, rids, strict=False):
        ids = eng.encode(r.text)
        assert [t.token for t in g.logprobs] == g.token_ids
        assert [t.token for t in stepped[rid]] == g.token_ids  # the step API gives the same numbers
        assert all(abs(a.logprob - b.logprob) < TOL for a, b in zip(stepped[rid], g.logprobs, strict=True))
        ref = full_forward(eng, r.prompt, ids + g.token_ids)
        scored = eng.score_rows([ScoreRow(tuple(ids + g.token_ids[:j]), ((t,),), r.prompt)
                                 for j, t in enumerate(g.token_ids)])
        for j, tl in enumerate(g.logprobs):
            assert abs(tl.logprob - scored[j].logprobs[0]) < TOL
            assert len(tl.top) == r.logprobs
            if r.logprobs:
                v, i = ref[len(ids) - 1 + j].topk(r.logprobs)
                assert [t for t, _ in tl.top] == i.tolist()
                assert torch.allclose(torch.tensor([lp for _, lp in tl.top]), v, atol=TOL)


def test_openai_logprob_shapes(lm):
    """The JSON shapes: token texts add up to the decoded text, offsets are where each token
    starts, the chosen token is always in a completions top list, chat lists exactly k."""
    from softprompt.serve.logprob_json import chat_logprobs, completion_logprobs, pieces

    eng = engine(lm)
    ids = eng.encode(TEXTS[1])
    echo = eng.prompt_logprobs([PromptLogprobRow(tuple(ids), "p0", 3)])[0]
    g = eng.generate([GenerateRequest(TEXTS[1], "p0", GenerateConfig(max_new_tokens=5), logprobs=2)])[0]
    text = lm.tokenizer.decode(ids + g.token_ids)
    gen = pieces(lm.tokenizer, g.token_ids, g.logprobs)
    obj = completion_logprobs(pieces(lm.tokenizer, ids, echo) + gen)
    assert "".join(obj["tokens"]) == text
    assert [text[o:] for o in obj["text_offset"]] == ["".join(obj["tokens"][i:]) for i in range(len(obj["tokens"]))]
    assert obj["token_logprobs"][0] is None and obj["top_logprobs"][0] is None
    assert obj["token_logprobs"][1:] == [e.logprob for e in echo[1:]] + [e.logprob for e in g.logprobs]
    ks = [3] * (len(ids) - 1) + [2] * len(g.token_ids)
    for piece, lp, top, k in zip(obj["tokens"][1:], obj["token_logprobs"][1:], obj["top_logprobs"][1:], ks, strict=True):
        assert top[piece] == lp and len(top) in (k, k + 1)
    assert completion_logprobs(gen, 7)["text_offset"][0] == 7
    chat = chat_logprobs(gen)
    assert [c["token"] for c in chat["content"]] == [lm.tokenizer.decode([t]) for t in g.token_ids]
    assert all(len(c["top_logprobs"]) == 2 and bytes(c["bytes"]).decode() == c["token"] for c in chat["content"])
