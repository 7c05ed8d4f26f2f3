"""No request can stall its neighbours or outgrow the server's memory: chunked prefill beside
decoding rows, the memory estimate in front of admission (413), the context-length check (400).

Relational where it can be: short requests sent together with a long prompt finish before the
long prompt has even been read (before, every row was prefilled as wide as the long one and the
long one answered first); a refused request leaves the model's counters untouched.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from serving import TEXTS, metric, paused, running

pytestmark = pytest.mark.usefixtures("one_thread")

pytest.importorskip("fastapi")


def model_counters(base: str) -> list[float]:
    text = httpx.get(base + "/metrics").text
    return [metric(text, f'softprompt_batch_rows_count{{kind="{k}"}}') for k in ("score", "prefill", "decode")]


def test_short_requests_sent_with_a_long_prompt_finish_before_it_is_read(lm, home):
    """16 short greedy requests and one ~450-token prompt meet in one batch: with a 16-token
    prefill chunk the short ones decode while the long prompt is read a chunk per step, so all of
    them finish before the long one (which asks for one token)."""
    from softprompt.inference import fused

    long_text = " ".join(TEXTS * 12)
    widths, run = [], fused.run
    calls = [("/v1/completions", {"model": "tiny", "prompt": TEXTS[k % 4], "max_tokens": 8, "temperature": 0})
             for k in range(16)]
    calls.append(("/v1/completions", {"model": "tiny", "prompt": long_text, "max_tokens": 1, "temperature": 0}))
    done = {}
    with running(lm, home, prefill_chunk=16) as (base, app, _):
        fused.run = lambda model, fwds: widths.extend(f.ids.shape for f in fwds) or run(model, fwds)  # every forward
        try:
            with paused(app, waiting=len(calls)):
                threads = [threading.Thread(target=lambda k=k, c=c: done.setdefault(k, (httpx.post(
                    base + c[0], json=c[1], timeout=120), time.monotonic()))) for k, c in enumerate(calls)]
                for t in threads:
                    t.start()
            for t in threads:
                t.join(120)
        finally:
            fused.run = run
    assert all(r.status_code == 200 for r, _ in done.values()), [r.text for r, _ in done.values() if r.status_code != 200]
    assert done[16][0].json()["usage"]["prompt_tokens"] > 300
    assert max(t for k, (_, t) in done.items() if k < 16) < done[16][1]
    assert sum(tuple(s) == (1, 16) for s in widths) >= 5, widths  # the long prompt, a chunk per step


def test_a_classify_request_alone_runs_in_slices_of_at_most_the_prefill_chunk(lm, home):
    """With nothing decoding, a scoring task still takes at most ``--prefill-chunk`` token slots per
    forward, so a request arriving meanwhile waits for one slice; the scores equal the same
    request's on a server whose chunk lets it run in one forward."""
    from softprompt.inference import fused

    body = {"prompt": "tiny", "inputs": [TEXTS[k % 4] * 3 for k in range(8)], "verbalizer": ["w1", "w2", "w3"]}
    shapes, run = [], fused.run
    fused.run = lambda model, fwds: shapes.extend(tuple(f.ids.shape) for f in fwds) or run(model, fwds)
    try:
        with running(lm, home, prefill_chunk=16) as (base, _, _):
            small = httpx.post(base + "/v1/classify", json=body, timeout=60)
        sliced = list(shapes)
        with running(lm, home, prefill_chunk=4096) as (base, _, _):
            whole = httpx.post(base + "/v1/classify", json=body, timeout=60)
    finally:
        fused.run = run
    assert small.status_code == whole.status_code == 200, small.text
    assert len(sliced) > 4 and max(b * c for b, c in sliced) <= 16, sliced
    assert len(shapes) - len(sliced) < len(sliced)  # the big chunk took fewer forwards
    for a, b in zip(small.json()["data"], whole.json()["data"], strict=True):
        assert a["label"] == b["label"]
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)


def test_a_request_over_the_memory_budget_is_413_before_any_model_work(lm, home):
    body = {"prompt": "tiny", "inputs": ["word " * 100] * 32, "verbalizer": [f"w{i}" for i in range(16)]}
    with running(lm, home, max_request_mb=2) as (base, _, _):
        before = model_counters(base)
        r = httpx.post(base + "/v1/classify", json=body, timeout=60)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
        assert "--max-request-mb" in r.json()["error"]["message"]
        r = httpx.post(base + "/v1/completions", json={"model": "p1", "prompt": "word " * 100, "n": 16,
                                                       "max_tokens": 200}, timeout=60)
        assert r.status_code == 413 and "MiB" in r.json()["error"]["message"], r.text
        assert model_counters(base) == before  # the model never ran
        ok = httpx.post(base + "/v1/classify", json={**body, "inputs": ["word"]}, timeout=60)
        assert ok.status_code == 200, ok.text


def test_prompt_virtual_and_completion_tokens_beyond_the_context_are_a_400_naming_them(lm, home):
    """The tiny model's context is 512 positions: 3 virtual tokens + the prompt + max_tokens over
    it is refused with vLLM's wording and the numbers; one token less is served."""
    text = "word " * 100
    with running(lm, home, max_tokens=600) as (base, _, _):
        n = httpx.post(base + "/v1/completions", json={"model": "p0", "prompt": text, "max_tokens": 1},
                       timeout=60).json()["usage"]["prompt_tokens"]
        before = model_counters(base)
        r = httpx.post(base + "/v1/completions", json={"model": "p0", "prompt": text, "max_tokens": 512 - n - 2},
                       timeout=60)
        err = r.json()["error"]
        assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == "prompt", r.text
        assert (f"maximum context length is 512 tokens. However, you requested 513 tokens ({n} in the prompt, "
                f"3 virtual, {512 - n - 2} in the completion)") in err["message"]
        assert model_counters(base) == before
        r = httpx.post(base + "/v1/completions", json={"model": "p0", "prompt": text, "max_tokens": 512 - n - 3,
                                                       "temperature": 0}, timeout=120)
        assert r.status_code == 200, r.text


def test_a_client_looping_over_bad_requests_is_paced_and_healthy_answers_are_not(lm, home):
    """Past a burst of 2 x --error-rate, each further 4xx to one address waits its turn at that
    rate, so a loop of malformed requests is slowed to it; a 2xx to the same address right
    after is not held. With --error-rate 0 the same loop runs unpaced."""
    from softprompt.serve.gate import Pace

    bad = {"model": "p0", "messages": [{"role": ["user"], "content": "hi"}]}

    def loop(base: str, n: int) -> tuple[float, float]:
        with httpx.Client(base_url=base, timeout=60) as c:
            t0 = time.perf_counter()
            assert all(c.post("/v1/chat/completions", json=bad).status_code == 400 for _ in range(n))
            looped = time.perf_counter() - t0
            t1 = time.perf_counter()
            assert c.get("/v1/models").status_code == 200
            return looped, time.perf_counter() - t1

    with running(lm, home, error_rate=10) as (base, _, _):
        paced, healthy = loop(base, 40)  # a burst of 20, then 20 at 10 a second: about 2 s
    with running(lm, home, error_rate=0) as (base, _, _):
        free, _ = loop(base, 40)
    assert paced >= 1.8 > free and healthy < 0.5, (paced, free, healthy)
    pace = Pace(10)  # the bucket itself: a burst of 20, then 0.1 s apart, at most Pace.MAX_WAIT
    assert [pace.wait("a", 0.0) for _ in range(20)] == [0.0] * 20
    assert pace.wait("a", 0.0) == pytest.approx(0.1) and pace.wait("b", 0.0) == 0.0
    assert pace.wait("a", 0.0) == pytest.approx(0.2) and pace.wait("a", 0.3) == pytest.approx(0.0, abs=1e-9)
    assert max(pace.wait("c", 0.0) for _ in range(1000)) == pytest.approx(Pace.MAX_WAIT)
