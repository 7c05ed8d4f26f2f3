"""Task recipes (``tasks/*.json``, shipped inside the package), resolved into a DataConfig once.

A recipe names its files (under the data root, ``Store.data_root``: ``--data-root``,
``$SOFTPROMPT_DATA`` or ``<home>/data``), their
columns, the template and the verbalizer. A split may also name the same data on the Hugging Face
hub (``"hub": {"id", "config", "split", "columns": {hub column: ours}, "values": {column: {hub
value: ours}}}``): local files win; without them the split is read through ``datasets`` into
``<data root>/hub`` (``Store.datasets_cache``), from its cache when offline.

``resolve`` turns a recipe (or the user's data flags) into a plain DataConfig whose ``files``
name the train, dev and test files, where the command builds its config; after that only
``splits.load_splits`` reads the data, and nothing looks at the recipe again. Two split
policies say which recipe file is which:

* train-dev (``train``, ``train-multitask``, ``continual``, ``inspect``): dev is the recipe's ``eval``
  file (or ``--dev-data``), else carved from train (``dev_fraction``); test is ``test``, else ``eval``;
* held-out (``compare``): test is ``test``, else ``eval``; dev is ``eval`` only when ``test``
  exists, else carved from train by the comparison.

``eval`` and ``inspect`` ask for a named split as test (``test=("eval",)``).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from softprompt.config import DataConfig, UserError
from softprompt.datafiles import DataFile, DataFiles
from softprompt.splits import user_files

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def task_name(task: str | None, path: str | None = None) -> str:
    """A task's short name (the recipe file's stem), or the data file's stem: result tags, store names."""
    if task:
        return Path(task).stem if task.endswith(".json") else task
    return Path(path or "data").stem


def task_path(task: str) -> Path:
    p = Path(task)
    if p.suffix == ".json" and p.is_file():
        return p
    p = TASKS_DIR / f"{task}.json"
    if not p.is_file():
        known = sorted(q.stem for q in TASKS_DIR.glob("*.json"))
        raise UserError(f"unknown --task {task!r}; known tasks: {', '.join(known)}")
    return p


def load_task(task: str) -> dict:
    return json.loads(task_path(task).read_text())


def user_overrides(cfg: DataConfig) -> dict:
    """The user's data options that override a task recipe (those different from the defaults)."""
    default = DataConfig()
    return {k: v for k, v in cfg.to_dict().items() if v != getattr(default, k) and k != "files"}


def _file(spec: dict, root: Path, limit: int | None = None) -> DataFile:
    """A recipe split spec ({path, columns, derive, label_map, carve, hub}, the path under ``root``)."""
    return DataFile(str(root / spec["path"]), tuple(spec["columns"]) if spec.get("columns") else None,
                    spec.get("derive"), spec.get("label_map"), carve=spec.get("carve"), hub=spec.get("hub"),
                    root=str(root), limit=limit)


def _test_spec(recipe: dict, task: str, names: tuple[str, ...], need: bool) -> dict | None:
    """The first of the recipe's splits ``names`` it has; ``need``: else one line naming those it has."""
    spec = next((recipe[n] for n in names if recipe.get(n)), None)
    if spec is None and need:
        have = [k for k in ("eval", "test") if recipe.get(k)]
        raise UserError(f"task {task!r} has no {' or '.join(repr(n) for n in names)} split; "
                        f"it has: {', '.join(have) or 'none'}")
    return spec


def resolve(cfg: DataConfig, task: str | None, root: Path | None, *, held_out: bool = False,
            test: tuple[str, ...] = ("test", "eval"), need_test: bool = False) -> DataConfig:
    """The DataConfig a command reads its data with: the user's settings (``cfg``, those not at
    their defaults win) over ``task``'s recipe (files under the data root ``root``), with
    ``files`` naming train, dev and test (policies in the module docstring; ``test``: the recipe
    splits tried in order as test, ``need_test``: one of them must exist). Without a task, the
    files of the user's own flags."""
    if not task:
        return replace(cfg, files=user_files(cfg, held_out))
    if root is None:
        raise UserError(f"--task {task}: no data root given (--data-root)")
    recipe = load_task(task)
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in recipe.items() if k in DataConfig.__dataclass_fields__}
    train = recipe["train"]
    fields.update(path=str(root / train["path"]), columns=tuple(train["columns"]) if train.get("columns") else None,
                  derive=train.get("derive"), label_map=train.get("label_map"), eval_path=None)
    out = DataConfig(**{**fields, **{k: v for k, v in user_overrides(cfg).items() if v is not None}})
    test_spec = _test_spec(recipe, task, test, need_test)
    if held_out:
        dev = _file(recipe["eval"], root) if recipe.get("eval") and recipe.get("test") else None
    elif out.eval_path:
        dev = user_files(out).dev
    else:
        dev = _file(recipe["eval"], root, out.eval_limit) if recipe.get("eval") else None
    return replace(out, files=DataFiles(_file(train, root, out.limit), dev, _file(test_spec, root) if test_spec else None))
