"""OpenAI's ``logprobs`` JSON from the engine's per-token log-probabilities.

The worker thread (the tokenizer's owner) turns tokens into ``Piece``s: the token's own text
(special tokens included), its log-probability and its k most likely alternatives as text. The
event loop writes them in the two shapes the OpenAI API uses:

* completions (legacy): ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``,
  parallel lists; ``top_logprobs[i]`` maps token text -> log-probability for the k most likely
  tokens plus the chosen one (so up to k+1 entries, as OpenAI documents); an echoed prompt's
  first token has ``null`` in ``token_logprobs`` and ``top_logprobs``; ``text_offset[i]`` is
  where token i starts in the choice's text;
* chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
  "bytes"}]}], "refusal": null}`` with exactly k alternatives.

The pieces of a completion add up to its text except where a token holds part of a UTF-8
character (it shows as U+FFFD, as in OpenAI's answers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from softprompt.inference.logprobs import TokenLogprob

if TYPE_CHECKING:
    from softprompt.models import Tokenizer


@dataclass(frozen=True)
class Piece:
    """One token as text, with its log-probability (None: an echoed prompt's first token)."""

    text: str
    logprob: float | None = None
    top: tuple[tuple[str, float], ...] = ()  # the k most likely tokens as (text, logprob), best first


def pieces(tokenizer: Tokenizer, tokens: Sequence[int], lps: Sequence[TokenLogprob | None]) -> list[Piece]:
    """Worker side: ``tokens`` and their log-probabilities as text."""

    def text(t: int) -> str:
        return tokenizer.decode([t], skip_special_tokens=False)

    return [Piece(text(t)) if lp is None else Piece(text(t), lp.logprob, tuple((text(a), v) for a, v in lp.top))
            for t, lp in zip(tokens, lps, strict=True)]


def completion_logprobs(items: Sequence[Piece], offset: int = 0) -> dict:
    """The completions ``logprobs`` object of ``items``, the first starting at character ``offset``."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for p in items:
        out["tokens"].append(p.text)
        out["text_offset"].append(offset)
        offset += len(p.text)
        out["token_logprobs"].append(p.logprob)
        if p.logprob is None:
            out["top_logprobs"].append(None)
            continue
        top = dict(p.top)
        top.setdefault(p.text, p.logprob)  # the chosen token is always there
        out["top_logprobs"].append(top)
    return out


def _entry(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(items: Sequence[Piece]) -> dict:
    """The chat ``logprobs`` object of generated tokens."""
    return {"content": [{**_entry(p.text, p.logprob), "top_logprobs": [_entry(t, v) for t, v in p.top]}
                        for p in items], "refusal": None}
