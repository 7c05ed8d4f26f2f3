"""A bounded Schemathesis run over the server's own OpenAPI schema: every operation, every
check (``--checks all``), positive and negative data, a fixed seed. The server must answer no
5xx and nothing the schema does not declare.

One exception is configured, with its reason: well-formed requests may get a 400 or 422 that the
schema cannot express, because those limits depend on tokenisation and on the stored prompts
(``--max-prompt-tokens``, ``--max-request-tokens``, label words, templates).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from serving import TEMPLATE, VERBALIZER, running

from softprompt import models
from softprompt.store import Store

pytestmark = pytest.mark.slow  # schemathesis against a live server


pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")

CONFIG = """
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "400", "401", "404", "409", "413", "422", "429"]

[dictionaries.models]
values = ["tiny", "p0"]

[parameters]
"body.model" = { dictionary = "models", probability = 0.8 }
"model_id" = { dictionary = "models", probability = 0.8 }
"name" = { dictionary = "models", probability = 0.5 }

[[operations]]
include-path = "/v1/classify"
parameters = { "body.prompt" = { dictionary = "models", probability = 0.8 } }
"""


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    """A server over its own store (the run may upload and delete prompts)."""
    store = Store(tmp_path_factory.mktemp("schema-home"))
    lm = models.load(str(tiny_model_dir("llama")))
    meta = {"base_model": {"name": lm.name, "fingerprint": lm.fingerprint}, "mode": "target",
            "template": TEMPLATE, "verbalizer": VERBALIZER}
    store.save_prompt("p0", torch.randn(3, lm.hidden_size), meta)
    with running(lm, store, max_tokens=8, max_rows=4, max_prompt_tokens=64, max_body_bytes=1 << 16) as (base, _, _):
        yield base


def test_schemathesis_finds_no_server_error_and_no_schema_violation(served, tmp_path):
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    cli = Path(sys.executable).with_name("schemathesis")
    cmd = [str(cli), "--config-file", str(config), "run", served + "/openapi.json", "--checks", "all",
           "--mode", "all", "--seed", "20261202", "--max-examples", "100", "--workers", "1",
           "--generation-deterministic", "--no-color"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    assert "No issues found" in out or "passed" in out.lower(), out[-3000:]


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"model": "tiny", "prompt": "the movie", "max_tokens": 3, "stream": True}),
    ("/v1/completions", {"model": "tiny", "prompt": ["a", "b"], "max_tokens": 2, "stream": True, "logprobs": 1,
                         "stream_options": {"include_usage": True}}),
    ("/v1/completions", {"model": "tiny", "prompt": "the movie", "max_tokens": 3}),
])
def test_streamed_answers_conform_to_the_declared_schema(served, path, body):
    """Schemathesis validates each Server-Sent Event against the declared text/event-stream schema
    (the plain model: the run above may have deleted the stored prompts)."""
    import schemathesis

    case = schemathesis.openapi.from_url(served + "/openapi.json")[path]["POST"].Case(
        body=body, media_type="application/json")
    response = case.call()
    assert response.status_code == 200
    assert response.headers["content-type"][0].startswith("text/event-stream" if body.get("stream") else "application/json")
    case.validate_response(response)
