"""Chat form: messages -> token ids through the tokenizer's own chat template.

The one place that turns chat messages into tokens, shared by training (``--chat`` rows become a
user turn and an assistant reply), generation, evaluation and the server's chat endpoint, so a
prompt trained in chat form sees exactly the tokens it is later served with. The soft prompt
still goes in front of everything: these functions return real token ids only.

Invariants:

* the template is the tokenizer's own (``tokenizer.chat_template``); nothing is guessed for a
  tokenizer without one (``UserError`` naming the model);
* the rendered text is tokenised with ``add_special_tokens=False``: templates write their own
  BOS / turn markers into the text, and adding them again would double them;
* ``chat_pair`` splits a rendered conversation at the generation prompt: the prompt ids are
  exactly what ``encode_chat(..., add_generation_prompt=True)`` gives at inference time, the
  reply ids are the assistant's text and the template's end-of-turn marker (the loss goes on
  those only).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from softprompt.config import UserError

if TYPE_CHECKING:
    from softprompt.models import LoadedModel, Tokenizer

ROLES = ("system", "user", "assistant")
ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role


def _content(message: dict, where: str) -> str:
    """A message's text: a string, or OpenAI's list of ``{"type": "text", "text": ...}`` parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise UserError(f"{where}.content[{j}]: only text parts ({{'type': 'text', 'text': ...}}) are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise UserError(f"{where}.content must be a string or a list of text parts")


def check_messages(messages: Sequence[dict], where: str = "messages") -> list[dict[str, str]]:
    """Validated copies ``{"role", "content"}`` of chat messages; a bad one is a ``UserError``."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise UserError(f"{where} must be a non-empty list of {{'role', 'content'}} objects")
    out = []
    for i, m in enumerate(messages):
        at = f"{where}[{i}]"
        if not isinstance(m, dict):
            raise UserError(f"{at} must be an object with 'role' and 'content'")
        role = ALIASES.get(m.get("role"), m.get("role"))
        if role not in ROLES:
            raise UserError(f"{at}: unknown role {m.get('role')!r}; expected one of {', '.join(ROLES)}")
        out.append({"role": role, "content": _content(m, at)})
    return out


def has_template(tokenizer: Tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    """The conversation as text, written by the tokenizer's chat template."""
    if not has_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or "this model"
        raise UserError(f"the tokenizer of {name} has no chat template; chat form needs an instruct (chat) model")
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja's TemplateError and the template's own raise_exception()
        raise UserError(f"the model's chat template refused these messages: {e}") from None


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens: the one way a text becomes tokens here
    (``data.encode`` is this function)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_chat(tokenizer: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation; with ``add_generation_prompt`` it ends where the assistant's
    reply begins (what the server feeds the model for ``/v1/chat/completions``)."""
    return encode(tokenizer, render(tokenizer, check_messages(messages), add_generation_prompt))


def messages_for(user: str, system: str | None = None, history: Sequence[dict] = ()) -> list[dict[str, str]]:
    """One user turn (after an optional system message and earlier turns)."""
    head = [{"role": "system", "content": system}] if system else []
    return head + list(history) + [{"role": "user", "content": user}]


def chat_pair(tokenizer: Tokenizer, user: str, reply: str, system: str | None = None) -> tuple[str, list[int], list[int]]:
    """(prompt text, prompt ids, reply ids) of one exchange; the reply ids carry the loss.

    The prompt is rendered with the generation prompt, the whole exchange without it; the reply
    is the text the whole exchange adds after the prompt, trailing whitespace removed (it ends
    with the template's end-of-turn marker, which teaches the prompt to stop).
    """
    msgs = messages_for(user, system)
    prompt = render(tokenizer, msgs, add_generation_prompt=True)
    whole = render(tokenizer, msgs + [{"role": "assistant", "content": reply}], add_generation_prompt=False)
    if not whole.startswith(prompt):
        raise UserError("the model's chat template renders an assistant turn that does not continue its own "
                        "generation prompt; chat form cannot separate the reply from the prompt")
    return prompt, encode(tokenizer, prompt), encode(tokenizer, whole[len(prompt):].rstrip())


def stop_ids(tokenizer: Tokenizer) -> list[int]:
    """Token ids that end an assistant turn: EOS, and the last token of a rendered reply (the
    template's end-of-turn marker, e.g. ``<|im_end|>`` or ``<end_of_turn>``)."""
    out = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if has_template(tokenizer):
        try:
            _, _, reply = chat_pair(tokenizer, "hi", "ok")
        except UserError:
            reply = []
        marks = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
        if reply and reply[-1] in marks and reply[-1] not in out:
            out.append(reply[-1])
    return out


def stop_tokens(lm: LoadedModel) -> frozenset[int]:
    """Tokens that end a generation, as ``model.generate`` stops: the tokenizer's EOS, the
    model's ``generation_config.eos_token_id`` (one id or several, e.g. Llama 3's end of turn),
    and the chat template's end-of-turn marker (``chat.stop_ids``)."""
    ids = set(stop_ids(lm.tokenizer))
    eos = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    return frozenset(ids)
