"""Serving replicas with Ray Serve: a local Ray cluster in this process, 2 replicas of a tiny
model, each with its own prompt store (as on machines without a shared filesystem).

Relational checks: the ``openai`` client gets the same answers through Ray as from the
single-process server; requests for one prompt stick to one replica; an upload and a deletion
reach every replica's store; a replica killed mid-load costs no request (the client retries) and
Ray starts a new one, which catches up on the uploads before serving.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from softprompt import store
from softprompt.serve.app import ServerConfig

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
from serving import running  # noqa: E402 - after the skips (home and lm, a store holding PROMPTS: conftest.py)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
TEXTS = ["the movie was", "a wonderful film with a great story", "who wrote the book"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(one_thread, lm, home, tiny_model_dir):
    """A local Ray cluster; Serve's proxy on a free port; the app with 2 replicas."""
    from ray import serve

    from softprompt.serve.ray_serve import APP, build_app

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app(ServerConfig(model_id="tiny"), str(tiny_model_dir("llama")), replicas=2,
                    replica_cpus=1, isolated_store=True, max_ongoing_requests=2,
                    # how long Ray's router waits for a busy replica that has the prompt (default 1 s)
                    env={"RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S": "0.1"}, store=home)
    serve.run(app, name=APP, route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def single(lm, home):
    with running(lm, home) as (url, _, _):
        yield url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=6, timeout=60)


def replica_stores(home) -> dict[str, object]:
    """Each live replica's private store (the directory name is its Ray replica id)."""
    root = home.home / "replicas"
    return {p.name: p / "prompts" for p in root.iterdir()} if root.is_dir() else {}


def replica_pids() -> set[int]:
    """Process ids of the live replicas (calls without a prompt spread over all of them)."""
    from ray import serve

    from softprompt.serve.ray_serve import APP

    h = serve.get_deployment_handle("Replica", APP)
    return {h.pid.remote().result(timeout_s=60) for _ in range(30)}


def running_replicas() -> int:
    from ray import serve

    from softprompt.serve.ray_serve import APP

    return serve.status().applications[APP].deployments["Replica"].replica_states.get("RUNNING", 0)


def test_answers_equal_the_single_process_server(cluster, single):
    r, s = client(cluster), client(single)
    for model in ("tiny", "p0", "p1", "p2"):
        for text in TEXTS:
            kw = dict(model=model, prompt=text, max_tokens=8, temperature=0)
            want = s.completions.create(**kw).choices[0].text
            assert r.completions.create(**kw).choices[0].text == want, (model, text)
    kw = dict(model="p1", prompt=TEXTS[1], max_tokens=10, temperature=0.9, seed=5)
    assert r.completions.create(**kw).choices[0].text == s.completions.create(**kw).choices[0].text
    streamed = "".join(c.choices[0].text for c in r.completions.create(**kw, stream=True))
    assert streamed == s.completions.create(**kw).choices[0].text
    body = {"prompt": "p2", "inputs": TEXTS}
    got = httpx.post(cluster + "/v1/classify", json=body, timeout=60).json()
    want = httpx.post(single + "/v1/classify", json=body, timeout=60).json()
    assert [d["label"] for d in got["data"]] == [d["label"] for d in want["data"]]
    for a, b in zip(got["data"], want["data"]):
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-5)
    err = httpx.post(cluster + "/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=60)
    assert err.status_code == 404 and err.json()["error"]["code"] == "model_not_found"


def test_a_prompt_sticks_to_one_replica_until_it_is_busy(cluster, lm):
    def served_by(model: str, tokens: int = 2) -> str:
        r = httpx.post(cluster + "/v1/completions", json={"model": model, "prompt": "the", "max_tokens": tokens},
                       timeout=60)
        assert r.status_code == 200, r.text
        return r.headers["x-softprompt-replica"]

    fresh = ["aff0", "aff1", "aff2"]  # prompts no replica has served yet
    for name in fresh:
        assert httpx.put(cluster + f"/v1/prompts/{name}", content=zipped(name, lm), timeout=60).status_code == 201
        served_by(name)  # one first request each; Ray learns where it went
    time.sleep(1.0)
    for name in fresh:
        seen = {served_by(name) for _ in range(4)}
        assert len(seen) == 1, (name, seen)
    assert len({served_by("tiny") for _ in range(12)}) == 2  # the plain model: no affinity
    # under load (max_ongoing_requests=2 per replica here) the same prompt spills to the other one.
    # 24 long answers from 16 clients keep both slots of the prompt's replica busy for several
    # seconds, past the router's wait for it (0.1-0.2 s as configured; Ray's default is 1-2 s, so the
    # check also holds where the setting does not reach the router); a burst that still drained
    # before the router gave up is tried again, at most 3 times.
    busy: set[str] = set()
    for _ in range(3):
        with ThreadPoolExecutor(16) as pool:
            busy |= set(pool.map(lambda _: served_by("aff0", 400), range(24)))
        if len(busy) == 2:
            break
    assert len(busy) == 2


def zipped(name: str, lm, n: int = 6) -> bytes:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / name
        store.save_prompt(d, torch.randn(n, lm.hidden_size, generator=torch.Generator().manual_seed(3)),
                          {"base_model": {"name": lm.name, "fingerprint": lm.fingerprint}, "mode": "lm"})
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for f in d.iterdir():
                zf.write(f, f"{name}/{f.name}")
        return buf.getvalue()


def test_uploads_and_deletions_reach_every_replica(cluster, lm, home):
    stores = replica_stores(home)
    assert len(stores) == 2
    for name in ("upl", "gone"):
        r = httpx.put(cluster + f"/v1/prompts/{name}", content=zipped(name, lm), timeout=60)
        assert r.status_code == 201, r.text
    for s in stores.values():  # answered only once every replica applied it
        assert (s / "upl" / "adapter_model.safetensors").is_file() and (s / "gone").is_dir()
    assert httpx.delete(cluster + "/v1/prompts/gone", timeout=60).status_code == 200
    for s in stores.values():
        assert not (s / "gone").exists() and (s / "upl").is_dir()
    for _ in range(4):  # whichever replica answers knows both facts
        ok = httpx.post(cluster + "/v1/completions", json={"model": "upl", "prompt": "the", "max_tokens": 2}, timeout=60)
        miss = httpx.post(cluster + "/v1/completions", json={"model": "gone", "prompt": "the", "max_tokens": 2}, timeout=60)
        assert ok.status_code == 200 and miss.status_code == 404


def test_a_killed_replica_loses_no_request_and_comes_back(cluster, single, home, lm):
    r, s = client(cluster), client(single)
    assert httpx.put(cluster + "/v1/prompts/kept", content=zipped("kept", lm), timeout=60).status_code in (200, 201)
    jobs = [dict(model=m, prompt=t, max_tokens=24, temperature=0) for m in ("tiny", "p0", "p1", "p2") for t in TEXTS] * 2
    want = [s.completions.create(**kw).choices[0].text for kw in jobs]
    before = replica_pids()
    assert len(before) == 2
    victim = min(before)
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(lambda kw: r.completions.create(**kw).choices[0].text, kw) for kw in jobs]
        time.sleep(0.5)  # requests are in flight on both replicas
        os.kill(victim, signal.SIGKILL)
        got = [f.result(timeout=180) for f in futures]
    assert got == want
    t0 = time.monotonic()
    while running_replicas() != 2 or victim in (now := replica_pids()) or len(now) != 2:  # Ray replaces it
        assert time.monotonic() - t0 < 120, "Ray did not bring the replica back"
        time.sleep(1)
    stores = replica_stores(home)
    assert len(stores) == 3  # the new replica made its own store ...
    newest = max(stores.values(), key=lambda p: p.stat().st_mtime)
    deadline = time.monotonic() + 30
    while not (newest / "kept").is_dir():  # ... and replayed the upload log into it
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert r.completions.create(model="p0", prompt=TEXTS[0], max_tokens=8, temperature=0).choices[0].text == \
        s.completions.create(model="p0", prompt=TEXTS[0], max_tokens=8, temperature=0).choices[0].text
