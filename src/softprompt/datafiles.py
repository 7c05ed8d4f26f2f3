"""What a resolved data set is made of: one ``DataFile`` per split (train, dev, test).

A task recipe (``recipes.resolve``) or the user's ``--data`` / ``--dev-data`` flags become a
``DataFiles`` once, where the command builds its config; ``DataConfig.files`` carries it, and
``splits.load_splits`` reads it. A ``DataFile`` is plain data: where the rows are, how they
become the data set's columns, and how many to keep. Nothing here reads a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from softprompt.configio import JsonMixin, option

TRAIN_SPLITS = ("train",)  # a datasets data set read for training, without a split
EVAL_SPLITS = ("validation", "test")  # a datasets data set read for evaluation, without a split


@dataclass(frozen=True)
class DataFile(JsonMixin):
    """One file of a data set: csv, tsv, jsonl, ``<label> <text>`` lines, or a datasets data set."""

    path: str = option("", "a file, a datasets folder or a hub name")
    columns: tuple[str, ...] | None = option(None, "names for a headerless csv/tsv")
    derive: dict[str, str] | None = option(None, "extra columns built from templates of others")
    label_map: dict[str, str] | None = option(None, "target values rewritten before the verbalizer")
    split: str | None = option(None, "a datasets data set: the split to read (else the first of default it has)")
    config: str | None = option(None, "a datasets data set on the hub: its configuration name")
    default: tuple[str, ...] = option(TRAIN_SPLITS, "a datasets data set: the splits tried in order without split")
    carve: dict[str, Any] | None = option(None, 'a seeded part of a file with no split: {"seed", "test_fraction", "part"}')
    hub: dict[str, Any] | None = option(None, "a recipe's file: the same rows on the hub, read where the file is missing")
    root: str | None = option(None, "a recipe's file: the data root it lies under (its hub cache is <root>/hub)")
    limit: int | None = option(None, "keep only the first K rows (after carve)")


@dataclass(frozen=True)
class DataFiles(JsonMixin):
    """The files of the three splits; ``dev`` None: carved from train (``dev_fraction``); ``test``
    None: the data has no test set."""

    train: DataFile | None = option(None, "the training file")
    dev: DataFile | None = option(None, "the dev file (None: carved from train)")
    test: DataFile | None = option(None, "the test file (None: none)")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataFiles:
        return cls(**{k: DataFile.from_dict(v) if isinstance(v, dict) else v for k, v in data.items()
                      if k in ("train", "dev", "test")})
