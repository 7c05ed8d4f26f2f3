"""Task recipes (``tasks/*.json``, shipped inside the package) and the splits they define.

A recipe names its files (under the data root, ``$SOFTPROMPT_DATA`` or ``../shared/data``), their
columns, the template and the verbalizer. Two named split policies turn a recipe (or user data)
into examples, and every command uses one of them:

* ``train_dev`` (``train``, ``train-multitask``, ``inspect``): train is the recipe's train split;
  dev is its ``eval`` split, else a seeded ``dev_fraction`` carved from train.
* ``held_out`` (``compare``, ``continual``, ``eval --split test``): test is the recipe's ``test``
  split, else its ``eval`` split (then dev must be carved from train); ``dev_spec`` says which
  labelled file may serve as dev.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

from softprompt import data as D
from softprompt.config import DataConfig, UserError, data_root

if TYPE_CHECKING:
    from softprompt.models import Tokenizer

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


def task_data_config(task: str, **overrides) -> tuple[DataConfig, dict]:
    """The DataConfig of a recipe (files resolved under the data root) and the raw recipe."""
    recipe = load_task(task)
    root = data_root()
    fields = {k: v for k, v in recipe.items() if k in DataConfig.__dataclass_fields__}
    fields["path"] = str(root / recipe["train"]["path"])
    fields["columns"] = tuple(recipe["train"]["columns"]) if recipe["train"].get("columns") else None
    fields["derive"] = recipe["train"].get("derive")
    fields["label_map"] = recipe["train"].get("label_map")
    fields["eval_path"] = None
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return DataConfig(**fields), recipe


def carve(rows: list[dict[str, str]], spec: dict | None, path) -> list[dict[str, str]]:
    """A seeded train/test split of a file that has none (MR, CR, Subj, MPQA).

    ``spec`` = ``{"seed": 0, "test_fraction": 0.2, "part": "train" | "test"}``; the two parts
    are disjoint and together are the whole file, in file order.
    """
    if not spec:
        return rows
    part, frac = spec.get("part"), float(spec.get("test_fraction", 0.2))
    if part not in ("train", "test") or not 0 < frac < 1:
        raise UserError(f"{path}: recipe 'carve' needs part train|test and 0 < test_fraction < 1, got {spec}")
    order = list(range(len(rows)))
    random.Random(int(spec.get("seed", 0))).shuffle(order)
    held = set(order[: int(len(rows) * frac)])
    return [r for i, r in enumerate(rows) if (i in held) == (part == "test")]


def load_split(tokenizer: Tokenizer, cfg: DataConfig, spec: dict | None, root: Path | None = None, limit=None):
    """Rows of a recipe split spec ({path, columns, derive, label_map}) as examples."""
    root = root or data_root()
    path = root / spec["path"]
    rows = carve(D.derive_columns(D.read_rows(path, spec.get("columns")), spec.get("derive")), spec.get("carve"), path)
    if limit:
        rows = rows[:limit]
    sub = DataConfig(**{**cfg.to_dict(), "label_map": spec.get("label_map"), "columns": None, "derive": None,
                        "limit": None, "eval_limit": None})
    return D.build_examples(tokenizer, rows, sub, path)


def user_overrides(cfg: DataConfig) -> dict:
    """The user's data options that override a task recipe (those different from the defaults)."""
    default = DataConfig()
    return {k: v for k, v in cfg.to_dict().items() if v != getattr(default, k)}


def train_dev(tokenizer: Tokenizer, data_cfg: DataConfig, task: str | None, seed: int):
    """Policy ``train_dev``: (train examples, dev examples, the DataConfig actually used)."""
    if not task:
        train, ev = D.load_train_eval(tokenizer, data_cfg, seed)
        return train, ev, data_cfg
    data_cfg, recipe = task_data_config(task, **user_overrides(data_cfg))
    train = load_split(tokenizer, data_cfg, recipe["train"], limit=data_cfg.limit)
    if data_cfg.eval_path:
        return train, D.load_eval_file(tokenizer, data_cfg), data_cfg
    if recipe.get("eval"):
        return train, load_split(tokenizer, data_cfg, recipe["eval"], limit=data_cfg.eval_limit), data_cfg
    return (*D.split_dev(train, data_cfg, seed), data_cfg)


def test_spec(recipe: dict) -> dict | None:
    """Policy ``held_out``: the labelled file that serves as test (``test``, else ``eval``)."""
    return recipe.get("test") or recipe.get("eval")


def dev_spec(recipe: dict) -> dict | None:
    """Policy ``held_out``: the file that may serve as dev (``eval``, only when ``test`` exists)."""
    return recipe.get("eval") if recipe.get("test") else None


def named_split(tokenizer: Tokenizer, cfg: DataConfig, recipe: dict, task: str, split: str, limit: int | None = None):
    """The recipe's ``split`` (eval | test) as examples, or one line naming the splits it has."""
    spec = recipe.get(split)
    if spec is None:
        have = [k for k in ("eval", "test") if recipe.get(k)]
        raise UserError(f"task {task!r} has no {split!r} split; it has: {', '.join(have) or 'none'}")
    return load_split(tokenizer, cfg, spec, limit=limit)
