"""What one client sends cannot hurt another: failure isolation in the worker, cost limits
checked before any model work, fair sharing of the worker, the declared request contract,
and the Ray Serve pieces that need no cluster.

Relational where it can be: healthy requests batched with poisoned ones answer exactly what
they answer alone. Requests are made to meet in one batch by pausing the worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import httpx
import pytest
import torch
from serving import TEMPLATE, TEXTS, VERBALIZER, metric, paused, running, single

from softprompt import store

pytestmark = pytest.mark.usefixtures("one_thread")

pytest.importorskip("fastapi")


def put_prompt(st, lm, name: str, emb: torch.Tensor, **meta) -> None:
    """Plant a prompt as an older version stored it: a plain folder, past the store's validator
    (``st.save_prompt`` refuses these prompts)."""
    from safetensors.torch import save_file

    meta = {"base_model": {"name": lm.name, "fingerprint": lm.fingerprint}, "mode": "target", **meta}
    d = st.prompt_path(name)
    d.mkdir(parents=True)
    (d / store.CONFIG).write_text(json.dumps(store.adapter_config(emb.shape[0], emb.shape[1], str(lm.path))))
    save_file({store.PROMPT_KEY: emb}, str(d / store.TENSORS))
    (d / store.META).write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def poisoned(lm, home):
    """Stored prompts that must not be served: N=0, NaN values, N above the limit, bad metadata."""
    H = lm.hidden_size
    put_prompt(home, lm, "empty", torch.zeros(0, H))
    put_prompt(home, lm, "nan", torch.full((4, H), float("nan")))
    put_prompt(home, lm, "huge", torch.randn(70, H))
    put_prompt(home, lm, "badverb", torch.randn(3, H), verbalizer="ab", template=TEMPLATE)
    put_prompt(home, lm, "badtemplate", torch.randn(3, H), verbalizer=VERBALIZER, template=5)
    return ["empty", "nan", "huge", "badverb", "badtemplate"]


def burst(base: str, calls: list[tuple[str, dict]]) -> list[httpx.Response]:
    async def go():
        async with httpx.AsyncClient(base_url=base, timeout=60) as c:
            return await asyncio.gather(*[c.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
                                          for path, body in calls])

    out = {}
    th = threading.Thread(target=lambda: out.setdefault("r", asyncio.run(go())))
    th.start()
    return th, out


def run_burst(app, base: str, calls: list[tuple[str, dict]], waiting: int | None = None) -> list[httpx.Response]:
    """``calls`` at once, meeting in one batch (``waiting``: how many reach the queue)."""
    with paused(app, waiting=len(calls) if waiting is None else waiting):
        th, out = burst(base, calls)
    th.join(120)
    return out["r"]


HEALTHY = [("/v1/completions", {"model": "p0", "prompt": TEXTS[0], "max_tokens": 6, "temperature": 0}),
           ("/v1/completions", {"model": "p1", "prompt": TEXTS[1], "max_tokens": 5, "temperature": 0.8, "seed": 3}),
           ("/v1/completions", {"model": "tiny", "prompt": TEXTS[2], "max_tokens": 4, "temperature": 0}),
           ("/v1/classify", {"prompt": "p2", "inputs": TEXTS[:2]})]


def assert_same(a: dict, b: dict) -> None:
    """Two answers agree: texts, tokens and labels exactly; classify scores up to float rounding
    (the scoring forwards' shapes follow the step budget, which follows the batch)."""
    key = "choices" if "choices" in a else "data"
    scores = ("probabilities", "logprobs")
    assert [{k: v for k, v in x.items() if k not in scores} for x in a[key]] == \
           [{k: v for k, v in x.items() if k not in scores} for x in b[key]]
    for x, y in zip(a[key], b[key], strict=True):
        for k in scores:
            if isinstance(x.get(k), dict):
                assert x[k].keys() == y[k].keys()
                assert list(x[k].values()) == pytest.approx(list(y[k].values()), abs=1e-5)
            else:
                assert x.get(k) == y.get(k)


def test_poisoned_requests_fail_alone_and_healthy_answers_are_unchanged(lm, poisoned, home):
    """The issue's triggers, sent in one batch with healthy requests (each failed every job in
    the batch with a 500 before): each gets its own 4xx; the healthy answers equal a run without them."""
    gen = {"prompt": TEXTS[0], "max_tokens": 3, "temperature": 0.7}
    bad = [("/v1/completions", {"model": "empty", **gen}),
           ("/v1/completions", {"model": "nan", **gen}),
           ("/v1/completions", {"model": "huge", **gen}),
           ("/v1/classify", {"prompt": "badverb", "inputs": ["x"]}),
           ("/v1/classify", {"prompt": "badtemplate", "inputs": ["x"]}),
           ("/v1/classify", {"prompt": "p0", "inputs": ["a \ud800"]}),
           ("/v1/classify", {"prompt": "p0", "inputs": ["a"], "verbalizer": {"x": "b\ud800"}}),
           ("/v1/completions", {"model": "p0", "prompt": "hi \udfff", "max_tokens": 2})]
    with running(lm, home, max_prompt_tokens=64) as (base, app, _):
        clean = run_burst(app, base, HEALTHY)
        mixed = run_burst(app, base, bad[:4] + HEALTHY + bad[4:], waiting=len(HEALTHY) + 5)  # text errors: no queue
        t0 = time.monotonic()
        tiny = httpx.post(base + "/v1/completions", json={"model": "p0", "prompt": "hi", "max_tokens": 2,
                                                          "temperature": 1e-300}, timeout=60)
        assert time.monotonic() - t0 < 30
        greedy = httpx.post(base + "/v1/completions", json={"model": "p0", "prompt": "hi", "max_tokens": 2,
                                                            "temperature": 0}, timeout=60)
    got = mixed[:4] + mixed[4 + len(HEALTHY):]
    assert [r.status_code for r in got] == [422, 422, 422, 422, 422, 400, 400, 400], [r.text for r in got]
    params = [r.json()["error"]["param"] for r in got]
    assert params[5:] == ["inputs[0]", "verbalizer.x", "prompt"]
    assert "virtual tokens" in got[2].json()["error"]["message"] and "NaN" in got[1].json()["error"]["message"]
    assert "softprompt.json:verbalizer" in got[3].json()["error"]["message"]
    healthy = mixed[4 : 4 + len(HEALTHY)]
    assert [r.status_code for r in healthy] == [200] * len(HEALTHY), [r.text for r in healthy]
    for a, b in zip(clean, healthy, strict=True):
        assert_same(a.json(), b.json())
    # a temperature too small to divide by (it overflowed to inf) counts as greedy
    assert tiny.status_code == 200 and tiny.json()["choices"] == greedy.json()["choices"]


def test_a_vanishing_temperature_among_healthy_requests_harms_none(lm, poisoned, home):
    """temperature 1e-300 (it once overflowed the sampler and failed its whole batch), sent in one
    burst with healthy requests: every answer is a 200 and the healthy ones equal a clean run."""
    tiny_t = ("/v1/completions", {"model": "p0", "prompt": TEXTS[0], "max_tokens": 3, "temperature": 1e-300})
    with running(lm, home) as (base, app, _):
        clean = run_burst(app, base, HEALTHY)
        mixed = run_burst(app, base, [tiny_t, *HEALTHY, tiny_t])
    assert [r.status_code for r in mixed] == [200] * (len(HEALTHY) + 2), [r.text for r in mixed]
    for a, b in zip(clean, mixed[1:-1], strict=True):
        assert_same(a.json(), b.json())


def test_a_row_that_breaks_the_decode_step_fails_alone(lm, monkeypatch, ref, home):
    """The safety net behind the checks: a row whose token choice raises (injected here: sampling
    with seed 666 fails, as a NaN distribution makes torch.multinomial fail) breaks the shared
    step; the rows are retried apart, only its request fails (500 naming the step), and the
    others in the same batch finish with their single-run answers."""
    from softprompt.inference import sampling

    real = sampling.pick_token

    def pick(logits, seen, cfg, gen):
        if cfg.seed == 666:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real(logits, seen, cfg, gen)

    monkeypatch.setattr(sampling, "pick_token", pick)
    calls = HEALTHY[:3] + [("/v1/completions", {"model": "p2", "prompt": TEXTS[0], "max_tokens": 3,
                                                 "temperature": 0.7, "seed": 666})]
    with running(lm, home) as (base, app, _):
        answers = run_burst(app, base, calls)
        assert httpx.get(base + "/healthz").json()["status"] == "ok"
    assert [r.status_code for r in answers] == [200, 200, 200, 500], [r.text for r in answers]
    assert "decode step" in answers[3].json()["error"]["message"]
    for (_, body), r in zip(calls[:3], answers, strict=False):
        prompt = None if body["model"] == "tiny" else body["model"]
        kw = {"seed": body["seed"]} if "seed" in body else {}
        want = single(ref, body["prompt"], prompt, body["max_tokens"], temperature=body["temperature"], **kw)
        assert r.json()["choices"][0]["text"] == want


# ---------------------------------------------------------------- cost limits


def test_costly_requests_are_refused_before_any_model_work(lm, poisoned, home):
    long_word = " ".join(["good"] * 200)
    cases = [
        ({"prompt": "p0", "inputs": ["x"], "verbalizer": {"a": long_word, "b": "bad"}}, "label_too_long"),
        ({"prompt": "p0", "inputs": ["x"], "verbalizer": [f"w{i}" for i in range(9)]}, "too_many_labels"),
        ({"prompt": "p0", "inputs": ["x"], "template": "{text:>20000000}"}, "invalid_value"),
        ({"prompt": "p0", "inputs": ["x" * 300], "template": "{text}{text}"}, "input_too_long"),
        ({"prompt": "p0", "inputs": ["x"] * 9}, "invalid_value"),
    ]
    with running(lm, home, max_labels=8, max_label_tokens=16, max_template_chars=500, max_rows=8,
                 max_request_tokens=200) as (base, _, _):
        before = httpx.get(base + "/metrics").text
        for body, code in cases:
            t0 = time.monotonic()
            r = httpx.post(base + "/v1/classify", json=body, timeout=60)
            assert r.status_code == 400 and r.json()["error"]["code"] == code, (body, r.text)
            assert time.monotonic() - t0 < 5
        r = httpx.post(base + "/v1/completions", json={"model": "p0", "prompt": TEXTS[:2], "n": 4, "max_tokens": 30},
                       timeout=60)  # 8 rows x (3 + ~7 + 30) tokens > 200
        assert r.status_code == 400 and r.json()["error"]["code"] == "request_too_large", r.text
        after = httpx.get(base + "/metrics").text
        for kind in ("score", "prefill", "decode"):
            name = f'softprompt_batch_rows_count{{kind="{kind}"}}'
            assert metric(after, name) == metric(before, name)  # the model never ran
        ok = httpx.post(base + "/v1/classify", json={"prompt": "p0", "inputs": ["x"]}, timeout=60)
        assert ok.status_code == 200


def test_a_long_request_delays_a_short_one_by_at_most_one_step(lm, home):
    """With --join-every 1, a short completion sent while a long one decodes is admitted at the
    next step (measured: the worker's steps between submission and admission)."""
    with running(lm, home, join_every=1) as (base, app, _):
        long_body = {"model": "p2", "prompt": TEXTS[0], "max_tokens": 400, "temperature": 0.9, "seed": 1,
                     "stream": True}
        with httpx.stream("POST", base + "/v1/completions", json=long_body, timeout=120) as stream:
            lines = stream.iter_lines()
            next(lines)  # the long request is decoding
            waits = []
            for i in range(3):
                long_running = app.state.scheduler.active_rows() == 1
                before = httpx.get(base + "/metrics").text
                r = httpx.post(base + "/v1/completions", json={"model": "p0", "prompt": TEXTS[i], "max_tokens": 3,
                                                               "temperature": 0}, timeout=60)
                after = httpx.get(base + "/metrics").text
                assert r.status_code == 200
                count = 'softprompt_wait_steps_count{kind="generate"}'
                assert metric(after, count) - metric(before, count) == 1  # this request's admission
                name = 'softprompt_wait_steps_sum{kind="generate"}'
                if long_running:  # (on a loaded machine the long one may have ended by the later ones)
                    waits.append(metric(after, name) - metric(before, name))
        assert waits and max(waits) <= 1, waits


# ---------------------------------------------------------------- the declared contract


def test_openapi_documents_every_request_field(srv_plain):
    base, _ = srv_plain
    spec = httpx.get(base + "/openapi.json").json()
    from softprompt.serve.protocol import ClassifyRequest, CompletionRequest

    for path, model in (("/v1/completions", CompletionRequest), ("/v1/classify", ClassifyRequest)):
        ref_ = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        props = spec["components"]["schemas"][ref_.rsplit("/", 1)[1]]["properties"]
        assert set(props) == set(model.model_fields)
        assert {"400", "413", "429", "500"} <= set(spec["paths"][path]["post"]["responses"])
    assert "requestBody" in spec["paths"]["/v1/prompts/{name}"]["put"]


@pytest.fixture(scope="module")
def srv_plain(lm, home):
    with running(lm, home, max_body_bytes=1 << 20) as (base, app, _):
        yield base, app


def test_malformed_requests_get_4xx_naming_the_field_before_any_work(srv_plain):
    base, _ = srv_plain
    ok = {"model": "p0", "prompt": "x", "max_tokens": 48}
    before = metric(httpx.get(base + "/metrics").text, "softprompt_generated_tokens_total")
    deep = "[" * 100_000 + "]" * 100_000
    cases = [
        ({**ok, "stream": "no"}, "stream", "invalid_type"),
        ({**ok, "stream": True, "stream_options": 5}, "stream_options", "invalid_type"),
        ({**ok, "stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage",
         "invalid_type"),
        ({**ok, "stop": ["a", 3]}, "stop[1]", "invalid_type"),
        ({**ok, "prompt": [[1, 2], [-3]]}, "prompt[1][0]", "invalid_value"),
        ({**ok, "prompt": "a\ud800b"}, "prompt", "invalid_value"),
        ({**ok, "prompt": ["ok", "a\ud800b"]}, "prompt[1]", "invalid_value"),
        ({**ok, "temperature": float("nan")}, "temperature", "invalid_value"),
        ({"prompt": "x"}, "model", "missing_required_parameter"),
    ]
    for body, param, code in cases:
        r = httpx.post(base + "/v1/completions", content=json.dumps(body), timeout=60,
                       headers={"content-type": "application/json"})
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert (err["param"], err["code"]) == (param, code), (body, err)
    r = httpx.post(base + "/v1/completions", content='{"model": "p0", "prompt": ' + deep + "}",
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert metric(httpx.get(base + "/metrics").text, "softprompt_generated_tokens_total") == before


def test_an_empty_prompt_is_the_same_400_naming_the_field_on_every_route(srv_plain, lm, home):
    """No token to continue from (the plain model, or a deep prompt, which has no token of its
    own) is one 400 naming the field, for completions and classify alike; a shallow prompt's
    virtual tokens are enough."""
    base, _ = srv_plain
    layers, kv, d = lm.kv_shape
    meta = {"base_model": {"name": lm.name, "fingerprint": lm.fingerprint}, "mode": "lm"}
    home.save_prompt("deep-e", torch.randn(layers, 2, kv, 3, d), meta)
    cases = [("/v1/completions", {"model": "tiny", "prompt": "", "max_tokens": 2}, "prompt"),
             ("/v1/completions", {"model": "deep-e", "prompt": "", "max_tokens": 2}, "prompt"),
             ("/v1/completions", {"model": "deep-e", "prompt": ["x", ""], "max_tokens": 2}, "prompt[1]"),
             ("/v1/classify", {"prompt": "tiny", "inputs": ["x", ""], "verbalizer": ["good", "bad"]}, "inputs[1]"),
             ("/v1/classify", {"prompt": "deep-e", "inputs": [""], "verbalizer": ["good", "bad"]}, "inputs[0]")]
    for path, body, param in cases:
        r = httpx.post(base + path, json=body, timeout=60)
        assert r.status_code == 400, (body, r.text)
        assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (param, "invalid_value"), (body, r.text)
    assert httpx.post(base + "/v1/completions", json={"model": "p0", "prompt": "", "max_tokens": 2}).status_code == 200
    assert httpx.post(base + "/v1/completions", json={"model": "deep-e", "prompt": "x", "max_tokens": 2}).status_code == 200


def test_options_names_every_method_of_the_path(srv_plain):
    base, _ = srv_plain
    r = httpx.request("OPTIONS", base + "/v1/prompts/p0")
    assert r.status_code == 405
    assert {m.strip() for m in r.headers["allow"].split(",")} >= {"GET", "PUT", "DELETE"}
    assert httpx.request("OPTIONS", base + "/v1/completions").headers["allow"] == "POST"


def test_an_unhandled_error_is_a_counted_500_with_the_request_id(srv_plain, monkeypatch, caplog):
    from softprompt.serve import routes_openai

    base, _ = srv_plain

    def boom(*a):
        raise RuntimeError("boom")

    monkeypatch.setattr(routes_openai, "list_models", boom)
    before = httpx.get(base + "/metrics").text
    with caplog.at_level(logging.ERROR):
        r = httpx.get(base + "/v1/models")
    after = httpx.get(base + "/metrics").text
    rid = r.headers["x-request-id"]
    assert r.status_code == 500 and rid in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "internal_error"
    for name in ('softprompt_requests_total{endpoint="/v1/models",status="500"}',
                 'softprompt_request_errors_total{endpoint="/v1/models"}'):
        assert metric(after, name) - metric(before, name) == 1
    assert 'status="0"' not in after
    assert any(getattr(rec, "fields", {}).get("id") == rid and rec.exc_info for rec in caplog.records)


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"model": "p0", "prompt": "x", "max_tokens": 2}),
    ("/v1/completions", {"model": "p0", "prompt": "x", "max_tokens": 2, "stream": True}),
    ("/v1/classify", {"prompt": "p0", "inputs": ["x"]}),
])
def test_a_fault_in_the_worker_is_a_500_whose_body_and_log_line_carry_the_request_id(srv_plain, monkeypatch,
                                                                                   caplog, path, body):
    from softprompt.serve import routes_openai

    base, _ = srv_plain

    def boom(*a, **kw):
        raise RuntimeError("boom")

    real = routes_openai.virtual_tokens
    monkeypatch.setattr(routes_openai, "virtual_tokens", boom)  # runs in the worker, inside prepare
    with caplog.at_level(logging.ERROR):
        r = httpx.post(base + path, json=body, timeout=60)
    rid = r.headers["x-request-id"]
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert f"request id {rid}" in r.json()["error"]["message"]
    faults = [rec for rec in caplog.records if rec.exc_info and "failed in the preparation" in rec.getMessage()]
    assert [getattr(rec, "fields", {}).get("id") for rec in faults] == [rid]
    monkeypatch.setattr(routes_openai, "virtual_tokens", real)
    assert httpx.post(base + path, json=body, timeout=60).status_code == 200  # still serving


# ---------------------------------------------------------------- Ray Serve parts (no cluster needed)


def test_prompt_log_keeps_the_latest_change_per_name():
    from softprompt.serve.replicas import PromptLog

    plog = PromptLog()
    for i in range(3):
        plog.append("a", {"adapter_model.safetensors": bytes(1000 * (i + 1))})
    plog.append("b", {"adapter_model.safetensors": bytes(10)})
    assert plog.nbytes() == 3000 + 10  # not 1000 + 2000 + 3000 + 10
    plog.append("a", None)  # deleted: its bytes go
    assert plog.nbytes() == 10
    assert [(s, n) for s, n, _ in plog.since("r", 0)] == [(4, "b"), (5, "a")]


def test_a_failed_sync_is_reported_retried_and_not_marked_applied():
    from softprompt.serve.replicas import PromptLog, Syncer

    plog, applied, broken = PromptLog(), [], [True]

    def apply(name, files):
        if broken[0]:
            raise OSError("disk full")
        applied.append(name)

    async def since(r, a):
        return plog.since(r, a)

    async def report(r, seq, err):
        plog.report(r, seq, err)

    async def scenario():
        sync = Syncer("r1", apply, since, report)
        seq = plog.append("a", {"f": b"x"})
        assert await sync.sync() is False and sync.applied == 0 and applied == []
        behind = await plog.wait_applied(seq, timeout_s=0.2)
        assert behind == {"r1": "OSError: disk full"}
        broken[0] = False  # the next poll retries it
        assert await sync.sync() is True and sync.applied == seq and applied == ["a"]
        assert await plog.wait_applied(seq, timeout_s=0.2) == {}

    asyncio.run(scenario())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ray_ingress_answers_413_before_reading_the_body():
    pytest.importorskip("ray")
    from starlette.requests import Request

    from softprompt.serve.ray_serve import Ingress

    ingress = Ingress(None, max_body_bytes=100, max_upload_bytes=1000)

    def scope(length: int | None):
        headers = [(b"content-length", str(length).encode())] if length is not None else []
        return {"type": "http", "method": "POST", "path": "/v1/completions", "headers": headers, "query_string": b""}

    async def never():
        raise AssertionError("the body was read")

    async def chunks():
        return {"type": "http.request", "body": b"x" * 60, "more_body": True}

    async def scenario():
        r = await ingress(Request(scope(10**9), never))
        assert r.status_code == 413 and json.loads(r.body)["error"]["code"] == "body_too_large"
        r = await ingress(Request(scope(None), chunks))  # no length: counted while read, stopped at the limit
        assert r.status_code == 413

    asyncio.run(scenario())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ray_replica_close_stops_the_worker(lm, home):
    pytest.importorskip("ray")
    from softprompt.config import ServerConfig
    from softprompt.inference.engine import Engine
    from softprompt.serve.app import create_app
    from softprompt.serve.ray_serve import Replica

    rep = object.__new__(Replica)  # what Ray Serve builds, minus the cluster
    rep.cfg = ServerConfig(shutdown_timeout_s=10)
    rep.app = create_app(Engine(lm, store=home), rep.cfg)
    rep.app.state.scheduler.start()
    rep._task = None
    assert rep.app.state.scheduler.thread.is_alive()
    rep.close()
    assert not rep.app.state.scheduler.thread.is_alive()
