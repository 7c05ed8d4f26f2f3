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
* message content is text: a special-token string inside it (``<|im_end|>``) is tokenised as
  the characters it spells, never as the special token, so only the template writes turn
  markers and a user cannot close their turn or open a system one (transformers'
  ``sanitize_control_tokens``); plain text gets the same ids as tokenising the rendered text;
* every field is type-checked before use: roles are strings from ``ROLES`` (or ``ALIASES``),
  content a string or text parts, all valid UTF-8; a bad one is a ``MessageError`` naming its
  path (``messages[0].role``);
* ``chat_pair`` splits a rendered conversation at the generation prompt: the prompt ids are
  exactly what ``encode_chat(..., add_generation_prompt=True)`` gives at inference time, the
  reply ids are the assistant's text and the template's end-of-turn marker (the loss goes on
  those only).
"""

from __future__ import annotations

from collections.abc import Sequence

from softprompt.config import UserError

ROLES = ("system", "user", "assistant")
ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role


class MessageError(UserError):
    """A malformed chat message; ``field`` is the path of what is wrong (``messages[0].role``)."""

    def __init__(self, field: str, problem: str):
        self.field = field
        super().__init__(f"{field} {problem}")


def _text(value, where: str) -> str:
    """A string that is valid UTF-8 (JSON can spell a lone surrogate, ``"\\ud800"``), else a ``MessageError``."""
    if not isinstance(value, str):
        raise MessageError(where, f"must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise MessageError(where, "is not valid UTF-8 text (it holds a lone surrogate)") from None
    return value


def _content(message: dict, where: str) -> str:
    """A message's text: a string, or OpenAI's list of ``{"type": "text", "text": ...}`` parts."""
    content = message.get("content")
    if isinstance(content, str):
        return _text(content, f"{where}.content")
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise MessageError(at, "is not a text part: only {'type': 'text', 'text': ...} parts are supported")
            parts.append(_text(part["text"], f"{at}.text"))
        return "".join(parts)
    raise MessageError(f"{where}.content", "must be a string or a list of text parts")


def _role(message: dict, where: str) -> str:
    role = message.get("role")
    known = ", ".join((*ROLES, *ALIASES))
    if not isinstance(role, str):
        got = "missing" if role is None else f"a {type(role).__name__}"
        raise MessageError(f"{where}.role", f"must be a string, one of {known} ({got})")
    if ALIASES.get(role, role) not in ROLES:
        raise MessageError(f"{where}.role", f"is an unknown role {role[:40]!r}; expected one of {known}")
    return ALIASES.get(role, role)


def check_messages(messages: Sequence[dict], where: str = "messages") -> list[dict[str, str]]:
    """Validated copies ``{"role", "content"}`` of chat messages; a bad one is a ``MessageError``."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise MessageError(where, "must be a non-empty list of {'role', 'content'} objects")
    out = []
    for i, m in enumerate(messages):
        at = f"{where}[{i}]"
        if not isinstance(m, dict):
            raise MessageError(at, "must be an object with 'role' and 'content'")
        out.append({"role": _role(m, at), "content": _content(m, at)})
    return out


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _apply(tokenizer, messages: Sequence[dict], add_generation_prompt: bool, tokenize: bool):
    if not has_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or "this model"
        raise UserError(f"the tokenizer of {name} has no chat template; chat form needs an instruct (chat) model")
    more = {"sanitize_control_tokens": True, "return_dict": False} if tokenize else {}
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=tokenize,
                                             add_generation_prompt=add_generation_prompt, **more)
    except Exception as e:  # jinja's TemplateError, the template's raise_exception(), and (tokenize) a
        # special token that plain text also makes, which cannot be kept apart as text
        raise UserError(f"the model's chat template refused these messages: {e}") from None


def render(tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    """The conversation as text, written by the tokenizer's chat template."""
    return _apply(tokenizer, messages, add_generation_prompt, tokenize=False)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens: the one way a text becomes tokens here
    (``data.encode`` is this function)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of a client's text (a completions ``prompt``): special-token strings in it stay
    the characters they spell. A client sends special tokens as token ids, never as text."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def encode_chat(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation; with ``add_generation_prompt`` it ends where the assistant's
    reply begins (what the server feeds the model for ``/v1/chat/completions``, and the prompt
    part of a ``--chat`` training row).

    Special-token strings inside the messages stay text (``sanitize_control_tokens``); only the
    template's own markers become special ids. Without such strings the ids are those of the
    rendered text tokenised whole.
    """
    return list(_apply(tokenizer, check_messages(messages), add_generation_prompt, tokenize=True))


def messages_for(user: str, system: str | None = None, history: Sequence[dict] = ()) -> list[dict[str, str]]:
    """One user turn (after an optional system message and earlier turns)."""
    head = [{"role": "system", "content": system}] if system else []
    return head + list(history) + [{"role": "user", "content": user}]


def chat_pair(tokenizer, user: str, reply: str, system: str | None = None) -> tuple[str, list[int], list[int]]:
    """(prompt text, prompt ids, reply ids) of one exchange; the reply ids carry the loss.

    The prompt is rendered with the generation prompt, the whole exchange without it. The prompt
    ids are ``encode_chat``'s, exactly what the server feeds for the same conversation (the
    user's text stays text); the reply is the text the whole exchange adds after the prompt,
    trailing whitespace removed, tokenised whole (it is the trainer's target and ends with the
    template's end-of-turn marker, which teaches the prompt to stop).
    """
    msgs = messages_for(user, system)
    prompt = render(tokenizer, msgs, add_generation_prompt=True)
    whole = render(tokenizer, msgs + [{"role": "assistant", "content": reply}], add_generation_prompt=False)
    if not whole.startswith(prompt):
        raise UserError("the model's chat template renders an assistant turn that does not continue its own "
                        "generation prompt; chat form cannot separate the reply from the prompt")
    return prompt, encode_chat(tokenizer, msgs), encode(tokenizer, whole[len(prompt):].rstrip())


def stop_ids(tokenizer) -> list[int]:
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


def stop_tokens(lm) -> frozenset[int]:
    """Tokens that end a generation, as ``model.generate`` stops: the tokenizer's EOS, the
    model's ``generation_config.eos_token_id`` (one id or several, e.g. Llama 3's end of turn),
    and the chat template's end-of-turn marker (``chat.stop_ids``)."""
    ids = set(stop_ids(lm.tokenizer))
    eos = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    return frozenset(ids)
