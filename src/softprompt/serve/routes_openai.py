"""OpenAI-compatible routes: ``/v1/models``, ``/v1/completions`` and ``/v1/classify``.

Each handler is parse (pure: body -> a frozen spec, 4xx on bad fields), submit (a ``Job`` whose
``prepare`` runs in the worker thread: tokenisation, prompt metadata) and render (JSON, or SSE
for a streamed completion). Nothing here touches the engine or the tokenizer: the worker
publishes ids, texts and scores as events.
"""

from __future__ import annotations

import math
import random
import time
import uuid
from dataclasses import dataclass
from functools import partial

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from softprompt.serve.context import served
from softprompt.serve.protocol import (
    MIN_TEMPERATURE,
    ApiError,
    ClassifyRequest,
    CompletionRequest,
    bad,
    prompt_list,
    prompt_of,
    refuse_unsupported,
    render_source,
)
from softprompt.serve.scheduler import Job, resolve_prompt
from softprompt.serve.streams import DONE, ClientGone, EventReader, StreamText, sse

# ---------------------------------------------------------------- models


def model_obj(mid: str, created: int, base_id: str) -> dict:
    return {"id": mid, "object": "model", "created": created, "owned_by": "softprompt",
            "root": base_id, "parent": None if mid == base_id else base_id}


def list_models(base_id: str, started: int) -> list[dict]:
    from softprompt import store

    out = [model_obj(base_id, started, base_id)]
    for name in store.list_prompts():
        try:
            created = int(store.prompt_path(name).stat().st_mtime)
        except OSError:  # removed meanwhile
            continue
        out.append({**model_obj(name, created, base_id), "kind": store.prompt_kind(name)})
    return out


async def models_list(request: Request):
    ctx = served(request)
    return {"object": "list", "data": await run_in_threadpool(list_models, ctx.base_id, ctx.started)}


async def models_get(model_id: str, request: Request):
    ctx = served(request)
    for m in await run_in_threadpool(list_models, ctx.base_id, ctx.started):
        if m["id"] == model_id:
            return m
    raise ApiError(404, f"The model {model_id!r} does not exist", param="model", code="model_not_found")


# ---------------------------------------------------------------- completions


@dataclass(frozen=True)
class CompletionSpec:
    """A parsed ``/v1/completions`` body."""

    model: str  # as the client named it (echoed back)
    prompt: str | None  # the prompt's name; None = the plain model
    inputs: list  # strings or token-id lists
    n: int
    gen: dict  # GenerateConfig fields except the seed
    seed: int
    stops: list[str]
    stream: bool
    echo: bool
    include_usage: bool

    @property
    def size(self) -> int:
        return len(self.inputs) * self.n


def parse_completion(body: CompletionRequest, cfg, base_id: str) -> CompletionSpec:
    """The request's spec, after the checks the schema cannot make (the server's limits)."""
    prompt = prompt_of(body.model, base_id)
    refuse_unsupported(body)
    inputs = prompt_list(body.prompt)
    if body.n > cfg.max_rows or len(inputs) * body.n > cfg.max_rows:
        raise bad(f"{len(inputs)} prompts x n={body.n} is more than {cfg.max_rows} rows", "n")
    if body.max_tokens > cfg.max_tokens:
        raise bad(f"'max_tokens' is {body.max_tokens}; this server allows at most {cfg.max_tokens}",
                  "max_tokens", "max_tokens_exceeded")
    temperature = body.temperature if body.temperature >= MIN_TEMPERATURE else 0.0
    gen = dict(max_new_tokens=body.max_tokens, temperature=temperature, top_p=body.top_p,
               repetition_penalty=body.repetition_penalty)
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    include_usage = body.stream and body.stream_options is not None and body.stream_options.include_usage
    return CompletionSpec(body.model, prompt, inputs, body.n, gen,
                          random.getrandbits(31) if body.seed is None else body.seed, stops, body.stream,
                          body.echo, include_usage)


def checked_ids(engine, text: str, param: str, limit: int) -> list[int]:
    """Token ids of ``text`` (worker side), or a 400 when there are more than ``limit``."""
    ids = engine.encode(text)
    if len(ids) > limit:
        raise bad(f"'{param}' has {len(ids)} tokens; this server takes at most {limit}", param, "context_length_exceeded")
    return ids


def virtual_tokens(engine, prompt: str | None, cfg) -> int:
    """N of the request's prompt (0 for the plain model), after the prompt's checks."""
    return 0 if prompt is None else resolve_prompt(engine, prompt, cfg.max_prompt_tokens).num_virtual_tokens


def check_cost(tokens: int, cfg) -> None:
    if tokens > cfg.max_request_tokens:
        raise bad(f"the request would take {tokens} tokens of model work; this server allows at most "
                  f"{cfg.max_request_tokens} per request", None, "request_too_large")


def completion_rows(spec: CompletionSpec, cfg, engine) -> tuple[list, dict]:
    """Worker side: the spec's ``GenerateRequest``s, plus the echoed texts and prompt token count."""
    from softprompt.config import GenerateConfig
    from softprompt.inference.engine import GenerateRequest

    tok, limit = engine.lm.tokenizer, cfg.max_prompt_tokens
    vocab, ids = len(tok), []
    for i, p in enumerate(spec.inputs):
        param = "prompt" if len(spec.inputs) == 1 else f"prompt[{i}]"
        if isinstance(p, str):
            ids.append(checked_ids(engine, p, param, limit))
        elif any(not 0 <= t < vocab for t in p) or len(p) > limit:
            raise bad(f"'{param}': token ids must be in [0, {vocab}), at most {limit}", param)
        else:
            ids.append(list(p))
        if not ids[-1] and spec.prompt is None:
            raise bad(f"'{param}' is empty: the plain model needs some text to continue", param)
    n_virtual = virtual_tokens(engine, spec.prompt, cfg)
    check_cost(sum(n_virtual + len(x) + spec.gen["max_new_tokens"] for x in ids) * spec.n, cfg)
    rows = [GenerateRequest("", spec.prompt, GenerateConfig(seed=(spec.seed + c) % 2**63, **spec.gen),
                            token_ids=tuple(x)) for x in ids for c in range(spec.n)]
    echoes = [tok.decode(x, skip_special_tokens=True) if spec.echo else "" for x in ids]
    return rows, {"echoes": echoes, "prompt_tokens": sum(len(x) for x in ids)}


async def completions(request: Request, body: CompletionRequest):
    ctx = served(request)
    spec = parse_completion(body, ctx.cfg, ctx.base_id)
    job = Job("generate", partial(completion_rows, spec, ctx.cfg), spec.size, spec.stops)
    ctx.scheduler.submit(job)
    reader = EventReader(job, request, ctx.cfg.request_timeout_s)
    try:
        kind, *rest = await reader.next()  # admitted, or the request's error as a plain JSON answer
        if kind == "error":
            raise rest[0]
    except (ApiError, ClientGone):
        reader.close()
        raise
    run = Completion(spec, job, reader, rest[0])
    if not spec.stream:
        return await run.whole()
    reader.close()  # from here on the streaming response notices a disconnect itself
    return StreamingResponse(run.events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class Completion:
    """Rendering one admitted completion: the texts the worker publishes, whole or as SSE."""

    def __init__(self, spec: CompletionSpec, job: Job, reader: EventReader, info: dict):
        self.spec, self.job, self.reader, self.info = spec, job, reader, info
        self.texts = [StreamText(spec.stops) for _ in range(spec.size)]
        self.head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                     "model": spec.model}

    def usage(self) -> dict:
        p, c = self.info["prompt_tokens"], sum(t.n_tokens for t in self.texts)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def advance(self) -> None:
        kind, *rest = await self.reader.next()
        if kind == "error":
            raise rest[0]
        for k, text, n_tokens, finish in rest[0] if kind == "tokens" else []:
            self.texts[k].update(text, n_tokens, finish)

    async def whole(self):
        try:
            while not all(t.finish for t in self.texts):
                await self.advance()
        except ClientGone:
            return Response(status_code=499)
        finally:
            self.reader.close()
        echoes, n = self.info["echoes"], self.spec.n
        choices = [{"index": i, "text": echoes[i // n] + t.text, "logprobs": None, "finish_reason": t.finish}
                   for i, t in enumerate(self.texts)]
        return {**self.head, "choices": choices, "usage": self.usage()}

    def chunk(self, choices: list, extra: dict | None = None) -> str:
        return sse({**self.head, "choices": choices, **(extra or {})})

    async def events(self):
        texts, sent_finish = self.texts, [False] * len(self.texts)
        try:
            if self.spec.echo:
                echoes, n = self.info["echoes"], self.spec.n
                yield self.chunk([{"index": i, "text": echoes[i // n], "logprobs": None, "finish_reason": None}
                                  for i in range(len(texts))])
            while True:
                out = []
                for i, t in enumerate(texts):
                    delta = t.delta()
                    if delta or (t.finish and not sent_finish[i]):
                        sent_finish[i] = bool(t.finish)
                        out.append({"index": i, "text": delta, "logprobs": None, "finish_reason": t.finish})
                if out:
                    yield self.chunk(out)
                if all(sent_finish):
                    break
                await self.advance()
            if self.spec.include_usage:
                yield self.chunk([], {"usage": self.usage()})
            yield DONE
        except ApiError as e:
            yield sse(e.body())
        finally:
            self.job.cancelled = not all(sent_finish)


# ---------------------------------------------------------------- classification


@dataclass(frozen=True)
class ClassifySpec:
    """A parsed ``/v1/classify`` body."""

    model: str
    prompt: str | None
    inputs: list
    template: str | None  # overrides the prompt's template
    verbalizer: dict | None  # overrides the prompt's verbalizer
    normalize: bool


def parse_classify(body: ClassifyRequest, cfg, base_id: str) -> ClassifySpec:
    model = body.prompt if body.prompt is not None else body.model
    prompt = prompt_of(model, base_id, "prompt")
    inputs = body.inputs if body.inputs is not None else body.input
    inputs = [inputs] if isinstance(inputs, (str, dict)) else inputs
    if len(inputs) > cfg.max_rows:
        raise bad(f"'inputs' has {len(inputs)} items; this server takes at most {cfg.max_rows}", "inputs")
    verbalizer = {w: w for w in body.verbalizer} if isinstance(body.verbalizer, list) else body.verbalizer
    if verbalizer is not None and len(verbalizer) > cfg.max_labels:
        raise bad(f"{len(verbalizer)} labels; this server scores at most {cfg.max_labels}", "verbalizer", "too_many_labels")
    return ClassifySpec(model, prompt, inputs, body.template, verbalizer, body.length_normalize)


def classify_rows(spec: ClassifySpec, cfg, engine) -> tuple[list, list[str]]:
    """Worker side: one ``ScoreRow`` per input (the prompt's metadata comes from the bank) and
    the labels; every cost limit is checked before any model work."""
    from softprompt.data import target_text
    from softprompt.inference.engine import ScoreRow

    meta = resolve_prompt(engine, spec.prompt, cfg.max_prompt_tokens).meta if spec.prompt else {}
    template = spec.template if spec.template is not None else meta.get("template")
    verbalizer = spec.verbalizer or meta.get("verbalizer")
    if not verbalizer:
        raise bad(f"{spec.model!r} has no verbalizer (it was not trained to classify); "
                  'send "verbalizer": {"label": "word", ...}', "verbalizer", "no_verbalizer")
    if len(verbalizer) > cfg.max_labels:
        raise bad(f"{len(verbalizer)} labels; this server scores at most {cfg.max_labels}", "verbalizer", "too_many_labels")
    labels, rows, cost = list(verbalizer), [], 0
    n_virtual = virtual_tokens(engine, spec.prompt, cfg)
    for i, x in enumerate(spec.inputs):
        src = render_source(template, x, i, cfg.max_template_chars)
        context = tuple(checked_ids(engine, src, f"inputs[{i}]", cfg.max_prompt_tokens))
        targets = tuple(tuple(engine.encode(target_text(src, verbalizer[lab]))) for lab in labels)
        for lab, t in zip(labels, targets, strict=True):
            if len(t) > cfg.max_label_tokens:
                raise bad(f"the label word of {lab!r} has {len(t)} tokens; at most {cfg.max_label_tokens}",
                          "verbalizer", "label_too_long")
        cost += n_virtual + len(context) + sum(len(t) for t in targets)
        rows.append(ScoreRow(context, targets, spec.prompt))
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
    job = Job("score", partial(classify_rows, spec, ctx.cfg), len(spec.inputs))
    ctx.scheduler.submit(job)
    reader = EventReader(job, request, ctx.cfg.request_timeout_s)
    try:
        kind, *rest = await reader.next()
    except ClientGone:
        return Response(status_code=499)
    finally:
        reader.close()
    if kind == "error":
        raise rest[0]
    results, labels = rest
    return classification(spec, job.rows, results, labels)
