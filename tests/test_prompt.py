"""Prompt initialisations: random (embedding-scaled), text, vocab, labels, prompt:NAME."""

from __future__ import annotations

import pytest
import torch

from softprompt.adapter import PromptKind
from softprompt.config import DataConfig, PromptConfig, UserError
from softprompt.prompt import COMMON_VOCAB, embedding_matrix, encode, make_prompt
from softprompt.training import tune as TR


def test_random_init_is_scaled_like_the_embeddings(tiny_lm):
    emb = embedding_matrix(tiny_lm.model).float()
    p = make_prompt(tiny_lm.model, tiny_lm.tokenizer, 64, "random", seed=0)
    assert p.shape == (64, tiny_lm.hidden_size) and p.dtype == torch.float32
    ratio = float(p.std() / emb.std())
    # the tiny model's embedding std is ~0.02, so an N(0, 1) init would give a ratio of ~50
    assert 1 / 1.5 < ratio < 1.5
    assert abs(float(p.mean() - emb.mean())) < 0.5 * float(emb.std())
    # seeded: same seed same prompt, other seed another prompt
    assert torch.equal(p, make_prompt(tiny_lm.model, tiny_lm.tokenizer, 64, "random", seed=0))
    assert not torch.equal(p, make_prompt(tiny_lm.model, tiny_lm.tokenizer, 64, "random", seed=1))


@pytest.mark.parametrize("n", [3, 11])
def test_text_init_rows_are_the_text_token_embeddings_cycled(tiny_lm, n):
    text = "the movie was good"
    ids = encode(tiny_lm.tokenizer, text)
    assert 1 < len(ids) < 11
    p = make_prompt(tiny_lm.model, tiny_lm.tokenizer, n, "text", text=text)
    emb = embedding_matrix(tiny_lm.model)
    assert p.shape == (n, tiny_lm.hidden_size)
    for i in range(n):
        assert torch.equal(p[i], emb[ids[i % len(ids)]].float())


def test_text_init_needs_text(tiny_lm):
    with pytest.raises(UserError):
        make_prompt(tiny_lm.model, tiny_lm.tokenizer, 4, "text", text="")
    with pytest.raises(UserError):
        PromptConfig(init="text")


def test_vocab_init_rows_are_embedding_rows_of_common_tokens(tiny_lm):
    emb = embedding_matrix(tiny_lm.model).float()
    top = min(COMMON_VOCAB, emb.shape[0])
    for n in (7, emb.shape[0] + 5):  # the second asks for more rows than the vocabulary has
        p = make_prompt(tiny_lm.model, tiny_lm.tokenizer, n, "vocab", seed=3)
        assert p.shape == (n, tiny_lm.hidden_size)
        # every row is exactly one embedding row among the first `top` ids
        match = (p.unsqueeze(1) == emb[:top].unsqueeze(0)).all(-1)  # (N, top)
        assert match.any(1).all()
    small = make_prompt(tiny_lm.model, tiny_lm.tokenizer, 7, "vocab", seed=3)
    assert len({tuple(r.tolist()) for r in small}) == 7  # distinct tokens when N <= vocab


def test_labels_init_starts_with_mean_label_word_embeddings(tiny_lm):
    tok, emb = tiny_lm.tokenizer, embedding_matrix(tiny_lm.model).float()
    words = ["positive", "negative"]
    p = make_prompt(tiny_lm.model, tok, 6, "labels", seed=0, label_words=words)
    assert p.shape == (6, tiny_lm.hidden_size)
    for i, w in enumerate(words):
        ids = encode(tok, " " + w)
        assert torch.allclose(p[i], emb[ids].mean(0), atol=1e-7)
    vocab_rows = (p[2:].unsqueeze(1) == emb.unsqueeze(0)).all(-1).any(1)
    assert vocab_rows.all()  # the rest is the vocab init
    with pytest.raises(UserError):
        make_prompt(tiny_lm.model, tok, 6, "labels", label_words=[])


def test_labels_init_through_train_uses_the_verbalizer(tiny_lm, toy_csv, sp_store):
    d = DataConfig(
        path=str(toy_csv),
        template="{text}",
        target_column="label",
        verbalizer={"0": "bad", "1": "good"},
    )
    p = TR.initial_prompt(tiny_lm, PromptConfig(num_virtual_tokens=4, init="labels"), d, seed=0, store=sp_store)
    emb = embedding_matrix(tiny_lm.model).float()
    assert torch.allclose(p[0], emb[encode(tiny_lm.tokenizer, " bad")].mean(0))
    assert torch.allclose(p[1], emb[encode(tiny_lm.tokenizer, " good")].mean(0))


def _save(st, name: str, prompt: torch.Tensor, lm, fingerprint: dict | None = None) -> None:
    meta = {"base_model": {"name": lm.name, "fingerprint": fingerprint or lm.fingerprint}}
    st.save_prompt((name), prompt, meta, str(lm.path), lm.model.config)


def test_prompt_init_copies_a_stored_prompt(tiny_lm, sp_store):
    src = torch.randn(5, tiny_lm.hidden_size)
    _save(sp_store, "source", src, tiny_lm)
    same = TR.initial_prompt(
        tiny_lm, PromptConfig(num_virtual_tokens=5, init="prompt:source"), DataConfig(), 0, store=sp_store
    )
    assert torch.equal(same, src)
    same[0, 0] += 1  # a copy, not a view of the stored tensor
    again = TR.initial_prompt(
        tiny_lm, PromptConfig(num_virtual_tokens=5, init="prompt:source"), DataConfig(), 0, store=sp_store
    )
    assert torch.equal(again, src)
    shorter = TR.initial_prompt(
        tiny_lm, PromptConfig(num_virtual_tokens=3, init="prompt:source"), DataConfig(), 0, store=sp_store
    )
    assert torch.equal(shorter, src[:3])
    longer = TR.initial_prompt(
        tiny_lm, PromptConfig(num_virtual_tokens=8, init="prompt:source"), DataConfig(), 0, store=sp_store
    )
    assert longer.shape == (8, tiny_lm.hidden_size) and torch.equal(longer[:5], src)


def test_prompt_init_refuses_other_models(tiny_lm, sp_store):
    _save(sp_store, "wide", torch.randn(4, tiny_lm.hidden_size + 1), tiny_lm)
    with pytest.raises(UserError, match="hidden size"):
        TR.initial_prompt(
            tiny_lm, PromptConfig(num_virtual_tokens=4, init="prompt:wide"), DataConfig(), 0, store=sp_store
        )
    other = {**tiny_lm.fingerprint, "embedding_sha256": "0" * 16}
    _save(sp_store, "foreign", torch.randn(4, tiny_lm.hidden_size), tiny_lm, fingerprint=other)
    with pytest.raises(UserError, match="--force"):
        TR.initial_prompt(
            tiny_lm, PromptConfig(num_virtual_tokens=4, init="prompt:foreign"), DataConfig(), 0, store=sp_store
        )
    forced = TR.initial_prompt(
        tiny_lm,
        PromptConfig(num_virtual_tokens=4, init="prompt:foreign"),
        DataConfig(),
        0,
        force=True, store=sp_store
    )
    assert torch.equal(forced, sp_store.load_prompt("foreign").embeddings)
    with pytest.raises(UserError, match="not found"):
        TR.initial_prompt(
            tiny_lm, PromptConfig(num_virtual_tokens=4, init="prompt:missing"), DataConfig(), 0, store=sp_store
        )


def test_bad_init_choices_are_user_errors(tiny_lm):
    with pytest.raises(UserError):
        PromptConfig(num_virtual_tokens=0)
    with pytest.raises(UserError):
        PromptConfig(init="zeros")
    with pytest.raises(UserError):
        make_prompt(tiny_lm.model, tiny_lm.tokenizer, 0, "vocab")


def test_prompt_kind_is_typed_and_round_trips_as_its_word():
    """A prompt tensor's kind is a ``PromptKind`` equal to the word configs and metadata write; the
    config's ``kind`` (which may also be ``auto``, a choice made at training) reads back the same."""
    import json

    assert PromptKind("deep") is PromptKind.DEEP and PromptKind.DEEP == "deep" and str(PromptKind.SHALLOW) == "shallow"
    cfg = PromptConfig(kind=PromptKind.DEEP)
    back = PromptConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and PromptKind(back.kind) is PromptKind.DEEP and json.dumps(cfg.to_dict()["kind"]) == '"deep"'
    with pytest.raises(UserError, match="--kind"):
        PromptConfig(kind="wide")
