"""The comparison harness: every method end to end (``--quick``), the report's structure, the
trainable-parameter counts, the shared base model untouched, fixed dev/test sets, the few-shot
prefix path equal to plain concatenation, and the SuperGLUE 32-shot recipes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import needs_data, shared_data_root
from helpers import file_examples

from softprompt import data as D
from softprompt import models, recipes
from softprompt.config import (
    COMPARE_METHODS,
    COMPARE_TRAINED,
    DataConfig,
    PromptConfig,
    UserError,
)
from softprompt.experiments import compare, compare_plots
from softprompt.experiments import compare_data as CD
from softprompt.experiments import compare_report as R
from softprompt.forward import sequence_logprobs
from softprompt.provenance import write_json
from softprompt.splits import load_splits
from softprompt.training import methods

VERB = {"0": "negative", "1": "positive"}
N = 4  # virtual tokens in these tests


def toy_cfg(csv) -> DataConfig:
    return DataConfig(path=str(csv), template="{text}", target_column="label", verbalizer=VERB)


def lora_expected(model) -> int:
    """LoRA rank 8 adds r * (in + out) per adapted linear layer (A: r x in, B: out x r)."""
    total = 0
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in methods.lora_targets(model):
            w = mod.weight  # Linear: (out, in); GPT-2 Conv1D: (in, out)
            total += methods.LORA_RANK * (w.shape[0] + w.shape[1])
    return total


@pytest.mark.slow
def test_every_method_end_to_end_base_unchanged(tiny_lm, toy_csv, tmp_path):
    before = {k: v.detach().clone() for k, v in tiny_lm.model.state_dict().items()}
    ccfg = compare.quick(compare.CompareConfig(methods=COMPARE_METHODS))  # every method, deep and residual prompts included
    doc = compare.run(
        tiny_lm,
        toy_cfg(toy_csv),
        None,
        ccfg,
        pcfg=PromptConfig(num_virtual_tokens=N, init="labels"),
    )
    # the shared model is unchanged bit for bit, still frozen and in eval mode
    after = tiny_lm.model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert (
        all(not p.requires_grad for p in tiny_lm.model.parameters()) and not tiny_lm.model.training
    )
    assert doc["base_model_unchanged"] is True

    runs = {r["method"]: r for r in doc["runs"]}
    assert list(runs) == list(COMPARE_METHODS)
    H = tiny_lm.hidden_size
    assert runs["prompt-tuning"]["trainable_params"] == N * H
    L, kv, d = tiny_lm.kv_shape
    assert runs["deep-prompt"]["trainable_params"] == L * 2 * kv * N * d
    assert runs["prompt-residual"]["trainable_params"] > N * H  # trains through its MLP
    assert N * H * 4 < runs["prompt-residual"]["task_bytes"] < N * H * 4 + 256  # saves the folded (N, H)
    assert L * 2 * kv * N * d * 4 < runs["deep-prompt"]["task_bytes"] < L * 2 * kv * N * d * 4 + 256
    assert runs["lora"]["trainable_params"] == lora_expected(tiny_lm.model)
    assert runs["full"]["trainable_params"] == sum(p.numel() for p in tiny_lm.model.parameters())
    assert runs["zero-shot"]["trainable_params"] == runs["few-shot"]["trainable_params"] == 0
    # storage: the prompt file holds N*H float32 plus a small safetensors header; serving K tasks
    assert N * H * 4 < runs["prompt-tuning"]["task_bytes"] < N * H * 4 + 256
    base = doc["model"]["bytes"]
    assert runs["full"]["task_bytes"] == base and runs["full"]["serve_bytes"] == 10 * base
    assert runs["lora"]["serve_bytes"] == base + 10 * runs["lora"]["task_bytes"]
    assert (
        runs["prompt-tuning"]["serve_bytes"]
        < runs["lora"]["serve_bytes"]
        < runs["full"]["serve_bytes"]
    )
    assert [runs[m]["mixed_task_batch"] for m in COMPARE_METHODS] == [True] * 5 + [False, False]
    assert runs["few-shot"]["k"] >= 1
    for m in COMPARE_METHODS:
        r = runs[m]
        n_test = doc["data"]["test"]
        assert r["test_accuracy"] * n_test == pytest.approx(round(r["test_accuracy"] * n_test))  # whole rows right
        assert r["latency_ms"] > 0 and "peak_mem_mb" in r  # PeakMemory itself: test_peak_memory_sees_an_allocation
        if m in COMPARE_TRAINED:
            assert (
                r["steps"] == ccfg.budget
                and r["train_time_s"] > 0
                and [s["lr"] for s in r["sweep"]] == [r["lr"]]
            )

    # the document: JSON round trip, keys, Markdown table rows, plots
    doc["command"] = "softprompt compare --quick"
    path = write_json(doc, tmp_path / "compare_toy.json")
    back = R.read_json(path)
    for key in (
        "git",
        "versions",
        "seeds",
        "data",
        "runs",
        "summary",
        "targets",
        "config",
        "model",
        "machine",
    ):
        assert key in back, key
    assert list(back["data"]["files"].values()) == [CD.sha256(toy_csv)]
    assert back["seeds"] == [0] and "revision" in back["git"] and "torch" in back["versions"]
    md = R.write_report(
        [back], tmp_path, "compare_toy", back["command"], notes="A hand-written note."
    )
    text = md.read_text()
    rows = [
        line
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith("| method")
    ]
    for m in COMPARE_METHODS:
        assert any(line.startswith(f"| {m} |") for line in rows), m
    assert "A hand-written note." in text and back["command"] in text
    for kind, _ in compare_plots.PLOTS:
        png = tmp_path / f"compare_toy_{kind}.png"
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"


def test_lora_and_full_counts_on_gpt2(tiny_model_dir, sp_home):
    lm = models.load(str(tiny_model_dir("gpt2")))
    lora = methods.LoraMethod(lm.model)
    assert methods.lora_targets(lm.model) == ["c_attn"]
    assert (
        lora.trainable_parameters()
        == lora_expected(lm.model)
        == sum(p.numel() for p in lora.parameters())
    )
    full = methods.FullMethod(lm.model)
    assert full.trainable_parameters() == methods.unique_parameters(lm.model)
    assert all(not p.requires_grad for p in lm.model.parameters())  # the copies are private


@pytest.mark.slow
def test_cli_compare_sizes_seeds_and_report(tiny_model_dir, sp_home, toy_csv, tmp_path, cli_main):
    out = tmp_path / "out"
    args = [
        "compare",
        "--model",
        str(tiny_model_dir("llama")),
        "--data",
        str(toy_csv),
        "--template",
        "{text}",
        "--target-column",
        "label",
        "--verbalizer",
        "0=negative,1=positive",
        "--methods",
        "zero-shot,prompt-tuning",
        "--train-sizes",
        "8,all",
        "--seeds",
        "0,1",
        "--num-virtual-tokens",
        str(N),
        "--quick",
        "--quiet",
        "--out",
        str(out),
    ]
    assert cli_main(args) == 0
    doc = json.loads((out / "compare_toy.json").read_text())
    sizes = sorted({(r["method"], r["n_train"]) for r in doc["runs"]})
    assert sizes == [("prompt-tuning", 8), ("prompt-tuning", doc["data"]["pool"]), ("zero-shot", 0)]
    assert sorted(r["seed"] for r in doc["runs"] if r["method"] == "prompt-tuning") == [0, 0, 1, 1]
    assert doc["command"].startswith("softprompt compare --model") and "--quick" in doc["command"]
    assert (out / "compare_toy.md").is_file()
    notes = tmp_path / "notes.md"
    notes.write_text("What we see.")
    assert (
        cli_main(
            [
                "compare",
                "--report",
                str(out / "compare_toy.json"),
                "--notes",
                str(notes),
                "--out",
                str(tmp_path / "docs"),
            ]
        )
        == 0
    )
    text = (tmp_path / "docs" / "comparison.md").read_text()
    assert "What we see." in text and "--report " in text
    assert (tmp_path / "docs" / "comparison_params.png").is_file()


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--methods", "zero-shot,magic"], "unknown magic"),
        (["--lr-sweep", "lora:1e-3"], "METHOD=LR"),
        (["--train-sizes", "32,lots"], "not an integer"),
        (["--methods", "deep-prompt,prompt-tuning", "--prefix-memory"], "--methods prompt-tuning: --prefix-memory goes with"),
        (["--methods", "prompt-tuning,deep-prompt", "--prefix-memory"], "--methods prompt-tuning: --prefix-memory goes with"),
        (["--methods", "lora", "--prefix-memory"], "--methods lora: no prompt method to take the prompt flags"),
    ],
)
def test_cli_user_errors(tiny_model_dir, sp_home, toy_csv, tmp_path, capsys, bad, message, cli_main):
    args = [
        "compare",
        "--model",
        str(tiny_model_dir("llama")),
        "--data",
        str(toy_csv),
        "--template",
        "{text}",
        "--target-column",
        "label",
        "--verbalizer",
        "0=negative,1=positive",
        "--out",
        str(tmp_path),
        *bad,
    ]
    capsys.readouterr()  # the tiny model's files, written on first use, print progress
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("compare_*"))  # stopped before any run: no journal, no result


def test_a_lever_one_prompt_method_cannot_take_stops_the_library_call_before_any_run(tiny_lm, toy_csv, tmp_path):
    ccfg = compare.CompareConfig(methods=("deep-prompt", "prompt-tuning"))
    with pytest.raises(UserError, match="--methods prompt-tuning: --prefix-memory goes with --kind deep"):
        compare.run(tiny_lm, toy_cfg(toy_csv), None, ccfg, pcfg=PromptConfig(kind="deep", memory=True),
                    journal=tmp_path / "out" / "compare_x.runs.jsonl")
    assert not (tmp_path / "out").exists()  # no journal was started


@pytest.mark.slow
def test_cli_prompt_levers_and_schedule_reach_the_runs(tiny_model_dir, sp_home, toy_csv, tmp_path, cli_main):
    """compare's lever flags train what ``train``'s do: recorded in the result, and PrefixMemory's
    memory counted among the deep prompt's trainable parameters (the same run without it has fewer)."""
    docs = {}
    for name, levers in {"plain": [], "levers": ["--prefix-memory", "--freeze-first-token", "--prompt-dropout", "0.1",
                                                 "--schedule", "cosine", "--warmup-ratio", "0.2"]}.items():
        args = ["compare", "--model", str(tiny_model_dir("llama")), "--data", str(toy_csv), "--template", "{text}",
                "--target-column", "label", "--verbalizer", "0=negative,1=positive", "--methods", "deep-prompt",
                "--num-virtual-tokens", str(N), "--quick", "--quiet", "--out", str(tmp_path), "--tag", name, *levers]
        assert cli_main(args) == 0
        docs[name] = json.loads((tmp_path / f"compare_{name}.json").read_text())
    p, t = docs["levers"]["prompt_config"], docs["levers"]["train_config"]
    assert (p["memory"], p["freeze_first"], p["dropout"], t["schedule"], t["warmup_ratio"]) == (True, True, 0.1, "cosine", 0.2)
    assert not docs["plain"]["prompt_config"]["memory"] and docs["plain"]["train_config"]["schedule"] == "linear"
    assert docs["plain"]["prompt_config"]["kind"] == PromptConfig().kind  # recorded as before: journals still resume
    params = {k: d["runs"][0]["trainable_params"] for k, d in docs.items()}
    assert params["levers"] > params["plain"] > 0


def test_splits_fixed_and_train_sets_nested(tiny_lm, toy_csv):
    s = CD.compare_splits(tiny_lm.tokenizer, toy_cfg(toy_csv))
    pool, dev, test = s.examples()
    assert len(pool) + len(dev) + len(test) == 48 and dev and test
    small, big = CD.train_indices(len(pool), 8, 3), CD.train_indices(len(pool), 16, 3)
    assert set(small) < set(big) and small != CD.train_indices(len(pool), 8, 4)
    # another template re-tokenises the same rows: same labels in the same order
    _, dev2, test2 = s.examples(replace(s.cfg, template="Review: {text}"))
    assert [e.label for e in dev2] == [e.label for e in dev] and [e.label for e in test2] == [
        e.label for e in test
    ]
    assert dev2[0].input_ids != dev[0].input_ids


def test_few_shot_prefix_equals_concatenation(tiny_lm, toy_csv):
    cfg = toy_cfg(toy_csv)
    ex = file_examples(tiny_lm.tokenizer, cfg, str(toy_csv), None)
    ids, text, k = methods.choose_demos(tiny_lm.tokenizer, ex[:12], VERB, budget=60, seed=0, max_k=8)
    assert 2 <= k <= 8 and len(ids) <= 60 and text.count("\n\n") == k
    assert {"negative", "positive"} <= set(text.split())  # both classes shown
    assert methods.choose_demos(tiny_lm.tokenizer, ex[:12], VERB, 60, 0, 8)[0] == ids  # seeded
    hp = methods.HandPrompt(tiny_lm.model, ids, text)
    for rows in (ex[12:16], ex[16:19]):  # the second batch reuses the demonstrations' cached keys/values
        fast = hp.score(D.collate(rows, tiny_lm.tokenizer.pad_token_id))
        cat = [
            D.Example(ids + e.input_ids, [D.IGNORE] * len(ids) + e.labels, len(ids) + e.source_len)
            for e in rows
        ]
        slow = sequence_logprobs(tiny_lm.model, None, **D.collate(cat, tiny_lm.tokenizer.pad_token_id))
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    assert hp._kv is not None


def test_compare_needs_a_verbalizer(tiny_lm, toy_csv):
    cfg = DataConfig(path=str(toy_csv), template="{text}", target_column="label")
    with pytest.raises(UserError, match="verbalizer"):
        CD.compare_splits(tiny_lm.tokenizer, cfg)


@needs_data("superglue-32shot")
@pytest.mark.parametrize("task, n_labels", [("rte", 2), ("boolq", 2), ("cb", 3)])
def test_superglue_recipes_match_their_files(tiny_lm, task, n_labels, monkeypatch):
    root = shared_data_root()
    cfg, recipe = recipes.resolve(DataConfig(), task, root), recipes.load_task(task)
    assert len(cfg.verbalizer) == n_labels
    for split in ("train", "eval", "test"):
        rows = D.read_rows(root / recipe[split]["path"])
        assert {r["label"] for r in rows} == set(cfg.verbalizer), (
            task,
            split,
        )  # every label has a word
        assert all(f in rows[0] for f in D.template_fields(cfg.template))
    train = load_splits(tiny_lm.tokenizer, cfg).train
    assert len(train) == 32 and all(len(e.input_ids) <= cfg.max_length for e in train)


@pytest.mark.slow
def test_interrupted_comparison_resumes_without_redoing_finished_runs(tiny_lm, toy_csv, tmp_path, monkeypatch):
    ccfg = compare.quick(compare.CompareConfig(methods=("zero-shot", "prompt-tuning", "lora"), seeds=(0, 1)))
    pcfg, cfg = PromptConfig(num_virtual_tokens=N), toy_cfg(toy_csv)
    whole = compare.run(tiny_lm, cfg, None, ccfg, pcfg=pcfg)  # uninterrupted, no journal
    journal = tmp_path / "compare_toy.runs.jsonl"
    real, calls = compare.run_one, []

    def run_one(ctx, n, seed, method):
        calls.append((method, seed))
        if len(calls) == 4:
            raise KeyboardInterrupt  # Ctrl-C in the fourth run
        return real(ctx, n, seed, method)

    monkeypatch.setattr(compare, "run_one", run_one)
    with pytest.raises(KeyboardInterrupt):
        compare.run(tiny_lm, cfg, None, ccfg, pcfg=pcfg, journal=journal)
    assert len(journal.read_text().splitlines()) == 1 + 3  # settings + three finished runs
    with pytest.raises(UserError, match="--resume"):  # never silently started again
        compare.run(tiny_lm, cfg, None, ccfg, pcfg=pcfg, journal=journal)
    with pytest.raises(UserError, match="other settings"):
        compare.run(tiny_lm, cfg, None, compare.quick(compare.CompareConfig(methods=("zero-shot",))), pcfg=pcfg, journal=journal, resume=True)
    calls.clear()
    resumed = compare.run(tiny_lm, cfg, None, ccfg, pcfg=pcfg, journal=journal, resume=True)
    assert calls == [("prompt-tuning", 1), ("lora", 1)]  # only the unfinished runs ran
    key = lambda r: (r["method"], r["seed"])  # noqa: E731
    got = {key(r): r["test_accuracy"] for r in resumed["runs"]}
    assert got == {key(r): r["test_accuracy"] for r in whole["runs"]}
    assert [key(r) for r in resumed["runs"]] == [key(r) for r in whole["runs"]]


def test_versus_lora_records_the_accuracy_gap_and_the_step_cost_of_each_prompt_kind():
    from softprompt.experiments.compare_report import versus_lora

    summary = [{"method": "lora", "n_train": 4907, "accuracy_mean": 0.962, "step_cpu_ms": 1000.0},
               {"method": "deep-prompt", "n_train": 4907, "accuracy_mean": 0.942, "step_cpu_ms": 900.0},
               {"method": "prompt-tuning", "n_train": 4907, "accuracy_mean": 0.9, "step_cpu_ms": 1200.0},
               {"method": "deep-prompt", "n_train": 32, "accuracy_mean": 0.5, "step_cpu_ms": 1.0}]  # no LoRA at 32
    got = {t["target"]: (t["value"], t["met"]) for t in versus_lora(summary)}
    assert got == {"best prompt kind (deep-prompt) at most 1 point under LoRA (n=4907)": (2.0, False),
                   "deep-prompt's training CPU time per step at most LoRA's (n=4907; ratio)": (0.9, True),
                   "prompt-tuning's training CPU time per step at most LoRA's (n=4907; ratio)": (1.2, False)}
    sst2 = {t["target"]: t["met"] for t in versus_lora(summary, margin=0.0)}
    assert sst2["best prompt kind (deep-prompt) at most 0 points under LoRA (n=4907)"] is False


def test_peak_memory_sees_an_allocation():
    """What the comparison records as peak memory grows by at least what the block allocates
    (in a fresh process: heap that other tests freed cannot hide the growth)."""
    import os
    import subprocess
    import sys

    code = ("import time\nfrom softprompt.experiments.measure import PeakMemory\n"
            "with PeakMemory() as mem:\n"
            "    block = bytearray(64 << 20)\n"
            "    block[::4096] = bytes([1]) * len(range(0, 64 << 20, 4096))  # every page written: resident\n"
            "    time.sleep(0.1)  # sampled every 10 ms, and once more on exit\n"
            "print(len(block), mem.delta_mb)")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=120)
    size, delta = out.stdout.split()
    assert int(size) == 64 << 20 and float(delta) >= 60
