"""The data of a comparison: one training pool, one dev set and one test set for every method.

The files come from the DataConfig, resolved with the held-out policy (``recipes.resolve(...,
held_out=True)``: a recipe's ``eval`` is dev when it has ``test``; with only ``eval``, that serves
as test; ``--test-data`` is the test set of ``--data``) and read by ``splits.load_splits``. What
has no file is carved from the training file with ``data_seed``; ``--dev-sample`` /
``--test-sample`` take seeded samples. None of this depends on the run seed, so all methods and
seeds share dev and test. A run's training set is the first ``size`` examples of a seeded
permutation of the pool, so for one seed the sets are nested across sizes.
``CompareSplits.examples(cfg)`` re-tokenises the same rows under another template (for the
hand-written template candidates).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from softprompt.config import DataConfig, UserError
from softprompt.datafiles import DataFiles
from softprompt.splits import Splits, load_splits, user_files

if TYPE_CHECKING:
    from softprompt.models import Tokenizer

TEST_FRACTION = 0.2  # share of the training file carved out as test when there is no test file


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


def files_of(tokenizer: Tokenizer, cfg: DataConfig) -> Splits:
    """The files of ``cfg`` as they are: no dev carved off train (the comparison carves its own)."""
    return load_splits(tokenizer, replace(cfg, dev_fraction=0.0))


@dataclass
class CompareSplits:
    tokenizer: Tokenizer
    cfg: DataConfig  # the task's data settings (template, verbalizer, files, ...)
    has_dev: bool  # False: dev carved from train (``dev_rows``)
    has_test: bool  # False: test carved from train (``test_rows``)
    pool_rows: list[int]  # rows of the training file that form the pool
    dev_rows: list[int]  # carved dev rows (empty when there is a dev file)
    test_rows: list[int]  # carved test rows (empty when there is a test file)
    dev_pick: list[int]  # the sample of dev taken (``--dev-sample``)
    test_pick: list[int]  # the sample of test taken (``--test-sample``)
    info: dict  # files with sha256, where dev and test come from, sizes, data_seed
    candidates: list[str]  # hand-written templates: the recipe's first, then its "hand_templates"
    words: dict[str, str]  # the label words (label -> word): every template of the comparison shares them
    _cache: dict = field(default_factory=dict)

    def examples(self, cfg: DataConfig | None = None):
        """(pool, dev, test) under ``cfg`` (default: the task's own settings), cached per template."""
        cfg = cfg or self.cfg
        if cfg.template not in self._cache:
            files = files_of(self.tokenizer, cfg)
            tr = files.train
            dev = files.dev if self.has_dev else [tr[i] for i in self.dev_rows]
            test = files.test if self.has_test else [tr[i] for i in self.test_rows]
            self._cache[cfg.template] = (
                [tr[i] for i in self.pool_rows],
                [dev[i] for i in self.dev_pick],
                [test[i] for i in self.test_pick],
            )
        return self._cache[cfg.template]


def compare_splits(
    tokenizer: Tokenizer,
    data_cfg: DataConfig,
    *,
    dev_sample: int | None = None,
    test_sample: int | None = None,
    dev_fraction: float = 0.1,
    data_seed: int = 0,
) -> CompareSplits:
    """The pool, dev and test of a comparison over ``data_cfg`` (resolved with
    ``recipes.resolve(..., held_out=True)``; user data without ``files``: ``--test-data`` is test)."""
    words = data_cfg.verbalizer
    if not words:
        raise UserError(
            "compare needs a classification task: a --verbalizer (or a task recipe with one)"
        )
    if data_cfg.files is None:
        data_cfg = replace(data_cfg, files=user_files(data_cfg, held_out=True))
    files = files_of(tokenizer, data_cfg)
    train_file = data_cfg.files.train  # type: ignore[union-attr]
    n = len(files.train)
    order = list(range(n))
    random.Random(f"carve:{data_seed}").shuffle(order)
    has_dev, has_test = bool(files.dev), bool(files.test)
    n_dev = 0 if has_dev else int(n * dev_fraction)
    n_test = 0 if has_test else int(n * TEST_FRACTION)
    if n - n_dev - n_test < 1:
        raise UserError(f"{train_file.path if train_file else 'data'}: {n} rows are too few to carve dev and test sets from")
    dev_total = len(files.dev) if has_dev else n_dev
    test_total = len(files.test) if has_test else n_test
    splits = CompareSplits(
        tokenizer=tokenizer,
        cfg=data_cfg,
        has_dev=has_dev,
        has_test=has_test,
        pool_rows=sorted(order[n_dev + n_test :]),
        dev_rows=order[:n_dev],
        test_rows=order[n_dev : n_dev + n_test],
        dev_pick=_sample(dev_total, dev_sample, "dev", data_seed),
        test_pick=_sample(test_total, test_sample, "test", data_seed),
        info={},
        candidates=[data_cfg.template or ""] + [t for t in data_cfg.hand_templates if t != data_cfg.template],
        words=dict(words),
    )
    splits.info = info(splits, data_cfg, dev_fraction, data_seed, dev_total, test_total)
    return splits


def info(splits: CompareSplits, cfg: DataConfig, dev_fraction: float, data_seed: int, dev_total: int,
         test_total: int) -> dict:
    """Where a comparison's data comes from: files with sha256, sizes, data_seed."""
    files = cfg.files or DataFiles()
    carved = f"carved from train ({{:.0%}}, seed {data_seed})"
    dev = str(Path(files.dev.path)) if splits.has_dev and files.dev else None
    test = str(Path(files.test.path)) if splits.has_test and files.test else None
    return {
        "files": {str(Path(f.path)): sha256(Path(f.path)) for f in (files.train, files.dev if dev else None,
                                                                    files.test if test else None)
                  if f and Path(f.path).is_file()},
        "data_seed": data_seed,
        "pool": len(splits.pool_rows),
        "dev": len(splits.dev_pick),
        "dev_sampled_from": dev_total,
        "dev_source": dev or carved.format(dev_fraction),
        "test": len(splits.test_pick),
        "test_sampled_from": test_total,
        "test_source": test or carved.format(TEST_FRACTION),
    }


def train_indices(n_pool: int, size: int | None, seed: int) -> list[int]:
    """Pool indices of a run's training set: the first ``size`` of a seeded permutation (nested
    across sizes for one seed: the 32 are among the 128)."""
    order = list(range(n_pool))
    random.Random(f"train:{seed}").shuffle(order)
    return sorted(order[: size or n_pool])
