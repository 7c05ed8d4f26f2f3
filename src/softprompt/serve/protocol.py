"""The server's wire protocol: OpenAI-shaped errors and the pure request-parsing helpers.

``ApiError`` is every error a client can see; ``error_body`` is the one place its JSON shape
``{"error": {message, type, param, code}}`` is written (the app, the gate and the Ray ingress
all call it), and it cuts server paths out of the message. The helpers check request fields
and raise 400s naming the field; the body-size check and "which prompt does this request name"
are here too, so ``ray_serve.py`` reads a request exactly as the app does.

Request bodies are pydantic models (``CompletionRequest``, ``ClassifyRequest``), so
``/openapi.json`` documents every field and a type or range error is a 400 naming the field path
(``invalid``); the checks that depend on the server's limits follow in the routes. Pure: no
FastAPI, no engine, no tokenizer, so each check is testable alone and safe on the event loop.
"""

from __future__ import annotations

import re
import string
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from softprompt.config import UserError

_PATH = re.compile(r"(?<![\w.~])~?(?:/[^/\s'\"()]+){2,}/?")  # an absolute path of two or more parts


def without_paths(text: str) -> str:
    """``text`` with every absolute filesystem path cut to its last part (``/srv/store/prompts/p``
    -> ``p``): a client learns which file, never where the server keeps it."""
    return _PATH.sub(lambda m: m.group().rstrip("/").rsplit("/", 1)[-1], text)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error JSON; the message never holds a server path (``without_paths``)."""
    return {"error": {"message": without_paths(message), "type": type, "param": param, "code": code}}


class ApiError(Exception):
    """An error answered as OpenAI's error JSON with ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def with_request_id(err: ApiError, rid: str) -> ApiError:
    """``err``, and for a server fault (5xx) the request id in its message: the id the access
    log and the fault's own log line carry, so a client's report finds the traceback."""
    if err.status < 500 or not rid or rid in err.message:
        return err
    return ApiError(err.status, f"{err.message} (request id {rid})", err.type, err.param, err.code, err.headers)


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


# ---------------------------------------------------------------- request bodies (the declared contract)


MAX_TOP = 20  # OpenAI's bound on logprobs / top_logprobs: k most likely alternatives per token
MIN_TEMPERATURE = 1e-3  # below it, logits / temperature overflows; such a temperature means greedy


class _Body(BaseModel):
    """Strict JSON types (no "1" for 1, no true for 1, no NaN); unknown fields are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


def _utf8(v: str) -> str:
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("is not valid UTF-8 text (it holds a lone surrogate)") from None
    return v


Str = Annotated[str, AfterValidator(_utf8)]  # JSON strings may spell lone surrogates ("\ud800")
Text = Annotated[Str, Field(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Scalar = Str | int | float | bool
Inputs = Str | dict[Str, Scalar] | Annotated[list[Str | dict[Str, Scalar]], Field(min_length=1)]


class StreamOptions(_Body):
    include_usage: bool = False


class CompletionRequest(_Body):
    """``POST /v1/completions`` (OpenAI's legacy completions, plus ``repetition_penalty``)."""

    model: Text = Field(description="a stored prompt's name, or the plain model's id (GET /v1/models)")
    prompt: Str | Annotated[list[Str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: int = Field(16, ge=0, description="tokens to generate at most (the server's --max-tokens caps "
                                                  "it); 0 only with echo (the prompt's log-probabilities)")
    temperature: float = Field(1.0, ge=0, le=2, description=f"0 = greedy (so is anything below {MIN_TEMPERATURE:g})")
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, description="choices per prompt (prompts x n <= the server's --max-rows)")
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1, description="choice i samples with seed + i")
    stop: Text | Annotated[list[Text], Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    repetition_penalty: float = Field(1.0, ge=0.01, le=10, description="CTRL-style; 1 = off")
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP, description="each token's log-probability and the k "
                                 "most likely alternatives (with echo: the prompt's too, the first null)")
    suffix: Str | None = Field(None, description="not supported: empty or null")
    best_of: int | None = Field(None, ge=1, description="not supported: 1 or null")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="not supported: 0 or null")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="not supported: 0 or null")
    logit_bias: dict[Str, float] | None = Field(None, description="not supported: empty or null")
    user: Str | None = None


class ChatRequest(_Body):
    """``POST /v1/chat/completions``: messages through the model's chat template (plus
    ``repetition_penalty``); choice i samples with seed + i."""

    model: Text = Field(description="a stored prompt's name, or the plain model's id (GET /v1/models)")
    messages: Annotated[list[dict[Str, Any]], Field(min_length=1, description="{role, content}: roles system, "
                                                     "developer, user, assistant; content text or text parts")]
    max_tokens: int | None = Field(None, ge=1, description="default: the server's --max-tokens")
    max_completion_tokens: int | None = Field(None, ge=1, description="the same as max_tokens (it wins)")
    temperature: float = Field(1.0, ge=0, le=2, description=f"0 = greedy (so is anything below {MIN_TEMPERATURE:g})")
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, description="choices (<= the server's --max-rows)")
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: Text | Annotated[list[Text], Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP, description="needs logprobs: true")
    repetition_penalty: float = Field(1.0, ge=0.01, le=10, description="CTRL-style; 1 = off")
    response_format: dict[Str, Any] | None = Field(None, description="only {'type': 'text'}")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="not supported: 0 or null")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="not supported: 0 or null")
    logit_bias: dict[Str, float] | None = Field(None, description="not supported: empty or null")
    tools: Any = Field(None, description="not supported")
    tool_choice: Any = Field(None, description="not supported")
    functions: Any = Field(None, description="not supported")
    function_call: Any = Field(None, description="not supported")
    audio: Any = Field(None, description="not supported")
    user: Str | None = None


class ClassifyRequest(_Body):
    """``POST /v1/classify``: label probabilities with a prompt's template and verbalizer."""

    prompt: Text | None = Field(None, description="a stored prompt's name or the plain model's id")
    model: Text | None = Field(None, description="the same as 'prompt' (one of them is required)")
    inputs: Inputs | None = Field(None, description="texts, or objects of the template's fields (--max-rows of them)")
    input: Inputs | None = Field(None, description="the same as 'inputs'")
    template: Str | None = Field(None, description="overrides the prompt's template, e.g. 'Review: {text}'")
    verbalizer: Annotated[dict[Str, Text], Field(min_length=1)] | Annotated[list[Text], Field(min_length=1)] | None = (
        Field(None, description="label -> label word; overrides the prompt's"))
    length_normalize: bool = Field(False, description="divide each label's log-probability by its tokens")

    @model_validator(mode="after")
    def _named(self):
        if self.prompt is None and self.model is None:
            raise ValueError("'prompt' (or 'model') is required")
        if self.inputs is None and self.input is None:
            raise ValueError("'inputs' is required")
        return self


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """Every error answer: OpenAI's shape."""

    error: ErrorDetail


_UNION_TAG = re.compile(r"[\[(]|^(str|int|float|bool|none|constrained-\w+)$")  # pydantic's names of union members


def invalid(errors: list[dict]) -> ApiError:
    """A request-validation failure as one 400 naming the field path (``stop[1]``, ``stream_options``).

    Of a union's per-member errors, the most specific one is reported (a bad value over a bad
    type, the deepest path).
    """
    if not errors:
        return bad("invalid request", None)
    e = max(errors, key=lambda x: (not x["type"].endswith(("_type", "_parsing")), len(x.get("loc", ()))))
    loc = [x for x in e.get("loc", ())[1:] if isinstance(x, int) or not _UNION_TAG.search(x)]
    param = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc).lstrip(".") or None
    kind = e["type"]
    if kind == "json_invalid" or (param is None and kind in ("model_attributes_type", "dict_type", "model_type")):
        detail = e.get("ctx", {}).get("error", "") if kind == "json_invalid" else "it must be a JSON object"
        return bad(f"the request body is not valid JSON: {detail}".rstrip(": "), None, "invalid_json")
    code = ("missing_required_parameter" if kind == "missing" else
            "invalid_type" if kind.endswith(("_type", "_parsing")) else "invalid_value")
    where = f"'{param}'" if param else "the request"
    return bad(f"invalid {where}: {e.get('msg', 'bad value')}", param, code)


# ---------------------------------------------------------------- checks beyond the schema


CHAT_UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "audio")


def refuse_unsupported(body: CompletionRequest | ChatRequest) -> None:
    """A 400 naming the first parameter given that this server does not implement."""
    for key, ok in (("suffix", lambda v: v in (None, "")), ("best_of", lambda v: v in (None, 1)),
                    ("frequency_penalty", lambda v: v in (None, 0)), ("presence_penalty", lambda v: v in (None, 0)),
                    ("logit_bias", lambda v: not v), *((k, lambda v: v is None) for k in CHAT_UNSUPPORTED),
                    ("response_format", lambda v: v in (None, {"type": "text"}))):
        if not ok(getattr(body, key, None)):
            hint = " (use the extension 'repetition_penalty')" if key.endswith("_penalty") else ""
            raise bad(f"'{key}' is not supported by this server{hint}", key, "unsupported_parameter")


def prompt_list(p) -> list[str | list[int]]:
    """OpenAI ``prompt`` (validated): a string, strings, a token list or token lists -> a list of inputs."""
    if isinstance(p, str):
        return [p]
    return [p] if isinstance(p[0], int) else list(p)


def render_source(template: str | None, x, i: int, limit: int) -> str:
    """Fill the prompt's template with one classify input (a string, or an object of fields).

    The result may have at most ``limit`` characters; a format spec cannot ask for more (a
    width like ``{text:>20000000}`` is refused before anything is built).
    """
    param = f"inputs[{i}]"
    if template is None:
        if not isinstance(x, str):
            raise bad("this prompt has no template: inputs must be strings", param)
        return check_size(x, limit, param)
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise bad(f"the template {template[:60]!r} is not a format string: {e}", "template") from None
    for _, _, spec, _ in parts:
        if spec and ("{" in spec or any(int(w) > limit for w in re.findall(r"\d+", spec))):
            raise bad(f"the template's format spec {spec[:40]!r} asks for more than {limit} characters", "template")
    fields = [f for _, f, _, _ in parts if f]
    if isinstance(x, str):
        if len(set(fields)) > 1:
            raise bad(f"the template needs the fields {sorted(set(fields))}: send objects", param)
        x = {fields[0]: x} if fields else {}
    if not isinstance(x, dict):
        raise bad("inputs must be strings or objects of template fields", param)
    try:
        return check_size(template.format_map({k: str(v) for k, v in x.items()}), limit, param)
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
        raise bad(f"cannot fill the template {template[:60]!r}: missing or bad field {e}", param) from None


def check_size(text: str, limit: int, param: str) -> str:
    if len(text) > limit:
        raise bad(f"'{param}' is {len(text)} characters after its template; at most {limit}", param, "input_too_long")
    return text
