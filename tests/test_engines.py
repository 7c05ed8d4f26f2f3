"""``softprompt serve --engine``: which engine runs, decided without importing vLLM.

``auto`` falls back to the built-in engine, saying why, where vLLM is missing, the model type is
not one the vLLM engine serves, a deep prompt is stored or Ray Serve is asked for; an explicit
``--engine vllm`` that cannot run is one line naming the way out.
"""

from __future__ import annotations

import sys

import pytest

from softprompt.config import UserError
from softprompt.serve import engines


@pytest.fixture
def with_vllm(monkeypatch):
    monkeypatch.setattr(engines, "vllm_version", lambda: "0.32.0")


@pytest.fixture
def without_vllm(monkeypatch):
    monkeypatch.setattr(engines, "vllm_version", lambda: None)


def test_auto_picks_vllm_where_it_can(with_vllm):
    c = engines.choose("auto", "llama", [])
    assert c.engine == "vllm" and "0.32.0" in c.reason


@pytest.mark.parametrize("model_type, deep, ray, why", [
    ("llama", [], False, "not installed"), ("t5", [], False, "'t5'"), ("llama", ["d"], False, "deep prompts (d)"),
    ("llama", [], True, "--ray")])
def test_auto_falls_back_to_the_builtin_engine_saying_why(monkeypatch, model_type, deep, ray, why):
    monkeypatch.setattr(engines, "vllm_version", lambda: None if why == "not installed" else "0.32.0")
    c = engines.choose("auto", model_type, deep, ray)
    assert c.engine == "native" and why in c.reason


def test_explicit_vllm_that_cannot_run_names_the_way_out(without_vllm):
    with pytest.raises(UserError, match=r"--engine vllm: vLLM is not installed .*bootstrap.sh --vllm.*--engine native"):
        engines.choose("vllm", "llama", [])


def test_explicit_vllm_serves_with_deep_prompts_stored(with_vllm):
    assert engines.choose("vllm", "llama", ["d"]).engine == "vllm"  # each deep request is refused instead


def test_choosing_imports_nothing_of_vllm(without_vllm):
    engines.choose("auto", "llama", [])
    assert not any(m == "vllm" or m.startswith(("vllm.", "softprompt.serve.vllm")) for m in sys.modules)


def test_the_cpus_are_split_between_vllms_worker_and_this_process(monkeypatch):
    """vLLM's model worker gets every allowed CPU but the last, this process's worker thread the
    last; a bind the user set is kept and ours goes where it leaves room; one CPU: no split."""
    import os

    from softprompt.serve.vllm.launch import split_cpus

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert split_cpus(None) == ("0,1,2", {3})
    assert split_cpus("0-1") == (None, {2, 3})
    assert split_cpus("0-3") == (None, None)
    assert split_cpus("auto") == (None, None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5})
    assert split_cpus(None) == (None, None)


def test_vllms_step_budget_follows_the_servers_flags():
    from softprompt.config import ServerConfig
    from softprompt.serve.vllm.launch import step_tokens

    assert step_tokens(ServerConfig(max_batch_rows=8, prefill_chunk=32)) == 40
