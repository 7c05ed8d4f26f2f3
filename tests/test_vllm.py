"""``softprompt serve --engine vllm`` against the built-in engine, on the real default model.

One vLLM server (the real CLI in a subprocess, float32, ``--enforce-eager`` so start-up skips
compilation) serves every test of the module; the reference is the built-in ``Engine`` in this
process, also float32. Relational checks: greedy answers of the plain model and 3 prompts sent
in one concurrent burst equal the built-in engine's (after checking the prompts change the
answers), first-token log-probabilities agree to ``TOL``; the official ``openai`` client works
(completions and chat, plain and streamed, streamed text == whole text); bad input gets the
same status and error body as the built-in server; a poisoned request in a burst fails alone;
a prompt uploaded while running is served and a deleted one answers 404.

Marked ``vllm``: the main suite's environment has no vLLM and skips them (saying why);
``.ci/run`` runs them in ``.venv-vllm`` (``bash scripts/bootstrap.sh --vllm``).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import importlib.util
import io
import os
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from softprompt import models, store
from softprompt.cli import environ
from softprompt.config import GenerateConfig
from softprompt.inference.engine import Engine, GenerateRequest

pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                 reason="vLLM is not installed here (bash scripts/bootstrap.sh --vllm; .ci/run runs "
                                        "these in .venv-vllm)")]

TOL = 1e-4  # first-token log-probability, float32 on both engines (measured: up to 1.2e-5)
TEXTS = ["The capital of France is", "Once upon a time", "def fib(n):"]
PROMPTS = ("p0", "p1", "p2")
BASE = "smollm2-135m"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prompt_meta(lm) -> dict:
    return {"base_model": {"name": lm.name, "fingerprint": lm.fingerprint}, "mode": "lm"}


@pytest.fixture(scope="module")
def st(tmp_path_factory) -> store.Store:
    """A store with the converted default model (linked from the user's store when there) and
    3 shallow prompts made of real embedding rows, plus one deep prompt."""
    path = tmp_path_factory.mktemp("vllm-home")
    usual = environ.read().home / "models"
    if usual.is_dir():
        (path / "models").symlink_to(usual)
    return environ.store(str(path))


@pytest.fixture(scope="module")
def home(st) -> Path:
    return st.home


@pytest.fixture(scope="module")
def lm(st):
    lm = models.load(None, "float32", store=st)
    g = torch.Generator().manual_seed(0)
    emb = lm.model.get_input_embeddings().weight
    for i, name in enumerate(PROMPTS):
        rows = emb[torch.randint(0, emb.shape[0], (6 + 2 * i,), generator=g)].detach().clone()
        st.save_prompt(name, rows, _prompt_meta(lm))
    layers, kv, d = lm.kv_shape
    st.save_prompt("deep0", torch.randn(layers, 2, kv, 4, d, generator=g) * 0.1, _prompt_meta(lm))
    return lm


@pytest.fixture(scope="module")
def ref(lm, st):
    return Engine(lm, store=st)


@pytest.fixture(scope="module")
def vllm_url(lm, home):
    """``softprompt serve --engine vllm`` in a subprocess (its log in the test's temp folder)."""
    port = _free_port()
    log = (home / "server.log").open("w")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "softprompt", "serve", "--home", str(home), "--engine", "vllm",
                             "--dtype", "float32",
                             "--port", str(port), "--vllm-arg=--enforce-eager"], stdout=log, stderr=subprocess.STDOUT,
                            env=env)
    url = f"http://127.0.0.1:{port}"
    import httpx

    t0 = time.monotonic()
    while True:
        assert proc.poll() is None, f"the server exited; see {home / 'server.log'}"
        assert time.monotonic() - t0 < 600, "the vLLM server did not start within 10 minutes"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                break
        time.sleep(1)
    yield url
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def native_url(lm, st):
    """The built-in server over the same store (for error bodies)."""
    from serving import running

    with running(lm, st, model_id=BASE) as s:
        yield s[0]


def post(url: str, path: str, body: dict):
    import httpx

    r = httpx.post(url + path, json=body, timeout=300)
    return r.status_code, r.json()


def test_mixed_burst_equals_the_builtin_engine(vllm_url, ref):
    jobs = [(m, t) for m in (None, *PROMPTS) for t in TEXTS]
    body = {"max_tokens": 16, "temperature": 0, "logprobs": 1}
    with cf.ThreadPoolExecutor(len(jobs)) as ex:
        got = list(ex.map(lambda j: post(vllm_url, "/v1/completions",
                                         {"model": j[0] or BASE, "prompt": j[1], **body}), jobs))
    want = ref.generate([GenerateRequest(t, m, GenerateConfig(max_new_tokens=16), logprobs=1) for m, t in jobs])
    assert len({w.text for w in want}) > len(TEXTS) * 2  # the prompts change the answers
    for (m, t), (status, ans), w in zip(jobs, got, want):
        assert status == 200, ans
        c = ans["choices"][0]
        assert c["text"] == w.text, (m, t)
        assert abs(c["logprobs"]["token_logprobs"][0] - w.logprobs[0].logprob) < TOL, (m, t)


def test_the_openai_client_works(vllm_url, ref):
    from serving import client

    oa = client(vllm_url)
    whole = oa.completions.create(model="p1", prompt=TEXTS[0], max_tokens=12, temperature=0)
    streamed = "".join(ch.choices[0].text for ch in oa.completions.create(
        model="p1", prompt=TEXTS[0], max_tokens=12, temperature=0, stream=True))
    want = ref.generate([GenerateRequest(TEXTS[0], "p1", GenerateConfig(max_new_tokens=12))])[0].text
    assert whole.choices[0].text == streamed == want
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    chat = oa.chat.completions.create(model=BASE, messages=msgs, max_tokens=12, temperature=0)
    chunks = oa.chat.completions.create(model=BASE, messages=msgs, max_tokens=12, temperature=0, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert chat.choices[0].message.content == text and text
    assert {m.id for m in oa.models.list().data} >= {BASE, *PROMPTS}


BAD = [{"model": "nope", "prompt": "x"}, {"model": "p0", "prompt": [10**9]}, {"model": "p0", "prompt": "x", "n": 0},
       {"model": BASE, "prompt": ""}, {"model": "p0", "prompt": "x", "max_tokens": 10**6},
       {"model": "p0", "prompt": "x", "temperature": -1}]


@pytest.mark.parametrize("body", BAD, ids=range(len(BAD)))
def test_bad_input_gets_the_builtin_servers_error(vllm_url, native_url, body):
    got, want = post(vllm_url, "/v1/completions", body), post(native_url, "/v1/completions", body)
    assert 400 <= want[0] < 500
    assert got == want


def test_a_poisoned_request_fails_alone(vllm_url, ref):
    poison = {"model": "p2", "prompt": [10**9], "max_tokens": 8}
    good = [{"model": m, "prompt": TEXTS[1], "max_tokens": 8, "temperature": 0} for m in (BASE, "p0", "p2")]
    with cf.ThreadPoolExecutor(8) as ex:
        got = list(ex.map(lambda b: post(vllm_url, "/v1/completions", b), [poison, *good, poison]))
    assert got[0][0] == got[-1][0] == 400
    want = ref.generate([GenerateRequest(TEXTS[1], None if b["model"] == BASE else b["model"],
                                         GenerateConfig(max_new_tokens=8)) for b in good])
    assert [g[1]["choices"][0]["text"] for g in got[1:-1]] == [w.text for w in want]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU vLLM keeps its own step budget")
def test_vllms_step_budget_on_a_cpu_is_the_servers_and_a_vllm_arg_wins(lm):
    from softprompt.config import ServerConfig
    from softprompt.serve.vllm.launch import engine_args, step_tokens

    cfg = ServerConfig(max_batch_rows=8, prefill_chunk=32)
    assert engine_args(str(lm.path), "float32", cfg).max_num_batched_tokens == step_tokens(cfg) == 40
    assert engine_args(str(lm.path), "float32", cfg, ["--max-num-batched-tokens 512"]).max_num_batched_tokens == 512


def test_seeded_sampling_of_prompts_read_over_several_steps_keeps_the_engine_alive(vllm_url):
    """Sampled requests with seeds whose prompts are longer than vLLM's step budget (so they are
    read over several steps) beside greedy ones: all answer 200 and the engine still serves.
    Before, vLLM's CPU runner died rewinding a CPU generator and every request failed."""
    long = " ".join(TEXTS * 60)  # ~600 tokens: more than the 160-token step budget
    sampled = [{"model": m, "prompt": long, "max_tokens": 4, "temperature": 1.0, "seed": 7} for m in (BASE, "p0")]
    greedy = [{"model": "p1", "prompt": TEXTS[k], "max_tokens": 6, "temperature": 0} for k in range(3)]
    with cf.ThreadPoolExecutor(8) as ex:
        got = list(ex.map(lambda b: post(vllm_url, "/v1/completions", b), [*sampled, *greedy, *sampled]))
    assert [g[0] for g in got] == [200] * len(got), [g[1] for g in got if g[0] != 200][:1]
    assert post(vllm_url, "/v1/completions", greedy[0])[0] == 200


def test_a_deep_prompt_is_refused_naming_the_builtin_engine(vllm_url):
    status, body = post(vllm_url, "/v1/completions", {"model": "deep0", "prompt": "x", "max_tokens": 2})
    assert status == 422 and "--engine native" in body["error"]["message"]


@pytest.mark.parametrize("server", ["vllm_url", "native_url"])
def test_upload_while_running_is_served_and_delete_answers_404(server, request, lm, ref, tmp_path):
    import httpx

    url = request.getfixturevalue(server)

    emb = lm.model.get_input_embeddings().weight
    rows = emb[torch.arange(100, 107)].detach().clone()
    d = store.save_prompt(tmp_path / "fresh", rows, _prompt_meta(lm))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in sorted(d.iterdir()):
            z.write(f, f.name)
    assert httpx.put(url + "/v1/prompts/fresh", content=buf.getvalue(), timeout=60).status_code == 201
    status, ans = post(url, "/v1/completions", {"model": "fresh", "prompt": TEXTS[0], "max_tokens": 8,
                                               "temperature": 0})
    ref.add_prompt("fresh-ref", rows)
    want = ref.generate([GenerateRequest(TEXTS[0], "fresh-ref", GenerateConfig(max_new_tokens=8))])[0].text
    assert status == 200 and ans["choices"][0]["text"] == want
    assert httpx.delete(url + "/v1/prompts/fresh", timeout=60).status_code == 200
    status, ans = post(url, "/v1/completions", {"model": "fresh", "prompt": TEXTS[0], "max_tokens": 8,
                                               "temperature": 0})
    assert status == 404 and ans["error"]["code"] == "model_not_found"


def test_classify_and_metrics_on_the_vllm_engine(vllm_url):
    import httpx

    status, ans = post(vllm_url, "/v1/classify", {"model": "p0", "input": "a great film",
                                                  "verbalizer": {"pos": "good", "neg": "bad"}})
    assert status == 200 and set(ans["data"][0]["probabilities"]) == {"pos", "neg"}
    text = httpx.get(vllm_url + "/metrics", timeout=30).text
    assert "softprompt_vllm_running_requests" in text and "softprompt_generated_tokens_total" in text
