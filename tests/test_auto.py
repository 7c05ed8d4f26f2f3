"""``--kind auto``, ``softprompt train``'s default: the choice for each kind of data (decision
table), printed once and stored in ``softprompt.json``; the user's flags win; bad combinations are
one line and exit 2; a prompt trained with no method flags loads and serves with the kind chosen;
the walk-through keeps its own explicit settings."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import write_toy_csv
from helpers import assert_user_error, run_cli

from softprompt.config import GenerateConfig, PromptConfig, TrainConfig, UserError
from softprompt.training import auto as A

VERB = "0=negative,1=positive"


def target_args(model: str, csv_path: Path, name: str, *extra: str) -> list[str]:
    return ["train", "--model", model, "--data", str(csv_path), "--template", "Review: {text}\nSentiment:",
            "--target-column", "label", "--verbalizer", VERB, "--max-length", "32", "--name", name, "--quiet", *extra]


@pytest.fixture
def many_csv(tmp_path) -> Path:
    """600 labelled rows: 540 train after the 10% dev split, more than auto's 512-row bound."""
    return write_toy_csv(tmp_path / "many.csv", rows=600, numbered=True)


@pytest.fixture
def tiny(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama"))


def meta_of(sp_home: Path, name: str) -> dict:
    return json.loads((sp_home / "prompts" / name / "softprompt.json").read_text())


# ---------------------------------------------------------------- the decision table


@pytest.mark.parametrize("facts, want", [
    (A.Facts(True, 4000, True), {"kind": "deep", "init": "labels", "lr": 0.03, "num_virtual_tokens": 20, "epochs": 1}),
    (A.Facts(True, 6920, True), {"kind": "deep", "init": "labels", "lr": 0.03, "num_virtual_tokens": 20, "steps": 600}),
    (A.Facts(True, 120_000, True), {"kind": "deep", "init": "labels", "lr": 0.03, "num_virtual_tokens": 20,
                                    "steps": 600}),
    (A.Facts(True, 513, True, labels=2), {"kind": "deep", "init": "labels", "lr": 0.03, "num_virtual_tokens": 20,
                                          "steps": 200}),
    (A.Facts(True, 300, True, labels=2), {"kind": "shallow", "init": "random", "lr": 0.03, "num_virtual_tokens": 20,
                                          "epochs": 3}),
    (A.Facts(True, 32, True, labels=2), {"kind": "shallow", "init": "random", "lr": 0.03, "num_virtual_tokens": 20,
                                         "steps": 50}),
    (A.Facts(True, 300, True, labels=6), {"kind": "deep", "init": "labels", "lr": 0.03, "num_virtual_tokens": 20,
                                          "epochs": 3}),
    (A.Facts(True, 32, True, labels=3), {"kind": "deep", "init": "labels", "lr": 0.03, "num_virtual_tokens": 20,
                                         "steps": 50}),
    (A.Facts(True, 300, False, model="t5", labels=6), {"kind": "shallow", "init": "random", "lr": 0.03,
                                                       "num_virtual_tokens": 20, "epochs": 3}),
    (A.Facts(True, 900, False, model="t5"), {"kind": "shallow", "init": "random", "lr": 0.03,
                                             "num_virtual_tokens": 20, "epochs": 3}),
    (A.Facts(True, 6920, False, model="t5"), {"kind": "shallow", "init": "random", "lr": 0.03,
                                              "num_virtual_tokens": 20, "steps": 1500}),
    (A.Facts(False, 50, True, mode="lm"), {"kind": "shallow", "init": "vocab", "lr": 0.1, "num_virtual_tokens": 20,
                                           "epochs": 5}),
    (A.Facts(False, 6920, True), {"kind": "shallow", "init": "vocab", "lr": 0.1, "num_virtual_tokens": 20,
                                  "steps": 1500}),
])
def test_the_table_chooses_from_the_facts(facts, want):
    pcfg, tcfg, rec = A.resolve(facts, PromptConfig(kind="auto"), TrainConfig(), given=set())
    assert rec["chose"] == want and rec["yours"] == {}
    got = {"kind": pcfg.kind, "init": pcfg.init, "lr": tcfg.lr, "num_virtual_tokens": pcfg.num_virtual_tokens}
    assert got == {k: want[k] for k in got}
    assert (tcfg.steps, tcfg.epochs) == (want.get("steps"), want.get("epochs", TrainConfig.epochs))
    # each row names committed results; a comparison still running has its partial document there
    files = [Path(A.__file__).parents[3] / f for f in rec["evidence"]]
    assert files and all(f.is_file() or f.with_suffix(".partial.json").is_file() for f in files), files


def test_the_line_says_what_and_why():
    pcfg, tcfg, rec = A.resolve(A.Facts(True, 6920, True), PromptConfig(kind="auto"), TrainConfig(), given=set())
    assert A.line(pcfg, tcfg, rec) == ("auto: deep prompt, init labels, lr 0.03, 20 virtual tokens, 600 steps "
                                       "(task has label words; 6,920 training rows)")
    pcfg, tcfg, rec = A.resolve(A.Facts(True, 300, True, labels=2), PromptConfig(kind="auto"), TrainConfig(),
                                given=set())
    assert "(task has label words; 300 training rows, at most 512; 2 label words)" in A.line(pcfg, tcfg, rec)
    pcfg, tcfg, rec = A.resolve(A.Facts(True, 300, True, labels=6), PromptConfig(kind="auto"), TrainConfig(),
                                given=set())
    assert A.line(pcfg, tcfg, rec) == ("auto: deep prompt, init labels, lr 0.03, 20 virtual tokens, 3 epochs "
                                       "(task has label words; 300 training rows, at most 512; 6 label words)")
    pcfg, tcfg, rec = A.resolve(A.Facts(True, 900, False, model="t5"), PromptConfig(kind="auto"), TrainConfig(),
                                given=set())
    assert A.line(pcfg, tcfg, rec).endswith("(task has label words; 900 training rows; t5 takes no deep prompts)")


def test_user_flags_win_field_by_field():
    facts = A.Facts(True, 6920, True)
    pcfg, tcfg, rec = A.resolve(facts, PromptConfig(kind="auto"), TrainConfig(lr=0.01, steps=7), given={"lr", "steps"})
    assert (pcfg.kind, pcfg.init, tcfg.lr, tcfg.steps) == ("deep", "labels", 0.01, 7)
    assert rec["chose"]["lr"] == 0.03 and rec["yours"] == {"lr": 0.01, "steps": 7}
    assert A.line(pcfg, tcfg, rec).endswith("7 steps (task has label words; 6,920 training rows; yours: --lr 0.01, "
                                            "--steps 7)")
    # --epochs alone replaces auto's budget, steps included
    _, tcfg, _ = A.resolve(A.Facts(True, 32, True), PromptConfig(kind="auto"), TrainConfig(epochs=2), given={"epochs"})
    assert (tcfg.epochs, tcfg.steps) == (2, None)
    # a library caller without ``given``: the fields set away from their defaults are the caller's
    pcfg, tcfg, rec = A.resolve(facts, PromptConfig(kind="auto", num_virtual_tokens=4), TrainConfig())
    assert (pcfg.num_virtual_tokens, pcfg.kind, tcfg.lr) == (4, "deep", 0.03) and rec["yours"] == {"num_virtual_tokens": 4}


def test_a_resolved_combination_that_fails_names_the_flag_and_the_choice():
    with pytest.raises(UserError, match=r"^--reparam lstm is not supported for --kind deep .*--kind auto chose a "
                                        r"deep prompt \(task has label words; 6,920 training rows\)"):
        A.resolve(A.Facts(True, 6920, True), PromptConfig(kind="auto", reparam="lstm"), TrainConfig(),
                  given={"reparam"})
    # the same flag with few rows: auto chose shallow, where lstm is allowed
    pcfg, _, _ = A.resolve(A.Facts(True, 100, True), PromptConfig(kind="auto", reparam="lstm"), TrainConfig())
    assert (pcfg.kind, pcfg.reparam) == ("shallow", "lstm")


def test_methods_that_name_their_kind_take_auto_as_that_kind():
    assert A.method_kind(PromptConfig(kind="auto"), "continual").kind == "shallow"
    assert A.method_kind(PromptConfig(), "continual").kind == "shallow"
    with pytest.raises(UserError, match="^continual trains shallow prompts only; drop --kind deep$"):
        A.method_kind(PromptConfig(kind="deep"), "continual")


# ---------------------------------------------------------------- softprompt train, end to end


def test_no_method_flags_on_many_labelled_rows_trains_a_deep_prompt_that_serves(capsys, cli_main, sp_store, sp_home,
                                                                                 tiny, tiny_lm, many_csv):
    from softprompt.inference.engine import Engine, GenerateRequest

    rc, out, err = run_cli(capsys, cli_main, target_args(tiny, many_csv, "many", "--batch-size", "64"))  # 1 epoch: 9 steps < 200
    assert rc == 0, err
    want = "auto: deep prompt, init labels, lr 0.03, 20 virtual tokens, 200 steps (task has label words; 540 training rows)"
    assert out.splitlines()[0] == want
    meta = meta_of(sp_home, "many")
    assert meta["kind"] == "deep" and meta["prompt"]["kind"] == "deep" and meta["prompt"]["init"] == "labels"
    assert meta["training"]["lr"] == 0.03 and meta["training"]["steps"] == 200
    assert meta["auto"]["chose"] == {"kind": "deep", "init": "labels", "lr": 0.03, "num_virtual_tokens": 20, "steps": 200}
    assert meta["auto"]["why"] == "task has label words; 540 training rows" and meta["auto"]["yours"] == {}
    assert meta["auto"]["facts"]["rows"] == 540 and meta["epochs"][-1]["step"] == 200
    sp = sp_store.load_prompt("many")
    assert sp.kind == "deep" and sp.tensor.shape[3] == 20
    # the stored prompt serves from the store, as the trained tensor does
    eng = Engine(tiny_lm, store=sp_store)
    req = GenerateRequest("Review: the movie was good\nSentiment:", "many", GenerateConfig(max_new_tokens=2))
    served = eng.generate([req], return_logits=True)[0]
    plain = eng.generate([GenerateRequest(req.text, None, req.config)], return_logits=True)[0]
    eng.add_prompt("trained", sp.tensor.clone())
    direct = eng.generate([GenerateRequest(req.text, "trained", req.config)], return_logits=True)[0]
    assert served.virtual_tokens == 20
    assert not torch.allclose(served.logits, plain.logits)  # the prompt changes the model's answer
    torch.testing.assert_close(served.logits, direct.logits, rtol=0, atol=0)


def test_few_labelled_rows_train_a_shallow_prompt(capsys, cli_main, sp_store, sp_home, tiny, toy_csv):
    rc, out, err = run_cli(capsys, cli_main, target_args(tiny, toy_csv, "few", "--steps", "3"))
    assert rc == 0, err
    # 48 rows: 44 train; auto's budget (3 epochs of 6 steps < 50 steps: 50 steps) gives way to --steps
    assert out.splitlines()[0] == ("auto: shallow prompt, init random, lr 0.03, 20 virtual tokens, 3 steps "
                                   "(task has label words; 44 training rows, at most 512; 2 label words; "
                                   "yours: --steps 3)")
    meta = meta_of(sp_home, "few")
    assert meta["kind"] == "shallow" and meta["auto"]["chose"]["steps"] == 50 and meta["training"]["steps"] == 3
    assert sp_store.load_prompt("few").tensor.shape == (20, 64)


def test_few_rows_of_a_task_with_more_than_two_label_words_train_a_deep_prompt(capsys, cli_main, sp_store, sp_home,
                                                                               tiny, tmp_path):
    rows = tmp_path / "three.csv"
    words = {"0": "bad and boring", "1": "good and great", "2": "long and slow"}
    rows.write_text("text,label\n" + "".join(f"the movie was {words[str(i % 3)]},{i % 3}\n" for i in range(48)))
    args = target_args(tiny, rows, "three", "--steps", "3")
    args[args.index(VERB)] = "0=negative,1=positive,2=neutral"
    rc, out, err = run_cli(capsys, cli_main, args)
    assert rc == 0, err
    assert out.splitlines()[0] == ("auto: deep prompt, init labels, lr 0.03, 20 virtual tokens, 3 steps (task has "
                                   "label words; 44 training rows, at most 512; 3 label words; yours: --steps 3)")
    meta = meta_of(sp_home, "three")
    assert meta["kind"] == "deep" and meta["prompt"]["init"] == "labels" and meta["auto"]["facts"]["labels"] == 3
    assert meta["auto"]["rule"] == 1 and meta["auto"]["chose"]["steps"] == 50
    assert sp_store.load_prompt("three").kind == "deep"


def test_language_modelling_trains_the_shallow_vocab_prompt_and_user_flags_win(capsys, cli_main, sp_store, sp_home, tiny,
                                                                              toy_csv):
    args = ["train", "--model", tiny, "--data", str(toy_csv), "--text-column", "text", "--name", "lm", "--quiet",
            "--lr", "0.05", "--epochs", "1", "--num-virtual-tokens", "3"]
    rc, out, err = run_cli(capsys, cli_main, args)
    assert rc == 0, err
    assert out.splitlines()[0] == ("auto: shallow prompt, init vocab, lr 0.05, 3 virtual tokens, 1 epoch "
                                   "(no label words: language modelling; 44 training rows; "
                                   "yours: --epochs 1, --lr 0.05, --num-virtual-tokens 3)")
    meta = meta_of(sp_home, "lm")
    assert meta["auto"]["chose"] == {"kind": "shallow", "init": "vocab", "lr": 0.1, "num_virtual_tokens": 20, "epochs": 5}
    assert meta["auto"]["yours"] == {"epochs": 1, "lr": 0.05, "num_virtual_tokens": 3}
    assert (meta["training"]["lr"], meta["training"]["epochs"], meta["prompt"]["num_virtual_tokens"]) == (0.05, 1, 3)
    assert meta["prompt"]["init"] == "vocab" and sp_store.load_prompt("lm").tensor.shape == (3, 64)


def test_an_explicit_kind_is_not_auto(capsys, cli_main, sp_home, tiny, toy_csv):
    rc, out, err = run_cli(capsys, cli_main, target_args(tiny, toy_csv, "explicit", "--kind", "shallow", "--steps", "2"))
    assert rc == 0, err
    assert "\nauto: " not in "\n" + out and "auto" not in meta_of(sp_home, "explicit")
    assert meta_of(sp_home, "explicit")["prompt"] == PromptConfig().to_dict()  # the library's defaults


@pytest.mark.parametrize("case, match", [
    ("reparam lstm, auto deep", "--reparam lstm is not supported for --kind deep (choose mlp); --kind auto chose a "
                                "deep prompt (task has label words; 540 training rows): give --kind"),
    ("init labels, no label words", "--init labels needs a verbalizer"),
    ("deep on t5", "decoder-only model with a key/value cache"),
    ("continual deep", "continual trains shallow prompts only; drop --kind deep"),
    ("multitask reparam", "train-multitask trains shallow prompts only; drop --kind auto / --reparam mlp"),
])
def test_bad_combinations_are_one_line(capsys, cli_main, sp_home, tiny, tiny_model_dir, toy_csv, many_csv, case, match):
    args = {
        "reparam lstm, auto deep": target_args(tiny, many_csv, "x", "--reparam", "lstm"),
        "init labels, no label words": ["train", "--model", tiny, "--data", str(toy_csv), "--text-column", "text",
                                        "--init", "labels", "--quiet"],
        "deep on t5": target_args(str(tiny_model_dir("t5")), toy_csv, "x", "--kind", "deep"),
        "continual deep": ["continual", "--model", tiny, "--tasks", "a,b", "--kind", "deep"],
        "multitask reparam": ["train-multitask", "--model", tiny, "--tasks", "sst2,trec", "--kind", "auto",
                              "--reparam", "mlp"],
    }[case]
    assert_user_error(capsys, cli_main, sp_home, args, match)


def test_resume_without_a_checkpoint_is_one_line_before_the_choice(capsys, cli_main, sp_home, tiny, toy_csv):
    assert_user_error(capsys, cli_main, sp_home, target_args(tiny, toy_csv, "fresh", "--resume"), "--resume: no checkpoint")


# ---------------------------------------------------------------- the walk-through


def test_quickstart_first_run_keeps_the_seeds_settings_then_shows_auto(monkeypatch, tiny_lm, sp_store):
    """The walk-through's runs (each cut to 2 steps here: the settings are what is checked)."""
    from softprompt import models
    from softprompt.cli import quickstart
    from softprompt.training import tune as TR

    real, asked = TR.train, []

    def two_steps(lm, data, pcfg, tcfg, **kw):
        asked.append((pcfg, tcfg, kw["given"]))
        return real(lm, data, pcfg, replace(tcfg, steps=2), **kw | {"given": kw["given"] | {"steps"}})

    monkeypatch.setattr(models, "load", lambda name=None, **kw: tiny_lm)
    monkeypatch.setattr(TR, "train", two_steps)
    monkeypatch.setattr(quickstart, "GEN", GenerateConfig(max_new_tokens=4))
    lines: list[str] = []
    out = quickstart.run(sp_store, print_fn=lines.append, recommended=True)
    (classic, classic_t, _), (rec, rec_t, rec_given) = asked
    assert classic == PromptConfig(num_virtual_tokens=4, init="random", kind="shallow")
    assert (classic_t.lr, classic_t.epochs, classic_t.steps) == (5e-3, 5, None) and "auto" not in out["classic"].meta
    assert rec.kind == "auto" and rec_given == set()  # the recommended run is --kind auto's choice
    meta = out["recommended"].meta
    assert meta["auto"]["chose"] == {"kind": "shallow", "init": "vocab", "lr": 0.1, "num_virtual_tokens": 20, "epochs": 5}
    assert (meta["prompt"]["init"], meta["training"]["lr"], meta["training"]["patience"]) == ("vocab", 0.1, None)
    assert ("auto: shallow prompt, init vocab, lr 0.1, 20 virtual tokens, 2 steps (no label words: language "
            "modelling; 50 training rows; yours: --steps 2)") in lines
    assert any("--kind auto" in line for line in lines)


def test_a_lever_of_one_kind_makes_auto_choose_that_kind():
    """DePT's offset exists for shallow prompts and PrefixMemory for deep ones: asked for with
    ``--kind auto``, auto takes the table's row of that kind instead of refusing the lever."""
    facts = A.Facts(True, 6920, True)  # left alone, auto chooses deep here (see the table test)
    assert A.resolve(facts, PromptConfig(kind="auto"), TrainConfig(), given=set())[0].kind == "deep"
    pcfg, _, _ = A.resolve(facts, PromptConfig(kind="auto", offset_rank=2), TrainConfig(), given={"offset_rank"})
    assert (pcfg.kind, pcfg.offset_rank) == ("shallow", 2)
    lm = A.Facts(False, 50, True, mode="lm")  # left alone: shallow
    pcfg, _, _ = A.resolve(lm, PromptConfig(kind="auto", memory=True), TrainConfig(), given={"memory"})
    assert (pcfg.kind, pcfg.memory) == ("deep", True)
