"""What every request passes before and after its route: a pure ASGI middleware (request id,
API key, body size limit, JSON access log, request metrics), the app's error handlers (every
error leaves as OpenAI's error JSON) and the JSON log format.

The key is compared in constant time; ``/``, ``/healthz`` and the web assets are open. The body
limit is checked on Content-Length before the body is read, and again while it is read (a
chunked body has no length).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid

from softprompt.serve.metrics import Metrics
from softprompt.serve.protocol import ApiError, bad, body_limit, check_length, too_large

log = logging.getLogger(__name__)


class Gate:
    """Pure ASGI middleware: request id, API key, body size limit, JSON access log, metrics."""

    OPEN = ("/", "/healthz", "/favicon.ico")

    def __init__(self, app, api_key: str | None, max_body_bytes: int, max_upload_bytes: int, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics
        self.max_body, self.max_upload = max_body_bytes, max_upload_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, rid, status = time.perf_counter(), uuid.uuid4().hex[:12], [0]
        path, method = scope["path"], scope["method"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        limit = body_limit(method, path, self.max_body, self.max_upload)

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
                raise too_large(limit)
            return msg

        try:
            err = self._refuse(path, headers, limit)
            if err is not None:
                await send_error(send_logged, err)
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


async def send_error(send, err: ApiError) -> None:
    """An ``ApiError`` as a whole ASGI response (for code below the app's exception handlers)."""
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def install_error_handlers(app) -> None:
    """Every error the app raises leaves as OpenAI's error JSON with its status."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def error(e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    async def on_api_error(request, e: ApiError):
        return error(e)

    async def on_http_error(request, e):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error(ApiError(e.status_code, str(e.detail), code=code, headers=getattr(e, "headers", None)))

    async def on_invalid(request, e):
        first = (e.errors() or [{}])[0]
        param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return error(bad(f"invalid request: {first.get('msg', 'bad value')}", param))

    async def on_crash(request, e):
        log.exception("unhandled error")
        return error(ApiError(500, "internal server error", "server_error", code="internal_error"))

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_invalid)
    app.add_exception_handler(Exception, on_crash)


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
