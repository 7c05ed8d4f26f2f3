"""The server's wire protocol: OpenAI-shaped errors and the pure request-parsing helpers.

``ApiError`` is every error a client can see; ``error_body`` is the one place its JSON shape
``{"error": {message, type, param, code}}`` is written (the app, the gate and the Ray ingress
all call it). The helpers check request fields and raise 400s naming the field; the body-size
check and "which prompt does this request name" are here too, so ``ray_serve.py`` reads a
request exactly as the app does.

Pure functions over bytes and dicts: no FastAPI, no engine, no tokenizer, so each check is
testable alone and safe on the event loop.
"""

from __future__ import annotations

import json
import string

from softprompt.config import UserError


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ApiError(Exception):
    """An error answered as OpenAI's error JSON with ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit} bytes", code="body_too_large")


def body_limit(method: str, path: str, max_body: int, max_upload: int) -> int:
    """Bytes a request body may have: prompt uploads get the upload limit, the rest the JSON one."""
    return max_upload if method == "PUT" and path.startswith("/v1/prompts/") else max_body


def check_length(content_length: str | None, limit: int) -> None:
    """413 from the Content-Length header alone, before a byte of the body is read."""
    if content_length is not None and (not content_length.isdigit() or int(content_length) > limit):
        raise too_large(limit)


def parse_json(raw: bytes) -> dict:
    """A request body as a JSON object, or a 400 saying what is wrong with it."""
    try:
        body = json.loads(raw)
    except UnicodeDecodeError:
        raise bad("the request body is not UTF-8 JSON", None, "invalid_json") from None
    except json.JSONDecodeError as e:
        raise bad(f"the request body is not valid JSON: {e.msg} at position {e.pos}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_json")
    return body


def named_prompt(path: str, body: dict):
    """The model field a request names: ``model``; for ``/v1/classify`` ``prompt``, else ``model``."""
    return body.get("prompt", body.get("model")) if path == "/v1/classify" else body.get("model")


def prompt_of(model, base_id: str, param: str = "model") -> str | None:
    """The prompt name a request runs under (None = the plain model); 400/404 for bad names."""
    from softprompt import store

    if not isinstance(model, str) or not model:
        raise bad(f"'{param}' must be a prompt name or the plain model's id (GET /v1/models)", param, "invalid_type")
    if model == base_id:
        return None
    try:
        return store.check_name(model)
    except UserError:
        raise ApiError(404, f"The model {model!r} does not exist", param="model", code="model_not_found") from None


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
