"""``softprompt eval``: label scoring, ensembles, generation metrics, recipes and their errors.

Relational checks: the engine's classification agrees with the training-time scorer, the
ensemble is the mean of the single-prompt probabilities, and the generation loss equals the
target log-likelihood computed by ``forward.sequence_logprobs``.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import file_examples

from softprompt import data as D
from softprompt import evaluate as EV
from softprompt import forward, metrics
from softprompt.config import DataConfig, EvalConfig
from softprompt.inference.engine import Engine

pytestmark = pytest.mark.usefixtures("one_thread")

TEMPLATE = "Review: {text}\nSentiment:"
VERB = {"0": "bad", "1": "good"}


def run_cli(capsys, main, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def add_prompts(st, lm, names=("a", "b", "c"), **meta) -> None:
    g = torch.Generator().manual_seed(5)
    for k, name in enumerate(names):
        st.save_prompt((name), torch.randn(3 + k, lm.hidden_size, generator=g),
                          {"base_model": {"fingerprint": lm.fingerprint}, **meta})


def examples(lm, toy_csv, limit=12):
    cfg = DataConfig(path=str(toy_csv), template=TEMPLATE, target_column="label", verbalizer=VERB)
    return file_examples(lm.tokenizer, cfg, str(toy_csv), limit)


def test_eval_cli_plain_and_prompt_with_stored_template(tiny_lm, toy_csv, capsys, cli_main, sp_store):
    base = ["eval", "--model", str(tiny_lm.path), "--data", str(toy_csv), "--limit", "10"]
    code, out, _ = run_cli(capsys, cli_main, *base, "--template", TEMPLATE, "--target-column", "label", "--verbalizer", "0=bad,1=good")
    res = last_json(out)
    assert code == 0 and res["n"] == 10 and res["prompts"] == ["plain"]
    assert sum(map(sum, res["confusion"])) == 10
    hits = sum(row[i] for i, row in enumerate(res["confusion"]))  # the confusion's diagonal
    assert res["accuracy"] == pytest.approx(hits / 10)
    add_prompts(sp_store, tiny_lm, ("a",), template=TEMPLATE, target_column="label", verbalizer=VERB)
    code, out, _ = run_cli(capsys, cli_main, *base, "--prompt", "a")  # template etc. from softprompt.json
    res = last_json(out)
    assert code == 0 and res["template"] == TEMPLATE and res["prompts"] == ["a"] and res["labels"] == ["0", "1"]


def test_engine_classification_agrees_with_training_scorer(tiny_lm, toy_csv, sp_store):
    add_prompts(sp_store, tiny_lm, ("a",))
    eng = Engine(tiny_lm, store=sp_store)
    exs = examples(tiny_lm, toy_csv)
    for name in ("a", None):
        scores = EV.engine_label_scores(eng, exs, list(VERB.values()), [name])[0]
        prompt = eng.bank.get(name)[0].embeddings if name else None
        ref = metrics.label_scores(lambda b: forward.sequence_logprobs(tiny_lm.model, prompt, **b), tiny_lm.tokenizer,  # noqa: B023 - called within this iteration
                             exs, list(VERB.values()), tiny_lm.tokenizer.pad_token_id)
        torch.testing.assert_close(scores.float(), ref, atol=1e-4, rtol=0)
    norm = EV.engine_label_scores(eng, exs, ["bad", "good and great"], [None], normalize=True)[0]
    raw = EV.engine_label_scores(eng, exs, ["bad", "good and great"], [None])[0]
    n_tok = [len(t) for t in metrics.label_targets(tiny_lm.tokenizer, exs[0], ["bad", "good and great"])]
    torch.testing.assert_close(norm, raw / torch.tensor(n_tok, dtype=raw.dtype))


def test_ensemble_is_the_mean_of_single_prompt_probabilities(tiny_lm, toy_csv, capsys, cli_main, sp_store):
    add_prompts(sp_store, tiny_lm)
    eng = Engine(tiny_lm, store=sp_store)
    exs = examples(tiny_lm, toy_csv)
    words = list(VERB.values())
    joint = EV.ensemble_probs(EV.engine_label_scores(eng, exs, words, ["a", "b", "c"]))  # one mixed batch
    singles = [EV.ensemble_probs(EV.engine_label_scores(eng, exs, words, [p]))[0] for p in ("a", "b", "c")]
    assert (singles[0] - singles[1]).abs().max() > 1e-3  # the members differ
    torch.testing.assert_close(joint.mean(0), torch.stack(singles).mean(0), atol=1e-6, rtol=0)
    code, out, _ = run_cli(capsys, cli_main, "eval", "--model", str(tiny_lm.path), "--prompt", "a,b,c", "--data", str(toy_csv),
                           "--limit", "12", "--template", TEMPLATE, "--target-column", "label", "--verbalizer", "0=bad,1=good")
    res = last_json(out)
    mean_pred = torch.stack(singles).mean(0).argmax(-1)
    gold = torch.tensor([int(e.label) for e in exs])
    assert code == 0 and res["accuracy"] == pytest.approx(float((mean_pred == gold).double().mean()))
    ens = res["ensemble"]
    assert set(ens["members"]) == {"a", "b", "c"}
    member_preds = torch.stack([s.argmax(-1) for s in singles])  # (members, rows); 3 voters, 2 labels: no ties
    votes = (member_preds.sum(0) >= 2).long()
    assert ens["majority_vote"]["accuracy"] == pytest.approx(float((votes == gold).double().mean()))
    assert ens["mean_probability"]["accuracy"] == res["accuracy"]


def test_generation_task_metrics(tiny_lm, toy_csv, capsys, cli_main, sp_store):
    add_prompts(sp_store, tiny_lm, ("a",))
    code, out, _ = run_cli(capsys, cli_main, "eval", "--model", str(tiny_lm.path), "--prompt", "a", "--data", str(toy_csv),
                           "--limit", "6", "--template", TEMPLATE, "--target-column", "text", "--max-new-tokens", "4")
    res = last_json(out)
    assert code == 0 and {"n", "exact_match", "loss", "perplexity"} <= set(res) and res["n"] == 6
    # loss = -(sum of target log-likelihoods) / target tokens, by the training-time scorer
    cfg = DataConfig(path=str(toy_csv), template=TEMPLATE, target_column="text")
    exs = file_examples(tiny_lm.tokenizer, cfg, str(toy_csv), 6)
    batch = D.collate(exs, tiny_lm.tokenizer.pad_token_id)
    p = sp_store.load_prompt("a").embeddings
    lp = forward.sequence_logprobs(tiny_lm.model, p, **batch)
    n_tok = int((batch["labels"] != -100).sum())
    assert res["loss"] == pytest.approx(float(-lp.sum() / n_tok), rel=1e-4)
    assert res["perplexity"] == pytest.approx(torch.exp(torch.tensor(res["loss"])).item(), rel=1e-5)


def test_task_recipe_splits(tiny_lm, tmp_path, capsys, cli_main):
    root = tmp_path / "data"
    root.mkdir()
    for split, n in (("train", 8), ("dev", 6), ("test", 4)):
        with (root / f"{split}.txt").open("w") as f:
            for i in range(n):
                f.write(f"{i % 2} the movie was {'good' if i % 2 else 'bad'}\n")
    recipe = {"train": {"path": "train.txt"}, "eval": {"path": "dev.txt"}, "test": {"path": "test.txt"},
              "template": TEMPLATE, "target_column": "label", "verbalizer": VERB, "max_length": 64}
    (tmp_path / "toy.json").write_text(json.dumps(recipe))
    base = ["eval", "--model", str(tiny_lm.path), "--task", str(tmp_path / "toy.json"), "--data-root", str(root)]
    code, out, _ = run_cli(capsys, cli_main, *base)
    assert code == 0 and last_json(out)["n"] == 4 and last_json(out)["split"] == "test"
    code, out, _ = run_cli(capsys, cli_main, *base, "--split", "eval")
    assert code == 0 and last_json(out)["n"] == 6
    del recipe["eval"]
    (tmp_path / "toy.json").write_text(json.dumps(recipe))
    code, _, err = run_cli(capsys, cli_main, *base, "--split", "eval")
    assert code == 2 and "no 'eval' split" in err


@pytest.mark.parametrize("extra, message", [
    ([], "give --data PATH or --task NAME"),
    (["--data", "DATA", "--limit", "0"], "--limit must be positive"),
    (["--data", "DATA"], "say what to evaluate"),
    (["--data", "DATA", "--prompt", "nope", "--template", TEMPLATE, "--target-column", "label"], "not found"),
    (["--data", "DATA", "--prompt", "a,../x"], "invalid prompt name"),
    (["--data", "DATA", "--prompt", "a,b", "--template", TEMPLATE, "--target-column", "label"], "ensembles need"),
    (["--data", "missing.csv", "--template", TEMPLATE, "--target-column", "label"], "not found"),
    (["--task", "nosuchtask"], "unknown --task"),
])
def test_eval_errors_are_one_line_exit_2(tiny_lm, toy_csv, capsys, extra, message, cli_main, sp_store):
    add_prompts(sp_store, tiny_lm, ("a", "b"))
    extra = [str(toy_csv) if x == "DATA" else x for x in extra]
    code, out, err = run_cli(capsys, cli_main, "eval", "--model", str(tiny_lm.path), *extra)
    assert code == 2 and message in err and err.count("\n") == 1


def test_split_flag_is_validated_by_config():
    with pytest.raises(Exception, match="eval or test"):
        EvalConfig(split="train")



@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_single_token_label_fast_path_equals_one_row_per_label(arch, tiny_model_dir, sp_home, toy_csv):
    """One row per example with all label words read off one distribution == one row per
    (example, label word), with and without a prompt, on decoder-only and encoder-decoder models."""
    from softprompt import models

    lm = models.load(str(tiny_model_dir(arch)))
    exs = examples(lm, toy_csv)
    words = list(VERB.values())
    assert metrics.single_token_choices(lm.tokenizer, exs, words) is not None  # the fast path applies
    prompt = torch.randn(3, lm.hidden_size, generator=torch.Generator().manual_seed(1))
    for p in (None, prompt):
        rows: list[int] = []

        def score(b, p=p, rows=rows):
            rows.append(b["input_ids"].shape[0])
            return forward.sequence_logprobs(lm.model, p, **b)

        fast = metrics.label_scores(score, lm.tokenizer, exs, words, lm.tokenizer.pad_token_id, batch_size=5)
        n_fast, rows[:] = sum(rows), []
        slow = metrics.label_scores(score, lm.tokenizer, exs, words, lm.tokenizer.pad_token_id, batch_size=5, fast=False)
        assert n_fast == len(exs) and sum(rows) == len(exs) * len(words)
        assert not torch.equal(slow[:, 0], slow[:, 1])  # the labels score differently
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_multi_token_label_words_take_the_row_per_label_path(tiny_lm, toy_csv):
    exs = examples(tiny_lm, toy_csv)
    words = ["bad", "good and great"]
    assert metrics.single_token_choices(tiny_lm.tokenizer, exs, words) is None
    score = lambda b: forward.sequence_logprobs(tiny_lm.model, None, **b)  # noqa: E731
    got = metrics.label_scores(score, tiny_lm.tokenizer, exs, words, tiny_lm.tokenizer.pad_token_id)
    ref = metrics.label_scores(score, tiny_lm.tokenizer, exs, words, tiny_lm.tokenizer.pad_token_id, fast=False)
    assert torch.equal(got, ref)
    batch = D.collate(metrics.candidate_examples(tiny_lm.tokenizer, exs[0], ["good and great"]), 0)
    with pytest.raises(ValueError, match="one labelled position"):
        forward.sequence_logprobs(tiny_lm.model, None, **batch, choices=torch.tensor([[5, 6]]))
