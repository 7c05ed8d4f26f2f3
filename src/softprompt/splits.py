"""The one way in for data: ``load_splits`` turns a DataConfig into train, dev and test examples.

Every command reads its data here (train, eval, compare, inspect, train-multitask, continual).
A task recipe is resolved into the DataConfig's ``files`` before (``recipes.resolve``, where the
command builds its config); nothing here reads a recipe. A DataConfig without ``files`` (the
user's ``--data`` / ``--dev-data`` flags) names its files in its own fields (``user_files``).

* train: the train file (its first ``limit`` rows);
* dev: the dev file (first ``eval_limit`` rows), else a seeded ``dev_fraction`` of train carved
  off with the run's seed (``split_dev``; train keeps the rest, in file order);
* test: the test file, else none.

Each split is read when first asked for (``eval`` reads only its test file). A recipe's file that
is missing locally is read from the Hugging Face hub when the recipe names it there (``hub_rows``,
cached under ``<data root>/hub``); local files win. Every mistake is a ``UserError``.
"""

from __future__ import annotations

import random
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from softprompt import data as D
from softprompt import hfdata
from softprompt.config import DataConfig, UserError
from softprompt.datafiles import EVAL_SPLITS, DataFile, DataFiles

if TYPE_CHECKING:
    from softprompt.models import Tokenizer


def user_files(cfg: DataConfig, held_out: bool = False) -> DataFiles:
    """The files the user's data fields name: ``path`` is train, ``eval_path`` dev (``held_out``:
    test, the way ``compare`` reads it)."""
    def file(path: str | None, split: str | None, default: tuple[str, ...], limit: int | None) -> DataFile | None:
        return DataFile(path, cfg.columns, cfg.derive, cfg.label_map, split, cfg.data_config, default,
                        limit=limit) if path else None

    train = file(cfg.path, cfg.data_split, ("train",), cfg.limit)
    if held_out:
        return DataFiles(train, None, file(cfg.eval_path, cfg.eval_split, EVAL_SPLITS, None))
    return DataFiles(train, file(cfg.eval_path, cfg.eval_split, EVAL_SPLITS, cfg.eval_limit), None)


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


def hub_rows(f: DataFile) -> list[dict[str, str]]:
    """A recipe file's rows from the Hugging Face hub (its ``hub`` entry) through ``datasets``,
    cached under ``<root>/hub``, in the recipe's columns and label values; else one line naming
    both ways to get the data."""
    path, root, hub = Path(f.path), Path(f.root or "."), f.hub
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


def read_file(tokenizer: Tokenizer, cfg: DataConfig, f: DataFile) -> list[D.Example]:
    """The examples of one file under ``cfg``'s template, verbalizer and lengths."""
    label_map = f.label_map
    if f.root is None or Path(f.path).exists():  # the user's data, or a recipe's local file (local files win)
        rows = D.derive_columns(D.read_rows(f.path, f.columns, f.split, f.config, f.default), f.derive)
    else:
        rows, label_map = hub_rows(f), None  # the hub rows carry the recipe's values already
    rows = carve(rows, f.carve, f.path)
    if f.limit:
        rows = rows[: f.limit]
    return D.build_examples(tokenizer, rows, replace(cfg, label_map=label_map), f.path)


def split_dev(train: list[D.Example], cfg: DataConfig, seed: int) -> tuple[list[D.Example], list[D.Example]]:
    """Carve a seeded dev split (``dev_fraction`` of train) off the training examples."""
    n_dev = int(len(train) * cfg.dev_fraction)
    if n_dev == 0 or len(train) - n_dev < 1:
        return train, []
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    dev = [train[i] for i in order[:n_dev]]
    keep = sorted(order[n_dev:])
    return [train[i] for i in keep], dev[: cfg.eval_limit] if cfg.eval_limit else dev


class Splits:
    """The train, dev and test examples of one DataConfig, each read when first asked for."""

    def __init__(self, tokenizer: Tokenizer, cfg: DataConfig, seed: int = 0) -> None:
        self.tokenizer, self.cfg, self.seed = tokenizer, cfg, seed
        self.files = cfg.files or user_files(cfg)

    @cached_property
    def _train_dev(self) -> tuple[list[D.Example], list[D.Example]]:
        if self.files.train is None:
            raise UserError("no training data: give --data PATH or --task NAME")
        train = read_file(self.tokenizer, self.cfg, self.files.train)
        if self.files.dev is not None:
            return train, read_file(self.tokenizer, self.cfg, self.files.dev)
        return split_dev(train, self.cfg, self.seed)

    @property
    def train(self) -> list[D.Example]:
        return self._train_dev[0]

    @property
    def dev(self) -> list[D.Example]:
        return self._train_dev[1]

    @cached_property
    def test(self) -> list[D.Example]:
        """The test file's examples; empty when the data has no test set."""
        return read_file(self.tokenizer, self.cfg, self.files.test) if self.files.test else []


def load_splits(tokenizer: Tokenizer, cfg: DataConfig, seed: int = 0) -> Splits:
    """Train, dev and test examples of ``cfg`` (``seed``: the dev split carved from train)."""
    return Splits(tokenizer, cfg, seed)
