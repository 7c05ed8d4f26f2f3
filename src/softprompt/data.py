"""Reading user data, templates, verbalizers, tokenisation and length-bucketed batches.

Readers turn a file into rows (``dict[str, str]``); ``build_examples`` turns rows into token
ids and labels. Two modes:

* language modelling (``text_column``): every token of the text is a target;
* input -> target (``template`` + ``target_column`` [+ ``verbalizer``]): the template filled
  with the row is the input, the (verbalized) target follows, and only target tokens carry
  labels (-100 elsewhere); with ``chat`` the two are a user turn and the assistant's reply in
  the model's chat template (``chat.py``).

Every mistake in the data is a ``UserError`` naming the file, row or column. Which files make
train, dev and test, and reading them, is ``splits.load_splits``'s (the one way in for data).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from softprompt import chat, hfdata
from softprompt.chat import encode  # the one text -> token ids, re-exported for the data layer
from softprompt.config import DataConfig, UserError

if TYPE_CHECKING:
    from softprompt.models import Tokenizer

log = logging.getLogger(__name__)
IGNORE = -100
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
# the walk-through's data (awesome-chatgpt-prompts, CC0-1.0), shipped inside the package
WALKTHROUGH_CSV = ASSETS_DIR / "awesome-chatgpt-prompts.csv"


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where there is no target
    source_len: int  # tokens of input before the target
    label: str | None = None  # the class value, in classification mode
    source_text: str = ""  # the filled template (input -> target mode)
    task: int | None = None  # index of the example's task in a multitask mix


# ---------------------------------------------------------------- readers


def not_found(path: Path, root: Path | None = None) -> UserError:
    """A missing data file; under the data root ``root`` (a task recipe's file) the line says where it goes."""
    if root is None:
        return UserError(f"data file not found: {path}")
    try:
        rel = path.resolve().relative_to(root.resolve())
    except ValueError:
        return UserError(f"data file not found: {path}")
    return UserError(f"data file not found: {path}; task recipes read their files under the data root {root} "
                     f"(--data-root or $SOFTPROMPT_DATA): put {rel} there (docs/data.md lists where each comes "
                     "from; a recipe that names a hub data set fetches it where a network exists)")


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise not_found(path)
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line} is not valid UTF-8 (byte {e.start}); re-save the file as UTF-8") from None


def _read_delimited(path: Path, text: str, delimiter: str, columns) -> list[dict[str, str]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows = [r for r in reader if r]
    if not rows:
        return []
    header = list(columns) if columns else rows.pop(0)
    out = []
    for i, r in enumerate(rows, start=1 if columns else 2):
        if len(r) != len(header):
            raise UserError(f"{path}: row {i} has {len(r)} fields, the header has {len(header)}")
        out.append(dict(zip(header, r)))
    return out


def _read_jsonl(path: Path, text: str) -> list[dict[str, str]]:
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {i} is not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}: line {i} is not a JSON object")
        out.append({k: v if isinstance(v, str) else json.dumps(v) for k, v in obj.items()})
    return out


def _read_label_lines(path: Path, text: str) -> list[dict[str, str]]:
    out, empty = [], []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        label, sep, rest = line.strip().partition(" ")
        if not sep and label.isdigit():  # a label with no text (CR has two): nothing to learn from
            empty.append(i)
            continue
        if not sep:
            raise UserError(f"{path}: line {i} is not '<label> <text>'")
        out.append({"label": label, "text": rest})
    if empty:
        log.warning("%s: skipped %d line(s) with a label but no text (first: line %d)", path, len(empty), empty[0])
    return out


def read_rows(path: str | Path, columns=None, split: str | None = None, config: str | None = None,
              default: tuple[str, ...] = ("train",)) -> list[dict[str, str]]:
    """Read csv, tsv, jsonl/json, ``<label> <text>`` lines (any other extension), or a
    ``datasets`` data set (a folder or a hub name; ``split`` and ``config`` choose in it,
    ``default`` are the splits tried in order without ``split``)."""
    if hfdata.is_dataset(path):
        return hfdata.read_dataset(path, split, config, default=default)
    path = Path(path)
    text = _read_text(path)
    ext = path.suffix.lower()
    if ext == ".csv":
        rows = _read_delimited(path, text, ",", columns)
    elif ext == ".tsv":
        rows = _read_delimited(path, text, "\t", columns)
    elif ext in (".jsonl", ".json"):
        rows = _read_jsonl(path, text)
    else:
        rows = _read_label_lines(path, text)
    if not rows:
        raise UserError(f"{path}: no data rows")
    return rows


def derive_columns(rows: list[dict[str, str]], derive: dict[str, str] | None) -> list[dict[str, str]]:
    for name, tpl in (derive or {}).items():
        for r in rows:
            r[name] = tpl.format_map(r)
    return rows


# ---------------------------------------------------------------- templates and examples


def template_fields(template: str) -> list[str]:
    """Column names a template uses; a malformed template is a UserError."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise UserError(f"--template {template!r} is malformed ({e}); use {{column}} placeholders") from None
    fields = [f for _, f, _, _ in parts if f is not None]
    bad = [f for f in fields if not f or f.isdigit()]
    if bad:
        raise UserError(f"--template {template!r}: name the column in every {{}} placeholder")
    return fields


def check_columns(path, rows: list[dict[str, str]], cfg: DataConfig) -> None:
    have = list(rows[0])
    need: list[tuple[str, str]] = []
    if cfg.mode == "lm":
        need.append(("--text-column", cfg.text_column or ""))
    else:
        need += [(f"column '{f}' named in --template", f) for f in template_fields(cfg.template or "")]
        need.append(("--target-column", cfg.target_column or ""))
    for what, col in need:
        if col not in have:
            raise UserError(f"{path}: {what} {col!r} is not a column; columns are: {', '.join(have)}")
    for i, row in enumerate(rows, 1):
        for _, col in need:
            if col not in row:
                raise UserError(f"{path}: row {i} has no {col!r} field")


def target_text(source: str, word: str) -> str:
    """Label words follow the input after one space unless the input already ends in space."""
    return word if (not source or source[-1].isspace()) else " " + word


def _lm_example(tokenizer: Tokenizer, row, cfg: DataConfig) -> tuple[Example, bool]:
    ids = encode(tokenizer, row[cfg.text_column])
    cut = len(ids) > cfg.max_length
    ids = ids[: cfg.max_length]
    return Example(input_ids=ids, labels=list(ids), source_len=0), cut


def resolve_target(row, cfg: DataConfig, path, index: int) -> tuple[str, str | None]:
    """(target word, class value or None) for one row."""
    value = row[cfg.target_column].strip()
    if cfg.label_map:
        value = cfg.label_map.get(value, value)
    if cfg.verbalizer is None:
        return value, None
    if value not in cfg.verbalizer:
        raise UserError(
            f"{path}: row {index}: label {value!r} is not in the verbalizer "
            f"(known: {', '.join(cfg.verbalizer)})"
        )
    return cfg.verbalizer[value], value


def _target_example(tokenizer: Tokenizer, row, cfg: DataConfig, path, index: int) -> tuple[Example, bool]:
    """Input -> target; in chat form (``cfg.chat``) the filled template is the user turn and the
    target the assistant reply, written by the model's chat template (``chat.chat_pair``): the
    input is everything up to the reply, the target the reply and its end-of-turn marker, and
    ``source_text`` the rendered input (it ends where the reply begins)."""
    source = cfg.template.format_map(row)
    word, label = resolve_target(row, cfg, path, index)
    if cfg.chat:
        source, src, tgt = chat.chat_pair(tokenizer, source, word, cfg.system)
    else:
        src = encode(tokenizer, source)
        tgt = encode(tokenizer, target_text(source, word))
        if label is None and tokenizer.eos_token_id is not None:
            tgt = tgt + [tokenizer.eos_token_id]  # generation targets learn to stop
    room = cfg.max_length - len(tgt)
    cut = len(src) > room
    if cut:
        src = src[-room:] if room > 0 else []  # keep the end of the input: it cues the answer
        tgt = tgt[: cfg.max_length - len(src)]
    ex = Example(input_ids=src + tgt, labels=[IGNORE] * len(src) + tgt, source_len=len(src), label=label,
                 source_text=source)
    return ex, cut


def build_examples(tokenizer: Tokenizer, rows, cfg: DataConfig, path="data") -> list[Example]:
    check_columns(path, rows, cfg)
    out, cut = [], 0
    for i, row in enumerate(rows, 1):
        if cfg.mode == "lm":
            ex, c = _lm_example(tokenizer, row, cfg)
        else:
            ex, c = _target_example(tokenizer, row, cfg, path, i)
        if not ex.input_ids:
            continue
        out.append(ex)
        cut += c
    if cut:
        log.warning("%s: %d of %d rows were longer than --max-length %d and were truncated", path, cut, len(rows), cfg.max_length)
    if not out:
        raise UserError(f"{path}: no usable rows (all empty after tokenisation)")
    return out


# ---------------------------------------------------------------- batches


def bucketed_batches(examples: list[Example], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffle, then sort by length inside windows of 50 batches, then shuffle the batches.

    Deterministic in (seed, epoch), which is what makes resumed training equal uninterrupted.
    """
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(examples)))
    rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for s in range(0, len(order), window):
        chunk = sorted(order[s : s + window], key=lambda i: len(examples[i].input_ids))
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row: input_ids, attention_mask, labels, all (B, T)."""
    T = max(len(e.input_ids) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if all(e.task is not None for e in examples):
        out["task_ids"] = torch.tensor([e.task for e in examples], dtype=torch.long)  # (B,)
    return out
