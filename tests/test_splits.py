"""One way in for data: ``splits.load_splits`` over a DataConfig resolved once (``recipes.resolve``).

Relational: the digests below were recorded from the data path this replaced (``recipes.train_dev``,
``recipes.named_split``, ``compare_data.load_splits``, ``multitask.load_task`` / ``load_test``,
``data.load_train_eval``), on the tiny test tokenizer; the new path must give exactly the same
examples (token ids, labels, class values, texts) in the same order, for every built-in recipe whose
files are under the data root, and for user data and a recipe built in the test. And every command
reads its data through ``load_splits``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import replace

import pytest
import torch
from conftest import shared_data_root, write_toy_csv, write_toy_task

from softprompt import evaluate, recipes, splits
from softprompt.config import DataConfig, UserError
from softprompt.experiments import compare_data as CD
from softprompt.training import multitask as MT

ROOT = shared_data_root()
V = {"0": "negative", "1": "positive"}

# recorded from the old path: per recipe, [n examples, sha256 prefix] of each split
OLD = {
    "agnews": {
        "train_dev/default": [[9001, "b3be3518a1b65b0d"], [1000, "ecc39d4035ae9497"]],
        "train_dev/limits": [[270, "4ad603119d0baccc"], [30, "d0a2c0b12bbf6855"]],
        "eval/test": [100, "d036851cbf2e96c9"],
        "compare": [[1800, "3eb9645ea60b145f"], [32, "738532959aaec926"], [64, "dcd7598395ac1567"], [32, "738532959aaec926"], "carved from train (10%, seed 0)", "ROOT/agnews/test.csv"],
        "multitask": [[64, "5046868987fa9ebf"], [16, "ca9843064a91fcc2"], [50, "909b976abb03fceb"]],
    },
    "boolq": {
        "train_dev/default": [[32, "a42856dfcdf8ebd4"], [32, "ac06895bff2b1363"]],
        "train_dev/limits": [[32, "a42856dfcdf8ebd4"], [32, "ac06895bff2b1363"]],
        "eval/eval": [32, "ac06895bff2b1363"],
        "eval/test": [100, "7269ec92461e9bbb"],
        "compare": [[32, "a42856dfcdf8ebd4"], [32, "ac06895bff2b1363"], [64, "ebf3fab6511783cd"], [32, "fcf7e468f4ba02af"], "ROOT/superglue-32shot/BoolQ/dev32.jsonl", "ROOT/superglue-32shot/BoolQ/val.jsonl"],
        "multitask": [[32, "bc613c828ab0b5ff"], [16, "ed3bd897034e9ce2"], [50, "428bd419177ca648"]],
    },
    "cb": {
        "train_dev/default": [[32, "1b28aedfbc33b146"], [32, "b5f59ce2d14088f0"]],
        "train_dev/limits": [[32, "1b28aedfbc33b146"], [32, "b5f59ce2d14088f0"]],
        "eval/eval": [32, "b5f59ce2d14088f0"],
        "eval/test": [56, "58f566a9c2b8c876"],
        "compare": [[32, "1b28aedfbc33b146"], [32, "b5f59ce2d14088f0"], [56, "58f566a9c2b8c876"], [32, "00ee3be89c0dcfd5"], "ROOT/superglue-32shot/CB/dev32.jsonl", "ROOT/superglue-32shot/CB/val.jsonl"],
        "multitask": [[32, "c98f7de6db1fda40"], [16, "d337e6251549b518"], [50, "12ae2c95088f6834"]],
    },
    "cr": {
        "train_dev/default": [[2716, "bd1491585aa397c1"], [301, "89045317cd57d712"]],
        "train_dev/limits": [[270, "9ac68974942fdfb5"], [30, "f7169a55a796636a"]],
        "eval/test": [100, "b88126eea2b6823c"],
        "compare": [[1800, "4026feb08e613bea"], [32, "5d225b9e7e056bec"], [64, "c4ca0a14718ac93b"], [32, "27a483b072d647e7"], "carved from train (10%, seed 0)", "ROOT/cr/all.txt"],
        "multitask": [[64, "20f76ac96994a387"], [16, "acacd398beb2e334"], [50, "662bc63ae6a593f4"]],
    },
    "mpqa": {
        "train_dev/default": [[7635, "c0bcba440d3fefd7"], [848, "65010f8d6334d7e9"]],
        "train_dev/limits": [[270, "d99081cb16d4dbcf"], [30, "ea2ef2a30230535c"]],
        "eval/test": [100, "2a09bc022a3e0f55"],
        "compare": [[1800, "f1a734d4f726feb7"], [32, "1a661da0935643b9"], [64, "997e099d482a6c01"], [32, "3ef0f32640c88d72"], "carved from train (10%, seed 0)", "ROOT/mpqa/all.txt"],
        "multitask": [[64, "716f34678fbe5055"], [16, "2eb2d331f7ca1523"], [50, "a460868b39bdb389"]],
    },
    "mr": {
        "train_dev/default": [[7677, "89d3079522ce5e98"], [853, "7505fd49e63d91d5"]],
        "train_dev/limits": [[270, "5d12f828b2defde5"], [30, "bc689fd42889c6c0"]],
        "eval/test": [100, "254f82e5bcfe9ac0"],
        "compare": [[1800, "378157a007ad2019"], [32, "8dcec16b484d19e8"], [64, "2d9f91360849cda3"], [32, "1615d6a9ff520f41"], "carved from train (10%, seed 0)", "ROOT/mr/all.txt"],
        "multitask": [[64, "602898aa3079d712"], [16, "aefead53a170b6cc"], [50, "5b2a5e4daa7bbde8"]],
    },
    "rte": {
        "train_dev/default": [[32, "0010e77b5504f6ac"], [32, "56656838fd88e177"]],
        "train_dev/limits": [[32, "0010e77b5504f6ac"], [32, "56656838fd88e177"]],
        "eval/eval": [32, "56656838fd88e177"],
        "eval/test": [100, "2b0453780338d0a4"],
        "compare": [[32, "0010e77b5504f6ac"], [32, "56656838fd88e177"], [64, "238826997f18b988"], [32, "84c385cde138c7e7"], "ROOT/superglue-32shot/RTE/dev32.jsonl", "ROOT/superglue-32shot/RTE/val.jsonl"],
        "multitask": [[32, "03e50f108019e7dc"], [16, "525a44b817459934"], [50, "43a232ed32d18c9f"]],
    },
    "sst2": {
        "train_dev/default": [[6920, "f77cf2ba31a33b3a"], [872, "84e0050c3cdb25a7"]],
        "train_dev/limits": [[300, "1e62d961eca940da"], [40, "377dd5d3bb0d6192"]],
        "eval/eval": [100, "40bef666e673a6da"],
        "eval/test": [100, "bba55833113fcb31"],
        "compare": [[2000, "27f05a4cfd486d6a"], [32, "63e0d0241052a74f"], [64, "b6cabb7d3ac79fe2"], [32, "eddf34dce4550c5a"], "ROOT/sst2/dev.txt", "ROOT/sst2/test.txt"],
        "multitask": [[64, "294d034f1dfc4d4a"], [16, "109ee806fbd14894"], [50, "f54affa94b31bb98"]],
    },
    "sst5": {
        "train_dev/default": [[8544, "aaac83a82039e1c9"], [1101, "ce89f7735dd1a6af"]],
        "train_dev/limits": [[300, "905c939aa313c503"], [40, "c3a9e5fef5a6ff23"]],
        "eval/eval": [100, "6da1695505d4b398"],
        "eval/test": [100, "ee535c943c0beee0"],
        "compare": [[2000, "83b9051bd4655a05"], [32, "285cceb51d961deb"], [64, "be164f928f6bfaf2"], [32, "8465e8264f549007"], "ROOT/sst5/dev.txt", "ROOT/sst5/test.txt"],
        "multitask": [[64, "3fcfca6a3e2b8e2a"], [16, "e3518cda5786d376"], [50, "ad552600e91c6158"]],
    },
    "subj": {
        "train_dev/default": [[7200, "152915f265fcc1ec"], [800, "7573c001ed4f89da"]],
        "train_dev/limits": [[270, "79bf13ff9e764afe"], [30, "a92f38854c9947ff"]],
        "eval/test": [100, "17c9973bc7b62643"],
        "compare": [[1800, "28928f5355cb9a22"], [32, "df6c3414359aadd9"], [64, "75b547931556e098"], [32, "fcd865775b8f33b8"], "carved from train (10%, seed 0)", "ROOT/subj/all.txt"],
        "multitask": [[64, "e8eb1dd91c78b48c"], [16, "3bf1b2e1f3b27e90"], [50, "d8df5ee252d6599c"]],
    },
    "trec": {
        "train_dev/default": [[4907, "5878bc62304cc1ae"], [545, "4dd02bf5ffba0ed8"]],
        "train_dev/limits": [[270, "63e71b3c68ba0400"], [30, "abe5965539ab6644"]],
        "eval/test": [100, "b0f092825f03055a"],
        "compare": [[1800, "0c8af9bd79547503"], [32, "26f5b8d8a0cd188a"], [64, "e85a23615efb7df9"], [32, "e78d8e20445b5b4c"], "carved from train (10%, seed 0)", "ROOT/trec/test.txt"],
        "multitask": [[64, "eb332c431df9acda"], [16, "fef36f9cef4ec2bf"], [50, "2a7522566d576fcb"]],
    },
}
OLD_TOY = {
    "user/carved": [[36, "debbb385b373c32c"], [12, "1b1dd29b17d9a8b0"]],
    "user/limits": [[18, "1f04711448680cf6"], [2, "4b27868f27b709d0"]],
    "user/dev_file": [[48, "43ef3ca6f06444f4"], [7, "459a94a8eccb3956"]],
    "user/lm": [[44, "7a927099ab828517"], [4, "b204df8096986b15"]],
    "user/compare": [[35, "35f0f34c0e89ab54"], [4, "16be786bf0f9ab28"], [9, "042ca93c2d94a792"]],
    "user/compare_test_file": [[44, "1756030666985a66"], [4, "64a4e88439711c71"], [9, "5b8195d985146fc0"]],
    "user/eval": [7, "bc08a653ee7f64d7"],
    "toy_task/train_dev": [[30, "5e167eaae84803ee"], [10, "2bd5edb79ce5e209"]],
    "toy_task/multitask": [[16, "a745997b045fc3dc"], [8, "06e317d1241c4b74"], [8, "06e317d1241c4b74"]],
}
FAST = ("cb", "rte")  # the others read thousands of rows (~5-15 s each)


def dig(examples) -> list:
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.input_ids, e.labels, e.source_len, e.label, e.source_text, e.task]).encode())
    return [len(examples), h.hexdigest()[:16]]


def recipe_digests(tok, task: str) -> dict:
    """What each command reads of ``task`` through the new path, as the old path was recorded."""
    out: dict = {}
    for tag, over, seed in (("default", {}, 0), ("limits", {"limit": 300, "eval_limit": 40}, 1)):
        s = splits.load_splits(tok, recipes.resolve(DataConfig(**over), task, ROOT), seed)
        out[f"train_dev/{tag}"] = [dig(s.train), dig(s.dev)]
    for split in ("eval", "test"):
        if f"eval/{split}" in OLD[task]:
            cfg = evaluate.merged_data_config({}, task, {}, ROOT, (split,), 100)
            out[f"eval/{split}"] = dig(splits.load_splits(tok, cfg).test)
    c = CD.compare_splits(tok, recipes.resolve(DataConfig(limit=2000), task, ROOT, held_out=True), dev_sample=32,
                          test_sample=64)
    pool, dev, test = c.examples()
    alt = c.examples(replace(c.cfg, template=c.candidates[-1]))[1]
    out["compare"] = [dig(pool), dig(dev), dig(test), dig(alt), c.info["dev_source"].replace(str(ROOT), "ROOT"),
                      c.info["test_source"].replace(str(ROOT), "ROOT")]
    td = MT.load_task(tok, task, MT.task_config(task, ROOT), 64, 16, 0, 1)
    out["multitask"] = [dig(td.train), dig(td.dev), dig(MT.load_test(td, 50, 0))]
    return json.loads(json.dumps(out))


@pytest.mark.parametrize("task", [pytest.param(t, marks=() if t in FAST else pytest.mark.slow) for t in OLD])
def test_every_recipe_gives_the_examples_the_old_path_gave(tiny_lm, task):
    if not (ROOT / recipes.load_task(task)["train"]["path"]).exists():
        pytest.skip(f"needs the {task} files under the data root {ROOT}")
    assert recipe_digests(tiny_lm.tokenizer, task) == OLD[task]


def test_user_data_and_a_test_recipe_give_the_examples_the_old_path_gave(tiny_lm, tmp_path):
    tok = tiny_lm.tokenizer
    csv, csv2 = write_toy_csv(tmp_path / "toy.csv"), write_toy_csv(tmp_path / "toy2.csv", rows=30, numbered=True)
    base = dict(path=str(csv), template="Review: {text}\nSentiment:", target_column="label", verbalizer=V)

    def train_dev(cfg: DataConfig, seed: int = 0) -> list:
        s = splits.load_splits(tok, cfg, seed)
        return [dig(s.train), dig(s.dev)]

    got = {
        "user/carved": train_dev(DataConfig(**base, dev_fraction=0.25), 3),
        "user/limits": train_dev(DataConfig(**base, limit=20, eval_limit=5)),
        "user/dev_file": train_dev(DataConfig(**base, eval_path=str(csv2), eval_limit=7)),
        "user/lm": train_dev(DataConfig(path=str(csv), text_column="text")),
        "user/compare": [dig(x) for x in CD.compare_splits(tok, DataConfig(**base), dev_sample=8).examples()],
        "user/compare_test_file": [dig(x) for x in CD.compare_splits(
            tok, recipes.resolve(DataConfig(**base, eval_path=str(csv2)), None, None, held_out=True), test_sample=9,
            data_seed=2).examples()],
        "user/eval": dig(splits.load_splits(tok, evaluate.merged_data_config(
            {}, None, {**base, "path": str(csv)}, None, ("test",), 7)).test),
    }
    mood = [(f"the film was {'good and great' if i % 2 else 'bad and boring'} {i}", str(i % 2)) for i in range(40)]
    task = str(write_toy_task(tmp_path, "mood", mood, "Review: {text}\nSentiment:", V))
    got["toy_task/train_dev"] = train_dev(recipes.resolve(DataConfig(), task, tmp_path), 5)
    td = MT.load_task(tok, task, MT.task_config(task, tmp_path), 16, 8, 0, 0)
    got["toy_task/multitask"] = [dig(td.train), dig(td.dev), dig(MT.load_test(td, 5, 0))]
    assert json.loads(json.dumps(got)) == OLD_TOY


class Spied(UserError):
    """Raised by the spy: the command stops once it has asked for its data."""


@pytest.mark.parametrize("command", ["train", "eval", "compare", "inspect", "train-multitask", "continual"])
def test_every_command_reads_its_data_through_load_splits(command, tiny_lm, toy_tasks, sp_store, cli_main, monkeypatch):
    import importlib

    for name in ("softprompt.training.tune", "softprompt.evaluate", "softprompt.experiments.compare_data",
                 "softprompt.experiments.interpret", "softprompt.training.multitask", "softprompt.experiments.continual"):
        importlib.import_module(name)
    calls: list[DataConfig] = []

    def spy(tokenizer, cfg, seed=0):
        calls.append(cfg)
        raise Spied("data asked for")

    real = splits.load_splits
    for mod in [m for n, m in sys.modules.items() if n.startswith("softprompt")]:
        if getattr(mod, "load_splits", None) is real:
            monkeypatch.setattr(mod, "load_splits", spy)
    mood, pets = str(toy_tasks["mood"]), str(toy_tasks["pets"])
    model = ["--model", str(tiny_lm.path)]
    sp_store.save_prompt("p", torch.zeros(4, tiny_lm.hidden_size), {"base_model": {"name": tiny_lm.name,
                         "fingerprint": tiny_lm.fingerprint}}, str(tiny_lm.path), tiny_lm.model.config)
    csv = ["--data", mood.removesuffix(".json") + ".csv", "--template", "{text}", "--target-column", "label"]
    argv = {"train": ["train", "--task", mood, "--quiet", "--name", "t"], "eval": ["eval", *csv],
            "compare": ["compare", "--task", mood, "--quick", "--quiet", "--methods", "zero-shot"],
            "inspect": ["inspect", "p", *csv], "train-multitask": ["train-multitask", "--tasks", f"{mood},{pets}"],
            "continual": ["continual", "--tasks", f"{mood},{pets}", "--methods", "prompt"]}[command]
    assert cli_main([*argv, *model]) == 2
    assert calls, f"{command} read its data some other way"
    files = calls[0].files
    assert files is not None  # resolved once, before the data is read
    read = files.test if command in ("eval", "inspect") else files.train
    assert read is not None and read.path.endswith("mood.csv")
