"""Data a user brings: the walk-through's CSV shipped in the package, missing recipe files,
and ``datasets`` data sets (save_to_disk folders, local dataset folders, hub names)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import shared_data_root

from softprompt import data as D
from softprompt import recipes
from softprompt.config import DataConfig, UserError

SHARED_COPY = shared_data_root() / "awesome-chatgpt-prompts" / "prompts.csv"


def test_walkthrough_data_ships_inside_the_package(monkeypatch, tmp_path, tiny_lm):
    from softprompt.cli.quickstart import walkthrough_data

    monkeypatch.setenv("SOFTPROMPT_DATA", str(tmp_path / "nowhere"))
    cfg = walkthrough_data()
    assert Path(cfg.path) == D.WALKTHROUGH_CSV and D.WALKTHROUGH_CSV.is_relative_to(Path(D.__file__).parent)
    rows = D.read_rows(cfg.path)
    assert len(rows) == 171 and list(rows[0]) == ["act", "prompt"]  # SOURCE.md: 171 rows, act,prompt
    train, dev = D.load_train_eval(tiny_lm.tokenizer, cfg)
    assert len(train) == 50 and dev == []
    if SHARED_COPY.is_file():  # the shipped copy is the data set, unchanged
        assert D.WALKTHROUGH_CSV.read_bytes() == SHARED_COPY.read_bytes()


@pytest.mark.slow
def test_quickstart_runs_with_only_the_package(monkeypatch, tmp_path, tiny_lm):
    """The walk-through end to end (a tiny model in place of the default one), with the data
    root pointing nowhere: everything it reads ships with the package."""
    from softprompt import models
    from softprompt.cli import quickstart

    monkeypatch.setenv("SOFTPROMPT_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setattr(models, "load", lambda name=None, **kw: tiny_lm)
    lines: list[str] = []
    out = quickstart.run(print_fn=lines.append, recommended=False)
    assert out["classic"].path.is_dir() and len(out["classic"].history) == 35  # 5 epochs x ceil(50/8)
    assert any(line.startswith("saved ") for line in lines)


def test_missing_recipe_files_say_where_to_put_them(monkeypatch, tmp_path, tiny_lm):
    monkeypatch.setenv("SOFTPROMPT_DATA", str(tmp_path / "data"))
    cfg, _ = recipes.task_data_config("sst2")
    with pytest.raises(UserError, match=r"data file not found: .*sst2/train.txt; task recipes read their files "
                                        r"under the data root .*: put sst2/train.txt there"):
        D.load_train_eval(tiny_lm.tokenizer, cfg)
    with pytest.raises(UserError, match=r"^data file not found: \S+$"):  # a file of the user's own: no hint
        D.read_rows(tmp_path / "mine.csv")


# ---------------------------------------------------------------- datasets

ROWS = {"text": [f"the film was {'good' if i % 2 else 'bad'} {i}" for i in range(12)], "label": [i % 2 for i in range(12)]}


def as_csv(path: Path, n: int) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(zip(ROWS["text"][:n], ROWS["label"][:n]))
    return path


def test_datasets_forms_read_like_the_csv(tmp_path, tiny_lm):
    datasets = pytest.importorskip("datasets")
    want = D.read_rows(as_csv(tmp_path / "ref.csv", 12))
    one = datasets.Dataset.from_dict(ROWS)
    one.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": one, "test": one.select(range(3))}).save_to_disk(str(tmp_path / "saved-dict"))
    local = tmp_path / "local"
    local.mkdir()
    as_csv(local / "train.csv", 12), as_csv(local / "test.csv", 3)
    assert D.read_rows(tmp_path / "saved") == want
    assert D.read_rows(tmp_path / "saved-dict") == want  # split 'train' by default
    assert D.read_rows(tmp_path / "saved-dict", split="test") == want[:3]
    assert D.read_rows(local) == want and D.read_rows(local, split="test") == want[:3]
    # and they train like a file: input -> target examples with the label word as target
    cfg = DataConfig(path=str(tmp_path / "saved-dict"), template="{text}\nSentiment:", target_column="label",
                     verbalizer={"0": "negative", "1": "positive"}, dev_fraction=0.0)
    ref = DataConfig(**{**cfg.to_dict(), "path": str(tmp_path / "ref.csv")})
    assert D.load_train_eval(tiny_lm.tokenizer, cfg)[0] == D.load_train_eval(tiny_lm.tokenizer, ref)[0]


def test_datasets_mistakes_are_one_line(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(ROWS)}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(UserError, match=r"no split 'dev'; splits are: train \(choose with --data-split\)"):
        D.read_rows(tmp_path / "d", split="dev")
    datasets.Dataset.from_dict(ROWS).save_to_disk(str(tmp_path / "one"))
    assert D.read_rows(tmp_path / "one", split="anything")  # a saved single split has no name to check


def test_hub_dataset_offline_is_one_line(tmp_path):
    """A hub name not in the datasets cache, offline (set before import, as the library reads it)."""
    pytest.importorskip("datasets")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path), "HF_HOME": str(tmp_path)}
    code = ("from softprompt import data\n"
            "from softprompt.config import UserError\n"
            "try:\n    data.read_rows('nobody-org/no-such-set', split='train')\n"
            "except UserError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("--data nobody-org/no-such-set: cannot read it as a data set on the hub"), out.stderr
    assert len(out.stdout.strip().splitlines()) == 1
