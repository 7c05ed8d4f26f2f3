"""inspect: nearest tokens of a text-initialised prompt are that text's tokens; similarity,
importance and the report."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import file_examples

from softprompt.config import DataConfig, PromptConfig, TrainConfig, UserError
from softprompt.experiments import interpret
from softprompt.prompt import encode, make_prompt
from softprompt.splits import load_splits
from softprompt.training import tune as TR

TEXT = "classify the sentiment of this review"


def test_nearest_tokens_of_a_text_init_are_the_texts_tokens(tiny_lm):
    p = make_prompt(tiny_lm.model, tiny_lm.tokenizer, 6, "text", text=TEXT)
    ids = encode(tiny_lm.tokenizer, TEXT)
    want = tiny_lm.tokenizer.convert_ids_to_tokens((ids * 2)[:6])
    near = interpret.nearest_tokens(tiny_lm.model, tiny_lm.tokenizer, p, k=3)
    assert [n[0][0] for n in near] == want
    assert all(abs(n[0][1] - 1.0) < 1e-5 for n in near)
    assert all(n[1][1] < n[0][1] for n in near)  # the runner-up is strictly less similar


def test_similarity_is_symmetric_with_unit_diagonal():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 8, generator=g), torch.randn(6, 8, generator=g)
    m = interpret.similarity({"a": a, "b": b, "a2": a * 3, "neg": -a})
    assert torch.allclose(m, m.T) and torch.allclose(m.diag(), torch.ones(4), atol=1e-6)
    assert abs(m[0, 2] - 1) < 1e-6 and abs(m[0, 3] + 1) < 1e-6  # scale-free, sign-aware


def test_importance_is_zero_for_a_token_already_at_the_fill_value(tiny_lm, toy_csv):
    cfg = DataConfig(path=str(toy_csv), template="{text}", target_column="label", verbalizer={"0": "negative", "1": "positive"})
    dev = load_splits(tiny_lm.tokenizer, cfg).dev
    p = torch.randn(3, tiny_lm.model.config.hidden_size) * 5
    p[1] = tiny_lm.model.get_input_embeddings().weight.float().mean(0)
    metric, base, drops = interpret.importance(tiny_lm.model, tiny_lm.tokenizer, p, dev, None)
    assert metric == "-loss" and drops[1] == 0.0 and drops[0] != 0.0 and drops[2] != 0.0
    metric, base, drops = interpret.importance(tiny_lm.model, tiny_lm.tokenizer, p, dev, cfg.verbalizer)
    assert metric == "accuracy" and drops[1] == 0.0
    assert base * len(dev) == pytest.approx(round(base * len(dev)))  # a share of the dev rows
    assert all(base - d >= -1e-9 and base - d <= 1 for d in drops)  # an ablated accuracy is still a share


@pytest.mark.slow
def test_inspect_command_table_json_and_heatmap(tiny_lm, toy_csv, tmp_path, capsys, tiny_model_dir, sp_store, cli_main):
    cfg = DataConfig(path=str(toy_csv), template="{text}", target_column="label", verbalizer={"0": "negative", "1": "positive"})
    for name, init in (("a", "text"), ("b", "random")):
        TR.train(tiny_lm, cfg, PromptConfig(num_virtual_tokens=4, init=init, init_text=TEXT if init == "text" else None),
                 TrainConfig(epochs=1, lr=0.01), name=name, store=sp_store)
    model = str(tiny_model_dir("llama"))
    assert cli_main(["inspect", "a", "--model", model, "--against", "b", "--dev-limit", "8", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "nearest vocabulary tokens" in out and "similarity" in out
    report = json.loads((tmp_path / "out" / "inspect_a.json").read_text())
    assert len(report["tokens"]) == 4 and len(report["importance"]["drop"]) == 4
    assert report["similarity"]["names"] == ["a", "b"]
    assert (tmp_path / "out" / "inspect_a.png").stat().st_size > 1000
    assert cli_main(["inspect", "nope", "--model", model]) == 2


def test_without_known_data_importance_is_skipped_with_a_note(tiny_lm, toy_csv, capsys, tiny_model_dir, tmp_path, sp_store, cli_main):
    """An imported PEFT prompt has no task or data in its metadata: inspect still reports, says
    why importance is missing, and measures it on data given with --data."""
    pytest.importorskip("peft")
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM


    model = str(tiny_model_dir("llama"))
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(model), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    pm.save_pretrained(str(tmp_path / "adapter"))
    assert cli_main(["prompts", "import", str(tmp_path / "adapter"), "--name", "peft"]) == 0
    capsys.readouterr()
    assert cli_main(["inspect", "peft", "--model", model]) == 0
    out = capsys.readouterr().out
    assert "importance skipped: the prompt's metadata names no task or data file" in out and "drop" not in out
    report = interpret.inspect_prompt(tiny_lm, "peft", store=sp_store)
    assert "importance" not in report and len(report["notes"]) == 1
    # --data supplies the rows: the same drops as importance() on those rows
    flags = ["--data", str(toy_csv), "--template", "Review: {text}", "--target-column", "label",
             "--verbalizer", "0=negative,1=positive"]
    assert cli_main(["inspect", "peft", "--model", model, *flags, "--dev-limit", "8", "--out", str(tmp_path / "o")]) == 0
    got = json.loads((tmp_path / "o" / "inspect_peft.json").read_text())["importance"]
    cfg = DataConfig(path=str(toy_csv), template="Review: {text}", target_column="label",
                     verbalizer={"0": "negative", "1": "positive"})
    rows = file_examples(tiny_lm.tokenizer, cfg, str(toy_csv), 8)
    metric, base, drops = interpret.importance(tiny_lm.model, tiny_lm.tokenizer, sp_store.load_prompt("peft").embeddings, rows, cfg.verbalizer)
    assert got["metric"] == metric == "accuracy" and got["rows"] == 8
    assert got["full_prompt"] == pytest.approx(base) and got["drop"] == pytest.approx(drops)
    assert "importance" not in interpret.inspect_prompt(tiny_lm, "peft", with_importance=False, store=sp_store)
    with pytest.raises(UserError, match="say what to evaluate"):  # --data without a template: one line
        interpret.inspect_prompt(tiny_lm, "peft", data={"path": str(toy_csv)}, store=sp_store)
