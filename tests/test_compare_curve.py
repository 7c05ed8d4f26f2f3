"""``softprompt compare --curve``: a learning curve from ONE run per (method, seed) equals separate
runs of each budget under the same schedule; the lr race on dev at the first point; resume ==
uninterrupted for the curve report; curves with several training sizes, capped at --epochs."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from softprompt import data as D
from softprompt.cli import main
from softprompt.config import CompareConfig, DataConfig, PromptConfig, TrainConfig, UserError
from softprompt.experiments import compare as C
from softprompt.experiments import compare_curve as CC
from softprompt.experiments import compare_data as CD
from softprompt.training.loop import fit

VERB = {"0": "negative", "1": "positive"}


def toy_cfg(csv) -> DataConfig:
    return DataConfig(path=str(csv), template="{text}", target_column="label", verbalizer=VERB)


def context(lm, csv, ccfg: CompareConfig, dropout: float = 0.0) -> C.Context:
    splits = CD.compare_splits(lm.tokenizer, toy_cfg(csv), dev_sample=ccfg.dev_sample)
    pcfg = PromptConfig(num_virtual_tokens=4, init="labels", dropout=dropout)
    ctx = C.Context(lm, splits, ccfg, TrainConfig(batch_size=4), pcfg, lambda _: None)
    ctx.hand_cfg = splits.cfg
    return ctx


@pytest.mark.parametrize("method, lr, dropout", [("prompt-tuning", 0.3, 0.0), ("deep-prompt", 0.03, 0.0),
                                                ("deep-prompt", 0.03, 0.5), ("lora", 3e-3, 0.0)])
def test_curve_point_equals_a_separate_run_of_that_many_steps(tiny_lm, toy_csv, method, lr, dropout):
    """With prefix dropout too: the curve's evaluations run in eval mode, as a finished run's do."""
    ctx = context(tiny_lm, toy_csv, CompareConfig(methods=(method,), curve=(3, 8), lr_sweep={method: (lr,)}), dropout)
    pool, dev = ctx.splits.examples()[:2]
    made, snaps = [], {}
    accuracy = ctx.accuracy

    def make(c, m, seed):  # the race's method, kept to read its state at each evaluation
        made.append(C.make_method(c, m, seed))
        return made[-1]

    def spy(score, examples):  # the state and dev scores at each point, taken when it is evaluated
        with torch.no_grad():
            snaps.setdefault(len(snaps), {**{k: v.clone() for k, v in made[-1].state().items()},
                                          "dev scores": score(D.collate(dev[:4], ctx.pad))})
        return accuracy(score, examples)

    ctx.accuracy = spy
    _, row, _ = CC.race(ctx, method, pool, 0, make)
    assert [p["steps"] for p in row["curve"]] == [3, 8]
    at = {3: snaps[0], 8: snaps[2]}  # dev then test at each point: snapshots 0, 1 at step 3; 2, 3 at step 8
    assert any(not torch.equal(at[3][k], at[8][k]) for k in at[3])  # the points are different states
    ctx.accuracy = accuracy
    for k, point in zip((3, 8), row["curve"], strict=True):
        m = C.make_method(ctx, method, 0)
        fit(m, pool, replace(ctx.tcfg, seed=0, steps=k, lr=lr), ctx.pad, None, progress=False, horizon=8)
        with torch.no_grad():
            state = {**m.state(), "dev scores": m.score(D.collate(dev[:4], ctx.pad))}
        assert all(torch.equal(state[n], at[k][n]) for n in state)  # bit for bit, scores in eval mode too
        test = ctx.splits.examples()[2]
        assert point["dev_accuracy"] == ctx.accuracy(m.score, dev)["accuracy"]
        assert point["test_accuracy"] == ctx.accuracy(m.score, test)["accuracy"]
    # the schedule's horizon matters: a 3-step run planned for 3 steps (lr decayed) ends elsewhere
    m = C.make_method(ctx, method, 0)
    fit(m, pool, replace(ctx.tcfg, seed=0, steps=3, lr=lr), ctx.pad, None, progress=False)
    assert any(not torch.equal(v, at[3][n]) for n, v in m.state().items())


def test_lr_race_continues_only_a_better_lr(tiny_lm, toy_csv):
    lrs = (0.3, 1e-9, 0.03)
    ctx = context(tiny_lm, toy_csv, CompareConfig(methods=("prompt-tuning",), curve=(2, 6), lr_sweep={"prompt-tuning": lrs}))
    m, kept, rows = CC.race(ctx, "prompt-tuning", ctx.splits.examples()[0], 0, C.make_method)
    assert [r["lr"] for r in rows] == list(lrs) and rows[0]["steps"] == 6  # the first lr runs the whole curve
    best = rows[0]["dev_accuracy"]
    for r in rows[1:]:
        if r["dev_accuracy"] > best:  # ahead at the first point: it goes on and is kept so far
            assert r["steps"] == 6 and "test_accuracy" in r["curve"][0]
            best = r["dev_accuracy"]
        else:  # ties keep the earlier lr
            assert r["steps"] == 2 and r["stopped"] == "dropped at the first point"
            assert len(r["curve"]) == 1 and "test_accuracy" not in r["curve"][0]
    assert kept["dev_accuracy"] == best and kept["steps"] == 6 and "test" in kept
    assert all("test" not in r for r in rows)


@pytest.mark.slow
def test_curve_report_resumed_equals_uninterrupted(tiny_lm, toy_csv, tmp_path, monkeypatch):
    ccfg = CompareConfig(methods=("prompt-tuning", "lora"), seeds=(0, 1), curve=(2, 4), dev_sample=8, test_sample=16,
                         latency_requests=2, lr_sweep={"prompt-tuning": (0.3, 0.03), "lora": (3e-3,)})
    pcfg, cfg = PromptConfig(num_virtual_tokens=4), toy_cfg(toy_csv)
    whole = C.run(tiny_lm, cfg, None, ccfg, pcfg=pcfg)
    journal, real, calls = tmp_path / "compare_toy.runs.jsonl", C.run_one, []

    def run_one(ctx, n, seed, method):
        calls.append((method, seed))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(ctx, n, seed, method)

    monkeypatch.setattr(C, "run_one", run_one)
    with pytest.raises(KeyboardInterrupt):
        C.run(tiny_lm, cfg, None, ccfg, pcfg=pcfg, journal=journal, label={"tag": "toy"})
    part = json.loads(C.partial_path(journal).read_text())  # the finished runs' document, renderable
    assert part["partial"] == {"finished": 2, "planned": 4} and part["tag"] == "toy"
    assert [(r["method"], r["seeds"]) for r in part["summary"]] == [("prompt-tuning", [0]), ("lora", [0])]
    from softprompt.experiments import compare_report as R

    md = R.write_report([part], tmp_path / "docs", "comparison", "test").read_text()
    assert "## toy (partial: 2 of 4 runs finished; the others still to run)" in md
    C.partial_path(journal).unlink()  # resuming writes it from the journal before training anything

    def stop(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(C, "run_one", stop)
    with pytest.raises(KeyboardInterrupt):
        C.run(tiny_lm, cfg, None, ccfg, pcfg=pcfg, journal=journal, resume=True, label={"tag": "toy"})
    again = json.loads(C.partial_path(journal).read_text())
    assert again["partial"] == part["partial"] and again["summary"] == part["summary"]
    monkeypatch.setattr(C, "run_one", run_one)
    calls.clear()
    resumed = C.run(tiny_lm, cfg, None, ccfg, pcfg=pcfg, journal=journal, resume=True)
    assert calls == [("prompt-tuning", 1), ("lora", 1)]
    earlier = [r["wall_s"] for r in resumed["runs"] if r["seed"] == 0]  # the two runs from the journal
    assert resumed["journal_runs"] == 2 and resumed["total_time_s"] > sum(earlier) > 0
    assert resumed["total_time_s"] > sum(r["wall_s"] for r in resumed["runs"]) and "journal_runs" not in whole
    curves = lambda doc: [(r["method"], r["n_train"], r["curve"]) for r in doc["summary"]]  # noqa: E731
    assert curves(resumed) == curves(whole) and [p["steps"] for p in whole["summary"][0]["curve"]] == [2, 4]
    point = whole["summary"][0]["curve"][-1]
    assert point["seeds"] == 2 and point["test_se"] == pytest.approx(CC.binomial_se(point["test_mean"], whole["data"]["test"]))


@pytest.mark.slow
def test_cli_curve_with_train_sizes_capped_at_epochs(tiny_model_dir, sp_home, toy_csv, tmp_path):
    out = tmp_path / "out"
    args = ["compare", "--model", str(tiny_model_dir("llama")), "--data", str(toy_csv), "--template", "{text}",
            "--target-column", "label", "--verbalizer", "0=negative,1=positive", "--methods", "prompt-tuning",
            "--lr-sweep", "prompt-tuning=0.3", "--train-sizes", "8,all", "--seeds", "0,1", "--curve", "2,100",
            "--epochs", "2", "--num-virtual-tokens", "4", "--latency-requests", "2", "--quiet", "--out", str(out)]
    assert main(args) == 0
    doc = json.loads((out / "compare_toy.json").read_text())
    steps = {r["n_train"]: [p["steps"] for p in r["curve"]] for r in doc["summary"]}
    pool = doc["data"]["pool"]
    per_epoch = -(-pool // 8)  # batch size 8, bucketed batches cover every row once
    assert steps == {8: [2], pool: [2, 2 * per_epoch]}  # 8 rows: one batch an epoch, so both points are 2
    assert all(r["steps"] == r["curve"][-1]["steps"] for r in doc["runs"])
    assert not (out / "compare_toy.partial.json").exists() and not (out / "compare_toy.runs.jsonl").exists()
    md = (out / "compare_toy.md").read_text()
    assert "Learning curves" in md and "| prompt-tuning | 8 | 2 | 2 |" in md


def test_curve_and_budget_are_exclusive():
    with pytest.raises(UserError, match="no --budget"):
        CompareConfig(curve=(200,), budget=100)
    with pytest.raises(UserError, match="--curve"):
        CompareConfig(curve=(0, 5))


def fake_doc(task: str, tag: str, accs: dict[str, float], n_test: int = 500) -> dict:
    summary = [{"method": m, "n_train": 0 if m == "zero-shot" else 100, "accuracy_mean": a, "trainable_params": 10,
                "train_time_s": 1.0, "curve": [{"steps": k, "seeds": 2, "dev_mean": a - 0.01, "dev_std": 0.0,
                                                "test_mean": a - 0.1 / k, "test_std": 0.01,
                                                "test_se": CC.binomial_se(a - 0.1 / k, n_test)} for k in (1, 2)]}
               for m, a in accs.items()]
    return {"task": task, "tag": tag, "data": {"test": n_test}, "summary": summary}


def test_plots_one_panel_per_task_shared_range_and_standard_errors(tmp_path):
    from softprompt.experiments import compare_plots as P

    docs = [fake_doc("sst2", "a", {"zero-shot": 0.8, "lora": 0.9}), fake_doc("trec", "b", {"lora": 0.96}, 100),
            fake_doc("sst2", "c", {"deep-prompt": 0.91})]
    assert list(P.by_task(docs)) == ["sst2", "trec"] and len(P.by_task(docs)["sst2"]) == 2  # one panel per task
    pts = P.points(docs[1:2], "bars")
    assert pts[0]["se"] == pytest.approx(100 * (0.96 * 0.04 / 100) ** 0.5)  # binomial SE on the doc's test rows
    lo, hi = P.y_range([(80.0, 1.8), (96.0, 2.0)])
    assert (lo, hi) == (75.0, 100.0)  # every panel gets this one range, whatever its own spread
    made = dict(P.plot(docs, tmp_path, "x"))
    assert {"x_tasks.png", "x_curves.png", "x_params.png"} <= set(made)
    assert all((tmp_path / name).read_bytes()[:4] == b"\x89PNG" for name in made)


def test_journal_settings_survive_new_default_fields_but_not_changed_values():
    from softprompt.experiments.compare_runs import comparable

    defaults = {"train": TrainConfig().to_dict(), "compare": CompareConfig().to_dict()}
    now = {"train": TrainConfig().to_dict(), "compare": CompareConfig(methods=("lora",)).to_dict()}
    old = {"train": {k: v for k, v in now["train"].items() if k != "pack"},  # written before `pack` existed
           "compare": {**{k: v for k, v in now["compare"].items() if k != "curve"},
                       "lr_sweep": {**now["compare"]["lr_sweep"], "full": [1.0]}}}  # another default for an unrun method
    assert comparable(old, defaults) == comparable(now, defaults)
    changed = {**now, "train": {**now["train"], "lr": 0.5}}
    assert comparable(changed, defaults) != comparable(now, defaults)
    assert comparable({**now, "compare": {**now["compare"], "curve": [200]}}, defaults) != comparable(now, defaults)
