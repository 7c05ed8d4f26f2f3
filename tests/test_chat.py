"""Chat formatting (chat.py): messages -> tokens through the tokenizer's own template."""

from __future__ import annotations

import pytest

from softprompt import chat
from softprompt.config import UserError


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from conftest import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("chat-tok"), chat=True)


def test_encode_chat_is_the_template_rendered_then_tokenised(tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is the capital of france"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    ids = chat.encode_chat(tok, msgs)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids("<|im_start|>") in ids  # the markers are single special tokens
    # OpenAI's list-of-parts content and the 'developer' role give the same tokens
    parts = [{"role": "developer", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
             msgs[1]]
    assert chat.encode_chat(tok, parts) == ids


def test_chat_pair_splits_at_the_generation_prompt(tok):
    prompt, p_ids, r_ids = chat.chat_pair(tok, "the movie was good", "positive", system="classify")
    assert p_ids == chat.encode_chat(tok, chat.messages_for("the movie was good", "classify"))
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert r_ids[-1] == end and tok.decode(r_ids[:-1]) == "positive"
    whole = tok.apply_chat_template(chat.messages_for("the movie was good", "classify")
                                    + [{"role": "assistant", "content": "positive"}], tokenize=False)
    assert whole.startswith(prompt) and tok.decode(p_ids + r_ids) == whole.rstrip()
    assert chat.stop_ids(tok) == [tok.eos_token_id, end]


@pytest.mark.parametrize("msgs, words", [
    ([], "non-empty list"),
    ([{"role": "tool", "content": "x"}], "unknown role 'tool'"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "only text parts"),
    (["hi"], "messages[0] must be an object"),
])
def test_bad_messages_are_one_line(tok, msgs, words):
    with pytest.raises(UserError, match=words.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        chat.encode_chat(tok, msgs)


def test_a_tokenizer_without_template_is_refused(tmp_path):
    from conftest import build_tokenizer

    plain = build_tokenizer(tmp_path)
    with pytest.raises(UserError, match="no chat template"):
        chat.encode_chat(plain, [{"role": "user", "content": "hi"}])
    assert chat.stop_ids(plain) == [plain.eos_token_id]
