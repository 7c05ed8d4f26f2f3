"""Continual learning: separate prompts on a frozen model forget nothing, bit for bit;
sequential full fine-tuning is the contrast; the command writes its report."""

from __future__ import annotations

import json

import pytest
import torch

from softprompt.config import PromptConfig, TrainConfig, UserError
from softprompt.experiments import continual
from softprompt.training import multitask as MT


def _tasks(toy_tasks):
    return tuple(str(toy_tasks[k]) for k in ("mood", "pets", "size"))


@pytest.mark.slow
def test_prompt_methods_forget_nothing_bit_for_bit(tiny_lm, toy_tasks, sp_store):
    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    ccfg = continual.ContinualConfig(tasks=_tasks(toy_tasks), methods=("prompt", "progressive", "full"), per_task=16,
                             test_per_task=8, stage_steps=3, lr_full=1e-3)
    doc = continual.run(tiny_lm, ccfg, PromptConfig(num_virtual_tokens=2), TrainConfig(lr=0.3), root=sp_store.data_root)
    by = {r["method"]: r for r in doc["results"]}
    for kind in ("prompt", "progressive"):
        r = by[kind]
        assert r["bit_identical"] and r["max_abs_score_change"] == 0.0
        assert r["forgetting"] == 0.0
        m = r["matrix"]
        assert all(m[i][j] == m[j][j] for j in range(3) for i in range(j, 3))  # columns constant
        assert all(m[i][j] is None for i in range(3) for j in range(i + 1, 3))
    assert not by["full"]["bit_identical"] and by["full"]["max_abs_score_change"] > 0  # fine-tuning moves old tasks
    assert by["full"]["trainable_parameters"] > 100 * by["prompt"]["trainable_parameters"]
    assert doc["base_model_unchanged"]
    for k, v in tiny_lm.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_the_bit_identity_check_can_fail(tiny_lm, toy_tasks, monkeypatch, sp_store):
    """If stage i+1 disturbed task i's prompt, the run must say so."""
    real = continual._Learner.learn

    def learn_and_disturb(self, i, task):
        out = real(self, i, task)
        if i == 1:
            self.prompts[0] = self.prompts[0] + 1e-3
        return out

    monkeypatch.setattr(continual._Learner, "learn", learn_and_disturb)
    ccfg = continual.ContinualConfig(tasks=_tasks(toy_tasks)[:2], methods=("prompt",), per_task=8, test_per_task=8, stage_steps=1)
    r = continual.run(tiny_lm, ccfg, PromptConfig(num_virtual_tokens=2), TrainConfig(), root=sp_store.data_root)["results"][0]
    assert not r["bit_identical"] and r["max_abs_score_change"] > 0


def test_progressive_serves_task_j_with_all_prompts_up_to_j(tiny_lm, toy_tasks, sp_store):
    ccfg = continual.ContinualConfig(tasks=_tasks(toy_tasks), methods=("progressive",), per_task=8, test_per_task=8, stage_steps=1)
    tasks = [continual._Task(MT.load_task(tiny_lm.tokenizer, t, MT.task_config(t, sp_store.data_root), 8, 8, 0), []) for t in ccfg.tasks]
    learner = continual._Learner("progressive", tiny_lm, PromptConfig(num_virtual_tokens=2), TrainConfig(), ccfg)
    for i, t in enumerate(tasks):
        learner.learn(i, t)
    assert [p.shape[0] for p in learner.prompts] == [2, 4, 6]
    assert torch.equal(learner.prompts[2][:4], learner.prompts[1])  # earlier prompts frozen inside


def test_forgetting_definition():
    m = [[0.9, None, None], [0.7, 0.8, None], [0.6, 0.5, 0.9]]
    assert continual.forgetting(m) == pytest.approx(((0.9 - 0.6) + (0.8 - 0.5)) / 2)


def test_worst_drop_sees_a_fall_that_the_last_stage_hides():
    # task 0 falls from 0.9 to 0.5 at stage 2, then a similar task brings it back to 0.9
    m = [[0.9, None, None], [0.5, 0.8, None], [0.9, 0.8, 0.7]]
    assert continual.forgetting(m) == pytest.approx(0.0)
    assert continual.worst_drop(m) == pytest.approx(0.4)
    assert continual.worst_drop([[0.9]]) is None and continual.forgetting([[0.9]]) is None


def test_continual_command_writes_json_markdown_png(tiny_model_dir, sp_home, toy_tasks, tmp_path, cli_main):
    out = tmp_path / "cl"
    args = ["continual", "--model", str(tiny_model_dir("llama")), "--tasks", ",".join(_tasks(toy_tasks)[:2]),
            "--per-task", "8", "--test-per-task", "8", "--stage-steps", "1", "--out", str(out), "--tag", "toy", "--quiet"]
    assert cli_main(args) == 0
    doc = json.loads((out / "continual_toy.json").read_text())
    assert [r["method"] for r in doc["results"]] == ["prompt", "full"]
    assert "--stage-steps 1" in doc["command"]
    md = (out / "continual_toy.md").read_text()
    assert "| prompt |" in md and "forgetting" in md
    assert (out / "continual_toy.png").stat().st_size > 1000
    with pytest.raises(UserError, match="unknown"):
        continual.ContinualConfig(tasks=("a", "b"), methods=("lora",))
    assert cli_main(["continual", "--tasks", "sst2"]) == 2
    assert cli_main(["continual"]) == 2  # neither --tasks nor --report


def test_continual_report_renders_again_without_running(tmp_path, cli_main):
    doc = {"tasks": ["a", "b"], "n_train": [8, 8], "n_test": [4, 4], "command": "softprompt continual --tasks a,b",
           "config": {"steps": 1, "lr_full": 1e-3}, "prompt_config": {"num_virtual_tokens": 2, "init": "vocab"},
           "train_config": {"lr": 0.1, "seed": 0}, "model": {"name": "toy"}, "git": {"revision": "abc"},
           "created": "now", "total_time_s": 6.0, "base_model_unchanged": True,
           "results": [{"method": "full", "matrix": [[1.0, None], [0.25, 0.75]], "average_accuracy": 0.5,
                        "forgetting": 0.75, "bit_identical": False, "max_abs_score_change": 2.0,
                        "trainable_parameters": 100}]}
    f = tmp_path / "continual_x.json"
    f.write_text(json.dumps(doc))
    assert cli_main(["continual", "--report", str(f)]) == 0
    md = (tmp_path / "continual_x.md").read_text()
    assert "| full | 100 | 50.0 | 75.0 points | 75.0 points | no (max change 2) |" in md
    (tmp_path / "bad.json").write_text("{}")
    assert cli_main(["continual", "--report", str(tmp_path / "bad.json")]) == 2
