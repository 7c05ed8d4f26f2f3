"""Serving replicas with Ray Serve: the same OpenAI-compatible app, R copies of the model.

One Serve application, three deployments:

* ``Ingress`` (HTTP, behind Ray's proxy): reads each request, takes the prompt it names from
  the JSON body (``model``; ``prompt`` for ``/v1/classify``) and forwards the raw request through
  a ``DeploymentHandle`` with ``multiplexed_model_id=<prompt>``. That is Ray Serve's model
  multiplexing router: a prompt goes to a replica that already served it (its prefix keys/values
  are cached there) and falls back to another replica when that one is at
  ``max_ongoing_requests`` or gone. The plain model carries no id (any replica). A replica that
  dies before answering is retried on another one; after ``attempts`` the client gets a 503,
  which OpenAI clients retry.
* ``Replica`` (R of them): loads the model once (``app.build_engine``) and runs the unchanged
  ``app.create_app`` app in-process (ASGI), so validation, batching, errors and streaming are those of
  ``softprompt serve``. Responses stream back chunk by chunk (SSE included).
* ``PromptLog`` (1): the ordered log of prompt uploads and deletions. The replica that handles
  ``PUT``/``DELETE /v1/prompts/NAME`` appends the change and answers only once every live
  replica has applied it; replicas poll the log and apply changes to their own store, and a
  replica that Ray starts later (or restarts) replays it before serving. Ray Serve has no
  broadcast to replicas, hence this small log (``docs/design.md``).

The parts that need no Ray (request plumbing, the log itself) are in ``replicas.py``.

Invariants: the app knows HTTP semantics; this module moves bytes, and reads requests only
through ``protocol`` (the prompt a request names, body limits, the error body). ``ray`` is an
optional extra (``pip install 'softprompt[ray]'``), imported when this module is.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from softprompt.config import UserError
from softprompt.serve.protocol import ApiError, body_limit, check_length, error_body, too_large
from softprompt.serve.replicas import (
    PromptLog,
    Syncer,
    affinity_key,
    asgi_call,
    is_stream,
    registry_write,
)
from softprompt.store import Store

if TYPE_CHECKING:
    from softprompt.config import ServerConfig

try:
    import ray
    from ray import serve
except ImportError:  # pragma: no cover - the extra is not installed
    raise UserError("Ray Serve needs its extra: pip install 'softprompt[ray]'") from None

log = logging.getLogger(__name__)
APP = "softprompt"


# ---------------------------------------------------------------- deployments


class Replica:
    """The model, loaded once, behind the unchanged single-process app (``app.create_app``)."""

    async def __init__(self, model: str | None, server_cfg: dict, prompt_log, force: bool = False,
                       device: str | None = None, dtype: str | None = None, threads: int = 1,
                       isolated_store: bool = False, store: Store | None = None, poll_s: float = 0.2):
        import torch

        from softprompt.config import ServerConfig
        from softprompt.serve.app import build_engine, create_app

        torch.set_num_threads(max(1, threads))
        self.id = serve.get_replica_context().replica_id.unique_id
        if isolated_store and store is not None:  # a store of its own, as on a machine without a shared filesystem
            store = _private_store(store, self.id)
        self.store = store
        self.cfg = ServerConfig(**server_cfg)
        self.app = create_app(build_engine(self.cfg, model, force, device, dtype, store), self.cfg)
        self.served = self.app.state.served
        self.app.state.scheduler.start()  # what the app's lifespan does under uvicorn
        self.log, self.poll_s = prompt_log, poll_s
        self.sync = Syncer(self.id, self._apply, lambda r, a: prompt_log.since.remote(r, a),
                           lambda r, seq, err: prompt_log.report.remote(r, seq, err))
        await self.sync.sync()  # a new or restarted replica catches up before its first request
        self._task = asyncio.get_running_loop().create_task(self._sync_forever())

    def base_id(self) -> str:
        return self.served.base_id

    def pid(self) -> int:
        return os.getpid()

    @serve.multiplexed(max_num_models_per_replica=64)
    async def _affine(self, name: str) -> str:
        """Marks ``name`` as served here; Ray's router sends its next requests here first."""
        return name

    async def handle(self, msg: dict):
        key = serve.get_multiplexed_model_id()
        if key:
            await self._affine(key)
        name = registry_write(msg["method"], msg["path"])
        if name is None:
            async for item in self._call(msg):
                yield item
            return
        items = [item async for item in self._call(msg)]
        if 200 <= items[0][1] < 300:  # answer once every live replica has the change (or say who has not)
            behind = await self._publish(name, msg["method"])
            if behind:
                items[0] = (*items[0][:2], [*items[0][2], ("x-softprompt-not-applied", ",".join(sorted(behind)))])
        for item in items:
            yield item

    async def _call(self, msg: dict) -> AsyncIterator[tuple]:
        async for item in asgi_call(self.app, msg):
            if item[0] == "start":  # which replica answered (logs, tests)
                item = (*item[:2], [*item[2], ("x-softprompt-replica", self.id)])
            yield item

    def check_health(self) -> None:
        if not self.app.state.scheduler.thread.is_alive():
            raise RuntimeError("the batching worker stopped")

    async def _publish(self, name: str, method: str) -> dict[str, str]:
        """Append the change to the log; the replicas that did not apply it in time, and why."""
        files = None if method == "DELETE" else await asyncio.to_thread(_read_prompt, self.store, name)
        seq = await self.log.append.remote(name, files)
        behind = await self.log.wait_applied.remote(seq)
        if behind:
            log.warning("prompt %s: change %d not applied by %s", name, seq, behind)
        return behind

    async def _sync_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.sync.sync()
            except Exception:  # noqa: BLE001 - the log restarts; keep polling
                log.warning("prompt log unreachable; retrying", exc_info=True)

    def close(self) -> None:
        """Stop polling and stop the worker (queued and running requests finish first)."""
        if getattr(self, "_task", None) is not None:
            self._task.cancel()
            self._task = None
        if hasattr(self, "app"):  # absent when the constructor failed
            self.app.state.scheduler.stop(self.cfg.shutdown_timeout_s)

    def __del__(self) -> None:  # Ray Serve calls it when it shuts the replica down
        self.close()

    def _apply(self, name: str, files: dict | None) -> None:
        from softprompt.serve.uploads import install_prompt

        store = self.store
        if store is None:
            return
        path = store.prompt_path(name)
        if files is None:
            if path.is_dir():
                store.remove_prompt(name)
            return
        if path.is_dir() and all((path / f).is_file() and (path / f).read_bytes() == b for f, b in files.items()):
            return  # already here (this replica took the upload, or a shared filesystem)
        ctx = self.served
        install_prompt(store, name, files, ctx.fingerprint, ctx.model_name, ctx.force, self.cfg.max_upload_bytes,
                       kv_shape=ctx.kv_shape, max_tokens=self.cfg.max_prompt_tokens)


def _read_prompt(store: Store, name: str) -> dict[str, bytes]:
    from softprompt.serve.uploads import PROMPT_FILES

    path = store.prompt_path(name)
    return {f: (path / f).read_bytes() for f in PROMPT_FILES if (path / f).is_file()}


def _private_store(store: Store, replica_id: str) -> Store:
    """A private copy of the shared store for this replica (test/isolated mode)."""
    import dataclasses
    import shutil
    from pathlib import Path

    shared = store.home
    mine = shared / "replicas" / replica_id
    if (shared / "prompts").is_dir() and not (mine / "prompts").exists():
        shutil.copytree(shared / "prompts", mine / "prompts")
    if (shared / "models").is_dir() and not (mine / "models").exists():
        mine.mkdir(parents=True, exist_ok=True)
        os.symlink(Path(shared / "models").resolve(), mine / "models")  # converted models are shared
    return dataclasses.replace(store, home=mine)


class Ingress:
    """HTTP entry: prompt affinity from the body, forwarding, retries on a dead replica."""

    RETRY = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)

    def __init__(self, replicas, max_body_bytes: int, max_upload_bytes: int, attempts: int = 3):
        self.replicas, self.attempts = replicas, attempts
        self.max_body, self.max_upload = max_body_bytes, max_upload_bytes
        self.base_id: str | None = None

    async def __call__(self, request):
        from starlette.responses import JSONResponse, Response, StreamingResponse

        limit = body_limit(request.method, request.url.path, self.max_body, self.max_upload)
        body = await read_within(request, limit)
        if isinstance(body, ApiError):
            return JSONResponse(body.body(), body.status)
        if self.base_id is None:
            self.base_id = await self.replicas.base_id.remote()
        path = request.url.path
        msg = {"method": request.method, "path": path, "query": request.url.query, "body": body,
               "headers": [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw]}
        handle = self.replicas.options(multiplexed_model_id=affinity_key(request.method, path, body, self.base_id),
                                       stream=True)
        try:
            if is_stream(path, body):
                (_, status, headers), rest = await self._first(handle, msg)
                return StreamingResponse(_bodies(rest), status_code=status, headers=dict(headers))
            items = await self._whole(handle, msg)
        except _Unavailable:
            err = error_body("no replica could take the request; retry", "server_error", code="replica_unavailable")
            return JSONResponse(err, 503, headers={"Retry-After": "1"})
        _, status, headers = items[0]
        return Response(b"".join(b for _, b in items[1:]), status_code=status, headers=dict(headers))

    async def _whole(self, handle, msg: dict) -> list[tuple]:
        for attempt in range(self.attempts):
            try:
                return [item async for item in handle.handle.remote(msg)]
            except self.RETRY as e:
                log.warning("replica lost (%s); attempt %d of %d", type(e).__name__, attempt + 1, self.attempts)
                await asyncio.sleep(0.2 * (attempt + 1))
        raise _Unavailable

    async def _first(self, handle, msg: dict):
        for attempt in range(self.attempts):
            gen = handle.handle.remote(msg)
            try:
                return await gen.__anext__(), gen
            except self.RETRY as e:
                log.warning("replica lost (%s); attempt %d of %d", type(e).__name__, attempt + 1, self.attempts)
                await asyncio.sleep(0.2 * (attempt + 1))
        raise _Unavailable


async def read_within(request, limit: int) -> bytes | ApiError:
    """The body, or a 413: from Content-Length before reading a byte, else counted while read."""
    try:
        check_length(request.headers.get("content-length"), limit)
    except ApiError as e:
        return e
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


class _Unavailable(Exception):
    pass


async def _bodies(gen) -> AsyncIterator[bytes]:
    async for _, chunk in gen:
        yield chunk


# ---------------------------------------------------------------- building and running


def build_app(server_cfg: ServerConfig | None = None, model: str | None = None, replicas: int = 1, force: bool = False,
              device: str | None = None, dtype: str | None = None, replica_cpus: float = 1.0,
              max_ongoing_requests: int | None = None, isolated_store: bool = False, env: dict | None = None,
              store: Store | None = None):
    """The Serve application: ``serve.run(build_app(...))`` or ``softprompt serve --ray``. Every
    replica receives ``store`` (pickled: paths only); ``env`` are variables for the replicas'
    processes (threading settings; the edge, ``cli/environ.py``, says which)."""
    import dataclasses

    from softprompt.config import ServerConfig

    cfg = server_cfg or ServerConfig()
    env = {k: v for k, v in (env or {}).items() if v is not None}
    opts = {"runtime_env": {"env_vars": env}} if env else {}
    log_app = serve.deployment(PromptLog, name="PromptLog", num_replicas=1, max_ongoing_requests=1000,
                               logging_config={"enable_access_log": False},  # polled 5x a second per replica
                               ray_actor_options={"num_cpus": 0, **opts}).bind()
    rep = serve.deployment(Replica, name="Replica", num_replicas=replicas, health_check_period_s=2,
                           max_ongoing_requests=max_ongoing_requests or cfg.max_batch_rows,
                           ray_actor_options={"num_cpus": replica_cpus, **opts})
    rep_app = rep.bind(model, dataclasses.asdict(cfg), log_app, force, device, dtype,
                       max(1, int(replica_cpus)), isolated_store, store)
    ingress = serve.deployment(Ingress, name="Ingress", num_replicas=1, max_ongoing_requests=10_000,
                               ray_actor_options={"num_cpus": 0, **opts})
    return ingress.bind(rep_app, cfg.max_body_bytes, cfg.max_upload_bytes)


def start(server_cfg: ServerConfig, address: str | None = None, **kw) -> None:
    """Connect to (or start) Ray, start Serve's HTTP proxy on host:port, deploy the app."""
    if kw.get("replicas", 1) < 1:
        raise UserError("--replicas must be at least 1")
    ray.init(address=address, ignore_reinit_error=True, include_dashboard=False)
    serve.start(http_options={"host": server_cfg.host, "port": server_cfg.port})
    serve.run(build_app(server_cfg, **kw), name=APP, route_prefix="/")
    log.info("serving on http://%s:%d/ with %d replica(s)", server_cfg.host, server_cfg.port, kw.get("replicas", 1))


def serve_forever(server_cfg: ServerConfig, model: str | None = None, replicas: int = 1, address: str | None = None,
                  force: bool = False, device: str | None = None, dtype: str | None = None,
                  store: Store | None = None, env: dict | None = None) -> None:
    """``softprompt serve --ray``: deploy, then wait; Ctrl-C or SIGTERM removes the app (and a Ray we started)."""
    import signal

    def stop(*_) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # SIGTERM (a service manager, kill) ends it like Ctrl-C
    start(server_cfg, address, model=model, replicas=replicas, force=force, device=device, dtype=dtype, store=store,
          env=env)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(APP)
        if address is None:
            serve.shutdown()
            ray.shutdown()
