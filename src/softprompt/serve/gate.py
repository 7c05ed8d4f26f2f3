"""What every request passes before and after its route: a pure ASGI middleware (request id,
API key, body size limit, JSON access log, request metrics), the app's error handlers (every
error leaves as OpenAI's error JSON) and the JSON log format.

The key is compared in constant time; ``/``, ``/healthz`` and the web assets are open. The body
limit is checked on Content-Length before the body is read, and again while it is read (a
chunked body has no length), so the app only ever sees a whole body within its limit. An
exception no handler answered is logged with the request id and answered as a 500 carrying
that id, and counted under its real status; every other 5xx answer carries the id too.

Error pacing (``Pace``): a client address that gets more than ``--error-rate`` 4xx answers a
second (after a burst of twice that) has each further 4xx answer held back until its turn at
that rate. A client looping over malformed requests then costs the event loop a few answers a
second instead of a core, so it cannot starve the worker of the CPU and the interpreter that
the healthy requests need; answers that are not 4xx (and 429, which already says when to come
back) are never held.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid

from softprompt.serve.context import request_id
from softprompt.serve.prometheus import Metrics
from softprompt.serve.protocol import (
    ApiError,
    bad,
    body_limit,
    check_length,
    invalid,
    too_large,
    with_request_id,
)

log = logging.getLogger(__name__)


class Gate:
    """Pure ASGI middleware: request id, API key, body size limit, JSON access log, metrics."""

    OPEN = ("/", "/healthz", "/favicon.ico")

    def __init__(self, app, api_key: str | None, max_body_bytes: int, max_upload_bytes: int, metrics: Metrics,
                 error_rate: float = 0.0):
        self.app, self.api_key, self.metrics = app, api_key, metrics
        self.max_body, self.max_upload = max_body_bytes, max_upload_bytes
        self.pace = Pace(error_rate)

    async def __call__(self, scope, receive, send):
        """Refuse (key, size), buffer the body within its limit, run the app, count and log it.

        An exception the app did not answer becomes a 500 carrying the request id.
        """
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, rid, status = time.perf_counter(), uuid.uuid4().hex[:12], [0]
        path, method = scope["path"], scope["method"]
        scope.setdefault("state", {})["request_id"] = rid  # request.state.request_id for the routes

        async def send_logged(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
                if 400 <= status[0] < 500 and status[0] != 429:
                    wait = self.pace.wait((scope.get("client") or ("?",))[0], time.monotonic())
                    if wait:
                        await asyncio.sleep(wait)
                msg = {**msg, "headers": [*msg.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(msg)

        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            limit = body_limit(method, path, self.max_body, self.max_upload)
            err = self._refuse(path, headers, limit)
            replay = None if err else await buffered(receive, limit)
            if err is not None:
                await send_error(send_logged, err)
            elif isinstance(replay, ApiError):
                await send_error(send_logged, replay)
            else:
                await self.app(scope, replay, send_logged)
        except Exception:
            log.exception("unhandled error", extra={"fields": {"id": rid, "method": method, "path": path}})
            if status[0]:  # the answer had started (a stream): it ends here
                raise
            await send_error(send_logged, ApiError(500, f"internal server error (request id {rid})", "server_error",
                                                   code="internal_error"))
        finally:
            dt = time.perf_counter() - t0
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or ("/web" if path.startswith("/web/") else "other")
            self.metrics.request(endpoint, status[0], dt)
            fields = {"id": rid, "method": method, "path": path, "status": status[0], "ms": round(dt * 1000, 1)}
            log.log(logging.ERROR if status[0] >= 500 else logging.INFO, "request", extra={"fields": fields})

    def _refuse(self, path: str, headers: dict, limit: int) -> ApiError | None:
        key = self.api_key
        if key and path not in self.OPEN and not path.startswith("/web/"):
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), key.encode()):
                return ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        try:
            check_length(headers.get("content-length"), limit)
        except ApiError as e:
            return e
        return None


class Pace:
    """Per client address, a token bucket of 4xx answers: ``rate`` a second, a burst of twice
    that; ``wait`` says how long an answer waits for its turn (0 within the rate), at most
    ``MAX_WAIT`` seconds. Addresses whose bucket is full again are forgotten."""

    MAX_WAIT = 5.0
    MAX_CLIENTS = 4096

    def __init__(self, rate: float):
        self.rate, self.burst = rate, 2 * rate
        self.buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens left, when)

    def wait(self, client: str, now: float) -> float:
        if self.rate <= 0:
            return 0.0
        tokens, then = self.buckets.get(client, (self.burst, now))
        tokens = max(min(self.burst, tokens + (now - then) * self.rate) - 1, -self.MAX_WAIT * self.rate)
        if len(self.buckets) >= self.MAX_CLIENTS and client not in self.buckets:
            self.buckets = {c: (t, w) for c, (t, w) in self.buckets.items() if t + (now - w) * self.rate < self.burst}
        self.buckets[client] = (tokens, now)
        return 0.0 if tokens >= 0 else -tokens / self.rate


async def buffered(receive, limit: int):
    """The whole request body read within ``limit`` bytes (else a 413), as a ``receive`` that
    replays it and then passes on what comes next (the client's disconnect)."""
    chunks, size, msg = [], 0, {"more_body": True}
    while msg.get("more_body", False):
        msg = await receive()
        if msg["type"] != "http.request":  # the client left before sending it all
            break
        chunks.append(msg.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            return too_large(limit)
    first = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
    if msg["type"] != "http.request":
        first.append(msg)

    async def replay():
        return first.pop(0) if first else await receive()

    return replay


async def send_error(send, err: ApiError) -> None:
    """An ``ApiError`` as a whole ASGI response (for code below the app's exception handlers)."""
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def allowed_methods(app, scope) -> str:
    """Every method some route takes at this path (Starlette names only the first route's)."""
    from starlette.routing import Match

    methods = set()
    for route in app.routes:
        match, _ = route.matches({**scope, "method": "GET"})
        if match != Match.NONE and getattr(route, "methods", None):
            methods |= set(route.methods)
    return ", ".join(sorted(methods))


def install_error_handlers(app) -> None:
    """Every error the app raises leaves as OpenAI's error JSON with its status. (Exceptions
    nobody answers are the gate's: it turns them into 500s with the request id.)"""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def error(e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    async def on_api_error(request, e: ApiError):
        return error(with_request_id(e, request_id(request)))

    async def on_http_error(request, e):
        if e.status_code == 400:  # the body could not be read as JSON at all (e.g. nested too deep)
            return error(bad("the request body could not be parsed as JSON", None, "invalid_json"))
        headers = dict(getattr(e, "headers", None) or {})
        if e.status_code == 405:
            headers["Allow"] = allowed_methods(request.app, request.scope)
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error(ApiError(e.status_code, str(e.detail), code=code, headers=headers))

    async def on_invalid(request, e):
        return error(invalid(list(e.errors())))

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_invalid)


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
