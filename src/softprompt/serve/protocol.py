"""OpenAI-style request parsing for the server: field checks that raise 400s with OpenAI's error
shape (``batching.ApiError``), classify inputs rendered through a prompt's template, and the
streaming text of one generated choice (stop strings, partial UTF-8 held back).

Pure functions over request bodies: no FastAPI, no engine, so each check is testable alone.
"""

import json
import string

from softprompt.serve.scheduler import ApiError


def bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def num(body: dict, key: str, default, lo: float, hi: float, integer: bool = False):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        raise bad(f"'{key}' must be {'an integer' if integer else 'a number'}, got {json.dumps(v)[:40]}", key)
    if not lo <= v <= hi:
        raise bad(f"'{key}' must be between {lo} and {hi}, got {v}", key)
    return v


def prompt_list(body: dict) -> list[str | list[int]]:
    """OpenAI ``prompt``: a string, a list of strings, a token list, or a list of token lists."""
    p = body.get("prompt")
    if isinstance(p, str):
        return [p]
    if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        return p
    if isinstance(p, list) and p and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
        return [p]
    if isinstance(p, list) and p and all(isinstance(x, list) and all(isinstance(t, int) for t in x) for x in p):
        return p
    raise bad("'prompt' must be a string, a list of strings or a list of token ids", "prompt", "invalid_type")


def stop_list(body: dict) -> list[str]:
    s = body.get("stop")
    stops = [] if s is None else [s] if isinstance(s, str) else s
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(x, str) and x for x in stops):
        raise bad("'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    return stops


def refuse_unsupported(body: dict) -> None:
    for key, ok in (("logprobs", lambda v: v in (None, 0)), ("suffix", lambda v: v in (None, "")),
                    ("best_of", lambda v: v in (None, 1)), ("frequency_penalty", lambda v: v in (None, 0)),
                    ("presence_penalty", lambda v: v in (None, 0)), ("logit_bias", lambda v: not v)):
        if not ok(body.get(key)):
            hint = " (use the extension 'repetition_penalty')" if key.endswith("_penalty") else ""
            raise bad(f"'{key}' is not supported by this server{hint}", key, "unsupported_parameter")


def render_source(template: str | None, x, i: int) -> str:
    """Fill the prompt's template with one classify input (a string, or an object of fields)."""
    param = f"inputs[{i}]"
    if template is None:
        if not isinstance(x, str):
            raise bad("this prompt has no template: inputs must be strings", param)
        return x
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    if isinstance(x, str):
        if len(set(fields)) > 1:
            raise bad(f"the template needs the fields {sorted(set(fields))}: send objects", param)
        x = {fields[0]: x} if fields else {}
    if not isinstance(x, dict):
        raise bad("inputs must be strings or objects of template fields", param)
    try:
        return template.format_map({k: str(v) for k, v in x.items()})
    except (KeyError, IndexError, ValueError) as e:
        raise bad(f"cannot fill the template {template!r}: missing or bad field {e}", param) from None


class RowText:
    """One choice's text, decoded as tokens arrive; stop strings cut it and end the row."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tok, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.text, self.sent, self.finish = "", 0, None

    def add(self, token: int | None, finish: str | None) -> None:
        if self.finish:  # already ended on a stop string; tokens in flight are dropped
            return
        if token is not None:
            self.ids.append(token)
            self.text = self.tok.decode(self.ids, skip_special_tokens=True)
            hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
            if hits:
                self.text, self.finish = self.text[: min(hits)], "stop"
                return
        self.finish = finish

    def delta(self) -> str:
        """New text safe to send: holds back a partial UTF-8 character and a possible stop prefix."""
        end = len(self.text)
        if not self.finish:
            while end > self.sent and self.text[end - 1] == "\ufffd":
                end -= 1
            for s in self.stops:
                for n in range(min(len(s) - 1, end), 0, -1):
                    if self.text[end - n : end] == s[:n]:
                        end -= n
                        break
        end = max(end, self.sent)
        out, self.sent = self.text[self.sent : end], end
        return out
