"""Models by hub id, resolved from a hub-style cache built here (no network: offline mode)."""

from __future__ import annotations

import dataclasses
import os
import shutil

import pytest
import torch

from softprompt import models
from softprompt.config import UserError
from softprompt.store import Store

REV = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(tmp_path, folder, repo_id: str):
    """The layout huggingface_hub writes: models--org--name/{snapshots/<rev>/..., refs/main}."""
    cache = tmp_path / "hub"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / REV)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    return cache


@pytest.fixture
def offline_hub(tmp_path, tiny_model_dir):
    return hub_cache(tmp_path, tiny_model_dir("llama"), "tiny-org/tiny-llama")


@pytest.fixture
def offline_store(offline_hub, sp_store) -> Store:
    """The test's store, offline, with the hub cache built here."""
    return dataclasses.replace(sp_store, hub_cache=offline_hub, offline=True)


def test_load_by_hub_id_from_the_cache_offline(offline_hub, offline_store, tiny_model_dir):
    lm = models.load("tiny-org/tiny-llama", store=offline_store)
    ref = models.load(str(tiny_model_dir("llama")))
    assert lm.name == "tiny-org/tiny-llama"
    assert lm.path == offline_hub / "models--tiny-org--tiny-llama" / "snapshots" / REV
    assert lm.fingerprint == ref.fingerprint
    ids = torch.tensor([ref.tokenizer("the movie was good", add_special_tokens=False)["input_ids"]])
    assert torch.equal(lm.model(ids).logits, ref.model(ids).logits)


def test_offline_and_not_cached_is_one_line(offline_store):
    with pytest.raises(UserError, match=r"--model tiny-org/other: not in the Hugging Face cache .* offline"):
        models.load("tiny-org/other", store=offline_store)


def test_offline_argument_overrides_the_store(offline_store):
    online = dataclasses.replace(offline_store, offline=False)
    assert models.load("tiny-org/tiny-llama", offline=True, store=online).name == "tiny-org/tiny-llama"
    with pytest.raises(UserError, match="offline"):
        models.load("tiny-org/other", offline=True, store=online)


def test_pickle_only_snapshot_is_refused(offline_hub, offline_store):
    snap = offline_hub / "models--tiny-org--tiny-llama" / "snapshots" / REV
    (snap / "model.safetensors").rename(snap / "pytorch_model.bin")
    with pytest.raises(UserError, match="no .safetensors weights"):
        models.load("tiny-org/tiny-llama", store=offline_store)


def test_not_a_model_name_lists_what_is_accepted(sp_home):
    with pytest.raises(UserError, match="hub id"):
        models.load("no such model")


def test_cli_offline_flag_lasts_one_command(offline_hub, monkeypatch, capsys, cli_main):
    """The CLI's edge reads the hub cache from the environment; --offline changes no variable."""
    monkeypatch.setenv("HF_HUB_CACHE", str(offline_hub))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert cli_main(["generate", "--model", "tiny-org/tiny-llama", "--offline", "--max-new-tokens", "3", "the movie"]) == 0
    assert "HF_HUB_OFFLINE" not in os.environ
    assert cli_main(["generate", "--model", "tiny-org/other", "--offline", "hi"]) == 2
    assert "not in the Hugging Face cache" in capsys.readouterr().err
