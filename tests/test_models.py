"""Models by hub id, resolved from a hub-style cache built here (no network: offline mode)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from softprompt import models
from softprompt.config import UserError

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
def offline_hub(tmp_path, tiny_model_dir, monkeypatch, sp_home):
    cache = hub_cache(tmp_path, tiny_model_dir("llama"), "tiny-org/tiny-llama")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_load_by_hub_id_from_the_cache_offline(offline_hub, tiny_model_dir):
    lm = models.load("tiny-org/tiny-llama")
    ref = models.load(str(tiny_model_dir("llama")))
    assert lm.name == "tiny-org/tiny-llama"
    assert lm.path == offline_hub / "models--tiny-org--tiny-llama" / "snapshots" / REV
    assert lm.fingerprint == ref.fingerprint
    ids = torch.tensor([ref.tokenizer("the movie was good", add_special_tokens=False)["input_ids"]])
    assert torch.equal(lm.model(ids).logits, ref.model(ids).logits)


def test_offline_and_not_cached_is_one_line(offline_hub):
    with pytest.raises(UserError, match=r"--model tiny-org/other: not in the Hugging Face cache .* offline"):
        models.load("tiny-org/other")


def test_offline_flag_without_the_environment(offline_hub, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert models.load("tiny-org/tiny-llama", offline=True).name == "tiny-org/tiny-llama"
    with pytest.raises(UserError, match="offline"):
        models.load("tiny-org/other", offline=True)


def test_pickle_only_snapshot_is_refused(offline_hub):
    snap = offline_hub / "models--tiny-org--tiny-llama" / "snapshots" / REV
    (snap / "model.safetensors").rename(snap / "pytorch_model.bin")
    with pytest.raises(UserError, match="no .safetensors weights"):
        models.load("tiny-org/tiny-llama")


def test_not_a_model_name_lists_what_is_accepted(sp_home):
    with pytest.raises(UserError, match="hub id"):
        models.load("no such model")


def test_cli_offline_flag_lasts_one_command(offline_hub, monkeypatch, capsys):
    from softprompt import cli

    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert cli.main(["generate", "--model", "tiny-org/tiny-llama", "--offline", "--max-new-tokens", "3", "the movie"]) == 0
    assert "HF_HUB_OFFLINE" not in os.environ
    assert cli.main(["generate", "--model", "tiny-org/other", "--offline", "hi"]) == 2
    assert "not in the Hugging Face cache" in capsys.readouterr().err
