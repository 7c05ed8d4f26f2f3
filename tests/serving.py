"""Helpers of the server tests (the fixtures that use them are in ``conftest.py``): the prompts the
served store holds, a real uvicorn server on a free loopback port, reference answers from the
engine, pausing the worker so requests meet in one batch, and reading ``/metrics``."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from softprompt import chat
from softprompt.config import GenerateConfig
from softprompt.inference.engine import Engine, EngineConfig, GenerateRequest

TEXTS = ["the movie was", "a wonderful film with a great story", "who wrote the book", "positive negative"]
TEMPLATE = "Review: {text}\nSentiment:"
VERBALIZER = {"0": "bad", "1": "good"}
PROMPTS = {"p0": 3, "p1": 5, "p2": 8}  # name -> N

@contextlib.contextmanager
def running(lm, **kw):
    """A real uvicorn server in a thread on a free loopback port; yields (base_url, app, server)."""
    import uvicorn

    from softprompt.serve.app import ServerConfig, create_app

    app = create_app(Engine(lm, EngineConfig(max_batch_rows=kw.get("max_batch_rows", 32))),
                     ServerConfig(model_id="tiny", **kw))
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


# ---------------------------------------------------------------- OpenAI compatibility



def engine_chat(eng: Engine, msgs, prompt: str | None, max_tokens: int, logprobs: int | None = None, **kw):
    """The engine's answer to the chat template's tokens, up to the template's end-of-turn marker."""
    tok = eng.lm.tokenizer
    ids = chat.encode_chat(tok, msgs)
    g = eng.generate([GenerateRequest("", prompt, GenerateConfig(max_new_tokens=max_tokens, **kw),
                                      token_ids=tuple(ids), logprobs=logprobs)])[0]
    stops = set(chat.stop_ids(tok))
    cut = next((j for j, t in enumerate(g.token_ids) if t in stops), len(g.token_ids))
    return ids, g.token_ids[:cut], (g.logprobs or [])[:cut]
