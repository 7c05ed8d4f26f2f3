"""How the config dataclasses (``config.py``) declare their fields and travel as JSON: ``option``
(a field's default and CLI metadata), ``flag`` (its CLI flag), and the JSON round trip (plain
lists and dicts out, tuples and renamed fields back in, so a config read from a result file
equals the one that wrote it)."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any, TypeVar


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, none: str | None = None,
           metavar: str | None = None) -> Any:
    """A config field with its CLI metadata: ``help`` (one line; the CLI prints the default), ``choices``,
    ``none`` (the word typed for ``None``, e.g. ``all``), ``metavar``. Mutable defaults are copied."""
    meta = {"help": help, "choices": choices, "none": none, "metavar": metavar}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def flag(name: str) -> str:
    """The CLI flag of a config field: ``max_batch_rows`` -> ``--max-batch-rows``."""
    return "--" + name.replace("_", "-")


# field names of earlier releases -> today's (result files keep the names they were written with)
RENAMED = {"eval_batch_size": "eval_max_batch_rows", "batch_size@EvalConfig": "max_batch_rows",
           "eval_limit@CompareConfig": "dev_sample", "test_limit@CompareConfig": "test_sample",
           "steps@ContinualConfig": "stage_steps"}

_C = TypeVar("_C", bound="JsonMixin")


class JsonMixin:
    """JSON round trip: ``to_dict`` gives plain lists and dicts; ``from_dict`` turns the lists of
    tuple-typed fields back into tuples (so a config read from a result file equals the one that
    wrote it), reads renamed fields under their new name and ignores keys it does not know."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_C], data: dict[str, Any]) -> _C:
        kinds = {f.name: str(f.type) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        named = {RENAMED.get(f"{k}@{cls.__name__}", RENAMED.get(k, k)): v for k, v in data.items()}
        return cls(**{k: _tupled(v, kinds[k]) for k, v in named.items() if k in kinds})


def _tupled(value: Any, annotation: str) -> Any:
    if isinstance(value, list) and annotation.startswith("tuple"):
        return tuple(value)
    if isinstance(value, dict) and annotation.startswith("dict[str, tuple"):
        return {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    return value
