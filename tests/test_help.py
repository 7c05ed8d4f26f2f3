"""The command line's help and errors: every subcommand's ``--help`` follows the same rules (each
flag has help, each default printed once, choices listed, no metavar named after a config field),
no flag means two things, old spellings still work for one release with a deprecation line, and
an error names the flag the user typed."""

from __future__ import annotations

import argparse
import dataclasses
import re

import pytest

from softprompt import config
from softprompt.cli import build_parser, main
from softprompt.cli.flags import _DeprecatedFlag

CONFIGS = [c for c in vars(config).values() if isinstance(c, type) and dataclasses.is_dataclass(c) and hasattr(c, "from_dict")]
FIELDS: dict[str, list[dataclasses.Field]] = {}
for _cls in CONFIGS:
    for _f in dataclasses.fields(_cls):
        FIELDS.setdefault(_f.name, []).append(_f)


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


COMMANDS = _commands()


def _flags(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, (argparse._HelpAction, _DeprecatedFlag))]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_follows_the_rules(name, capsys):
    parser = COMMANDS[name]
    with pytest.raises(SystemExit) as done:
        main([name, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: softprompt {name}")
    for act in _flags(parser):
        flag = act.option_strings[-1]
        assert act.help and act.help != argparse.SUPPRESS, f"{name} {flag}: no help"
        said = act.help.replace("%(default)s", str(act.default)).lower()
        assert said.count("default") <= 1, f"{name} {flag}: default printed twice: {act.help}"
        own = act.option_strings[0].lstrip("-").upper().replace("-", "_")
        if act.nargs != 0 and act.choices is None and act.metavar is None:  # argparse would name it after the field
            assert act.dest.upper() == own, f"{name} {flag}: metavar {act.dest.upper()} is the field's name"
        listed = act.help + " " + ",".join(act.choices or ())
        declared = [f.metadata["choices"] for f in FIELDS.get(act.dest, []) if f.metadata.get("choices")]
        if declared:
            assert any(all(c in listed for c in choices) for choices in declared), f"{name} {flag}: choices not listed"


def test_help_texts_are_declared_on_the_fields_and_say_no_default():
    """Each config field declares its help; the CLI alone prints the default (once)."""
    for cls in CONFIGS:
        for f in dataclasses.fields(cls):
            text = f.metadata.get("help")
            assert text, f"{cls.__name__}.{f.name} declares no help"
            assert "(default" not in text, f"{cls.__name__}.{f.name}: the help names its default itself"


def test_eval_data_split_says_what_eval_does(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the split to train on" not in text
    assert "--data-split SPLIT a datasets data set as --data: the split to evaluate" in text


# flags whose values differ in form only: eval's --prompt also takes several names (an ensemble)
ALIKE = {"--prompt"}


def test_no_flag_means_two_things():
    """A flag spelled alike in several commands sets the same field and takes the same kind of
    value; the flags that meant dev in one command and test in another are apart now."""
    seen: dict[str, tuple[str, str, object]] = {}
    for name, parser in COMMANDS.items():
        for act in _flags(parser):
            flag, kind = act.option_strings[0], (act.dest, act.metavar)
            if flag in seen and flag not in ALIKE:
                assert seen[flag][1:] == kind, f"{flag} is {seen[flag][1:]} in {seen[flag][0]}, {kind} in {name}"
            seen.setdefault(flag, (name, *kind))
    assert seen["--dev-data"][:2] == ("train", "eval_path") and seen["--test-data"][:2] == ("compare", "eval_path")
    for old in ("--eval-data", "--eval-split", "--test-limit", "--eval-limit"):
        assert old not in seen
    assert {name for name, parser in COMMANDS.items() for act in _flags(parser)
            if act.option_strings[0] == "--dev-limit"} == {"train", "inspect"}  # the first K dev rows


def _parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


@pytest.mark.parametrize("argv, old, new, dest, value", [
    (["train", "--eval-data", "d.csv"], "--eval-data", "--dev-data", "eval_path", "d.csv"),
    (["train", "--eval-limit", "7"], "--eval-limit", "--dev-limit", "eval_limit", "7"),
    (["compare", "--eval-data", "t.csv"], "--eval-data", "--test-data", "eval_path", "t.csv"),
    (["compare", "--eval-limit", "50"], "--eval-limit", "--dev-sample", "dev_sample", "50"),
    (["compare", "--test-limit", "9"], "--test-limit", "--test-sample", "test_sample", "9"),
    (["eval", "--batch-size", "4"], "--batch-size", "--max-batch-rows", "max_batch_rows", 4),
    (["compare", "--lr", "lora=1e-3"], "--lr", "--lr-sweep", "lr_sweep", ["lora=1e-3"]),
    (["inspect", "p", "--eval-limit", "8"], "--eval-limit", "--dev-limit", "eval_limit", "8"),
])
def test_old_spellings_work_with_a_deprecation_line(argv, old, new, dest, value, capsys):
    a = _parse(argv)
    assert getattr(a, dest) == value
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and old in err[0] and new in err[0] and "deprecated" in err[0]
    assert getattr(_parse([*argv[:-2], new, argv[-1]]), dest) == value
    assert capsys.readouterr().err == ""


def test_all_and_never_are_typeable_and_zero_still_reads_as_all(capsys):
    from softprompt.cli.flags import from_args

    assert from_args(config.TrainConfig, _parse(["train", "--patience", "never"])).patience is None
    assert from_args(config.TrainConfig, _parse(["train", "--patience", "3"])).patience == 3
    assert from_args(config.TrainConfig, _parse(["train"])).patience == config.TrainConfig().patience
    assert from_args(config.CompareConfig, _parse(["compare", "--test-sample", "all"])).test_sample is None
    assert from_args(config.CompareConfig, _parse(["compare", "--train-sizes", "8,all"])).train_sizes == (8, None)
    assert capsys.readouterr().err == ""
    many = from_args(config.MultitaskConfig, _parse(["train-multitask", "--tasks", "a,b", "--per-task", "0"]))
    assert many.per_task is None and "--per-task all" in capsys.readouterr().err
    assert from_args(config.MultitaskConfig, _parse(["train-multitask", "--tasks", "a,b", "--per-task", "all"])).per_task is None


@pytest.mark.parametrize("argv, flag", [
    (["continual", "--tasks", "a,b", "--stage-steps", "0"], "--stage-steps"),
    (["eval", "--task", "sst2", "--max-batch-rows", "0"], "--max-batch-rows"),
    (["train", "--data", "x.csv", "--text-column", "t", "--dev-limit", "0"], "--dev-limit"),
    (["train", "--data", "x.csv", "--text-column", "t", "--patience", "soon"], "--patience"),
    (["compare", "--task", "sst2", "--dev-sample", "0"], "--dev-sample"),
])
def test_errors_name_the_flag_the_user_typed(argv, flag, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("softprompt: error: ") and len(err.splitlines()) == 1
    assert re.search(re.escape(flag) + r"(?![\w-])", err), err


def test_every_positive_limit_names_its_field():
    """A bad number in any config names the field (as its flag), never a vague 'limits'."""
    for cls in (config.EngineConfig, config.ServerConfig, config.EvalConfig, config.TrainConfig, config.InspectConfig):
        for f in dataclasses.fields(cls):
            if f.type not in ("int", "float") or f.name in ("seed", "weight_decay", "max_grad_norm", "temperature"):
                continue
            try:
                cls(**{f.name: -1})
            except config.UserError as e:
                assert config.flag(f.name) in str(e), f"{cls.__name__}.{f.name}: {e}"


def test_the_recorded_command_spells_each_flag_once_and_new(capsys):
    from softprompt.cli.flags import command_line

    a = _parse(["compare", "--lr", "lora=1e-3", "--eval-limit", "50", "--test-sample", "all"])
    a.command = "compare"
    assert command_line(a) == "softprompt compare --dev-sample 50 --test-sample all --lr-sweep lora=1e-3"
