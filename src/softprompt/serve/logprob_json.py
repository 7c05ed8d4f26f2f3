"""OpenAI's ``logprobs`` JSON from the engine's per-token log-probabilities.

Two shapes, as the OpenAI API writes them:

* completions (legacy): ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``,
  parallel lists; ``top_logprobs[i]`` maps token text -> log-probability for the k most likely
  tokens plus the chosen one (so up to k+1 entries, as OpenAI documents); an echoed prompt's
  first token has ``null`` in ``token_logprobs`` and ``top_logprobs``; ``text_offset[i]`` is
  where token i starts in the choice's text;
* chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
  "bytes"}]}], "refusal": null}`` with exactly k alternatives.

A token's text is its own decode (special tokens kept), so the pieces of a completion add up to
its text except where a token holds part of a UTF-8 character (it shows as U+FFFD, as in
OpenAI's answers). Pure functions over a ``decode(token_id) -> str``; the tokenizer's owner
calls them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from softprompt.inference.logprobs import TokenLogprob

Decode = Callable[[int], str]


def token_decoder(tokenizer) -> Decode:
    """One token's text, special tokens included (they are part of what the model saw or said)."""
    return lambda t: tokenizer.decode([t], skip_special_tokens=False)


def completion_logprobs(decode: Decode, tokens: Sequence[int], lps: Sequence[TokenLogprob | None],
                        offset: int = 0) -> dict:
    """The completions ``logprobs`` object for ``tokens`` starting at character ``offset``."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t, lp in zip(tokens, lps, strict=True):
        piece = decode(t)
        out["tokens"].append(piece)
        out["text_offset"].append(offset)
        offset += len(piece)
        if lp is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        top = {decode(a): v for a, v in lp.top}
        top.setdefault(piece, lp.logprob)  # the chosen token is always there
        out["token_logprobs"].append(lp.logprob)
        out["top_logprobs"].append(top)
    return out


def join_completion(parts: Sequence[dict]) -> dict:
    """Concatenate completions ``logprobs`` objects (echoed prompt, then the generated text)."""
    return {key: [x for p in parts for x in p[key]] for key in ("tokens", "token_logprobs", "top_logprobs",
                                                                "text_offset")}


def _entry(piece: str, logprob: float) -> dict:
    return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}


def chat_logprobs(decode: Decode, lps: Sequence[TokenLogprob]) -> dict:
    """The chat ``logprobs`` object of generated tokens."""
    content = [{**_entry(decode(lp.token), lp.logprob), "top_logprobs": [_entry(decode(a), v) for a, v in lp.top]}
               for lp in lps]
    return {"content": content, "refusal": None}
