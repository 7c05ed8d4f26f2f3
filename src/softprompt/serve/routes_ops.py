"""Operations routes: the web page, liveness and Prometheus metrics.

``/metrics`` reads the counters and the snapshot the scheduler's worker publishes; it never
touches the engine.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse

from softprompt.serve.context import served


async def index(request: Request):
    return FileResponse(served(request).web / "index.html", media_type="text/html")


async def healthz(request: Request):
    ctx = served(request)
    sched = ctx.scheduler
    ok = sched.thread.is_alive() and not sched.stopping
    body = {"status": "ok" if ok else "unavailable", "model": ctx.base_id, "queue_depth": sched.depth(),
            "active_rows": sched.active_rows()}
    return JSONResponse(body, status_code=200 if ok else 503)


async def prometheus(request: Request):
    """The counters, plus gauges from the scheduler's published snapshot (not from the engine)."""
    ctx = served(request)
    sched = ctx.scheduler
    gauges = {"softprompt_queue_depth": sched.depth(), "softprompt_active_rows": sched.active_rows(),
              "softprompt_max_batch_rows": ctx.cfg.max_batch_rows, **sched.snapshot}
    return PlainTextResponse(ctx.metrics.render(gauges), media_type="text/plain; version=0.0.4")
