"""HTTP server: one frozen model serves every stored prompt, with cross-task dynamic batching.

``create_app(engine, config) -> FastAPI``; ``serve(config, model)`` loads the model once and
runs uvicorn (``softprompt serve``). Routes (details and examples in ``docs/serving.md``):

    GET  /                          the web page (``softprompt/web/``)
    GET  /healthz   GET /metrics    liveness; Prometheus text format
    GET  /v1/models[/{id}]          the plain model and every stored prompt (OpenAI list shape)
    POST /v1/completions            OpenAI completions; ``model`` = prompt name or the plain model
    POST /v1/classify               label + probabilities with the prompt's template/verbalizer
    GET  /v1/prompts[/{name}]  PUT/DELETE /v1/prompts/{name}    the prompt registry

Batching (``batching.py``): handlers (asyncio) validate and tokenise, then queue a ``Job``
(bounded: 429 + Retry-After when full); ONE worker thread owns the ``Engine`` and runs the
classification rows of all requests as one mixed batch, and generation with continuous
batching (``engine.StepBatch``: rows join and leave between decode steps). A client that
disconnects, times out or hits a stop string has its rows dropped at the next step.

Invariants: only the worker thread touches the engine (bank, caches, model); everything a
client can get wrong is a 4xx with OpenAI's error JSON ``{"error": {message, type, param,
code}}``; no request can stop the worker. Top-level imports are light (the CLI imports
``ServerConfig`` to build its flags); FastAPI, torch and the rest load inside functions.
"""

import hmac
import json
import logging
import math
import os
import random
import time
import uuid
from pathlib import Path

from softprompt.config import ServerConfig, UserError
from softprompt.serve.protocol import (
    RowText,
    bad,
    num,
    prompt_list,
    refuse_unsupported,
    render_source,
    stop_list,
)
from softprompt.serve.scheduler import (
    ApiError,
    ClientGone,
    EventReader,
    Job,
    Metrics,
    Scheduler,
    resolve_prompt,
)
from softprompt.serve.uploads import install_prompt, prompt_info

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the app


def create_app(engine, config: ServerConfig | None = None):
    """The FastAPI app over ``engine``; the worker thread starts and stops with the app's lifespan."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import (
            FileResponse,
            JSONResponse,
            PlainTextResponse,
            Response,
            StreamingResponse,
        )
        from fastapi.staticfiles import StaticFiles
        from starlette.concurrency import run_in_threadpool
        from starlette.exceptions import HTTPException
    except ImportError:
        raise UserError("the server needs its extra: pip install 'softprompt[serve]'") from None
    from contextlib import asynccontextmanager

    from softprompt import store
    from softprompt.config import GenerateConfig
    from softprompt.data import target_text
    from softprompt.inference.engine import GenerateRequest, ScoreRow

    cfg = config or ServerConfig()
    base_id = cfg.model_id or str(engine.lm.name)
    tok = engine.lm.tokenizer
    vocab = len(tok)
    metrics = Metrics()
    sched = Scheduler(engine, metrics, cfg.max_batch_rows, cfg.max_wait_ms, cfg.max_queue, cfg.join_every)
    web = Path(__file__).resolve().parents[1] / "web"
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        sched.start()
        log.info("ready", extra={"fields": {"model": base_id, "max_batch_rows": cfg.max_batch_rows}})
        yield
        await run_in_threadpool(sched.stop, cfg.shutdown_timeout_s)
        log.info("stopped")

    app = FastAPI(title="softprompt", version="1", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.scheduler, app.state.metrics, app.state.config = sched, metrics, cfg
    app.add_middleware(Gate, cfg=cfg, metrics=metrics)
    if web.is_dir():
        app.mount("/web", StaticFiles(directory=web), name="web")

    def error(e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(ApiError)
    async def on_api_error(request, e: ApiError):
        return error(e)

    @app.exception_handler(HTTPException)
    async def on_http_error(request, e):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error(ApiError(e.status_code, str(e.detail), code=code, headers=getattr(e, "headers", None)))

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request, e):
        first = (e.errors() or [{}])[0]
        param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return error(bad(f"invalid request: {first.get('msg', 'bad value')}", param))

    @app.exception_handler(Exception)
    async def on_crash(request, e):
        log.exception("unhandled error")
        return error(ApiError(500, "internal server error", "server_error", code="internal_error"))

    async def read_json(request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except UnicodeDecodeError:
            raise bad("the request body is not UTF-8 JSON", None, "invalid_json") from None
        except json.JSONDecodeError as e:
            raise bad(f"the request body is not valid JSON: {e.msg} at position {e.pos}", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object", None, "invalid_json")
        return body

    def prompt_of(model, param: str = "model") -> str | None:
        if not isinstance(model, str) or not model:
            raise bad(f"'{param}' must be a prompt name or the plain model's id (GET /v1/models)", param, "invalid_type")
        if model == base_id:
            return None
        try:
            return store.check_name(model)
        except UserError:
            raise ApiError(404, f"The model {model!r} does not exist", param="model", code="model_not_found") from None

    def encode(text: str, param: str) -> list[int]:
        ids = engine.encode(text)
        if len(ids) > cfg.max_prompt_tokens:
            raise bad(f"'{param}' has {len(ids)} tokens; this server takes at most {cfg.max_prompt_tokens}",
                       param, "context_length_exceeded")
        return ids

    # ------------------------------------------------ pages and operations

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(web / "index.html", media_type="text/html")

    @app.get("/healthz")
    async def healthz():
        ok = sched.thread.is_alive() and not sched.stopping
        body = {"status": "ok" if ok else "unavailable", "model": base_id, "queue_depth": sched.depth(),
                "active_rows": sched.active_rows()}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        gauges = {"softprompt_queue_depth": sched.depth(), "softprompt_active_rows": sched.active_rows(),
                  "softprompt_max_batch_rows": cfg.max_batch_rows}
        try:  # the worker owns the engine: a read that races with it is skipped, not retried
            st = engine.stats()
            gauges["softprompt_prefix_cache_bytes"] = st["prefix_cache"]["bytes"]
            gauges["softprompt_resident_prompts"] = len(st["resident_prompts"])
            gauges["softprompt_resident_deep_prompts"] = st["resident_deep_prompts"]
        except RuntimeError:
            pass
        return PlainTextResponse(metrics.render(gauges), media_type="text/plain; version=0.0.4")

    # ------------------------------------------------ OpenAI-compatible

    def model_obj(mid: str, created: int) -> dict:
        return {"id": mid, "object": "model", "created": created, "owned_by": "softprompt",
                "root": base_id, "parent": None if mid == base_id else base_id}

    def list_models() -> list[dict]:
        out = [model_obj(base_id, started)]
        for name in store.list_prompts():
            try:
                created = int(store.prompt_path(name).stat().st_mtime)
            except OSError:  # removed meanwhile
                continue
            out.append({**model_obj(name, created), "kind": store.prompt_kind(name)})
        return out

    @app.get("/v1/models")
    async def models_list():
        return {"object": "list", "data": await run_in_threadpool(list_models)}

    @app.get("/v1/models/{model_id:path}")
    async def models_get(model_id: str):
        for m in await run_in_threadpool(list_models):
            if m["id"] == model_id:
                return m
        raise ApiError(404, f"The model {model_id!r} does not exist", param="model", code="model_not_found")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        prompt = prompt_of(body.get("model"))
        refuse_unsupported(body)
        prompts = prompt_list(body)
        n = num(body, "n", 1, 1, cfg.max_rows, integer=True)
        if len(prompts) * n > cfg.max_rows:
            raise bad(f"{len(prompts)} prompts x n={n} is more than {cfg.max_rows} rows", "n")
        max_tokens = num(body, "max_tokens", 16, 1, 1 << 30, integer=True)
        if max_tokens > cfg.max_tokens:
            raise bad(f"'max_tokens' is {max_tokens}; this server allows at most {cfg.max_tokens}",
                       "max_tokens", "max_tokens_exceeded")
        seed = num(body, "seed", None, -(2**63), 2**63 - 1, integer=True)
        seed = random.getrandbits(31) if seed is None else seed
        gcfg = dict(max_new_tokens=max_tokens, temperature=num(body, "temperature", 1.0, 0, 2),
                    top_p=num(body, "top_p", 1.0, 1e-9, 1), repetition_penalty=num(body, "repetition_penalty", 1.0, 0.01, 10))
        stops, stream, echo = stop_list(body), bool(body.get("stream")), bool(body.get("echo"))
        ids = []
        for i, p in enumerate(prompts):
            param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            if isinstance(p, str):
                ids.append(encode(p, param))
            elif any(not 0 <= t < vocab for t in p) or len(p) > cfg.max_prompt_tokens:
                raise bad(f"'{param}': token ids must be in [0, {vocab}), at most {cfg.max_prompt_tokens}", param)
            else:
                ids.append(list(p))
            if not ids[-1] and prompt is None:
                raise bad(f"'{param}' is empty: the plain model needs some text to continue", param)
        rows = [GenerateRequest("", prompt, GenerateConfig(seed=(seed + c) % 2**63, **gcfg), token_ids=tuple(x))
                for x in ids for c in range(n)]
        texts = [RowText(tok, stops) for _ in rows]
        echoes = [tok.decode(x, skip_special_tokens=True) if echo else "" for x in ids]
        job = Job("generate", rows, [prompt] if prompt else [])
        sched.submit(job)
        reader = EventReader(job, request, cfg.request_timeout_s)
        head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": body["model"]}

        def usage() -> dict:
            p, c = sum(len(x) for x in ids), sum(len(t.ids) for t in texts)
            return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

        async def advance() -> None:
            kind, *rest = await reader.next()
            if kind == "error":
                raise rest[0]
            for k, token, finish in rest[0] if kind == "tokens" else []:
                texts[k].add(token, finish)
                if texts[k].finish:
                    job.dropped.add(k)

        try:
            await advance()  # admitted, or the prompt's error as a plain JSON answer
        except (ApiError, ClientGone):
            reader.close()
            raise
        if not stream:
            try:
                while not all(t.finish for t in texts):
                    await advance()
            except ClientGone:
                return Response(status_code=499)
            finally:
                reader.close()
            choices = [{"index": i, "text": echoes[i // n] + t.text, "logprobs": None, "finish_reason": t.finish}
                       for i, t in enumerate(texts)]
            return {**head, "choices": choices, "usage": usage()}
        reader.close()  # from here on the streaming response notices a disconnect itself
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(choices: list, extra: dict | None = None) -> str:
            return f"data: {json.dumps({**head, 'choices': choices, **(extra or {})})}\n\n"

        async def sse():
            sent_finish = [False] * len(texts)
            try:
                if echo:
                    yield chunk([{"index": i, "text": echoes[i // n], "logprobs": None, "finish_reason": None}
                                 for i in range(len(texts))])
                while True:
                    out = []
                    for i, t in enumerate(texts):
                        delta = t.delta()
                        if delta or (t.finish and not sent_finish[i]):
                            sent_finish[i] = bool(t.finish)
                            out.append({"index": i, "text": delta, "logprobs": None, "finish_reason": t.finish})
                    if out:
                        yield chunk(out)
                    if all(sent_finish):
                        break
                    await advance()
                if include_usage:
                    yield chunk([], {"usage": usage()})
                yield "data: [DONE]\n\n"
            except ApiError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
            finally:
                job.cancelled = not all(sent_finish)

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # ------------------------------------------------ classification

    @app.post("/v1/classify")
    async def classify(request: Request):
        body = await read_json(request)
        model = body.get("prompt", body.get("model"))
        prompt = prompt_of(model, "prompt")
        inputs = body.get("inputs", body.get("input"))
        inputs = [inputs] if isinstance(inputs, (str, dict)) else inputs
        if not isinstance(inputs, list) or not inputs or len(inputs) > cfg.max_rows:
            raise bad(f"'inputs' must be a list of 1 to {cfg.max_rows} strings or objects", "inputs")
        t_over, v_over = body.get("template"), body.get("verbalizer")
        if t_over is not None and not isinstance(t_over, str):
            raise bad("'template' must be a string", "template")
        if isinstance(v_over, list):
            v_over = {w: w for w in v_over}
        if v_over is not None and (not isinstance(v_over, dict) or not v_over or
                                   not all(isinstance(w, str) and w for w in v_over.values())):
            raise bad("'verbalizer' must map labels to non-empty label words", "verbalizer")
        normalize = bool(body.get("length_normalize", False))

        def prepare(eng):  # runs in the worker: the prompt's metadata comes from the bank
            meta = resolve_prompt(eng, prompt).meta if prompt else {}
            template = t_over if t_over is not None else meta.get("template")
            verbalizer = v_over or meta.get("verbalizer")
            if not verbalizer:
                raise bad(f"{model!r} has no verbalizer (it was not trained to classify); "
                           'send "verbalizer": {"label": "word", ...}', "verbalizer", "no_verbalizer")
            labels = list(verbalizer)
            rows = []
            for i, x in enumerate(inputs):
                src = render_source(template, x, i)
                targets = tuple(tuple(eng.encode(target_text(src, verbalizer[lab]))) for lab in labels)
                rows.append(ScoreRow(tuple(encode(src, f"inputs[{i}]")), targets, prompt))
            return rows, labels

        job = Job("score", prepare=prepare, size=len(inputs))
        sched.submit(job)
        reader = EventReader(job, request, cfg.request_timeout_s)
        try:
            kind, *rest = await reader.next()
        except ClientGone:
            return Response(status_code=499)
        finally:
            reader.close()
        if kind == "error":
            raise rest[0]
        results, labels = rest
        data, n_tok = [], 0
        for i, r in enumerate(results):
            lp = [v / (t if normalize else 1) for v, t in zip(r.logprobs, r.n_tokens, strict=True)]
            top = max(lp)
            ex = [math.exp(v - top) for v in lp]
            probs = {lab: e / sum(ex) for lab, e in zip(labels, ex, strict=True)}
            data.append({"index": i, "label": labels[lp.index(top)], "probabilities": probs,
                         "logprobs": dict(zip(labels, r.logprobs, strict=True))})
            n_tok += len(job.rows[i].context)
        return {"object": "classification", "model": model, "labels": labels, "data": data,
                "usage": {"prompt_tokens": n_tok, "total_tokens": n_tok}}

    # ------------------------------------------------ the prompt registry

    def check_name(name: str) -> str:
        try:
            return store.check_name(name)
        except UserError as e:
            raise bad(str(e), "name", "invalid_name") from None

    def info_or_404(name: str) -> dict:
        if not store.prompt_path(check_name(name)).is_dir():
            raise ApiError(404, f"prompt {name!r} not found", param="name", code="prompt_not_found")
        return prompt_info(name)

    @app.get("/v1/prompts")
    async def prompts_list():
        data = await run_in_threadpool(lambda: [prompt_info(n) for n in store.list_prompts()])
        return {"object": "list", "model": base_id, "data": data}

    @app.get("/v1/prompts/{name}")
    async def prompts_get(name: str):
        return await run_in_threadpool(info_or_404, name)

    @app.put("/v1/prompts/{name}")
    async def prompts_put(name: str, request: Request):
        check_name(name)
        if name == base_id:
            raise bad(f"{name!r} is the plain model's id; pick another name", "name", "invalid_name")
        raw = await request.body()
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form(max_files=8, max_fields=8, max_part_size=cfg.max_upload_bytes)
            files = {v.filename or k: await v.read() for k, v in form.multi_items() if hasattr(v, "read")}
        else:
            files = {"upload.zip": raw}
        if not files or not any(files.values()):
            raise bad("empty upload: send the prompt directory as a zip body or as multipart files", "body", "invalid_upload")
        replaced = await run_in_threadpool(install_prompt, name, files, engine.lm, engine.cfg.force, cfg.max_upload_bytes)
        info = await run_in_threadpool(prompt_info, name)
        return JSONResponse({**info, "replaced": replaced}, status_code=200 if replaced else 201)

    @app.delete("/v1/prompts/{name}")
    async def prompts_delete(name: str):
        info_or_404(name)
        try:
            await run_in_threadpool(store.remove_prompt, name)
        except UserError:
            raise ApiError(404, f"prompt {name!r} not found", param="name", code="prompt_not_found") from None
        return {"id": name, "object": "prompt", "deleted": True}

    return app


class Gate:
    """Pure ASGI middleware: request id, API key, body size limit, JSON access log, metrics."""

    OPEN = ("/", "/healthz", "/favicon.ico")

    def __init__(self, app, cfg: ServerConfig, metrics: Metrics):
        self.app, self.cfg, self.metrics = app, cfg, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, rid, status = time.perf_counter(), uuid.uuid4().hex[:12], [0]
        path, method = scope["path"], scope["method"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        upload = method == "PUT" and path.startswith("/v1/prompts/")
        limit = self.cfg.max_upload_bytes if upload else self.cfg.max_body_bytes

        async def send_logged(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
                msg = {**msg, "headers": [*msg.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(msg)

        seen = [0]

        async def receive_limited():
            msg = await receive()
            seen[0] += len(msg.get("body", b""))
            if seen[0] > limit:
                raise ApiError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
            return msg

        err = self._refuse(path, headers, limit)
        try:
            if err is not None:
                await _send_error(send_logged, err)
            else:
                await self.app(scope, receive_limited, send_logged)
        finally:
            dt = time.perf_counter() - t0
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or ("/web" if path.startswith("/web/") else "other")
            self.metrics.request(endpoint, status[0], dt)
            log.info("request", extra={"fields": {"id": rid, "method": method, "path": path,
                                                  "status": status[0], "ms": round(dt * 1000, 1)}})

    def _refuse(self, path: str, headers: dict, limit: int) -> ApiError | None:
        key = self.cfg.api_key
        if key and path not in self.OPEN and not path.startswith("/web/"):
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), key.encode()):
                return ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return ApiError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
        return None


async def _send_error(send, err: ApiError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------- running it


class JsonFormatter(logging.Formatter):
    """One JSON object per log line: ts, level, logger, msg and the record's ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage(), **getattr(record, "fields", {})}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def json_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def serve(cfg: ServerConfig, model: str | None = None, force: bool = False, device: str | None = None,
          dtype: str | None = None) -> None:
    """Load the model once and serve until SIGINT/SIGTERM (in-flight requests finish first)."""
    try:
        import uvicorn
    except ImportError:
        raise UserError("the server needs its extra: pip install 'softprompt[serve]'") from None
    from softprompt import models
    from softprompt.inference.engine import Engine, EngineConfig

    json_logging()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    lm = models.load(model, dtype, device)
    engine = Engine(lm, EngineConfig(max_batch_rows=cfg.max_batch_rows, force=force))
    app = create_app(engine, cfg)
    log.info("listening", extra={"fields": {"url": f"http://{cfg.host}:{cfg.port}/", "auth": bool(cfg.api_key)}})
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_config=None, access_log=False,
                timeout_graceful_shutdown=int(math.ceil(cfg.shutdown_timeout_s)))
