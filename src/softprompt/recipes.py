"""Task recipes (``tasks/*.json``, shipped inside the package) and the splits they define.

A recipe names its files (under the data root, ``Store.data_root``: ``--data-root``,
``$SOFTPROMPT_DATA`` or ``<home>/data``), their
columns, the template and the verbalizer. A split may also name the same data on the Hugging Face
hub (``"hub": {"id", "config", "split", "columns": {hub column: ours}, "values": {column: {hub
value: ours}}}``): local files win; without them the split is read through ``datasets`` into
``<data root>/hub`` (``Store.datasets_cache``), from its cache when offline. Two named split policies turn a recipe (or user data)
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
from softprompt import hfdata
from softprompt.config import DataConfig, UserError

if TYPE_CHECKING:
    from softprompt.models import Tokenizer
    pass

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


def task_data_config(task: str, root: Path, **overrides) -> tuple[DataConfig, dict]:
    """The DataConfig of a recipe (files resolved under the data root ``root``) and the raw recipe."""
    recipe = load_task(task)
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


def load_split(tokenizer: Tokenizer, cfg: DataConfig, spec: dict | None, root: Path, limit=None):
    """Rows of a recipe split spec ({path, columns, derive, label_map}, the path under ``root``) as examples."""
    path = root / spec["path"]
    if path.exists():  # local files win
        rows = D.derive_columns(D.read_rows(path, spec.get("columns")), spec.get("derive"))
        label_map = spec.get("label_map")
    else:
        rows, label_map = hub_rows(spec, path, root), None
    rows = carve(rows, spec.get("carve"), path)
    if limit:
        rows = rows[:limit]
    sub = DataConfig(**{**cfg.to_dict(), "label_map": label_map, "columns": None, "derive": None,
                        "limit": None, "eval_limit": None})
    return D.build_examples(tokenizer, rows, sub, path)


def hub_rows(spec: dict, path: Path, root: Path) -> list[dict[str, str]]:
    """The split's rows from the Hugging Face hub (its ``hub`` entry) through ``datasets``, cached
    under ``root/hub``, in the recipe's columns and label values; else one line naming both ways
    to get the data."""
    hub = spec.get("hub")
    if not hub:
        raise D.not_found(path, root)
    try:
        rows = hfdata.read_dataset(hub["id"], hub.get("split"), hub.get("config"), cache_dir=root / "hub")
    except UserError as e:
        rel = path.relative_to(root) if path.is_relative_to(root) else path
        raise UserError(f"data file not found: {path}, and the hub data set {hub['id']} could not be read "
                        f"({str(e).split(': ', 1)[-1]}); put {rel} under the data root {root} (--data-root), "
                        f"or run once with network access to fetch {hub['id']} into {root / 'hub'} "
                        "(docs/data.md)") from None
    names, values = hub.get("columns") or {}, hub.get("values") or {}
    out = []
    for r in rows:
        r = {names.get(k, k): v for k, v in r.items()}
        out.append({k: values.get(k, {}).get(v, v) for k, v in r.items()})
    return out


def user_overrides(cfg: DataConfig) -> dict:
    """The user's data options that override a task recipe (those different from the defaults)."""
    default = DataConfig()
    return {k: v for k, v in cfg.to_dict().items() if v != getattr(default, k)}


def train_dev(tokenizer: Tokenizer, data_cfg: DataConfig, task: str | None, seed: int, root: Path | None = None):
    """Policy ``train_dev``: (train examples, dev examples, the DataConfig actually used); a
    ``task``'s files are under the data root ``root``."""
    if not task:
        train, ev = D.load_train_eval(tokenizer, data_cfg, seed)
        return train, ev, data_cfg
    if root is None:
        raise UserError(f"--task {task}: no data root given (--data-root)")
    data_cfg, recipe = task_data_config(task, root, **user_overrides(data_cfg))
    train = load_split(tokenizer, data_cfg, recipe["train"], root, limit=data_cfg.limit)
    if data_cfg.eval_path:
        return train, D.load_eval_file(tokenizer, data_cfg), data_cfg
    if recipe.get("eval"):
        return train, load_split(tokenizer, data_cfg, recipe["eval"], root, limit=data_cfg.eval_limit), data_cfg
    return (*D.split_dev(train, data_cfg, seed), data_cfg)


def test_spec(recipe: dict) -> dict | None:
    """Policy ``held_out``: the labelled file that serves as test (``test``, else ``eval``)."""
    return recipe.get("test") or recipe.get("eval")


def dev_spec(recipe: dict) -> dict | None:
    """Policy ``held_out``: the file that may serve as dev (``eval``, only when ``test`` exists)."""
    return recipe.get("eval") if recipe.get("test") else None


def named_split(tokenizer: Tokenizer, cfg: DataConfig, recipe: dict, task: str, split: str, root: Path, limit: int | None = None):
    """The recipe's ``split`` (eval | test) as examples, or one line naming the splits it has."""
    spec = recipe.get(split)
    if spec is None:
        have = [k for k in ("eval", "test") if recipe.get(k)]
        raise UserError(f"task {task!r} has no {split!r} split; it has: {', '.join(have) or 'none'}")
    return load_split(tokenizer, cfg, spec, root, limit=limit)
