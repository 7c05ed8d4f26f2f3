"""The HTTP server, end to end: a real uvicorn server on a free loopback port (in a thread),
called with the official ``openai`` client and with ``httpx``.

Every answer is checked against the engine's own single-request answer (relational, no magic
numbers): batching across requests and prompts, continuous batching (rows joining mid-way),
streaming and stop strings must change nothing. Bad requests get OpenAI-shaped 4xx errors and
the server keeps serving. The batching queue is paused where a test needs requests to meet in
one batch, or the queue to be full, so nothing here depends on timing.
"""

from __future__ import annotations

import io
import json
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
from serving import (
    BURST,
    PROMPTS,
    TEMPLATE,
    TEXTS,
    VERBALIZER,
    check_classification,
    client,
    metric,
    paused,
    running,
    send_burst,
    single,
)

from softprompt import models, store
from softprompt.config import GenerateConfig
from softprompt.inference.engine import (
    Engine,
    GenerateRequest,
    ScoreRequest,
    StepBatch,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- the engine's step API


def test_rows_joining_a_running_batch_equal_single_runs(tiny_model_dir, sp_home):
    """Continuous batching is exact: rows that join mid-way, or leave early, change nothing."""
    for arch in ("llama", "gpt2"):
        lm = models.load(str(tiny_model_dir(arch)))
        eng = Engine(lm)
        g = torch.Generator().manual_seed(7)
        for name, n in PROMPTS.items():
            eng.add_prompt(name, torch.randn(n, lm.hidden_size, generator=g))
        reqs = [GenerateRequest(TEXTS[0], "p0", GenerateConfig(max_new_tokens=9)),
                GenerateRequest(TEXTS[1], None, GenerateConfig(max_new_tokens=4)),
                GenerateRequest(TEXTS[2], "p2", GenerateConfig(max_new_tokens=7, temperature=0.8, seed=3)),
                GenerateRequest("", "p1", GenerateConfig(max_new_tokens=6, repetition_penalty=1.3)),
                GenerateRequest(TEXTS[3], "p1", GenerateConfig(max_new_tokens=8))]
        single = [eng.generate([r])[0].token_ids for r in reqs]
        batch, out, where = StepBatch(eng), {}, {}
        for rid, i in zip(batch.add(reqs[:2]), (0, 1), strict=True):
            where[rid] = i
        arrivals = {1: [2], 3: [3, 4]}  # step -> requests joining before it
        step, cancelled = 0, None
        while len(batch) or any(s >= step for s in arrivals):
            for i, rid in zip(arrivals.get(step, []), batch.add([reqs[i] for i in arrivals.get(step, [])]), strict=True):
                where[rid] = i
            for e in batch.step():
                out.setdefault(where[e.rid], []).extend([] if e.token is None else [e.token])
            if step == 4:  # a client goes away: its row leaves, the others go on
                cancelled = next(r.rid for r in batch.live if where[r.rid] == 0)
                batch.cancel([cancelled])
            step += 1
        for i, ids in enumerate(single):
            assert out[i] == (ids[:5] if i == 0 else ids), (arch, i)
        assert len(single[0]) > 5  # the cancelled row really was cut short


# ---------------------------------------------------------------- fixtures: a real server


# ---------------------------------------------------------------- OpenAI compatibility


def test_openai_client_lists_models_and_completes_like_the_engine(srv, ref):
    oc = client(srv[0])
    ids = [m.id for m in oc.models.list()]
    assert ids[0] == "tiny" and set(PROMPTS) | {"lm-only"} <= set(ids)
    assert oc.models.retrieve("p1").id == "p1"
    for model, prompt in (("p1", "p1"), ("tiny", None)):
        r = oc.completions.create(model=model, prompt=TEXTS[0], max_tokens=8, temperature=0)
        assert r.choices[0].text == single(ref, TEXTS[0], prompt, 8)
        assert r.model == model and r.object == "text_completion"
        n_in = len(ref.encode(TEXTS[0]))
        assert r.usage.prompt_tokens == n_in and r.usage.total_tokens == n_in + r.usage.completion_tokens
    # a list of prompts x n: choice i is prompt i // n; sampling seeds are seed + i % n
    r = oc.completions.create(model="p2", prompt=TEXTS[:2], max_tokens=5, n=2, temperature=0.9, seed=11)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:
        assert c.text == single(ref, TEXTS[c.index // 2], "p2", 5, temperature=0.9, seed=11 + c.index % 2)


def test_streaming_sends_the_same_text_in_chunks(srv, ref):
    oc = client(srv[0])
    chunks = list(oc.completions.create(model="p0", prompt=TEXTS[2], max_tokens=10, temperature=0, stream=True,
                                        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == single(ref, TEXTS[2], "p0", 10)
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) > 1  # really incremental
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens > 0
    import httpx  # the raw wire format: data: {...} lines, then data: [DONE]

    body = {"model": "p0", "prompt": TEXTS[2], "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", srv[0] + "/v1/completions", json=body, timeout=60) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: {") for ln in lines[:-1])


def test_stop_strings_cut_the_text_streamed_or_not(srv, ref):
    full = single(ref, TEXTS[1], "p1", 12)
    stop = full[3:5]  # a stop string that occurs in the greedy answer
    cut = full[: full.find(stop)]
    oc = client(srv[0])
    r = oc.completions.create(model="p1", prompt=TEXTS[1], max_tokens=12, temperature=0, stop=[stop, "zzz"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    chunks = oc.completions.create(model="p1", prompt=TEXTS[1], max_tokens=12, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == cut
    r = oc.completions.create(model="p1", prompt=TEXTS[1], max_tokens=3, temperature=0, echo=True)
    assert r.choices[0].text == TEXTS[1] + single(ref, TEXTS[1], "p1", 3)


def test_mixed_burst_is_batched_and_each_answer_equals_its_single_run(srv, ref):
    """Concurrent requests for different prompts (and the plain model, and classification) meet
    in one engine batch; each answer equals the engine's answer to that request alone."""
    gens, classify = BURST, ("p0", "p2")
    answers = send_burst(srv, gens, classify)
    for (text, prompt, m), a in zip(gens, answers, strict=False):
        assert a.json()["choices"][0]["text"] == single(ref, text, prompt, m)
    for p, a in zip(classify, answers[len(gens):], strict=True):
        check_classification(ref, p, a.json())


def test_classify_uses_the_prompts_template_and_verbalizer(srv, http, ref):
    r = http.post("/v1/classify", json={"prompt": "p1", "inputs": TEXTS})
    assert r.status_code == 200
    check_classification(ref, "p1", r.json())
    # the plain model with an explicit template and verbalizer; objects fill named fields
    body = {"prompt": "tiny", "inputs": [{"text": TEXTS[0]}], "template": TEMPLATE, "verbalizer": VERBALIZER}
    r = http.post("/v1/classify", json=body)
    want = ref.score([ScoreRequest(TEMPLATE.format(text=TEXTS[0]), (" bad", " good"))])[0].logprobs
    assert list(r.json()["data"][0]["logprobs"].values()) == pytest.approx(want, abs=1e-4)
    r = http.post("/v1/classify", json={"prompt": "lm-only", "inputs": ["x"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "verbalizer"


# ---------------------------------------------------------------- the prompt registry


def zipped(path: Path, folder: str = "") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in path.iterdir():
            z.write(f, folder + f.name)
    return buf.getvalue()


def test_upload_use_replace_and_delete_a_prompt(srv, http, ref, tmp_path, home):
    src = home.export_prompt("p0", tmp_path / "p0-export")
    assert http.get("/v1/prompts/up1").status_code == 404
    r = http.put("/v1/prompts/up1", content=zipped(src), headers={"content-type": "application/zip"})
    assert r.status_code == 201 and r.json()["num_virtual_tokens"] == PROMPTS["p0"]
    assert "up1" in [m["id"] for m in http.get("/v1/models").json()["data"]]
    body = {"model": "up1", "prompt": TEXTS[0], "max_tokens": 6, "temperature": 0}
    assert http.post("/v1/completions", json=body).json()["choices"][0]["text"] == single(ref, TEXTS[0], "p0", 6)
    # replace it (multipart, files in a folder inside the zip): the server sees the new tensor
    src2 = home.export_prompt("p1", tmp_path / "p1-export")
    r = http.put("/v1/prompts/up1", files={"file": ("p1.zip", zipped(src2, "p1/"), "application/zip")})
    assert r.status_code == 200 and r.json()["replaced"] and r.json()["num_virtual_tokens"] == PROMPTS["p1"]
    assert http.post("/v1/completions", json=body).json()["choices"][0]["text"] == single(ref, TEXTS[0], "p1", 6)
    files = {f.name: (f.name, f.read_bytes()) for f in src.iterdir()}  # multipart, one part per file
    assert http.put("/v1/prompts/up2", files=files).status_code == 201
    assert http.get("/v1/prompts/up2").json()["verbalizer"] == VERBALIZER
    for name in ("up1", "up2"):
        assert http.delete(f"/v1/prompts/{name}").json() == {"id": name, "object": "prompt", "deleted": True}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert http.delete("/v1/prompts/up1").status_code == 404


def test_bad_uploads_are_refused_and_nothing_becomes_visible(srv, http, tmp_path, home):
    src = home.export_prompt("p0", tmp_path / "ok")
    wrong = tmp_path / "wrong"  # hidden size 32: trained for another model
    store.save_prompt(wrong, torch.randn(4, 32), {})
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../../adapter_config.json", "{}")
    partial = io.BytesIO()
    with zipfile.ZipFile(partial, "w") as z:
        z.write(src / "adapter_config.json", "adapter_config.json")
    cases = [(b"not a zip", 400), (zipped(wrong), 422), (evil.getvalue(), 400), (partial.getvalue(), 422), (b"", 400)]
    for content, status in cases:
        r = http.put("/v1/prompts/bad", content=content)
        assert r.status_code == status, r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert http.put("/v1/prompts/..bad", content=zipped(src)).status_code in (400, 404)
    assert http.put("/v1/prompts/tiny", content=zipped(src)).status_code == 400  # the plain model's id
    assert "bad" not in home.list_prompts() and http.get("/v1/prompts/bad").status_code == 404


# ---------------------------------------------------------------- errors, limits, auth


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(lm, ref, home):
    import httpx

    with running(lm, home, max_body_bytes=4096, max_prompt_tokens=64, max_tokens=32) as (base, _, _):
        c = httpx.Client(base_url=base, timeout=60)
        ok = {"model": "p0", "prompt": TEXTS[0], "max_tokens": 4, "temperature": 0}
        cases = [
            (c.post("/v1/completions", content=b'{"model": "p0",'), 400, "invalid_json"),
            (c.post("/v1/completions", json=[1, 2]), 400, "invalid_json"),
            (c.post("/v1/completions", json={**ok, "model": "nope"}), 404, "model_not_found"),
            (c.post("/v1/completions", json={**ok, "model": "../etc"}), 404, "model_not_found"),
            (c.post("/v1/completions", json={**ok, "max_tokens": 33}), 400, "max_tokens_exceeded"),
            (c.post("/v1/completions", json={**ok, "prompt": "the movie " * 40}), 400, "context_length_exceeded"),
            (c.post("/v1/completions", json={**ok, "prompt": "x" * 5000}), 413, "body_too_large"),
            (c.post("/v1/completions", json={**ok, "temperature": "hot"}), 400, "invalid_type"),
            (c.post("/v1/completions", json={**ok, "max_tokens": 0}), 400, "invalid_value"),
            (c.post("/v1/completions", json={**ok, "prompt": None}), 400, "invalid_type"),
            (c.post("/v1/completions", json={**ok, "prompt": [10**9]}), 400, "invalid_value"),
            (c.post("/v1/completions", json={**ok, "model": "tiny", "prompt": ""}), 400, "invalid_value"),
            (c.post("/v1/completions", json={**ok, "logprobs": 30}), 400, "invalid_value"),
            (c.post("/v1/completions", json={**ok, "stop": [1]}), 400, "invalid_type"),
            (c.post("/v1/classify", json={"prompt": "p0", "inputs": []}), 400, "invalid_value"),
            (c.post("/v1/classify", json={"prompt": "p0", "inputs": [{"nope": 1}]}), 400, "invalid_value"),
            (c.post("/v1/classify", json={"prompt": "zz", "inputs": ["a"]}), 404, "model_not_found"),
            (c.get("/v1/nothing-here"), 404, "not_found"),
            (c.delete("/v1/completions"), 405, "method_not_allowed"),
        ]
        chunked = c.post("/v1/completions", content=iter([b"{" + b" " * 3000, b" " * 3000 + b"}"]))
        cases.append((chunked, 413, "body_too_large"))  # no Content-Length: counted while read
        for r, status, code in cases:
            assert r.status_code == status, (r.request.content[:60], r.text)
            assert r.json()["error"]["code"] == code and set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert c.get("/healthz").json()["status"] == "ok"
        assert c.post("/v1/completions", json=ok).json()["choices"][0]["text"] == single(ref, TEXTS[0], "p0", 4)
        errors = metric(c.get("/metrics").text, 'softprompt_request_errors_total{endpoint="/v1/completions"}')
        assert errors >= 14


def test_api_key_is_required_when_set(lm, home):
    import httpx
    import openai

    with running(lm, home, api_key="s3cret") as (base, _, _):
        body = {"model": "p0", "prompt": "x", "max_tokens": 2}
        assert httpx.post(base + "/v1/completions", json=body).status_code == 401
        r = httpx.post(base + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(base + "/metrics").status_code == 401
        assert httpx.get(base + "/healthz").status_code == 200 and httpx.get(base + "/").status_code == 200
        assert client(base, "s3cret").completions.create(model="p0", prompt="x", max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            client(base, "wrong").models.list()


def test_full_queue_answers_429_timeouts_504_then_serves_again(lm, ref, home):
    import httpx

    with running(lm, home, max_queue=2, max_batch_rows=1, request_timeout_s=3) as (base, app, _):
        body = {"model": "p1", "prompt": TEXTS[0], "max_tokens": 4, "temperature": 0}
        results = []

        def call():
            results.append(httpx.post(base + "/v1/completions", json=body, timeout=60))

        with paused(app, waiting=2):
            threads = [threading.Thread(target=call) for _ in range(2)]
            for t in threads:
                t.start()
            while app.state.scheduler.depth() < 2:
                time.sleep(0.01)
            r = httpx.post(base + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
            assert int(r.headers["retry-after"]) >= 1
        for t in threads:
            t.join(60)
        assert [r.status_code for r in results] == [200, 200]
        assert all(r.json()["choices"][0]["text"] == single(ref, TEXTS[0], "p1", 4) for r in results)
        app.state.scheduler.pause()  # a request that waits past request_timeout_s: 504, then it is dropped
        r = httpx.post(base + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        app.state.scheduler.pause(False)
        assert httpx.get(base + "/healthz").json()["status"] == "ok"
        assert httpx.post(base + "/v1/completions", json=body, timeout=60).status_code == 200


def test_a_client_that_goes_away_stops_its_rows(srv, http):
    import httpx

    base, app, _ = srv
    body = {"model": "p2", "prompt": TEXTS[0], "max_tokens": 500, "temperature": 0.9, "stream": True}
    before = metric(http.get("/metrics").text, "softprompt_generated_tokens_total")
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
        next(r.iter_lines())  # the first chunk: the row is decoding; now hang up
    t0 = time.monotonic()
    while app.state.scheduler.active_rows():
        assert time.monotonic() - t0 < 10
        time.sleep(0.01)
    assert metric(http.get("/metrics").text, "softprompt_generated_tokens_total") - before < 500


def test_metrics_are_prometheus_text(srv, http):
    http.post("/v1/completions", json={"model": "p0", "prompt": "x", "max_tokens": 2})
    text = http.get("/metrics").text
    for name in ("softprompt_requests_total", "softprompt_request_errors_total", "softprompt_batch_rows_bucket",
                 "softprompt_queue_depth", "softprompt_tokens_per_second", "softprompt_request_latency_seconds_bucket",
                 "softprompt_active_rows", "softprompt_generated_tokens_total"):
        assert name in text
    for line in text.splitlines():  # every sample: name{labels} value
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])
    assert 'le="+Inf"' in text and "# TYPE softprompt_request_latency_seconds histogram" in text


def test_graceful_shutdown_finishes_in_flight_requests(lm, ref, home):
    import httpx

    with running(lm, home) as (base, app, server):
        body = {"model": "p2", "prompt": TEXTS[1], "max_tokens": 12, "temperature": 0}
        out = {}
        th = threading.Thread(target=lambda: out.setdefault("r", httpx.post(base + "/v1/completions", json=body, timeout=60)))
        with paused(app, waiting=1):
            th.start()
        server.should_exit = True  # what SIGTERM does
        th.join(60)
        assert out["r"].status_code == 200
        assert out["r"].json()["choices"][0]["text"] == single(ref, TEXTS[1], "p2", 12)


def test_serve_command_wires_flags_model_and_json_logs(tiny_model_dir, home, lm, monkeypatch, capsys):
    """``softprompt serve``: flags -> ServerConfig, the model loaded once, JSON log lines. uvicorn.run
    is replaced by an in-process client (a subprocess would spend ~10 s importing torch here)."""
    import logging

    import uvicorn
    from conftest import with_store
    from starlette.testclient import TestClient

    from softprompt import cli

    seen = {}

    def fake_run(app, **kw):
        seen.update(kw, cfg=app.state.config)
        with TestClient(app) as c:  # runs the lifespan: worker thread up, then drained and stopped
            seen["open"] = c.get("/v1/models").status_code
            seen["ok"] = c.post("/v1/completions", headers={"Authorization": "Bearer k"},
                                json={"model": "p0", "prompt": "x", "max_tokens": 2}).status_code

    monkeypatch.setattr(uvicorn, "run", fake_run)
    monkeypatch.setenv("SOFTPROMPT_API_KEY", "k")  # the CLI reads it at its edge
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        argv = ["serve", "--model", str(tiny_model_dir("llama")), "--port", "8123", "--max-batch-rows", "4",
                "--max-wait-ms", "2.5"]
        assert cli.main(with_store(home, argv)) == 0  # the module's store, through --home
    finally:
        root.handlers[:], root.level = handlers, level
    cfg = seen["cfg"]
    assert (seen["host"], seen["port"], cfg.max_batch_rows, cfg.max_wait_ms, cfg.api_key) == ("127.0.0.1", 8123, 4, 2.5, "k")
    assert seen["open"] == 401 and seen["ok"] == 200 and seen["access_log"] is False
    logs = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert any(e["msg"] == "request" and e["path"] == "/v1/completions" and e["status"] == 200 for e in logs)
    assert {"ready", "stopped"} <= {e["msg"] for e in logs}
    assert cli.main(with_store(home, ["serve", "--max-batch-rows", "0"])) == 2  # a bad flag: one line, exit 2


def test_deep_prompt_uploads_are_validated_served_and_shown(srv, http, ref, tmp_path, tiny_model_dir, home):
    from safetensors.torch import save_file

    from softprompt.prompt import make_deep_prompt

    lm = ref.lm
    kv = make_deep_prompt(lm.model, lm.tokenizer, 4, "random", seed=1)
    good = store.save_prompt(tmp_path / "deep", kv, {"kind": "deep"}, str(lm.path))
    gpt2 = models.load(str(tiny_model_dir("gpt2")))  # 4 key/value heads where the served Llama has 2
    other = store.save_prompt(tmp_path / "other", make_deep_prompt(gpt2.model, gpt2.tokenizer, 4, "random"), {})
    poisoned = kv.clone()
    poisoned[0, 0, 0, 0, 0] = float("nan")
    nan = store.save_prompt(tmp_path / "nan", kv, {}).resolve()  # then poisoned past the validator
    (nan / store.TENSORS).unlink()
    save_file({store.PROMPT_KEY: store.deep_to_peft(poisoned)}, str(nan / store.TENSORS))
    for src, message in ((other, "another model"), (nan, "NaN")):
        r = http.put("/v1/prompts/deepbad", content=zipped(src))
        assert r.status_code == 422 and message in r.json()["error"]["message"], r.text
    assert "deepbad" not in home.list_prompts()
    r = http.put("/v1/prompts/deep1", content=zipped(good))
    assert r.status_code == 201 and r.json()["kind"] == "deep"
    kinds = {m["id"]: m.get("kind") for m in http.get("/v1/models").json()["data"]}
    assert kinds["deep1"] == "deep" and kinds["p0"] == "shallow"
    ref.add_prompt("deep-ref", kv)
    body = {"model": "deep1", "prompt": TEXTS[0], "max_tokens": 6, "temperature": 0}
    got = http.post("/v1/completions", json=body).json()
    assert "choices" in got, got
    assert got["choices"][0]["text"] == single(ref, TEXTS[0], "deep-ref", 6), got
    assert any(line.startswith("softprompt_resident_deep_prompts 1") for line in http.get("/metrics").text.splitlines())
    assert http.delete("/v1/prompts/deep1").status_code == 200
