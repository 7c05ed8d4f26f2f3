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
from softprompt.splits import load_splits

SHARED_COPY = shared_data_root() / "awesome-chatgpt-prompts" / "prompts.csv"


def test_walkthrough_data_ships_inside_the_package(monkeypatch, tmp_path, tiny_lm):
    from softprompt.cli.quickstart import walkthrough_data

    monkeypatch.setenv("SOFTPROMPT_DATA", str(tmp_path / "nowhere"))
    cfg = walkthrough_data()
    assert Path(cfg.path) == D.WALKTHROUGH_CSV and D.WALKTHROUGH_CSV.is_relative_to(Path(D.__file__).parent)
    rows = D.read_rows(cfg.path)
    assert len(rows) == 171 and list(rows[0]) == ["act", "prompt"]  # SOURCE.md: 171 rows, act,prompt
    s = load_splits(tiny_lm.tokenizer, cfg)
    train, dev = s.train, s.dev
    assert len(train) == 50 and dev == []
    if SHARED_COPY.is_file():  # the shipped copy is the data set, unchanged
        assert D.WALKTHROUGH_CSV.read_bytes() == SHARED_COPY.read_bytes()


@pytest.mark.slow
def test_quickstart_runs_with_only_the_package(monkeypatch, tmp_path, tiny_lm, sp_store):
    """The walk-through end to end (a tiny model in place of the default one), with the data
    root pointing nowhere: everything it reads ships with the package."""
    from softprompt import models
    from softprompt.cli import quickstart

    monkeypatch.setenv("SOFTPROMPT_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setattr(models, "load", lambda name=None, **kw: tiny_lm)
    lines: list[str] = []
    out = quickstart.run(print_fn=lines.append, recommended=False, store=sp_store)
    assert out["classic"].path.is_dir() and len(out["classic"].history) == 35  # 5 epochs x ceil(50/8)
    assert any(line.startswith("saved ") for line in lines)


def test_missing_recipe_files_say_where_to_put_them(tmp_path, tiny_lm):
    root = tmp_path / "data"
    with pytest.raises(UserError, match=r"data file not found: .*agnews/dev.tsv.*put agnews/dev.tsv under the data root "
                                        r".* or run once with network access to fetch fancyzhx/ag_news into "):
        _ = load_splits(tiny_lm.tokenizer, recipes.resolve(DataConfig(), "agnews", root)).train
    with pytest.raises(UserError, match=r"data file not found: .*cr/all.txt; .*: put cr/all.txt there"):  # no hub id
        _ = load_splits(tiny_lm.tokenizer, recipes.resolve(DataConfig(), "cr", root)).train
    with pytest.raises(UserError, match=r"^data file not found: \S+$"):  # a file of the user's own: no hint
        D.read_rows(tmp_path / "mine.csv")


def hub_dataset_cache(cache: Path, repo_id: str, splits: dict[str, dict]) -> Path:
    """The layout ``datasets`` writes when it downloads a hub data set (``<org>___<name>/<config>/
    <version>/<hash>/`` with arrow files and dataset_info.json), written by the same builder
    ``load_dataset`` uses for a parquet hub repository; ``load_dataset(repo_id)`` resolves it offline."""
    import datasets
    from datasets.packaged_modules.parquet.parquet import Parquet

    files = cache.parent / "parquet"
    files.mkdir(parents=True, exist_ok=True)
    data_files = {}
    for split, cols in splits.items():
        datasets.Dataset.from_dict(cols).to_parquet(str(files / f"{split}.parquet"))
        data_files[split] = [str(files / f"{split}.parquet")]
    org, name = repo_id.split("/")
    Parquet(cache_dir=str(cache), dataset_name=name, config_name="default", hash="0123456789abcdef",
            data_files=data_files).download_and_prepare()
    # a download of org/name lands in <org>___<name>/default/: the builder refuses local data files
    # under a repo_id and names the config after them, so it wrote <name>/default-<files hash>/
    (built,) = (cache / name).iterdir()
    (cache / f"{org}___{name}").mkdir()
    built.rename(cache / f"{org}___{name}" / "default")
    return cache


def test_a_recipe_without_local_files_reads_its_hub_data_set_from_the_cache(tmp_path, tiny_lm, monkeypatch):
    """trec with no local files: its hub id is resolved by ``datasets`` from a hub-style cache
    under ``<data root>/hub``, offline; columns and label values become the recipe's."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network here: never try it
    root = tmp_path / "data"
    questions = [f"what is thing number {i} ?" for i in range(20)]
    hub_dataset_cache(root / "hub", "CogComp/trec", {
        "train": {"text": questions, "coarse_label": [i % 6 for i in range(20)], "fine_label": [0] * 20},
        "test": {"text": questions[:6], "coarse_label": list(range(6)), "fine_label": [0] * 6}})
    cfg = recipes.resolve(DataConfig(), "trec", root)
    s = load_splits(tiny_lm.tokenizer, cfg)
    assert len(s.train) + len(s.dev) == 20 and len(s.dev) == int(20 * cfg.dev_fraction)
    test = s.test
    # hub coarse labels ABBR, ENTY, DESC, HUM, LOC, NUM -> the recipe's 2, 1, 0, 3, 4, 5
    assert [e.label for e in test] == ["2", "1", "0", "3", "4", "5"]
    assert test[0].source_text == "Question: what is thing number 0 ?\nAnswer type:"
    (root / "trec").mkdir()  # local files win over the hub
    (root / "trec" / "test.txt").write_text("5 how far is it ?\n")
    local = load_splits(tiny_lm.tokenizer, cfg).test
    assert [e.label for e in local] == ["5"]


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
    assert load_splits(tiny_lm.tokenizer, cfg).train == load_splits(tiny_lm.tokenizer, ref).train


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
