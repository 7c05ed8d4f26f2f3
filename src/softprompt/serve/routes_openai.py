"""OpenAI-compatible routes: ``/v1/models``, ``/v1/completions`` and ``/v1/classify`` (chat:
``routes_chat``; how generated choices are written: ``choices``).

Each handler is parse (pure: body -> a frozen spec, 4xx on bad fields), submit (a ``Job`` whose
``prepare`` runs in the worker thread: tokenisation, prompt metadata) and render (JSON, or SSE
for a streamed completion). Nothing here touches the engine or the tokenizer: the worker
publishes ids, texts and scores as events.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from softprompt.config import GenerateConfig, ServerConfig
from softprompt.serve.choices import Completion, TextShape, respond
from softprompt.serve.context import request_id, served
from softprompt.serve.events import Failed
from softprompt.serve.protocol import (
    MIN_TEMPERATURE,
    ApiError,
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
    bad,
    prompt_list,
    prompt_of,
    refuse_unsupported,
    render_source,
)
from softprompt.serve.scheduler import Job, resolve_prompt
from softprompt.serve.streams import ClientGone, EventReader
from softprompt.store import Store

if TYPE_CHECKING:
    from softprompt.inference.engine import Engine

# ---------------------------------------------------------------- models


def model_obj(mid: str, created: int, base_id: str) -> dict:
    return {"id": mid, "object": "model", "created": created, "owned_by": "softprompt",
            "root": base_id, "parent": None if mid == base_id else base_id}


def list_models(store: Store | None, base_id: str, started: int) -> list[dict]:
    out = [model_obj(base_id, started, base_id)]
    for name in store.list_prompts() if store else []:
        try:
            created = int(store.prompt_path(name).stat().st_mtime)
        except OSError:  # removed meanwhile
            continue
        out.append({**model_obj(name, created, base_id), "kind": store.prompt_kind(name)})
    return out


async def models_list(request: Request):
    ctx = served(request)
    return {"object": "list", "data": await run_in_threadpool(list_models, ctx.store, ctx.base_id, ctx.started)}


async def models_get(model_id: str, request: Request):
    ctx = served(request)
    for m in await run_in_threadpool(list_models, ctx.store, ctx.base_id, ctx.started):
        if m["id"] == model_id:
            return m
    raise ApiError(404, f"The model {model_id!r} does not exist", param="model", code="model_not_found")


# ---------------------------------------------------------------- completions


@dataclass(frozen=True)
class GenerationSettings:
    """A request's generation settings after the server's limits: ``GenerateConfig`` without
    the seed (choice i samples with seed + i)."""

    max_new_tokens: int
    temperature: float  # 0 = greedy
    top_p: float
    repetition_penalty: float

    def config(self, seed: int) -> GenerateConfig:
        return GenerateConfig(seed=seed % 2**63, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                              top_p=self.top_p, repetition_penalty=self.repetition_penalty)


@dataclass(frozen=True)
class CompletionSpec:
    """A parsed ``/v1/completions`` body."""

    model: str  # as the client named it (echoed back)
    prompt_name: str | None  # the stored prompt it runs under; None = the plain model
    inputs: list[str | list[int]]  # OpenAI's "prompt": strings or token-id lists
    n: int
    gen: GenerationSettings
    seed: int
    stops: list[str]
    stream: bool
    echo: bool
    include_usage: bool
    logprobs: int | None = None  # k most likely alternatives per token; None = no log-probabilities

    @property
    def size(self) -> int:
        return len(self.inputs) * self.n

    @property
    def rows(self) -> int:
        """Rows it brings into the batch (none with max_tokens 0)."""
        return self.size if self.gen.max_new_tokens else 0


def sampling(body: CompletionRequest | ChatRequest, cfg: ServerConfig, max_tokens: int) -> tuple[GenerationSettings, int]:
    """The generation settings and the seed (random when not given) of a completions or chat
    request, after the server's limit on ``max_tokens``."""
    if max_tokens > cfg.max_tokens:
        param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
        raise bad(f"'{param}' is {max_tokens}; this server allows at most {cfg.max_tokens}", param,
                  "max_tokens_exceeded")
    temperature = body.temperature if body.temperature >= MIN_TEMPERATURE else 0.0
    gen = GenerationSettings(max_new_tokens=max_tokens, temperature=temperature, top_p=body.top_p,
                             repetition_penalty=body.repetition_penalty)
    return gen, random.getrandbits(31) if body.seed is None else body.seed


def parse_completion(body: CompletionRequest, cfg: ServerConfig, base_id: str) -> CompletionSpec:
    """The request's spec, after the checks the schema cannot make (the server's limits)."""
    prompt_name = prompt_of(body.model, base_id)
    refuse_unsupported(body)
    inputs = prompt_list(body.prompt)
    if body.n > cfg.max_rows or len(inputs) * body.n > cfg.max_rows:
        raise bad(f"{len(inputs)} prompts x n={body.n} is more than {cfg.max_rows} rows", "n")
    if body.max_tokens == 0 and not body.echo:
        raise bad("'max_tokens' must be at least 1 (0 only with 'echo': the prompt's log-probabilities)", "max_tokens")
    gen, seed = sampling(body, cfg, body.max_tokens)
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    include_usage = body.stream and body.stream_options is not None and body.stream_options.include_usage
    return CompletionSpec(body.model, prompt_name, inputs, body.n, gen, seed, stops, body.stream, body.echo, include_usage,
                          body.logprobs)


def checked_ids(ids: list[int], param: str, limit: int) -> list[int]:
    """``ids`` (of the field ``param``), or a 400 when there are more than ``limit``."""
    if len(ids) > limit:
        raise bad(f"'{param}' has {len(ids)} tokens; this server takes at most {limit}", param, "context_length_exceeded")
    return ids


def virtual_tokens(engine: Engine, prompt_name: str | None, cfg: ServerConfig) -> int:
    """N of the request's prompt (0 for the plain model), after the prompt's checks."""
    return 0 if prompt_name is None else resolve_prompt(engine, prompt_name, cfg.max_prompt_tokens).num_virtual_tokens


def check_not_empty(ids: Sequence[int], engine: Engine, prompt_name: str | None, cfg: ServerConfig, param: str) -> None:
    """A 400 naming ``param`` when a row has no token to continue from: its text is empty and it
    runs on the plain model or a deep prompt (a shallow prompt's virtual tokens are enough)."""
    if ids or (prompt_name is not None and resolve_prompt(engine, prompt_name, cfg.max_prompt_tokens).kind == "shallow"):
        return
    who = "the plain model" if prompt_name is None else f"the deep prompt {prompt_name!r} (it has no token of its own)"
    raise bad(f"'{param}' is empty: {who} needs some text to continue", param)


def check_cost(tokens: int, cfg: ServerConfig) -> None:
    if tokens > cfg.max_request_tokens:
        raise bad(f"the request would take {tokens} tokens of model work; this server allows at most "
                  f"{cfg.max_request_tokens} per request", None, "request_too_large")


def completion_rows(spec: CompletionSpec, cfg: ServerConfig, engine: Engine) -> tuple[list, dict]:
    """Worker side: the spec's ``GenerateRequest``s, plus the echoed texts (with ``logprobs``
    their tokens' log-probabilities, through the scoring forward) and the prompt token count."""
    from softprompt import chat
    from softprompt.inference.engine import GenerateRequest, PromptLogprobRow
    from softprompt.serve.logprob_json import pieces

    tok, limit = engine.lm.tokenizer, cfg.max_prompt_tokens
    vocab, ids = len(tok), []
    for i, p in enumerate(spec.inputs):
        param = "prompt" if len(spec.inputs) == 1 else f"prompt[{i}]"
        if isinstance(p, str):
            ids.append(checked_ids(chat.encode_text(tok, p), param, limit))  # text: special-token strings stay text
        elif any(not 0 <= t < vocab for t in p) or len(p) > limit:
            raise bad(f"'{param}': token ids must be in [0, {vocab}), at most {limit}", param)
        else:
            ids.append(list(p))
        check_not_empty(ids[-1], engine, spec.prompt_name, cfg, param)
    n_virtual = virtual_tokens(engine, spec.prompt_name, cfg)
    check_cost(sum(n_virtual + len(x) + spec.gen.max_new_tokens for x in ids) * spec.n, cfg)
    rows = [GenerateRequest("", spec.prompt_name, spec.gen.config(spec.seed + c), token_ids=tuple(x),
                            logprobs=spec.logprobs) for x in ids for c in range(spec.n)
            if spec.rows]
    info = {"echoes": [tok.decode(x, skip_special_tokens=True) if spec.echo else "" for x in ids],
            "prompt_tokens": sum(len(x) for x in ids)}
    if spec.echo and spec.logprobs is not None:
        if engine.is_encoder_decoder:
            raise bad("'echo' with 'logprobs' needs a decoder-only model", "echo")
        lps = engine.prompt_logprobs([PromptLogprobRow(tuple(x), spec.prompt_name, spec.logprobs) for x in ids])
        info["echo_pieces"] = [pieces(tok, x, lp) for x, lp in zip(ids, lps, strict=True)]
    return rows, info


async def completions(request: Request, body: CompletionRequest):
    ctx = served(request)
    spec = parse_completion(body, ctx.cfg, ctx.base_id)
    job = Job("generate", partial(completion_rows, spec, ctx.cfg), spec.rows, spec.stops, request_id(request))
    return await respond(request, ctx, job, spec.stream, lambda reader, info: Completion(
        TextShape(spec.n, spec.logprobs is not None, info), spec.size, spec.stops, spec.model, job, reader, info,
        spec.include_usage, done=not spec.rows))


# ---------------------------------------------------------------- classification


@dataclass(frozen=True)
class ClassifySpec:
    """A parsed ``/v1/classify`` body."""

    model: str
    prompt_name: str | None  # the stored prompt (the request's "prompt" or "model"); None = the plain model
    inputs: list[str | dict]
    template: str | None  # overrides the prompt's template
    verbalizer: dict | None  # overrides the prompt's verbalizer
    normalize: bool


def parse_classify(body: ClassifyRequest, cfg: ServerConfig, base_id: str) -> ClassifySpec:
    model = body.prompt if body.prompt is not None else body.model
    prompt_name = prompt_of(model, base_id, "prompt")
    inputs = body.inputs if body.inputs is not None else body.input
    inputs = [inputs] if isinstance(inputs, (str, dict)) else inputs
    if len(inputs) > cfg.max_rows:
        raise bad(f"'inputs' has {len(inputs)} items; this server takes at most {cfg.max_rows}", "inputs")
    verbalizer = {w: w for w in body.verbalizer} if isinstance(body.verbalizer, list) else body.verbalizer
    if verbalizer is not None and len(verbalizer) > cfg.max_labels:
        raise bad(f"{len(verbalizer)} labels; this server scores at most {cfg.max_labels}", "verbalizer", "too_many_labels")
    return ClassifySpec(model, prompt_name, inputs, body.template, verbalizer, body.length_normalize)


def stored_field(name: str, meta: dict, key: str):
    """The prompt's stored ``template`` (a string) or ``verbalizer`` (label -> non-empty word), or 422."""
    value = meta.get(key) if isinstance(meta, dict) else None
    ok = value is None or (isinstance(value, str) if key == "template" else
                           isinstance(value, dict) and all(isinstance(w, str) and w for w in value.values()))
    if not ok:
        want = "a string" if key == "template" else "an object of non-empty label words"
        raise ApiError(422, f"prompt {name!r}: softprompt.json:{key} must be {want}, got {str(value)[:40]!r}",
                       param="model", code="prompt_unusable")
    return value


def classify_rows(spec: ClassifySpec, cfg: ServerConfig, engine: Engine) -> tuple[list, list[str]]:
    """Worker side: one ``ScoreRow`` per input (the prompt's metadata comes from the bank) and
    the labels; every cost limit is checked before any model work."""
    from softprompt.data import target_text
    from softprompt.inference.engine import ScoreRow

    meta = resolve_prompt(engine, spec.prompt_name, cfg.max_prompt_tokens).meta if spec.prompt_name else {}
    template = spec.template if spec.template is not None else stored_field(spec.prompt_name, meta, "template")
    verbalizer = spec.verbalizer or stored_field(spec.prompt_name, meta, "verbalizer")
    if not verbalizer:
        raise bad(f"{spec.model!r} has no verbalizer (it was not trained to classify); "
                  'send "verbalizer": {"label": "word", ...}', "verbalizer", "no_verbalizer")
    if len(verbalizer) > cfg.max_labels:
        raise bad(f"{len(verbalizer)} labels; this server scores at most {cfg.max_labels}", "verbalizer", "too_many_labels")
    labels, rows, cost = list(verbalizer), [], 0
    n_virtual = virtual_tokens(engine, spec.prompt_name, cfg)
    for i, x in enumerate(spec.inputs):
        src = render_source(template, x, i, cfg.max_template_chars)
        context = tuple(checked_ids(engine.encode(src), f"inputs[{i}]", cfg.max_prompt_tokens))
        check_not_empty(context, engine, spec.prompt_name, cfg, f"inputs[{i}]")
        targets = tuple(tuple(engine.encode(target_text(src, verbalizer[lab]))) for lab in labels)
        for lab, t in zip(labels, targets, strict=True):
            if len(t) > cfg.max_label_tokens:
                raise bad(f"the label word of {lab!r} has {len(t)} tokens; at most {cfg.max_label_tokens}",
                          "verbalizer", "label_too_long")
        cost += n_virtual + len(context) + sum(len(t) for t in targets)
        rows.append(ScoreRow(context, targets, spec.prompt_name))
    check_cost(cost, cfg)
    return rows, labels


def classification(spec: ClassifySpec, rows: list, results: list, labels: list[str]) -> dict:
    data, n_tok = [], 0
    for i, r in enumerate(results):
        lp = [v / (t if spec.normalize else 1) for v, t in zip(r.logprobs, r.n_tokens, strict=True)]
        top = max(lp)
        ex = [math.exp(v - top) for v in lp]
        probs = {lab: e / sum(ex) for lab, e in zip(labels, ex, strict=True)}
        data.append({"index": i, "label": labels[lp.index(top)], "probabilities": probs,
                     "logprobs": dict(zip(labels, r.logprobs, strict=True))})
        n_tok += len(rows[i].context)
    return {"object": "classification", "model": spec.model, "labels": labels, "data": data,
            "usage": {"prompt_tokens": n_tok, "total_tokens": n_tok}}


async def classify(request: Request, body: ClassifyRequest):
    ctx = served(request)
    spec = parse_classify(body, ctx.cfg, ctx.base_id)
    job = Job("score", partial(classify_rows, spec, ctx.cfg), len(spec.inputs), request_id=request_id(request))
    ctx.scheduler.submit(job)
    reader = EventReader(job, request, ctx.cfg.request_timeout_s)
    try:
        event = await reader.next()
    except ClientGone:
        return Response(status_code=499)
    finally:
        reader.close()
    if isinstance(event, Failed):
        raise event.error
    return classification(spec, job.rows, event.results, event.info)
