"""The Ray-free parts of serving replicas (``ray_serve.py``): reading a forwarded request
(which prompt it runs under, whether it streams, whether it changes the registry), running it
through an ASGI app in-process, and the ordered log of prompt changes every replica applies.

Pure Python and asyncio, so each piece is tested without a Ray cluster. Requests are read only
through ``protocol``, exactly as the app reads them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable

from softprompt.serve.protocol import ApiError, named_prompt, prompt_of

log = logging.getLogger(__name__)
_DROP = {"content-length", "transfer-encoding", "connection"}


def affinity_key(method: str, path: str, body: bytes, base_id: str | None) -> str:
    """The prompt a request runs under ('' = no affinity: plain model, or not a model call)."""
    if method != "POST" or path not in ("/v1/completions", "/v1/classify"):
        return ""
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return ""
    if not isinstance(obj, dict) or base_id is None:
        return ""
    try:
        return prompt_of(named_prompt(path, obj), base_id) or ""
    except ApiError:  # not a prompt name: the app answers the error, any replica will do
        return ""


def is_stream(path: str, body: bytes) -> bool:
    if path != "/v1/completions" or b'"stream"' not in body:
        return False
    try:
        return json.loads(body).get("stream") is True  # as the app reads it: a JSON true, nothing else
    except (ValueError, AttributeError, RecursionError):
        return False


def registry_write(method: str, path: str) -> str | None:
    """NAME of ``PUT``/``DELETE /v1/prompts/NAME`` (a change every replica must see)."""
    name = path.removeprefix("/v1/prompts/")
    return name if method in ("PUT", "DELETE") and name != path and name and "/" not in name else None


async def asgi_call(app, msg: dict) -> AsyncIterator[tuple]:
    """Run one request through an ASGI app; yields ("start", status, headers) then ("body", bytes)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": msg["method"],
             "scheme": "http", "path": msg["path"], "raw_path": msg["path"].encode(), "root_path": "",
             "query_string": msg["query"].encode("latin-1"), "client": ("127.0.0.1", 0),
             "server": ("127.0.0.1", 80),
             "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in msg["headers"]]}
    out: asyncio.Queue = asyncio.Queue()
    gone, sent = asyncio.Event(), [False]

    async def receive() -> dict:
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": msg["body"], "more_body": False}
        await gone.wait()  # the app watches for a disconnect; it comes when our caller leaves
        return {"type": "http.disconnect"}

    async def run() -> None:
        try:
            await app(scope, receive, out.put)
        finally:
            await out.put(None)

    task = asyncio.get_running_loop().create_task(run())
    try:
        while (m := await out.get()) is not None:
            if m["type"] == "http.response.start":
                headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in m.get("headers", [])]
                yield ("start", m["status"], [(k, v) for k, v in headers if k.lower() not in _DROP])
            elif m.get("body"):
                yield ("body", m["body"])
    finally:
        gone.set()
        await task


# ---------------------------------------------------------------- the prompt log


class PromptLog:
    """Prompt uploads/deletions in order and how far each replica applied them.

    Bounded: only the latest change per name is kept (an upload's bytes are dropped as soon as
    a newer upload or a deletion of that name arrives). A replica that cannot apply a change
    reports it (``report``); ``wait_applied`` names the replicas that have not applied a change
    and why.
    """

    def __init__(self, live_s: float = 3.0):
        self.seq, self.live_s = 0, live_s
        self.latest: dict[str, tuple[int, dict | None]] = {}  # name -> (seq, files or None = deleted)
        self.acks: dict[str, tuple[int, float]] = {}  # replica id -> (applied seq, last seen)
        self.errors: dict[str, tuple[int, str]] = {}  # replica id -> (seq it failed on, why)

    def append(self, name: str, files: dict | None) -> int:
        self.seq += 1
        self.latest[name] = (self.seq, files)
        return self.seq

    def nbytes(self) -> int:
        return sum(len(b) for _, files in self.latest.values() for b in (files or {}).values())

    def since(self, replica: str, applied: int) -> list[tuple[int, str, dict | None]]:
        """Changes after ``applied``; the call also records that ``replica`` is live and there."""
        self.acks[replica] = (applied, time.monotonic())
        if replica in self.errors and self.errors[replica][0] <= applied:
            del self.errors[replica]
        return sorted((s, n, f) for n, (s, f) in self.latest.items() if s > applied)

    def report(self, replica: str, seq: int, error: str) -> None:
        self.errors[replica] = (seq, error)

    async def wait_applied(self, seq: int, timeout_s: float = 10.0) -> dict[str, str]:
        """Waits until every live replica (polled within ``live_s``) has applied ``seq``; returns
        the replicas that have not (by then), each with its reported error or "no answer"."""
        deadline = time.monotonic() + timeout_s
        while True:
            now = time.monotonic()
            behind = {r: self.errors.get(r, (0, "not applied in time"))[1]
                      for r, (s, t) in self.acks.items() if now - t < self.live_s and s < seq}
            if not behind or now > deadline:
                return behind
            await asyncio.sleep(0.05)


class Syncer:
    """One replica's side of the log: applies changes in order. A change that fails is not
    marked applied: it is reported to the log and retried at the next poll (a newer change of
    the same name replaces it)."""

    def __init__(self, replica: str, apply: Callable[[str, dict | None], None], since: Callable, report: Callable):
        self.replica, self.apply, self.since, self.report = replica, apply, since, report
        self.applied = 0
        self.failed: tuple[int, str, str] | None = None  # (seq, name, error) of the change that failed

    async def sync(self) -> bool:
        """Apply what is new; False if a change failed (it stays pending)."""
        while ops := await self.since(self.replica, self.applied):
            for seq, name, files in ops:
                try:
                    await asyncio.to_thread(self.apply, name, files)
                except Exception as e:  # noqa: BLE001 - reported and retried, the replica keeps serving
                    self.failed = (seq, name, f"{type(e).__name__}: {e}")
                    log.warning("could not apply the change %d to prompt %s: %s", seq, name, self.failed[2])
                    await self.report(self.replica, seq, self.failed[2])
                    return False
                self.applied, self.failed = seq, None
        return True
