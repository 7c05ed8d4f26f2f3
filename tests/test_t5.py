"""Encoder-decoder models (a tiny random T5): the prompt goes in front of the encoder input.

No pretrained T5 is available offline, so these check the mechanics relationally: our loss and
scores equal T5's own forward on ``[P][x]`` row by row, our decode loop equals
``model.generate`` (plain and with ``inputs_embeds``), mixed batches equal single runs, and
training moves the loss down.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import file_examples

from softprompt import data as D
from softprompt import models
from softprompt.config import DataConfig, GenerateConfig, PromptConfig, TrainConfig
from softprompt.forward import prompt_loss, seq2seq, sequence_logprobs
from softprompt.inference.engine import Engine, GenerateRequest, ScoreRequest
from softprompt.training import tune as TR

pytestmark = pytest.mark.usefixtures("one_thread")

TEMPLATE = "Review: {text}\nSentiment:"


@pytest.fixture
def t5(tiny_model_dir, sp_home):
    return models.load(str(tiny_model_dir("t5")))


def rand_prompt(lm, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, lm.hidden_size, generator=torch.Generator().manual_seed(seed))


def toy_batch(lm, toy_csv, n=6):
    cfg = DataConfig(path=str(toy_csv), template=TEMPLATE, target_column="label", verbalizer={"0": "bad", "1": "good"})
    return D.collate(file_examples(lm.tokenizer, cfg, str(toy_csv), n), lm.tokenizer.pad_token_id)


def test_loss_and_scores_equal_t5_on_each_row(t5, toy_csv):
    p = rand_prompt(t5, 4)
    batch = toy_batch(t5, toy_csv)
    loss = prompt_loss(t5.model, p, batch)  # dispatched to seq2seq_loss
    lps = sequence_logprobs(t5.model, p, **batch)
    total, count = 0.0, 0
    emb = t5.model.get_input_embeddings()
    for i, (src, tgt) in enumerate(zip(*seq2seq.split_batch(batch))):
        x = torch.cat([p, emb(torch.tensor(src))])[None]  # [P][x], no padding at all
        out = t5.model(inputs_embeds=x, labels=torch.tensor([tgt]))
        total += out.loss.item() * len(tgt)
        count += len(tgt)
        assert lps[i].item() == pytest.approx(-out.loss.item() * len(tgt), abs=1e-4)
    assert loss.item() == pytest.approx(total / count, abs=1e-5)


def test_generation_equals_hf_generate_plain_and_prompted(t5, sp_store):
    eng = Engine(t5, store=sp_store)
    p = rand_prompt(t5, 5)
    eng.add_prompt("p", p)
    text, n = "the movie was good", 6
    ids = torch.tensor([t5.tokenizer(text, add_special_tokens=False)["input_ids"]])
    kw = dict(max_new_tokens=n, do_sample=False, eos_token_id=t5.tokenizer.eos_token_id, pad_token_id=0)
    with torch.no_grad():
        plain = t5.model.generate(input_ids=ids, **kw)[0, 1:].tolist()
        x = torch.cat([p, t5.model.get_input_embeddings()(ids[0])])[None]
        prompted = t5.model.generate(inputs_embeds=x, **kw)[0, 1:].tolist()
    ours = eng.generate([GenerateRequest(text, None, GenerateConfig(max_new_tokens=n)),
                         GenerateRequest(text, "p", GenerateConfig(max_new_tokens=n))])
    assert plain != prompted  # the prompt changes the output
    assert ours[0].token_ids == plain[: len(ours[0].token_ids)]
    assert ours[1].token_ids == prompted[: len(ours[1].token_ids)]


def test_mixed_batch_equals_single_runs(t5, sp_store):
    eng = Engine(t5, store=sp_store)
    eng.add_prompt("a", rand_prompt(t5, 3, 1))
    eng.add_prompt("b", rand_prompt(t5, 7, 2))
    reqs = [GenerateRequest("the movie was", "a", GenerateConfig(max_new_tokens=3)),
            GenerateRequest("a wonderful film with a great story", "b", GenerateConfig(max_new_tokens=7)),
            GenerateRequest("who wrote", None, GenerateConfig(max_new_tokens=5, temperature=0.7, seed=1)),
            GenerateRequest("", "b", GenerateConfig(max_new_tokens=4))]
    mixed = eng.generate(reqs, return_logits=True)
    assert (mixed[0].logits[0] - eng.generate([GenerateRequest("the movie was", "b")], return_logits=True)[0].logits[0]).abs().max() > 1e-2
    for r, m in zip(reqs, mixed):
        s = eng.generate([r], return_logits=True)[0]
        assert m.token_ids == s.token_ids
        torch.testing.assert_close(m.logits, s.logits, atol=1e-5, rtol=0)
    sreq = [ScoreRequest("the movie was", (" good", " bad and boring"), "a"), ScoreRequest("who wrote", (" the sea",), None)]
    for r, m in zip(sreq, eng.score(sreq)):
        torch.testing.assert_close(torch.tensor(m.logprobs), torch.tensor(eng.score([r])[0].logprobs), atol=1e-5, rtol=0)


def test_training_lowers_the_loss_and_eval_runs(t5, toy_csv, capsys, cli_main, sp_store):
    dcfg = DataConfig(path=str(toy_csv), template=TEMPLATE, target_column="label", verbalizer={"0": "bad", "1": "good"})
    res = TR.train(t5, dcfg, PromptConfig(num_virtual_tokens=4, init="vocab"),
                      TrainConfig(epochs=3, batch_size=8, lr=0.3, patience=None), name="t5toy", store=sp_store)
    losses = [e["train_loss"] for e in res.epochs]
    assert losses[-1] < losses[0] and res.path is not None
    code = cli_main(["eval", "--model", str(t5.path), "--prompt", "t5toy", "--data", str(toy_csv), "--limit", "8"])
    out = capsys.readouterr().out
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["n"] == 8
    assert sp_store.load_prompt("t5toy").meta["template"] == TEMPLATE


def test_saved_t5_prompt_is_a_seq2seq_peft_adapter_with_our_scores(t5, tiny_model_dir, toy_csv, sp_store):
    """A T5 prompt is written as a SEQ_2_SEQ_LM adapter; PEFT puts it in front of the encoder
    input, as we do, so PEFT's loss on one row equals ours."""
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import T5ForConditionalGeneration

    p = rand_prompt(t5, 4)
    path = sp_store.save_prompt(("t5p"), p, {}, str(tiny_model_dir("t5")), t5.model.config)
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_2_SEQ_LM" and cfg["num_transformer_submodules"] == 1
    base = T5ForConditionalGeneration.from_pretrained(str(tiny_model_dir("t5")), local_files_only=True)
    peft_model = PeftModel.from_pretrained(base, str(path)).eval()
    batch = toy_batch(t5, toy_csv, n=2)
    ours = sequence_logprobs(t5.model, p, **batch)
    for i, (src, tgt) in enumerate(zip(*seq2seq.split_batch(batch))):
        with torch.no_grad():
            out = peft_model(input_ids=torch.tensor([src]), attention_mask=torch.ones(1, len(src), dtype=torch.long),
                             labels=torch.tensor([tgt]))
        assert ours[i].item() == pytest.approx(-out.loss.item() * len(tgt), abs=1e-4)
