"""Readers, templates, verbalizers, truncation, task recipes and batches."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import needs_data, shared_data_root

from softprompt import data as D
from softprompt import recipes
from softprompt.config import DataConfig, UserError
from softprompt.splits import load_splits, split_dev

ROWS = [
    {"text": "the movie was good", "label": "1"},
    {"text": "a terrible film, with a comma", "label": "0"},
    {"text": 'who wrote "the book"', "label": "1"},
]
SHARED_DATA = shared_data_root()


@pytest.fixture
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir("llama"), local_files_only=True)


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def write_all_formats(tmp_path: Path) -> dict[str, Path]:
    import csv

    out = {}
    for ext, delim in (("csv", ","), ("tsv", "\t")):
        p = tmp_path / f"d.{ext}"
        with p.open("w", newline="") as f:
            w = csv.writer(f, delimiter=delim)
            w.writerow(["text", "label"])
            w.writerows([[r["text"], r["label"]] for r in ROWS])
        out[ext] = p
    out["jsonl"] = tmp_path / "d.jsonl"
    out["jsonl"].write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    out["txt"] = tmp_path / "d.txt"
    out["txt"].write_text("".join(f"{r['label']} {r['text']}\n" for r in ROWS))
    return out


def test_all_readers_give_the_same_rows(tmp_path):
    files = write_all_formats(tmp_path)
    for ext, p in files.items():
        assert D.read_rows(p) == ROWS, ext


def test_headerless_delimited_with_columns(tmp_path):
    p = tmp_path / "h.tsv"
    p.write_text("".join(f"{r['label']}\t{r['text']}\n" for r in ROWS))
    rows = D.read_rows(p, columns=("label", "text"))
    assert rows == [{"label": r["label"], "text": r["text"]} for r in ROWS]


def test_jsonl_non_string_values_become_text(tmp_path):
    p = tmp_path / "n.jsonl"
    p.write_text('{"text": "x", "label": 1}\n')
    assert D.read_rows(p) == [{"text": "x", "label": "1"}]


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("missing.csv", None, "not found"),
        ("empty.csv", b"text,label\n", "no data rows"),
        ("blank.jsonl", b"\n\n", "no data rows"),
        ("bytes.csv", b"text,label\nok,1\n\xff\xfe bad,0\n", "line 3 is not valid UTF-8"),
        ("ragged.csv", b"text,label\na,1\nb,0,extra\n", "row 3 has 3 fields"),
        ("bad.jsonl", b'{"text": "a"}\n{"text": \n', "line 2 is not valid JSON"),
        ("list.jsonl", b"[1, 2]\n", "line 1 is not a JSON object"),
        ("nolabel.txt", b"1 fine\nlonely\n", "line 2 is not '<label> <text>'"),
    ],
)
def test_reader_errors_name_file_and_place(tmp_path, name, content, match):
    p = tmp_path / name
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(UserError, match=match) as e:
        D.read_rows(p)
    assert name in str(e.value)
    assert "\n" not in str(e.value)


def test_utf8_bom_is_accepted(tmp_path):
    p = tmp_path / "bom.csv"
    p.write_bytes("text,label\nok,1\n".encode("utf-8-sig"))
    assert D.read_rows(p) == [{"text": "ok", "label": "1"}]


def test_lm_mode_every_token_is_a_target(tok):
    cfg = DataConfig(text_column="text")
    exs = D.build_examples(tok, ROWS, cfg)
    for ex, r in zip(exs, ROWS, strict=True):
        assert ex.input_ids == encode(tok, r["text"])
        assert ex.labels == ex.input_ids and ex.source_len == 0


def test_target_mode_labels_only_on_the_target(tok):
    verb = {"0": "negative", "1": "positive"}
    cfg = DataConfig(template="Review: {text}\nSentiment:", target_column="label", verbalizer=verb)
    exs = D.build_examples(tok, ROWS, cfg)
    for ex, r in zip(exs, ROWS, strict=True):
        source = f"Review: {r['text']}\nSentiment:"
        src, tgt = encode(tok, source), encode(tok, " " + verb[r["label"]])
        assert ex.input_ids == src + tgt  # classification: no EOS after the label word
        assert ex.labels == [D.IGNORE] * len(src) + tgt
        assert ex.source_len == len(src) and ex.label == r["label"] and ex.source_text == source


def test_generation_targets_end_with_eos(tok):
    # no verbalizer: a free-text target
    cfg = DataConfig(template="Q: {text}\nA: ", target_column="label")
    ex = D.build_examples(tok, ROWS[:1], cfg)[0]
    tgt = encode(tok, "1") + [tok.eos_token_id]  # the template ends in a space: no extra space
    assert ex.labels[-len(tgt) :] == tgt and ex.label is None
    assert all(t == D.IGNORE for t in ex.labels[: -len(tgt)])


def test_label_map_then_verbalizer(tok):
    rows = [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}]
    cfg = DataConfig(
        template="{text}",
        target_column="label",
        verbalizer={"0": "bad", "1": "good"},
        label_map={"pos": "1", "neg": "0"},
    )
    exs = D.build_examples(tok, rows, cfg)
    assert [e.label for e in exs] == ["1", "0"]
    assert exs[0].input_ids[exs[0].source_len :] == encode(tok, " good")


def test_label_not_in_verbalizer_names_the_row(tok):
    cfg = DataConfig(template="{text}", target_column="label", verbalizer={"1": "positive"})
    with pytest.raises(UserError, match=r"f\.csv: row 2: label '0' is not in the verbalizer"):
        D.build_examples(tok, ROWS, cfg, path="f.csv")


@pytest.mark.parametrize(
    "cfg, match",
    [
        (
            DataConfig(text_column="body"),
            "--text-column 'body' is not a column; columns are: text, label",
        ),
        (DataConfig(template="{text} {title}", target_column="label"), "'title'"),
        (DataConfig(template="{text}", target_column="gold"), "--target-column 'gold'"),
    ],
)
def test_missing_columns(tok, cfg, match):
    with pytest.raises(UserError, match=match):
        D.build_examples(tok, ROWS, cfg, path="f.csv")


def test_truncation_is_counted_and_warned(tok, caplog):
    long_rows = [{"text": "the movie was good and the actors were great " * 3}] * 2 + [
        {"text": "a"}
    ]
    cfg = DataConfig(text_column="text", max_length=8)
    with caplog.at_level(logging.WARNING, logger="softprompt.data"):
        exs = D.build_examples(tok, long_rows, cfg, path="long.csv")
    assert [len(e.input_ids) for e in exs][:2] == [8, 8]
    assert exs[0].input_ids == encode(tok, long_rows[0]["text"])[:8]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 of 3 rows" in warnings[0] and "long.csv" in warnings[0]


def test_target_truncation_keeps_the_end_of_the_input_and_the_target(tok):
    row = {"text": "the movie was good and the actors were great " * 3, "label": "1"}
    cfg = DataConfig(
        template="{text} Sentiment:",
        target_column="label",
        verbalizer={"0": "negative", "1": "positive"},
        max_length=10,
    )
    ex = D.build_examples(tok, [row], cfg)[0]
    full = encode(tok, row["text"] + " Sentiment:")
    tgt = encode(tok, " positive")
    assert len(ex.input_ids) == 10
    assert ex.input_ids[-len(tgt) :] == tgt
    assert ex.input_ids[: ex.source_len] == full[-ex.source_len :]


def test_no_truncation_no_warning(tok, caplog):
    with caplog.at_level(logging.WARNING, logger="softprompt.data"):
        D.build_examples(tok, ROWS, DataConfig(text_column="text"))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_dev_split_is_seeded_and_disjoint():
    exs = [D.Example(input_ids=[i + 2], labels=[i + 2], source_len=0) for i in range(48)]
    cfg = DataConfig(text_column="text")
    tr1, dev1 = split_dev(exs, cfg, seed=0)
    tr2, dev2 = split_dev(exs, cfg, seed=0)
    tr3, dev3 = split_dev(exs, cfg, seed=1)
    key = lambda xs: [e.input_ids[0] for e in xs]  # noqa: E731
    assert len(dev1) == int(48 * cfg.dev_fraction) > 0
    assert sorted(key(tr1) + key(dev1)) == key(exs)  # a partition of train
    assert key(dev1) == key(dev2) and key(tr1) == key(tr2)
    assert key(dev1) != key(dev3)
    assert key(tr1) == sorted(key(tr1))  # training rows keep file order
    assert split_dev(exs, DataConfig(text_column="text", dev_fraction=0.0), 0) == (exs, [])


def test_limit_and_eval_file(tok, toy_csv):
    s = load_splits(tok, DataConfig(path=str(toy_csv), text_column="text", limit=10, dev_fraction=0.0))
    assert len(s.train) == 10 and s.dev == [] and s.test == []
    s = load_splits(tok, DataConfig(path=str(toy_csv), eval_path=str(toy_csv), text_column="text", eval_limit=7))
    assert len(s.train) == 48 and len(s.dev) == 7


def test_bucketed_batches_cover_every_row_once_and_are_deterministic(tok, toy_csv):
    exs = load_splits(tok, DataConfig(path=str(toy_csv), text_column="text", dev_fraction=0.0)).train
    b0 = D.bucketed_batches(exs, 5, seed=0, epoch=0)
    assert sorted(i for b in b0 for i in b) == list(range(len(exs)))
    assert all(len(b) <= 5 for b in b0)
    assert b0 == D.bucketed_batches(exs, 5, seed=0, epoch=0)
    assert b0 != D.bucketed_batches(exs, 5, seed=0, epoch=1)


def test_collate_right_pads(tok):
    exs = D.build_examples(
        tok,
        ROWS,
        DataConfig(template="{text}", target_column="label", verbalizer={"0": "no", "1": "yes"}),
    )
    b = D.collate(exs, pad_id=tok.pad_token_id)
    T = max(len(e.input_ids) for e in exs)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (3, T)
    for i, e in enumerate(exs):
        n = len(e.input_ids)
        assert b["attention_mask"][i].tolist() == [1] * n + [0] * (T - n)
        assert b["input_ids"][i, :n].tolist() == e.input_ids
        assert (b["input_ids"][i, n:] == tok.pad_token_id).all()
        assert b["labels"][i, :n].tolist() == e.labels and (b["labels"][i, n:] == D.IGNORE).all()


def test_unknown_task_lists_known_tasks():
    with pytest.raises(UserError, match="known tasks: .*sst2"):
        recipes.task_path("no-such-task")


@needs_data("sst2")
def test_sst2_recipe_resolves(tok, monkeypatch):
    cfg = recipes.resolve(DataConfig(limit=20, eval_limit=10), "sst2", SHARED_DATA)
    assert Path(cfg.path).is_file() and Path(cfg.path).is_relative_to(SHARED_DATA)
    assert cfg.mode == "target" and cfg.verbalizer == {"0": "negative", "1": "positive"}
    assert [Path(f.path).name for f in (cfg.files.train, cfg.files.dev, cfg.files.test)] == ["train.txt", "dev.txt", "test.txt"]
    s = load_splits(tok, cfg)
    train, ev = s.train, s.dev
    assert len(train) == 20 and len(ev) == 10
    assert {e.label for e in train} <= {"0", "1"} and len({e.label for e in train}) == 2
    for e in train:
        assert e.source_text.startswith("Review: ") and e.source_text.endswith("\nSentiment:")
        assert e.labels[e.source_len :] in (encode(tok, " negative"), encode(tok, " positive"))
    # a user option overrides the recipe
    cfg2 = recipes.resolve(DataConfig(limit=5, max_length=64), "sst2", SHARED_DATA)
    assert cfg2.limit == 5 and cfg2.max_length == 64 and cfg2.files.train.limit == 5
