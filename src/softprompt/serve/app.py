"""HTTP server: one frozen model serves every stored prompt, with cross-task dynamic batching.

``create_app(engine, config) -> FastAPI`` wires the pieces; ``serve(config, model)`` loads the
model once (``build_engine``, also used by the Ray Serve replicas) and runs uvicorn
(``softprompt serve``). Routes (details and examples in ``docs/serving.md``):

    GET  /                          the web page (``softprompt/web/``)
    GET  /healthz   GET /metrics    liveness; Prometheus text format
    GET  /v1/models[/{id}]          the plain model and every stored prompt (OpenAI list shape)
    POST /v1/completions            OpenAI completions; ``model`` = prompt name or the plain model
    POST /v1/chat/completions       OpenAI chat completions through the model's chat template
    POST /v1/classify               label + probabilities with the prompt's template/verbalizer
    GET  /v1/prompts[/{name}]  PUT/DELETE /v1/prompts/{name}    the prompt registry

The package, by concern: ``protocol`` (errors, request parsing), ``gate`` (key, body limit,
request ids, access log, error handlers), ``routes_openai``, ``routes_chat``, ``routes_prompts``
and ``routes_ops`` (handlers: parse, submit, render), ``scheduler`` (admission policy, the one
worker thread that owns the engine and the tokenizer), ``streams`` (event reader, streamed text,
SSE), ``prometheus`` (the ``/metrics`` text), ``uploads`` (prompt uploads), ``ray_serve`` (replicas over Ray Serve).

Invariants: only the worker thread touches the engine (bank, caches, model) and the tokenizer;
everything a client can get wrong is a 4xx with OpenAI's error JSON ``{"error": {message, type,
param, code}}``; no request can stop the worker. Top-level imports are light; FastAPI, torch
and the rest load inside functions.
"""

import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from softprompt.config import ServerConfig, UserError

if TYPE_CHECKING:
    from softprompt.inference.engine import Engine
    from softprompt.store import Store

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the app


def create_app(engine: "Engine", config: ServerConfig | None = None, make_scheduler=None):
    """The FastAPI app over ``engine``; the worker thread starts and stops with the app's lifespan.
    ``make_scheduler(engine, metrics, config)`` replaces the built-in ``Scheduler`` (the vLLM
    engine's, ``softprompt.serve.vllm``).

    Over 60 lines: the route table, one line per route with its declared responses.
    """
    try:
        from fastapi import FastAPI
        from fastapi.responses import PlainTextResponse
        from fastapi.staticfiles import StaticFiles
        from starlette.concurrency import run_in_threadpool
    except ImportError:
        raise UserError("the server needs its extra: pip install 'softprompt[serve]'") from None
    from contextlib import asynccontextmanager

    from softprompt import chat
    from softprompt.serve import routes_chat
    from softprompt.serve import routes_openai as oa
    from softprompt.serve import routes_ops as ops
    from softprompt.serve import routes_prompts as rp
    from softprompt.serve.context import Served
    from softprompt.serve.gate import Gate, install_error_handlers
    from softprompt.serve.prometheus import Metrics
    from softprompt.serve.scheduler import Scheduler

    cfg = config or ServerConfig()
    metrics = Metrics()
    sched = (make_scheduler or Scheduler)(engine, metrics, cfg)
    ctx = Served(cfg, sched, metrics, cfg.model_id or str(engine.lm.name), engine.lm.fingerprint, engine.lm.name,
                 engine.cfg.force, engine.lm.kv_shape, int(time.time()), Path(__file__).resolve().parents[1] / "web",
                 chat.has_template(engine.lm.tokenizer), engine.store)

    @asynccontextmanager
    async def lifespan(app):
        sched.start()
        log.info("ready", extra={"fields": {"model": ctx.base_id, "max_batch_rows": cfg.max_batch_rows}})
        yield
        await run_in_threadpool(sched.stop, cfg.shutdown_timeout_s)
        log.info("stopped")

    app = FastAPI(title="softprompt", version="1", lifespan=lifespan, docs_url="/docs", redoc_url=None,
                  strict_content_type=False)  # a JSON body without a Content-Type is still read as JSON
    app.state.scheduler, app.state.metrics, app.state.config, app.state.served = sched, metrics, cfg, ctx
    app.add_middleware(Gate, api_key=cfg.api_key, max_body_bytes=cfg.max_body_bytes,
                       max_upload_bytes=cfg.max_upload_bytes, metrics=metrics, error_rate=cfg.error_rate)
    install_error_handlers(app)
    if ctx.web.is_dir():
        app.mount("/web", StaticFiles(directory=ctx.web), name="web")
    errors = error_responses(cfg)
    app.add_api_route("/", ops.index, methods=["GET"], include_in_schema=False)
    app.add_api_route("/healthz", ops.healthz, methods=["GET"], responses={503: errors[503]})
    app.add_api_route("/metrics", ops.prometheus, methods=["GET"], responses=_pick(errors, 401),
                      response_class=PlainTextResponse)
    app.add_api_route("/v1/models", oa.models_list, methods=["GET"], responses=_pick(errors, 401))
    app.add_api_route("/v1/models/{model_id:path}", oa.models_get, methods=["GET"], responses=_pick(errors, 401, 404))
    work = _pick(errors, 400, 401, 404, 413, 422, 429, 500, 503, 504)
    app.add_api_route("/v1/completions", oa.completions, methods=["POST"], responses=_streamed(work))
    app.add_api_route("/v1/chat/completions", routes_chat.chat_completions, methods=["POST"], responses=_streamed(work))
    app.add_api_route("/v1/classify", oa.classify, methods=["POST"], responses=work)
    app.add_api_route("/v1/prompts", rp.prompts_list, methods=["GET"], responses=_pick(errors, 401))
    app.add_api_route("/v1/prompts/{name}", rp.prompts_get, methods=["GET"], responses=_pick(errors, 400, 401, 404))
    app.add_api_route("/v1/prompts/{name}", rp.prompts_put, methods=["PUT"], openapi_extra=rp.UPLOAD_BODY,
                      responses={**_pick(errors, 400, 401, 413, 422), 201: {"description": "a new prompt"}})
    app.add_api_route("/v1/prompts/{name}", rp.prompts_delete, methods=["DELETE"], responses=_pick(errors, 400, 401, 404))
    app.openapi = lambda: with_limits(app, cfg)
    return app


SSE_EVENT = {  # OpenAPI before 3.2: a text/event-stream schema describes one event, not the stream
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string", "description": "a JSON chunk of the answer (object '*.chunk'), an "
                                                             "error object, or '[DONE]' last"},
                   "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}}


def _streamed(work: dict) -> dict:
    """The responses of a route that answers JSON, or Server-Sent Events when streamed."""
    return {**work, 200: {"description": "the answer, or its Server-Sent Events when streamed",
                          "content": {"application/json": {}, "text/event-stream": {"schema": SSE_EVENT}}}}


def error_responses(cfg: ServerConfig) -> dict[int, dict]:
    """The error statuses the routes answer, for ``/openapi.json`` (all with OpenAI's error body)."""
    from softprompt.serve.protocol import ErrorBody

    words = {400: "a field is missing, of the wrong type or out of range (param names it)",
             401: "missing or wrong API key", 404: "no such model, prompt or route",
             413: f"body over {cfg.max_body_bytes} bytes (uploads: {cfg.max_upload_bytes}), or estimated working "
                  f"memory over {cfg.max_request_mb:g} MiB",
             422: "the prompt's files cannot be used with this model",
             429: "the queue is full (Retry-After)", 500: "a server fault; the message names the request id",
             503: "shutting down", 504: f"not finished within {cfg.request_timeout_s:g} s"}
    return {k: {"model": ErrorBody, "description": v} for k, v in words.items()}


def with_limits(app, cfg: ServerConfig) -> dict:
    """The OpenAPI document, with this server's limits written into the request schemas."""
    from fastapi.openapi.utils import get_openapi

    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schemas = doc.get("components", {}).get("schemas", {})
        for model, field, limit in (("CompletionRequest", "max_tokens", cfg.max_tokens),
                                    ("CompletionRequest", "n", cfg.max_rows)):
            if field in schemas.get(model, {}).get("properties", {}):
                schemas[model]["properties"][field]["maximum"] = limit
        app.openapi_schema = doc
    return app.openapi_schema


def _pick(errors: dict, *codes: int) -> dict:
    return {c: errors[c] for c in codes}


# ---------------------------------------------------------------- running it


def build_engine(cfg: ServerConfig, model: str | None = None, force: bool = False, device: str | None = None,
                 dtype: str | None = None, store: "Store | None" = None):
    """The model loaded once, in an ``Engine`` sized for ``cfg`` over ``store``'s prompts (``serve``
    and every Ray replica)."""
    from softprompt import models
    from softprompt.config import EngineConfig
    from softprompt.inference.engine import Engine

    return Engine(models.load(model, dtype, device, store=store),
                  EngineConfig(max_batch_rows=cfg.max_batch_rows, force=force), store)


def serve(cfg: ServerConfig, model: str | None = None, force: bool = False, device: str | None = None,
          dtype: str | None = None, store: "Store | None" = None, engine: str = "native",
          vllm_args: list[str] = (), vllm_cpus: tuple = (None, None)) -> None:
    """Load the model once and serve ``store``'s prompts until SIGINT/SIGTERM (in-flight requests
    finish first). ``engine``: "native", "vllm" or "auto" (``softprompt.serve.engines``);
    ``vllm_args``: vLLM's own engine flags, passed through; ``vllm_cpus``: (the CPU bind the
    user set for vLLM's worker, the function that sets one), from the process's edge."""
    try:
        import uvicorn
    except ImportError:
        raise UserError("the server needs its extra: pip install 'softprompt[serve]'") from None
    from softprompt.serve.gate import json_logging

    json_logging()
    from softprompt.serve import engines

    choice = engines.choose(engine, *engines.setup_facts(model, store))
    log.info("engine", extra={"fields": {"engine": choice.engine, "why": choice.reason}})
    eng = build_engine(cfg, model, force, device, dtype, store)
    make = None
    if choice.engine == "vllm":
        from softprompt.serve.vllm.launch import scheduler_factory

        make = scheduler_factory(eng, cfg, vllm_args, *vllm_cpus)
    app = create_app(eng, cfg, make)
    log.info("listening", extra={"fields": {"url": f"http://{cfg.host}:{cfg.port}/", "auth": bool(cfg.api_key)}})
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_config=None, access_log=False,
                timeout_graceful_shutdown=int(math.ceil(cfg.shutdown_timeout_s)))
