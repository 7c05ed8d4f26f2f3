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
    ApiError,
    bad,
    num,
    parse_json,
    prompt_list,
    prompt_of,
    refuse_unsupported,
    render_source,
    stop_list,
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


def parse_completion(body: dict, cfg, base_id: str) -> CompletionSpec:
    prompt = prompt_of(body.get("model"), base_id)
    refuse_unsupported(body)
    inputs = prompt_list(body)
    n = num(body, "n", 1, 1, cfg.max_rows, integer=True)
    if len(inputs) * n > cfg.max_rows:
        raise bad(f"{len(inputs)} prompts x n={n} is more than {cfg.max_rows} rows", "n")
    max_tokens = num(body, "max_tokens", 16, 1, 1 << 30, integer=True)
    if max_tokens > cfg.max_tokens:
        raise bad(f"'max_tokens' is {max_tokens}; this server allows at most {cfg.max_tokens}",
                  "max_tokens", "max_tokens_exceeded")
    seed = num(body, "seed", None, -(2**63), 2**63 - 1, integer=True)
    gen = dict(max_new_tokens=max_tokens, temperature=num(body, "temperature", 1.0, 0, 2),
               top_p=num(body, "top_p", 1.0, 1e-9, 1),
               repetition_penalty=num(body, "repetition_penalty", 1.0, 0.01, 10))
    stream = bool(body.get("stream"))
    return CompletionSpec(body["model"], prompt, inputs, n, gen, random.getrandbits(31) if seed is None else seed,
                          stop_list(body), stream, bool(body.get("echo")),
                          stream and bool((body.get("stream_options") or {}).get("include_usage")))


def checked_ids(engine, text: str, param: str, limit: int) -> list[int]:
    """Token ids of ``text`` (worker side), or a 400 when there are more than ``limit``."""
    ids = engine.encode(text)
    if len(ids) > limit:
        raise bad(f"'{param}' has {len(ids)} tokens; this server takes at most {limit}", param, "context_length_exceeded")
    return ids


def completion_rows(spec: CompletionSpec, limit: int, engine) -> tuple[list, dict]:
    """Worker side: the spec's ``GenerateRequest``s, plus the echoed texts and prompt token count."""
    from softprompt.config import GenerateConfig
    from softprompt.inference.engine import GenerateRequest

    tok = engine.lm.tokenizer
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
    rows = [GenerateRequest("", spec.prompt, GenerateConfig(seed=(spec.seed + c) % 2**63, **spec.gen),
                            token_ids=tuple(x)) for x in ids for c in range(spec.n)]
    echoes = [tok.decode(x, skip_special_tokens=True) if spec.echo else "" for x in ids]
    return rows, {"echoes": echoes, "prompt_tokens": sum(len(x) for x in ids)}


async def completions(request: Request):
    ctx = served(request)
    spec = parse_completion(parse_json(await request.body()), ctx.cfg, ctx.base_id)
    job = Job("generate", partial(completion_rows, spec, ctx.cfg.max_prompt_tokens), spec.size, spec.stops)
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


def parse_classify(body: dict, cfg, base_id: str) -> ClassifySpec:
    model = body.get("prompt", body.get("model"))
    prompt = prompt_of(model, base_id, "prompt")
    inputs = body.get("inputs", body.get("input"))
    inputs = [inputs] if isinstance(inputs, (str, dict)) else inputs
    if not isinstance(inputs, list) or not inputs or len(inputs) > cfg.max_rows:
        raise bad(f"'inputs' must be a list of 1 to {cfg.max_rows} strings or objects", "inputs")
    template, verbalizer = body.get("template"), body.get("verbalizer")
    if template is not None and not isinstance(template, str):
        raise bad("'template' must be a string", "template")
    if isinstance(verbalizer, list):
        verbalizer = {w: w for w in verbalizer}
    if verbalizer is not None and (not isinstance(verbalizer, dict) or not verbalizer or
                                   not all(isinstance(w, str) and w for w in verbalizer.values())):
        raise bad("'verbalizer' must map labels to non-empty label words", "verbalizer")
    return ClassifySpec(model, prompt, inputs, template, verbalizer, bool(body.get("length_normalize", False)))


def classify_rows(spec: ClassifySpec, limit: int, engine) -> tuple[list, list[str]]:
    """Worker side: one ``ScoreRow`` per input (the prompt's metadata comes from the bank) and the labels."""
    from softprompt.data import target_text
    from softprompt.inference.engine import ScoreRow

    meta = resolve_prompt(engine, spec.prompt).meta if spec.prompt else {}
    template = spec.template if spec.template is not None else meta.get("template")
    verbalizer = spec.verbalizer or meta.get("verbalizer")
    if not verbalizer:
        raise bad(f"{spec.model!r} has no verbalizer (it was not trained to classify); "
                  'send "verbalizer": {"label": "word", ...}', "verbalizer", "no_verbalizer")
    labels = list(verbalizer)
    rows = []
    for i, x in enumerate(spec.inputs):
        src = render_source(template, x, i)
        targets = tuple(tuple(engine.encode(target_text(src, verbalizer[lab]))) for lab in labels)
        rows.append(ScoreRow(tuple(checked_ids(engine, src, f"inputs[{i}]", limit)), targets, spec.prompt))
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


async def classify(request: Request):
    ctx = served(request)
    spec = parse_classify(parse_json(await request.body()), ctx.cfg, ctx.base_id)
    job = Job("score", partial(classify_rows, spec, ctx.cfg.max_prompt_tokens), len(spec.inputs))
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
