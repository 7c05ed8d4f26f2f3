"""CLI flags derived from the config dataclasses (``config.py``): one flag per field, its type from
the annotation, its help, choices and the word for ``None`` from the field's declared metadata
(``config.option``), its default printed once. A flag the user did not give stays
None, so the dataclass's default applies: the CLI defines no default of its own. The flags that
several commands share (model, device, data) are built here once.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Callable
from typing import Any

from softprompt.config import UserError

# ---------------------------------------------------------------- CLI flags from the configs


def deprecation(old: str, new: str) -> None:
    """The one line an old spelling prints; it keeps working for one more release."""
    print(f"softprompt: warning: {old} is deprecated and will be removed in the next release; use {new}",
          file=sys.stderr)


class _DeprecatedFlag(argparse.Action):
    """A hidden old spelling of a flag: stores into the new flag's field and prints one line."""

    def __init__(self, option_strings: list[str], dest: str, new: str, append: bool = False, **kw: Any) -> None:
        super().__init__(option_strings, dest, **kw)
        self.new, self.append = new, append

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        deprecation(option_string or self.option_strings[0], self.new)
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), values] if self.append else values)


def add_old_flag(parser: Any, old: str, new: str, dest: str, append: bool = False, **kw: Any) -> None:
    """``old``, hidden, as a deprecated spelling of ``new`` (which stores into ``dest``)."""
    parser.add_argument(old, dest=dest, default=None, help=argparse.SUPPRESS, action=_DeprecatedFlag, new=new,
                        append=append, **kw)


def _comma_list(item: type, flag: str, none: str | None = None) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        out: list = []
        for part in (p.strip() for p in text.split(",")):
            if none and part.lower() == none:
                out.append(None)
            elif part:
                try:
                    out.append(item(part))
                except ValueError:
                    kind = "an integer" if item is int else "a number" if item is float else "valid"
                    raise UserError(f"{flag}: {part!r} is not {kind}{f' or {none}' if none else ''}") from None
        if not out:
            raise UserError(f"{flag} needs a comma-separated list")
        return tuple(out)

    return parse


def _number_or(item: type, flag: str, none: str, zero_was_none: bool) -> Callable[[str], Any]:
    """Parser of a number flag whose ``None`` is typed as the word ``none`` (``all``, ``never``);
    ``zero_was_none``: ``0`` was the old spelling of that word (still read, with a warning)."""

    def parse(text: str) -> Any:
        if text.strip().lower() == none:
            return None
        try:
            value = item(text)
        except ValueError:
            raise UserError(f"{flag}: {text!r} is not {'an integer' if item is int else 'a number'} or {none}") from None
        if zero_was_none and value == 0:
            deprecation(f"{flag} 0", f"{flag} {none}")
            return None
        return value

    return parse


def _float_map(flag: str) -> Callable[[str], dict[str, float]]:
    def parse(text: str) -> dict[str, float]:
        out = {}
        for key, word in (parse_verbalizer(text) or {}).items():
            try:
                out[key] = float(word)
            except ValueError:
                raise UserError(f"{flag}: {word!r} is not a number (expected NAME=NUMBER,...)") from None
        return out

    return parse


_METAVARS = {"int": "N", "float": "X", "str": "TEXT"}
# flags whose 0 meant "all" before the word was typeable: (config class, field)
ZERO_WAS_ALL = {("MultitaskConfig", "per_task"), ("ContinualConfig", "per_task"), ("ContinualConfig", "test_per_task")}


def _converter(cls: type, f: dataclasses.Field, flag: str) -> tuple[dict[str, Any], Callable[[str], Any] | None]:
    """(argparse keywords, parser of the given text or None) for a field: its type annotation (a
    string: annotations are postponed) and its declared metadata. Lists, label maps and numbers
    with a word for None are parsed after argparse, so a mistake in them is a one-line
    ``UserError`` like every other."""
    annotation, meta = str(f.type), f.metadata
    base = annotation[: -len(" | None")] if annotation.endswith(" | None") else annotation
    none, choices = meta.get("none"), meta.get("choices")
    simple = {"int": int, "float": float, "str": str}
    if base in simple and none:
        zero = (cls.__name__, f.name) in ZERO_WAS_ALL
        return {"metavar": f"{_METAVARS[base]}|{none}"}, _number_or(simple[base], flag, none, zero)
    if base == "str" and choices and all(":" not in c for c in choices):
        return {"choices": choices}, None
    if base in simple:
        own = flag.lstrip("-").upper().replace("-", "_")  # a str flag's value is named after the flag
        return {"type": simple[base], "metavar": meta.get("metavar") or (own if base == "str" else _METAVARS[base])}, None
    if base == "bool":
        return {"action": argparse.BooleanOptionalAction}, None
    lists = {"tuple[int | None, ...]": int, "tuple[int, ...]": int, "tuple[str, ...]": str, "tuple[float, ...]": float}
    if base in lists:
        return {"metavar": "A,B,..."}, _comma_list(lists[base], flag, none)
    if base == "dict[str, str]":
        return {"metavar": "K=V,..."}, parse_verbalizer
    if base == "dict[str, float]":
        return {"metavar": "NAME=LR,..."}, _float_map(flag)
    raise TypeError(f"no CLI flag for a field of type {annotation}")


def _shown_default(f: dataclasses.Field) -> str | None:
    """The default as a user would type it, or None where there is nothing to show."""
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    none = f.metadata.get("none")
    if isinstance(default, tuple):
        return ",".join(none or "" if v is None else str(v) for v in default) or None
    if isinstance(default, bool):
        return "on" if default else "off"
    if default is None:
        return none
    return str(default)


def flag_help(f: dataclasses.Field, text: str | None = None, listed: bool = False, default: Any = None) -> str:
    """A field's help line: its declared help (or ``text``), its choices unless argparse lists
    them (``listed``), and the default (``default``: the command's own), once, unless the text says
    what "not given:" means."""
    out = text or f.metadata["help"]
    choices = f.metadata.get("choices")
    if choices and not listed:
        out += f"; one of {', '.join(choices)}"
    shown = None if "not given:" in out else str(default) if default is not None else _shown_default(f)
    return (out + (f" (default {shown})" if shown is not None else "")).replace("%", "%%")


_CONVERT: dict[tuple[str, str], Any] = {}  # (config class, field) -> parser of the flag's text


def add_flags(parser: Any, cls: type, only: tuple[str, ...] | None = None, skip: tuple[str, ...] = (),
              rename: dict[str, str] | None = None, helps: dict[str, str] | None = None,
              old: dict[str, str] | None = None, defaults: dict[str, Any] | None = None) -> None:
    """One ``--flag`` per field of ``cls`` (or of ``only``): type, choices and help from the
    field's annotation and declared metadata (``config.option``), the default printed once. A
    flag not given stays None, so ``given`` leaves the default to the dataclass. ``rename`` maps a
    field to another flag name; ``helps`` overrides a help; ``old`` maps a field to its previous
    flag name, kept hidden for one release with a deprecation line; ``defaults`` gives a command's
    own default for a field (a constant of ``config.py``)."""
    rename, old, defaults = rename or {}, old or {}, defaults or {}
    for f in dataclasses.fields(cls):
        if (only is not None and f.name not in only) or f.name in skip:
            continue
        flag = "--" + rename.get(f.name, f.name).replace("_", "-")
        kw, convert = _converter(cls, f, flag)
        text = flag_help(f, (helps or {}).get(f.name), listed="choices" in kw, default=defaults.get(f.name))
        parser.add_argument(flag, dest=f.name, default=defaults.get(f.name), help=text, **kw)
        if f.name in old:
            add_old_flag(parser, "--" + old[f.name], flag, f.name, **{k: v for k, v in kw.items() if k != "action"})
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


def add_model_flags(p: argparse._ActionsContainer) -> None:
    p.add_argument("--model", default=None, help="smollm2-135m (default, embedded), a local transformers folder, "
                   "or a Hugging Face hub id such as Qwen/Qwen2.5-0.5B-Instruct (docs/architectures.md)")
    p.add_argument("--offline", action="store_true",
                   help="use only the Hugging Face cache, never the network (as HF_HUB_OFFLINE=1)")


def add_device_flags(p: argparse._ActionsContainer, auto_dtype: bool = False) -> None:
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


def add_data_root_flag(p: argparse._ActionsContainer) -> None:
    p.add_argument("--data-root", help="where task recipes find their files (default $SOFTPROMPT_DATA, else <home>/data)")


def add_store_flags(p: argparse._ActionsContainer) -> None:
    """``--home`` and ``--data-root`` (where the command has no --data-root yet): the Store."""
    p.add_argument("--home", help="the store: prompts, converted models, runs "
                   "(default $SOFTPROMPT_HOME, else ~/.cache/softprompt)")
    if "--data-root" not in p._option_string_actions:
        add_data_root_flag(p)


def add_data_flags(p: Any, only: tuple[str, ...], title: str = "data", helps: dict[str, str] | None = None,
                   rename: dict[str, str] | None = None, old: dict[str, str] | None = None) -> None:
    """``--task``, ``--data-root`` and the DataConfig fields in ``only`` (``path`` is ``--data``;
    ``rename`` and ``old`` as in ``add_flags``)."""
    from softprompt.config import DataConfig

    g = p.add_argument_group(title)
    g.add_argument("--task", help="a task recipe (sst2, trec, agnews, rte, boolq, cb, ...) or a recipe .json file")
    add_data_root_flag(g)
    add_flags(g, DataConfig, only=only, rename={"path": "data", **(rename or {})}, helps=helps, old=old)


def as_typed(message: str, parser: argparse.ArgumentParser) -> str:
    """An error message with each field's canonical flag (``--eval-limit``) replaced by the flag
    this command spells it with (``--dev-limit``), so the message names what the user types."""
    for act in parser._actions:
        if not act.option_strings or isinstance(act, _DeprecatedFlag):
            continue
        canonical, typed = "--" + act.dest.replace("_", "-"), act.option_strings[0]
        if canonical != typed:
            message = re.sub(re.escape(canonical) + r"(?![\w-])", typed, message)
    return message


def unescape(text: str | None) -> str | None:
    """``\\n`` and ``\\t`` typed in a shell template become real newlines and tabs."""
    return None if text is None else text.replace("\\n", "\n").replace("\\t", "\t")


# the data flags of the commands that read one evaluation data set (eval, inspect)
EVAL_DATA = ("path", "template", "target_column", "text_column", "verbalizer", "max_length", "data_split",
             "data_config", "chat", "system")


def data_given(a: argparse.Namespace, only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The DataConfig fields the user gave (of ``only``), the template's typed ``\\n`` unescaped."""
    from softprompt.config import DataConfig

    kw = given(DataConfig, a, only)
    if "template" in kw:
        kw["template"] = unescape(kw["template"])
    return kw


def data_config(a: argparse.Namespace, held_out: bool = False):
    """The DataConfig of the user's data flags, resolved once (``recipes.resolve``): with ``--task``
    the recipe fills what was not given and names the files (``held_out``: compare's policy)."""
    from softprompt import recipes
    from softprompt.config import DataConfig

    if not a.task and not getattr(a, "path", None):
        raise UserError("give --data PATH (csv, tsv, jsonl) or --task NAME")
    kw = data_given(a)
    if not a.task and not kw.get("text_column") and not kw.get("template"):
        raise UserError("say what to learn: --text-column C, or --template TPL --target-column C")
    return recipes.resolve(DataConfig(**kw), a.task, a.store.data_root, held_out=held_out)


PROMPT_FLAGS = ("num_virtual_tokens", "init", "init_text", "kind", "reparam", "dropout", "freeze_first", "offset_rank",
                "offset_length", "memory")
PROMPT_RENAME = {"dropout": "prompt_dropout", "freeze_first": "freeze_first_token", "memory": "prefix_memory"}


def add_prompt_train_flags(p: argparse._ActionsContainer, train_fields: tuple[str, ...], defaults: dict[str, Any] | None = None) -> None:
    """PromptConfig's flags and the TrainConfig fields in ``train_fields``, plus --quiet;
    ``defaults``: the command's own defaults of PromptConfig fields (``add_flags``)."""
    from softprompt.config import PromptConfig, TrainConfig

    g = p.add_argument_group("prompt and training")
    add_flags(g, PromptConfig, only=PROMPT_FLAGS, rename=PROMPT_RENAME, defaults=defaults)
    add_flags(g, TrainConfig, only=train_fields)
    g.add_argument("--quiet", action="store_true", help="no progress display")


def prompt_train_configs(a: argparse.Namespace):
    """(PromptConfig, TrainConfig) from the flags of ``add_prompt_train_flags``."""
    from softprompt.config import PromptConfig, TrainConfig

    return from_args(PromptConfig, a, PROMPT_FLAGS), from_args(TrainConfig, a)


def names(text: str, what: str) -> tuple[str, ...]:
    out = tuple(t.strip() for t in text.split(",") if t.strip())
    if not out:
        raise UserError(f"{what} needs a comma-separated list")
    return out


def command_line(a: argparse.Namespace) -> str:
    """The command as the user could retype it: the subcommand and every option given."""
    import shlex

    parts = ["softprompt", a.command]
    for act in a.parser._actions:
        if not act.option_strings or act.dest == "help" or isinstance(act, _DeprecatedFlag):
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
