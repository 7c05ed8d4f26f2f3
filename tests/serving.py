"""Helpers of the server tests (the fixtures that use them are in ``conftest.py``): the prompts the
served store holds, a real uvicorn server on a free loopback port, reference answers from the
engine, pausing the worker so requests meet in one batch, and reading ``/metrics``."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time

import pytest
import torch
from helpers import TEXTS

from softprompt import chat
from softprompt.config import GenerateConfig
from softprompt.inference.engine import Engine, EngineConfig, GenerateRequest, ScoreRequest
from softprompt.store import Store

TEMPLATE = "Review: {text}\nSentiment:"

VERBALIZER = {"0": "bad", "1": "good"}

PROMPTS = {"p0": 3, "p1": 5, "p2": 8}  # name -> N


@contextlib.contextmanager
def running(lm, store: Store | None, **kw):
    """A real uvicorn server over ``store``'s prompts in a thread on a free loopback port; yields
    (base_url, app, server)."""
    import uvicorn

    from softprompt.serve.app import ServerConfig, create_app

    app = create_app(Engine(lm, EngineConfig(max_batch_rows=kw.get("max_batch_rows", 32)), store),
                     ServerConfig(**{"model_id": "tiny", "error_rate": 0, **kw}))  # tests send bad requests by the thousand
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=10))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    t0 = time.monotonic()
    while not server.started:
        assert th.is_alive() and time.monotonic() - t0 < 30, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app, server
    finally:
        server.should_exit = True
        th.join(20)
        sock.close()


def client(base: str, key: str = "none"):
    import openai

    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60)


def single(ref, text: str, prompt: str | None, max_tokens: int, **kw) -> str:
    return ref.generate([GenerateRequest(text, prompt, GenerateConfig(max_new_tokens=max_tokens, **kw))])[0].text


@contextlib.contextmanager
def paused(app, waiting: int, timeout: float = 20):
    """Hold the worker while the body sends requests; resume once ``waiting`` jobs are queued."""
    sched = app.state.scheduler
    sched.pause()
    try:
        yield
        t0 = time.monotonic()
        while sched.depth() < waiting:
            assert time.monotonic() - t0 < timeout, f"only {sched.depth()} of {waiting} requests queued"
            time.sleep(0.01)
    finally:
        sched.pause(False)


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def save_prompts(lm, store: Store):
    """PROMPTS (random, at the scale of the embeddings, with a task's template and verbalizer)
    and an "lm-only" prompt, in ``store``; returns ``lm``."""
    g = torch.Generator().manual_seed(7)
    for name, n in PROMPTS.items():
        meta = {"base_model": {"name": lm.name, "fingerprint": lm.fingerprint}, "task": "toy", "mode": "target",
                "template": TEMPLATE, "target_column": "label", "verbalizer": VERBALIZER,
                "metrics": {"best_eval": {"accuracy": 0.5}, "final_train_loss": 1.25}}
        store.save_prompt(name, torch.randn(n, lm.hidden_size, generator=g), meta)
    store.save_prompt("lm-only", torch.randn(4, lm.hidden_size, generator=g),
                      {"base_model": {"name": lm.name, "fingerprint": lm.fingerprint}, "mode": "lm"})
    return lm


BURST = [(TEXTS[i % 4], [None, "p0", "p1", "p2"][i % 4], 3 + i) for i in range(10)]  # (text, prompt, max_tokens)


def send_burst(srv, gens, classify) -> list:
    """Concurrent completions ``gens`` (text, prompt or None, max_tokens; greedy) and classify
    calls (one per prompt in ``classify``), held back until all are queued so that they meet in
    one engine batch. Checks that every answer is a 200 and that the decode steps were batched
    (many rows per step, one prefill row per completion); returns the responses, in order."""
    import httpx

    base, app, _ = srv
    before = httpx.get(base + "/metrics").text

    async def burst():
        async with httpx.AsyncClient(base_url=base, timeout=60) as c:
            calls = [c.post("/v1/completions", json={"model": p or "tiny", "prompt": t, "max_tokens": m,
                                                     "temperature": 0}) for t, p, m in gens]
            calls += [c.post("/v1/classify", json={"prompt": p, "inputs": TEXTS}) for p in classify]
            return await asyncio.gather(*calls)

    with paused(app, waiting=len(gens) + len(classify)):
        th_result = {}
        th = threading.Thread(target=lambda: th_result.setdefault("r", asyncio.run(burst())))
        th.start()
    th.join(60)
    answers = th_result["r"]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    after = httpx.get(base + "/metrics").text
    rows = 'softprompt_batch_rows_sum{kind="decode"}'
    steps = 'softprompt_batch_rows_count{kind="decode"}'
    d_rows, d_steps = metric(after, rows) - metric(before, rows), metric(after, steps) - metric(before, steps)
    assert d_rows / d_steps > 3  # many rows per decode step: the requests were batched
    assert metric(after, 'softprompt_batch_rows_sum{kind="prefill"}') - metric(before, 'softprompt_batch_rows_sum{kind="prefill"}') == len(gens)
    return answers


def check_classification(ref, prompt: str, got: dict, texts=TEXTS, atol: float = 1e-4) -> None:
    want = ref.score([ScoreRequest(TEMPLATE.format(text=t), (" bad", " good"), prompt) for t in texts])
    assert got["labels"] == ["0", "1"]
    for w, d in zip(want, got["data"], strict=True):
        assert d["logprobs"] == pytest.approx(dict(zip(["0", "1"], w.logprobs, strict=True)), abs=atol)
        if abs(w.logprobs[1] - w.logprobs[0]) > 2 * atol:  # not a tie within the tolerance
            assert d["label"] == ["0", "1"][int(w.logprobs[1] > w.logprobs[0])]
        assert sum(d["probabilities"].values()) == pytest.approx(1.0)


def engine_chat(eng: Engine, msgs, prompt: str | None, max_tokens: int, logprobs: int | None = None, **kw):
    """The engine's answer to the chat template's tokens, up to the template's end-of-turn marker."""
    tok = eng.lm.tokenizer
    ids = chat.encode_chat(tok, msgs)
    g = eng.generate([GenerateRequest("", prompt, GenerateConfig(max_new_tokens=max_tokens, **kw),
                                      token_ids=tuple(ids), logprobs=logprobs)])[0]
    stops = set(chat.stop_ids(tok))
    cut = next((j for j, t in enumerate(g.token_ids) if t in stops), len(g.token_ids))
    return ids, g.token_ids[:cut], (g.logprobs or [])[:cut]


def server_burst(sp_store, lm, gens: list[tuple[str, str | None, int]]) -> list[str]:
    """Greedy completions of (text, prompt, max_tokens) sent at once to a paused server, so they
    meet in one batch; each answer is checked against the engine's single run and returned."""
    import httpx

    ref = Engine(lm, store=sp_store)
    want = [ref.generate([GenerateRequest(t, p, GenerateConfig(max_new_tokens=m))])[0].text for t, p, m in gens]
    with running(lm, sp_store) as (base, app, _):
        async def burst():
            async with httpx.AsyncClient(base_url=base, timeout=60) as c:
                return await asyncio.gather(*[c.post("/v1/completions", json={
                    "model": p or "tiny", "prompt": t, "max_tokens": m, "temperature": 0}) for t, p, m in gens])

        out = {}
        with paused(app, waiting=len(gens)):
            th = threading.Thread(target=lambda: out.setdefault("r", asyncio.run(burst())))
            th.start()
        th.join(60)
    assert [a.status_code for a in out["r"]] == [200] * len(gens)
    assert [a.json()["choices"][0]["text"] for a in out["r"]] == want
    return want
