"""Prompt transfer (--init transfer): the ranking picks the prompt trained on the same data."""

from __future__ import annotations

import pytest
import torch
from conftest import sharpen

from softprompt import recipes
from softprompt.config import DataConfig, PromptConfig, TrainConfig, UserError
from softprompt.splits import load_splits
from softprompt.training import transfer as TF
from softprompt.training import tune as TR


def _train(st, lm, task, name, init="random", seed=0):
    cfg = recipes.resolve(DataConfig(), str(task), st.data_root)
    return TR.train(lm, cfg, PromptConfig(num_virtual_tokens=4, init=init),
                    TrainConfig(epochs=3, lr=0.3, seed=seed, patience=None), name=name, task=str(task), store=st)


@pytest.mark.slow
def test_transfer_picks_the_prompt_trained_on_the_same_data(tiny_lm, toy_tasks, sp_store):
    sharpen(tiny_lm)  # so that a prompt can move the tiny model's predictions at all
    _train(sp_store, tiny_lm, toy_tasks["pets"], "pets-src")
    _train(sp_store, tiny_lm, toy_tasks["mood"], "mood-src")
    _train(sp_store, tiny_lm, toy_tasks["size"], "size-src")
    res = _train(sp_store, tiny_lm, toy_tasks["mood"], "mood-new", init="transfer", seed=1)
    ranking = res.meta["transfer"]["ranking"]
    assert res.meta["transfer"]["source"] == "mood-src"
    assert [r["name"] for r in ranking][0] == "mood-src" and len(ranking) == 3  # itself excluded
    assert ranking[0]["loss"] < ranking[1]["loss"] - 0.05, ranking
    assert res.meta["prompt"]["init"] == "prompt:mood-src"  # recorded as what it really was


def test_transfer_starts_from_the_chosen_prompt(tiny_lm, toy_tasks, sp_store):
    src = _train(sp_store, tiny_lm, toy_tasks["mood"], "src")
    train_ex = load_splits(tiny_lm.tokenizer, recipes.resolve(DataConfig(), str(toy_tasks["mood"]), sp_store.data_root)).train
    assert TF.rank_sources(tiny_lm, train_ex, store=sp_store)[0]["name"] == "src"
    init = TR.initial_prompt(tiny_lm, PromptConfig(num_virtual_tokens=4, init="prompt:src"), DataConfig(), 0, store=sp_store)
    assert torch.equal(init, sp_store.load_prompt("src").embeddings.float())
    assert torch.equal(init, src.prompt)


def test_transfer_without_stored_prompts_is_a_user_error(tiny_lm, toy_tasks, sp_store):
    with pytest.raises(UserError, match="no stored prompt"):
        _train(sp_store, tiny_lm, toy_tasks["mood"], "lonely", init="transfer")
    assert "lonely" not in sp_store.list_prompts()  # nothing half-written
