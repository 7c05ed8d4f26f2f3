"""CLI flags derived from the config dataclasses (``config.py``): one flag per field, its type from
the annotation, its help from the field's comment and default. A flag the user did not give stays
None, so the dataclass's default applies: the CLI defines no default of its own. The flags that
several commands share (model, device, data) are built here once.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
from typing import Any

from softprompt.config import UserError

# ---------------------------------------------------------------- CLI flags from the configs


def field_docs(cls) -> dict[str, str]:
    """Each field's one-line comment (``name: type = default  # comment``) in ``cls``'s source."""
    return dict(re.findall(r"^\s+(\w+): .*?  # (.+)$", inspect.getsource(cls), re.M))


def _comma_list(item: type, flag: str, allow_all: bool = False):
    def parse(text: str) -> tuple:
        out: list = []
        for part in (p.strip() for p in text.split(",")):
            if allow_all and part == "all":
                out.append(None)
            elif part:
                try:
                    out.append(item(part))
                except ValueError:
                    kind = "an integer" if item is int else "a number" if item is float else "valid"
                    raise UserError(f"{flag}: {part!r} is not {kind}{' or all' if allow_all else ''}") from None
        if not out:
            raise UserError(f"{flag} needs a comma-separated list")
        return tuple(out)

    return parse


def _float_map(flag: str):
    def parse(text: str) -> dict[str, float]:
        out = {}
        for key, word in (parse_verbalizer(text) or {}).items():
            try:
                out[key] = float(word)
            except ValueError:
                raise UserError(f"{flag}: {word!r} is not a number (expected NAME=NUMBER,...)") from None
        return out

    return parse


def _converter(annotation: str, flag: str):
    """(argparse keywords, parser of the given text or None) for a field's type annotation (a
    string: annotations are postponed). Lists and label maps are parsed after argparse, so a
    mistake in them is a one-line ``UserError`` like every other."""
    base = annotation[: -len(" | None")] if annotation.endswith(" | None") else annotation
    simple = {"int": int, "float": float, "str": str}
    if base in simple:
        return {"type": simple[base]}, None
    if base == "bool":
        return {"action": argparse.BooleanOptionalAction}, None
    lists = {"tuple[int | None, ...]": (int, True), "tuple[int, ...]": (int, False),
             "tuple[str, ...]": (str, False), "tuple[float, ...]": (float, False)}
    if base in lists:
        item, allow_all = lists[base]
        return {"metavar": "A,B,..."}, _comma_list(item, flag, allow_all)
    if base == "dict[str, str]":
        return {"metavar": "K=V,..."}, parse_verbalizer
    if base == "dict[str, float]":
        return {"metavar": "NAME=LR,..."}, _float_map(flag)
    raise TypeError(f"no CLI flag for a field of type {annotation}")


_CONVERT: dict[tuple[str, str], Any] = {}  # (config class, field) -> parser of the flag's text


def add_flags(parser, cls, only: tuple[str, ...] | None = None, skip: tuple[str, ...] = (),
              rename: dict[str, str] | None = None, helps: dict[str, str] | None = None,
              defaults: dict[str, Any] | None = None) -> None:
    """One ``--flag`` per field of ``cls`` (or of ``only``): type from the annotation, help from the
    field's comment and its default. A flag not given stays None, so ``given`` leaves the default
    to the dataclass. ``rename`` maps a field to another flag name; ``helps`` overrides a help;
    ``defaults`` gives a command's own default for a field (a constant of ``config.py``)."""
    docs = {**field_docs(cls), **(helps or {})}
    rename, defaults = rename or {}, defaults or {}
    for f in dataclasses.fields(cls):
        if (only is not None and f.name not in only) or f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        default = defaults.get(f.name, default)
        shown = ",".join("all" if v is None else str(v) for v in default) if isinstance(default, tuple) else default
        text = f"{docs.get(f.name, '')} (default {shown})".replace("%", "%%")
        flag = "--" + rename.get(f.name, f.name).replace("_", "-")
        kw, convert = _converter(str(f.type), flag)
        parser.add_argument(flag, dest=f.name, default=defaults.get(f.name), help=text, **kw)
        if convert is not None:
            _CONVERT[(cls.__name__, f.name)] = convert


def given(cls, args, only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The fields of ``cls`` that the user set on the command line (flags from ``add_flags``)."""
    names = [f.name for f in dataclasses.fields(cls) if only is None or f.name in only]
    out = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    for n, v in out.items():
        convert = _CONVERT.get((cls.__name__, n))
        if convert is not None and isinstance(v, str):
            out[n] = convert(v)
    return out


def from_args(cls, args, only: tuple[str, ...] | None = None, **extra):
    """``cls`` from the flags the user gave (every other field keeps its default) and ``extra``."""
    return cls(**{**given(cls, args, only), **extra})


# ---------------------------------------------------------------- flags several commands share


def add_model_flags(p) -> None:
    p.add_argument("--model", default=None, help="smollm2-135m (default, embedded), a local transformers folder, "
                   "or a Hugging Face hub id such as Qwen/Qwen2.5-0.5B-Instruct (docs/architectures.md)")
    p.add_argument("--offline", action="store_true",
                   help="use only the Hugging Face cache, never the network (as HF_HUB_OFFLINE=1)")


def add_device_flags(p, auto_dtype: bool = False) -> None:
    """``--device`` and ``--dtype``; ``auto_dtype`` (serve, generate, eval): ``--dtype auto`` is
    offered and is the default (bfloat16 where the device computes bf16 natively, else float32)."""
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:K (under torchrun, cuda = this process's GPU) (default cpu)")
    if auto_dtype:
        p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                       help="the frozen model's dtype; auto: bfloat16 where the CPU (AMX or AVX512-BF16) or GPU "
                            "computes bf16 natively, else float32; prompts are cast to it (default auto)")
    else:
        p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                       help="the frozen model's dtype; a trained prompt stays float32 (default float32)")


def add_data_root_flag(p) -> None:
    p.add_argument("--data-root", help="where task recipes find their files (default $SOFTPROMPT_DATA, else <home>/data)")


def add_store_flags(p) -> None:
    """``--home`` and ``--data-root`` (where the command has no --data-root yet): the Store."""
    p.add_argument("--home", help="the store: prompts, converted models, runs "
                   "(default $SOFTPROMPT_HOME, else ~/.cache/softprompt)")
    if "--data-root" not in p._option_string_actions:
        add_data_root_flag(p)


DATA_RENAME = {"path": "data", "eval_path": "eval-data"}


def add_data_flags(p, only: tuple[str, ...], title: str = "data", helps: dict[str, str] | None = None) -> None:
    """``--task``, ``--data-root`` and the DataConfig fields in ``only`` (``path`` is ``--data``)."""
    from softprompt.config import DataConfig

    g = p.add_argument_group(title)
    g.add_argument("--task", help="a task recipe (sst2, trec, agnews, rte, boolq, cb, ...) or a recipe .json file")
    add_data_root_flag(g)
    add_flags(g, DataConfig, only=only, rename=DATA_RENAME, helps=helps)


def unescape(text: str | None) -> str | None:
    """``\\n`` and ``\\t`` typed in a shell template become real newlines and tabs."""
    return None if text is None else text.replace("\\n", "\n").replace("\\t", "\t")


# the data flags of the commands that read one evaluation data set (eval, inspect)
EVAL_DATA = ("path", "template", "target_column", "text_column", "verbalizer", "max_length", "data_split",
             "data_config", "chat", "system")


def data_given(a, only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The DataConfig fields the user gave (of ``only``), the template's typed ``\\n`` unescaped."""
    from softprompt.config import DataConfig

    kw = given(DataConfig, a, only)
    if "template" in kw:
        kw["template"] = unescape(kw["template"])
    return kw


def data_config(a):
    """The DataConfig of the user's data flags; with ``--task`` the recipe fills what was not given."""
    from softprompt.config import DataConfig

    if not a.task and not getattr(a, "path", None):
        raise UserError("give --data PATH (csv, tsv, jsonl) or --task NAME")
    kw = data_given(a)
    if not a.task and not kw.get("text_column") and not kw.get("template"):
        raise UserError("say what to learn: --text-column C, or --template TPL --target-column C")
    return DataConfig(**kw)


PROMPT_FLAGS = ("num_virtual_tokens", "init", "init_text", "kind", "reparam", "dropout", "freeze_first", "offset_rank",
                "offset_length", "memory")
PROMPT_RENAME = {"dropout": "prompt_dropout", "freeze_first": "freeze_first_token", "memory": "prefix_memory"}


def add_prompt_train_flags(p, train_fields: tuple[str, ...], defaults: dict[str, Any] | None = None) -> None:
    """PromptConfig's flags and the TrainConfig fields in ``train_fields``, plus --quiet;
    ``defaults``: the command's own defaults of PromptConfig fields (``add_flags``)."""
    from softprompt.config import PromptConfig, TrainConfig

    g = p.add_argument_group("prompt and training")
    add_flags(g, PromptConfig, only=PROMPT_FLAGS, rename=PROMPT_RENAME, defaults=defaults)
    add_flags(g, TrainConfig, only=train_fields)
    g.add_argument("--quiet", action="store_true", help="no progress display")


def prompt_train_configs(a):
    """(PromptConfig, TrainConfig) from the flags of ``add_prompt_train_flags``."""
    from softprompt.config import PromptConfig, TrainConfig

    return from_args(PromptConfig, a, PROMPT_FLAGS), from_args(TrainConfig, a)


def names(text: str, what: str) -> tuple[str, ...]:
    out = tuple(t.strip() for t in text.split(",") if t.strip())
    if not out:
        raise UserError(f"{what} needs a comma-separated list")
    return out


def command_line(a) -> str:
    """The command as the user could retype it: the subcommand and every option given."""
    import shlex

    parts = ["softprompt", a.command]
    for act in a.parser._actions:
        if not act.option_strings or act.dest == "help":
            continue
        v = getattr(a, act.dest, None)
        if isinstance(act, argparse.BooleanOptionalAction) and v is not None:
            parts.append(act.option_strings[0 if v else 1])
            continue
        if v is None or v is False or v == act.default:
            continue
        for item in v if isinstance(v, list) else [v]:
            item = ",".join("all" if x is None else str(x) for x in item) if isinstance(item, tuple) else item
            if isinstance(item, dict):
                item = ",".join(f"{k}={w}" for k, w in item.items())
            parts += [act.option_strings[-1]] + ([] if item is True else [str(item)])
    return shlex.join(parts)


def parse_verbalizer(text: str | None) -> dict[str, str] | None:
    """``"0=negative,1=positive"`` -> ``{"0": "negative", "1": "positive"}``."""
    if not text:
        return None
    out: dict[str, str] = {}
    for part in text.split(","):
        key, sep, word = part.partition("=")
        if not (sep and key.strip() and word.strip()):
            raise UserError(f"bad --verbalizer entry {part!r}; expected LABEL=WORD")
        out[key.strip()] = word.strip()
    return out
