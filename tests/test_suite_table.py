"""The six-task suite's README table (``softprompt.experiments.suite_table``): rendered from
synthetic result files, its numbers are the step-600 test accuracies' mean, sd and gap computed
here independently; partial and missing tasks say so; the README is rewritten only between its
markers, whole or not at all."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

from softprompt.config import UserError
from softprompt.experiments import compare_report
from softprompt.experiments import suite_table as ST

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import suite_readme  # noqa: E402  (benchmarks/suite_readme.py)

# (method, seed) -> test accuracy at steps 200 and 600 (step 200 differs, so a wrong point shows;
# every figure the test rounds is clear of a rounding boundary)
TREC = {("deep-prompt", 0): (0.50, 0.962), ("deep-prompt", 1): (0.52, 0.946),
        ("lora", 0): (0.40, 0.972), ("lora", 1): (0.45, 0.964),
        ("prompt-tuning", 0): (0.30, 0.934), ("prompt-tuning", 1): (0.31, 0.910)}
SST2 = {("deep-prompt", 0): (0.60, 0.912), ("lora", 0): (0.61, 0.9283)}


def doc(task: str, accs: dict, n_test: int, partial: dict | None = None) -> dict:
    runs = [{"method": m, "seed": s, "n_train": 100, "test_accuracy": a600,
             "curve": [{"steps": 200, "dev_accuracy": 0.5, "test_accuracy": a200},
                       {"steps": 600, "dev_accuracy": 0.6, "test_accuracy": a600}]}
            for (m, s), (a200, a600) in accs.items()]
    d = {"schema": compare_report.SCHEMA, "task": task, "tag": f"suite_{task}", "runs": runs,
         "data": {"test": n_test, "test_sampled_from": n_test}}
    return {**d, "partial": partial} if partial else d


@pytest.fixture
def results(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "compare_suite_trec.json").write_text(json.dumps(doc("trec", TREC, 500)))
    stale = doc("trec", {("lora", 0): (0.1, 0.1)}, 500, {"finished": 1, "planned": 6})
    (out / "compare_suite_trec.partial.json").write_text(json.dumps(stale))  # the finished file wins
    (out / "compare_suite_sst2.partial.json").write_text(
        json.dumps(doc("sst2", SST2, 1821, {"finished": 2, "planned": 6})))
    return out


def cells(text: str) -> dict[str, list[str]]:
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| task")]
    return {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in rows}


def pts(method: str, accs: dict) -> list[float]:
    return [100 * a600 for (m, _), (_, a600) in accs.items() if m == method]


def suite_lrs(results: Path) -> None:
    """The suite run's lrs on TREC's runs (0.03, 3e-3, 0.3), so another lr's file can be told apart."""
    base = json.loads((results / "compare_suite_trec.json").read_text())
    for r in base["runs"]:
        r["lr"] = {"deep-prompt": 0.03, "lora": 0.003, "prompt-tuning": 0.3}[r["method"]]
    (results / "compare_suite_trec.json").write_text(json.dumps(base))


def test_table_numbers_are_the_step_600_means_sds_and_gaps(results):
    text = ST.render(ST.load(results))
    table = cells(text)
    assert list(table)[:6] == list(ST.TASKS.values())
    trec, sst2, mr = table["TREC"], table["SST-2"], table["MR"]
    for col, method in enumerate(ST.METHODS):  # two seeds: mean ± sample sd of the step-600 points
        a = pts(method, TREC)
        assert trec[col] == f"{statistics.mean(a):.1f} ± {statistics.stdev(a):.1f}"
    assert trec[3] == "2 / 2 / 2"
    best = max(statistics.mean(pts(m, TREC)) for m in ST.PROMPTS)
    gap_trec = best - statistics.mean(pts("lora", TREC))
    assert trec[5] == f"{gap_trec:+.1f} (deep prompt)" and gap_trec < 0
    # the SE column: the binomial SE at the row's mean accuracy, on the task's test rows
    p = statistics.mean(statistics.mean(pts(m, TREC)) for m in ST.METHODS) / 100
    assert trec[4] == f"{100 * (p * (1 - p) / 500) ** 0.5:.1f} (500 rows)"
    # partial, one seed: the value alone; the method without a finished run says so
    assert sst2[:3] == [f"{pts('deep-prompt', SST2)[0]:.1f}", f"{pts('lora', SST2)[0]:.1f}", "running"]
    assert sst2[3] == "1 / 1 / 0" and "1,821 rows" in sst2[4]
    gap_sst2 = pts("deep-prompt", SST2)[0] - pts("lora", SST2)[0]
    assert sst2[5] == f"{gap_sst2:+.1f} (deep prompt)"
    assert mr[:3] == ["running"] * 3 and not any(ch.isdigit() for c in mr for ch in c)
    # the mean row: over the two tasks with LoRA and a prompt kind; the shallow prompt has one
    mean = table["mean of 2 tasks"]
    assert mean[0] == f"{statistics.mean([statistics.mean(pts('deep-prompt', TREC)), pts('deep-prompt', SST2)[0]]):.1f}"
    assert mean[2].endswith("(1 of 2 tasks)")
    assert mean[5] == f"{statistics.mean([gap_trec, gap_sst2]):+.1f}"
    status = text.splitlines()[-1]
    assert "Finished: TREC (6 runs)" in status and "SST-2 (2 of 6 runs)" in status and "MR" in status


AUTO = {"trec": [95.0, 96.4], "agnews": [90.0]}  # auto_suite's test accuracies per task (%)


def test_the_defaults_column_is_auto_suites_mean_minus_the_best_prompt_kind(results):
    (results / "auto_suite.json").write_text(json.dumps({"summary": [
        {"task": t, "auto_mean": statistics.mean(a), "auto_sd": statistics.stdev(a) if len(a) > 1 else 0.0,
         "auto_seeds": list(range(len(a)))} for t, a in AUTO.items()]}))
    table = cells(ST.render(ST.load(results), ST.load_auto(results)))
    best = max(statistics.mean(pts(m, TREC)) for m in ST.PROMPTS)
    diff = statistics.mean(AUTO["trec"]) - best
    a = AUTO["trec"]
    assert table["TREC"][6] == f"{statistics.mean(a):.1f} ± {statistics.stdev(a):.1f} (2 seeds), {diff:+.1f}"
    assert table["SST-2"][6] == "not run" and table["MR"][6] == "not run"
    assert table["AG News"][6] == "90.0 (1 seed)"  # no suite run to compare with: no difference
    assert table["mean of 2 tasks"][6] == f"{diff:+.1f} (1 task)"
    # without auto_suite.json the column says so on every row, and the README block is the same call
    assert all(row[6] in ("not run", "-") for row in cells(ST.render(ST.load(results))).values())
    readme = results.parent / "README.md"
    readme.write_text(f"{ST.START}\n{ST.END}\n")
    ST.write_readme(readme, results)
    assert ST.generated_block(readme.read_text()) == ST.render(ST.load(results), ST.load_auto(results))


def test_readme_block_is_replaced_only_between_the_markers(results, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# top\n\nbefore\n\n{ST.START}\nold table\n{ST.END}\n\nafter\n")
    ST.write_readme(readme, results)
    text = readme.read_text()
    assert text.startswith("# top\n\nbefore\n\n") and text.endswith(f"{ST.END}\n\nafter\n")
    assert "old table" not in text and ST.generated_block(text) == ST.render(ST.load(results))
    ST.write_readme(readme, results)
    assert readme.read_text() == text  # idempotent


FULL = {("full", 0): (0.55, 0.968), ("full", 1): (0.56, 0.952)}  # full fine-tuning on TREC


def test_full_fine_tuning_sentence_gives_its_mean_and_the_best_prompt_kinds_on_the_same_tasks(results):
    """The stretch target: full fine-tuning (``compare_suite_<task>_full.json``) where it ran, and
    the best prompt kind's mean against it over those tasks only; no file, no sentence."""
    assert "Full fine-tuning" not in ST.render(ST.load(results), {}, ST.load_full(results))
    (results / "compare_suite_trec_full.json").write_text(json.dumps({**doc("trec", FULL, 500), "tag": "suite_trec_full"}))
    line = next(x for x in ST.render(ST.load(results), {}, ST.load_full(results)).splitlines() if "Full fine" in x)
    a, best = pts("full", FULL), max(statistics.mean(pts(m, TREC)) for m in ST.PROMPTS)
    assert f"TREC {statistics.mean(a):.1f} ± {statistics.stdev(a):.1f}" in line and "SST-2" not in line
    assert line.endswith(f"mean over TREC: best prompt kind {best:.1f}, full fine-tuning {statistics.mean(a):.1f} "
                         f"({best - statistics.mean(a):+.1f}).")
    readme = results.parent / "README.md"  # the README block is the same call
    readme.write_text(f"{ST.START}\n{ST.END}\n")
    ST.write_readme(readme, results)
    assert line in readme.read_text()


# the deep prompt and LoRA on Subj, a third curve point at one epoch (900 steps)
EPOCH = {("deep-prompt", 0): 0.956, ("deep-prompt", 1): 0.946, ("lora", 0): 0.962, ("lora", 1): 0.952}


def epoch_doc(task: str, accs: dict, n_test: int) -> dict:
    runs = [{"method": m, "seed": s, "n_train": 100, "test_accuracy": a,
             "curve": [{"steps": 200, "dev_accuracy": 0.5, "test_accuracy": 0.5},
                       {"steps": 600, "dev_accuracy": 0.6, "test_accuracy": 0.6},
                       {"steps": 900, "dev_accuracy": 0.7, "test_accuracy": a}]}
            for (m, s), a in accs.items()]
    return {"schema": compare_report.SCHEMA, "task": task, "tag": f"suite_{task}_epoch", "runs": runs,
            "data": {"test": n_test, "test_sampled_from": n_test}}


def test_one_epoch_sentence_gives_the_deep_prompt_and_lora_at_the_epoch_and_their_mean_gap(results):
    """``compare_suite_<task>_epoch.json`` where it ran: both methods' last point (the epoch, its
    steps named), their difference, its mean over those tasks; the other tasks named, with their
    epoch's steps where the suite's document gives pool and batch; no file, no sentence."""
    assert "One epoch" not in ST.render(ST.load(results), {}, {}, ST.load_epoch(results))
    (results / "compare_suite_subj_epoch.json").write_text(json.dumps(epoch_doc("subj", EPOCH, 2000)))
    trec = {**doc("trec", TREC, 500), "train_config": {"batch_size": 8}}
    trec["data"]["pool"] = 4907
    (results / "compare_suite_trec.json").write_text(json.dumps(trec))
    line = next(x for x in ST.render(ST.load(results), {}, {}, ST.load_epoch(results)).splitlines() if "One epoch" in x)
    d = [100 * EPOCH[("deep-prompt", s)] for s in (0, 1)]
    lo = [100 * EPOCH[("lora", s)] for s in (0, 1)]
    gap = statistics.mean(d) - statistics.mean(lo)
    assert (f"Subj (900 steps) {statistics.mean(d):.1f} ± {statistics.stdev(d):.1f} against "
            f"{statistics.mean(lo):.1f} ± {statistics.stdev(lo):.1f} ({gap:+.1f})") in line
    assert f"mean over 1 task: {gap:+.1f}." in line
    assert "No one-epoch run: SST-2, TREC (one epoch: 614 steps), MR, MPQA, AG News." in line
    assert line in ST.block(results)  # the README block is the same call


def test_an_epoch_run_still_running_is_named_partial_with_its_runs_so_far(results):
    """``compare_suite_<task>_epoch.partial.json`` (some seeds finished): its cells are the finished
    runs, and the sentence says how many of the planned runs they are; a finished file says nothing."""
    (results / "compare_suite_subj_epoch.json").write_text(json.dumps(epoch_doc("subj", EPOCH, 2000)))
    seed0 = {k: v for k, v in EPOCH.items() if k[1] == 0}
    part = {**epoch_doc("agnews", seed0, 1000), "partial": {"finished": 2, "planned": 4}}
    (results / "compare_suite_agnews_epoch.partial.json").write_text(json.dumps(part))
    line = next(x for x in ST.block(results).splitlines() if "One epoch" in x)
    assert (f"AG News (900 steps; partial: 2 of 4 runs) {100 * seed0[('deep-prompt', 0)]:.1f} against "
            f"{100 * seed0[('lora', 0)]:.1f}") in line
    assert "Subj (900 steps) " in line and line.count("partial") == 1


def test_a_run_that_collapsed_to_one_label_is_named_and_left_out_of_the_second_mean(results):
    """A LoRA run that predicted one label for every test row (a diverged run) is named with its
    seed and accuracy, and the mean difference is also given over the tasks without one."""
    (results / "compare_suite_subj_epoch.json").write_text(json.dumps(epoch_doc("subj", EPOCH, 2000)))
    broken = {**EPOCH, ("lora", 1): 0.52}
    mpqa = epoch_doc("mpqa", broken, 2000)
    for r in mpqa["runs"]:  # rows: true labels; the collapsed run predicts label 0 only
        r["confusion"] = [[520, 0], [480, 0]] if (r["method"], r["seed"]) == ("lora", 1) else [[480, 20], [30, 470]]
    (results / "compare_suite_mpqa_epoch.json").write_text(json.dumps(mpqa))
    line = next(x for x in ST.block(results).splitlines() if "One epoch" in x)
    assert [r["seed"] for r in ST.collapsed(mpqa, "lora")] == [1] and ST.collapsed(mpqa, "deep-prompt") == []
    subj = statistics.mean(100 * EPOCH[("deep-prompt", s)] - 100 * EPOCH[("lora", s)] for s in (0, 1))
    both = statistics.mean(100 * broken[("deep-prompt", s)] - 100 * broken[("lora", s)] for s in (0, 1))
    assert "predicted one label for every test row: LoRA seed 1 (52.0))" in line
    assert line.count("predicted one label") == 1  # Subj's runs have no confusion matrix here; MPQA's others are fine
    assert f"mean over 2 tasks: {statistics.mean([subj, both]):+.1f}; over the 1 without a collapsed run: {subj:+.1f}." in line


def test_each_methods_lr_at_one_epoch_is_the_one_ahead_on_dev(results):
    """Where a method also ran over the epoch at another lr (``compare_suite_<task>_epoch_<method><lr>.json``),
    its cell is the lr with the higher mean dev accuracy, and the choice is named either way; a
    partial file at another lr is not a candidate."""
    base = epoch_doc("subj", EPOCH, 2000)
    for r in base["runs"]:
        r["lr"] = 0.03 if r["method"] == "deep-prompt" else 0.003
    (results / "compare_suite_subj_epoch.json").write_text(json.dumps(base))
    better = {("lora", 0): 0.982, ("lora", 1): 0.972}
    for dev, chosen in ((0.8, True), (0.6, False)):
        alt = epoch_doc("subj", better, 2000)
        for r in alt["runs"]:
            r["lr"], r["curve"][-1]["dev_accuracy"] = 0.001, dev
        (results / "compare_suite_subj_epoch_lora1e3.json").write_text(json.dumps(alt))
        line = next(x for x in ST.block(results).splitlines() if "One epoch" in x)
        lora = [100 * (better if chosen else EPOCH)[("lora", s)] for s in (0, 1)]
        gap = statistics.mean(100 * EPOCH[("deep-prompt", s)] for s in (0, 1)) - statistics.mean(lora)
        assert f"against {statistics.mean(lora):.1f} ± {statistics.stdev(lora):.1f} (" in line
        said = "LoRA at lr 0.001, ahead of 0.003 on dev; " if chosen else "LoRA at lr 0.003, ahead of 0.001 on dev; "
        assert said in line and "deep prompt at lr" not in line
        assert f"mean over 1 task: {gap:+.1f}." in line
    deep = epoch_doc("subj", {("deep-prompt", 0): 0.990, ("deep-prompt", 1): 0.980}, 2000)
    for r in deep["runs"]:
        r["lr"], r["curve"][-1]["dev_accuracy"] = 0.01, 0.9
    (results / "compare_suite_subj_epoch_deep1e2.partial.json").write_text(json.dumps(deep))
    assert "deep prompt at lr" not in next(x for x in ST.block(results).splitlines() if "One epoch" in x)
    (results / "compare_suite_subj_epoch_deep1e2.json").write_text(json.dumps(deep))
    line = next(x for x in ST.block(results).splitlines() if "One epoch" in x)
    gap = statistics.mean([99.0, 98.0]) - statistics.mean(100 * EPOCH[("lora", s)] for s in (0, 1))
    assert "Subj (900 steps) 98.5 ± 0.7 against " in line
    assert f"(deep prompt at lr 0.01, ahead of 0.03 on dev; LoRA at lr 0.003, ahead of 0.001 on dev; {gap:+.1f})" in line
    for r in deep["runs"]:  # mean dev 0.7, as at lr 0.03: a tie
        r["curve"][-1]["dev_accuracy"] = 0.75 if r["seed"] == 0 else 0.65
    (results / "compare_suite_subj_epoch_deep1e2.json").write_text(json.dumps(deep))
    line = next(x for x in ST.block(results).splitlines() if "One epoch" in x)
    assert "deep prompt at lr 0.03, tied with 0.01 on dev, the epoch run's lr kept; " in line
    assert f"Subj (900 steps) {statistics.mean(100 * EPOCH[('deep-prompt', s)] for s in (0, 1)):.1f} ± " in line


def test_the_tables_cells_take_each_methods_lr_ahead_on_dev_at_step_600(results):
    """Where a method also ran the suite's budget at another lr (``compare_suite_<task>_lr_<method><lr>.json``),
    its cell, the gap and the means take the lr with the higher mean dev accuracy at step 600, and
    one sentence names every choice; lower on dev, the cell stays and the sentence says so."""
    suite_lrs(results)
    assert "Learning rates at step 600" not in ST.block(results)
    alt = doc("trec", {("deep-prompt", 0): (0.5, 0.974), ("deep-prompt", 1): (0.5, 0.968)}, 500)
    for dev, chosen in ((0.7, True), (0.5, False)):
        for r in alt["runs"]:
            r["lr"], r["curve"][-1]["dev_accuracy"] = 0.01, dev
        (results / "compare_suite_trec_lr_deep1e2.json").write_text(json.dumps(alt))
        text = ST.block(results)
        deep = [97.4, 96.8] if chosen else pts("deep-prompt", TREC)
        row = cells(text)["TREC"]
        assert row[0] == f"{statistics.mean(deep):.1f} ± {statistics.stdev(deep):.1f}"
        assert row[5] == f"{statistics.mean(deep) - statistics.mean(pts('lora', TREC)):+.1f} (deep prompt)"
        said = "deep prompt at lr 0.01, ahead of 0.03 on dev" if chosen else "deep prompt at lr 0.03, ahead of 0.01 on dev"
        assert f"(`compare_suite_<task>_lr_<method><lr>.json`; the cells above take the choice): TREC: {said}." in text
    (results / "compare_suite_trec_lr_lora1e3.partial.json").write_text(json.dumps(alt))  # unfinished: no candidate
    assert "LoRA at lr" not in ST.block(results)
    short = doc("trec", {("lora", 0): (0.99, 0.99), ("lora", 1): (0.99, 0.99)}, 500)
    for r in short["runs"]:  # a higher dev accuracy, but its last point is step 400: another budget
        r["lr"], r["curve"] = 0.001, [{**r["curve"][0], "steps": 400, "dev_accuracy": 0.9}]
    (results / "compare_suite_trec_lr_lora1e3.json").write_text(json.dumps(short))
    assert "LoRA at lr" not in ST.block(results) and cells(ST.block(results))["TREC"][1] == "96.8 ± 0.6"


@pytest.mark.parametrize("body", ["no markers at all\n", f"{ST.END}\nreversed\n{ST.START}\n"])
def test_without_markers_the_readme_is_left_as_it_was(results, tmp_path, body, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(body)
    with pytest.raises(UserError, match="suite-table:start"):
        ST.write_readme(readme, results)
    assert readme.read_text() == body and sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "results"]
    assert suite_readme.main(["--readme", str(readme), "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "README.md" in err and readme.read_text() == body


def test_auto_suites_own_table_gives_the_readmes_difference_on_a_rounding_boundary(results):
    """benchmarks/auto_suite.py's Markdown and the README's column format the same float: a mean
    difference of -1.05 once read -1.1 there and -1.0 here."""
    import auto_suite  # noqa: PLC0415  (benchmarks/auto_suite.py)

    best = max(statistics.mean(pts(m, TREC)) for m in ST.PROMPTS)  # 95.4, the deep prompt
    runs = [{"task": "trec", "seed": s, "test_accuracy": (best - 1.05) / 100} for s in (0, 1)]
    summary = auto_suite.summarize(runs, results, ["trec"])
    (results / "auto_suite.json").write_text(json.dumps({"summary": summary}))
    readme = cells(ST.render(ST.load(results), ST.load_auto(results)))["TREC"][6].rsplit(", ", 1)[1]
    res = {"benchmark": "auto_suite", "quick": False, "machine_note": "", "runs": [], "summary": summary}
    own = cells(auto_suite.markdown(res))["TREC"][4].split(" ")[0]
    assert own == readme and summary[0]["met"] is False


def test_auto_suite_measures_against_the_readmes_cells_with_lrs_chosen_on_dev(results):
    """Where the suite also ran a method at another lr and dev takes it, benchmarks/auto_suite.py's
    difference is against that cell, the README's, not the suite run's own; its Markdown names the choice."""
    import auto_suite  # noqa: PLC0415  (benchmarks/auto_suite.py)

    suite_lrs(results)
    alt = doc("trec", {("deep-prompt", 0): (0.5, 0.974), ("deep-prompt", 1): (0.5, 0.968)}, 500)
    for r in alt["runs"]:
        r["lr"], r["curve"][-1]["dev_accuracy"] = 0.01, 0.7  # ahead of the suite run's 0.6 on dev
    (results / "compare_suite_trec_lr_deep1e2.json").write_text(json.dumps(alt))
    runs = [{"task": "trec", "seed": s, "test_accuracy": a} for s, a in ((0, 0.952), (1, 0.956))]
    summary = auto_suite.summarize(runs, results, ["trec"])
    assert summary[0]["minus_best"] == pytest.approx(95.4 - statistics.mean([97.4, 96.8]))
    assert summary[0]["minus_best"] < 95.4 - statistics.mean(pts("deep-prompt", TREC))  # not the suite run's cell
    (results / "auto_suite.json").write_text(json.dumps({"summary": summary}))
    readme = cells(ST.block(results))["TREC"][6].rsplit(", ", 1)[1]
    res = {"benchmark": "auto_suite", "quick": False, "machine_note": "", "runs": [], "summary": summary}
    md = auto_suite.markdown(res)
    assert cells(md)["TREC"][4].split(" ")[0] == readme == f"{summary[0]['minus_best']:+.1f}"
    assert "TREC: deep prompt at lr 0.01, ahead of 0.03 on dev)" in md
