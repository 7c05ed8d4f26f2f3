"""The data of a comparison: one training pool, one dev set and one test set for every method.

Dev and test come from the task's own files where the recipe has them (``eval`` is dev,
``test`` is test; with only ``eval``, it serves as test), else they are carved from the
training file with ``data_seed``; ``--eval-limit``/``--test-limit`` take seeded samples.
None of this depends on the run seed, so all methods and seeds share dev and test. A run's
training set is the first ``size`` examples of a seeded permutation of the pool, so for one
seed the sets are nested across sizes. ``Splits.examples(cfg)`` re-tokenises the same rows
under another template (for the hand-written template candidates).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from softprompt import data as D
from softprompt import recipes
from softprompt.config import DataConfig, UserError

if TYPE_CHECKING:
    from softprompt.models import Tokenizer

TEST_FRACTION = 0.2  # share of the training file carved out as test when there is no test file
Loader = Callable[[DataConfig], list[D.Example]]


@dataclass
class Source:
    path: Path
    read: Loader  # DataConfig (template etc.) -> all examples of the file, in file order
    _memo: dict = field(default_factory=dict)

    def load(self, cfg: DataConfig) -> list[D.Example]:
        key = json.dumps(cfg.to_dict(), sort_keys=True)
        if key not in self._memo:
            self._memo[key] = self.read(cfg)
        return self._memo[key]


def sources(
    tokenizer: Tokenizer, cfg: DataConfig, recipe: dict, root: Path | None = None
) -> tuple[Source, Source | None, Source | None]:
    """(train, dev, test) files of a recipe (under the data root ``root``), or of --data/--eval-data
    (eval-data is the test set)."""

    def spec_source(spec: dict, limit: int | None = None) -> Source:
        return Source(root / spec["path"], lambda c: recipes.load_split(tokenizer, c, spec, root, limit=limit))

    def file_source(path: str, limit: int | None = None) -> Source:
        return Source(Path(path), lambda c: D.load_file(tokenizer, c, path, limit))

    if not recipe:
        test = file_source(cfg.eval_path) if cfg.eval_path else None
        return file_source(cfg.path, cfg.limit), None, test
    train = spec_source(recipe["train"], cfg.limit)
    test_spec, dev_spec = recipes.test_spec(recipe), recipes.dev_spec(recipe)
    return (
        train,
        spec_source(dev_spec) if dev_spec else None,
        spec_source(test_spec) if test_spec else None,
    )


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sample(n: int, limit: int | None, tag: str, seed: int) -> list[int]:
    idx = list(range(n))
    if limit and limit < n:
        idx = sorted(random.Random(f"{tag}:{seed}").sample(idx, limit))
    return idx


@dataclass
class Splits:
    cfg: DataConfig  # the task's data settings (template, verbalizer, ...)
    train: Source
    dev: Source | None  # None: carved from train (``dev_rows``)
    test: Source | None  # None: carved from train (``test_rows``)
    pool_rows: list[int]  # rows of the training file that form the pool
    dev_rows: list[int]  # carved dev rows (empty when there is a dev file)
    test_rows: list[int]  # carved test rows (empty when there is a test file)
    dev_pick: list[int]  # the sample of dev taken (``--eval-limit``)
    test_pick: list[int]  # the sample of test taken (``--test-limit``)
    info: dict  # files with sha256, where dev and test come from, sizes, data_seed
    candidates: list[str]  # hand-written templates: the recipe's first, then its "hand_templates"
    _cache: dict = field(default_factory=dict)

    def examples(self, cfg: DataConfig | None = None):
        """(pool, dev, test) under ``cfg`` (default: the task's own settings), cached per template."""
        cfg = cfg or self.cfg
        if cfg.template not in self._cache:
            tr = self.train.load(cfg)
            dev = self.dev.load(cfg) if self.dev else [tr[i] for i in self.dev_rows]
            test = self.test.load(cfg) if self.test else [tr[i] for i in self.test_rows]
            self._cache[cfg.template] = (
                [tr[i] for i in self.pool_rows],
                [dev[i] for i in self.dev_pick],
                [test[i] for i in self.test_pick],
            )
        return self._cache[cfg.template]


def load_splits(
    tokenizer: Tokenizer,
    data_cfg: DataConfig,
    task: str | None,
    *,
    dev_sample: int | None = None,
    test_sample: int | None = None,
    dev_fraction: float = 0.1,
    data_seed: int = 0,
    root: Path | None = None,
) -> Splits:
    """The pool, dev and test of a task (recipe, files under the data root ``root``) or of user
    data (``data_cfg``)."""
    recipe: dict = {}
    if task:
        if root is None:
            raise UserError(f"--task {task}: no data root given (--data-root)")
        data_cfg, recipe = recipes.task_data_config(task, root, **recipes.user_overrides(data_cfg))
    if not data_cfg.verbalizer:
        raise UserError(
            "compare needs a classification task: a --verbalizer (or a task recipe with one)"
        )
    train, dev, test = sources(tokenizer, data_cfg, recipe, root)
    n = len(train.load(data_cfg))
    order = list(range(n))
    random.Random(f"carve:{data_seed}").shuffle(order)
    n_dev = 0 if dev else int(n * dev_fraction)
    n_test = 0 if test else int(n * TEST_FRACTION)
    if n - n_dev - n_test < 1:
        raise UserError(f"{train.path}: {n} rows are too few to carve dev and test sets from")
    dev_rows, test_rows = order[:n_dev], order[n_dev : n_dev + n_test]
    dev_total = len(dev.load(data_cfg)) if dev else n_dev
    test_total = len(test.load(data_cfg)) if test else n_test
    splits = Splits(
        cfg=data_cfg,
        train=train,
        dev=dev,
        test=test,
        pool_rows=sorted(order[n_dev + n_test :]),
        dev_rows=dev_rows,
        test_rows=test_rows,
        dev_pick=_sample(dev_total, dev_sample, "dev", data_seed),
        test_pick=_sample(test_total, test_sample, "test", data_seed),
        info={},
        candidates=[data_cfg.template]
        + [t for t in recipe.get("hand_templates", []) if t != data_cfg.template],
    )
    carved = f"carved from train ({{:.0%}}, seed {data_seed})"
    splits.info = {
        "files": {str(s.path): sha256(s.path) for s in (train, dev, test) if s},
        "data_seed": data_seed,
        "pool": len(splits.pool_rows),
        "dev": len(splits.dev_pick),
        "dev_sampled_from": dev_total,
        "dev_source": str(dev.path) if dev else carved.format(dev_fraction),
        "test": len(splits.test_pick),
        "test_sampled_from": test_total,
        "test_source": str(test.path) if test else carved.format(TEST_FRACTION),
    }
    return splits


def train_indices(n_pool: int, size: int | None, seed: int) -> list[int]:
    """Pool indices of a run's training set: the first ``size`` of a seeded permutation (nested
    across sizes for one seed: the 32 are among the 128)."""
    order = list(range(n_pool))
    random.Random(f"train:{seed}").shuffle(order)
    return sorted(order[: size or n_pool])
