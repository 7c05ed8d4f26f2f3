"""The Ray-free parts of serving replicas (``ray_serve.py``): reading a forwarded request
(which prompt it runs under, whether it streams, whether it changes the registry), running it
through an ASGI app in-process, and the ordered log of prompt changes every replica applies.

Pure Python and asyncio, so each piece is tested without a Ray cluster. Requests are read only
through ``protocol``, exactly as the app reads them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from softprompt.serve.protocol import ApiError, named_prompt, prompt_of

_DROP = {"content-length", "transfer-encoding", "connection"}


def affinity_key(method: str, path: str, body: bytes, base_id: str | None) -> str:
    """The prompt a request runs under ('' = no affinity: plain model, or not a model call)."""
    if method != "POST" or path not in ("/v1/completions", "/v1/classify"):
        return ""
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
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
        return bool(json.loads(body).get("stream"))
    except (ValueError, AttributeError):
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
    """Prompt uploads/deletions in order (latest per name) and how far each replica applied them."""

    def __init__(self, live_s: float = 3.0):
        self.seq, self.live_s = 0, live_s
        self.latest: dict[str, tuple[int, dict | None]] = {}  # name -> (seq, files or None = deleted)
        self.acks: dict[str, tuple[int, float]] = {}  # replica id -> (applied seq, last seen)

    def append(self, name: str, files: dict | None) -> int:
        self.seq += 1
        self.latest[name] = (self.seq, files)
        return self.seq

    def since(self, replica: str, applied: int) -> list[tuple[int, str, dict | None]]:
        """Changes after ``applied``; the call also records that ``replica`` is live and there."""
        self.acks[replica] = (applied, time.monotonic())
        return sorted((s, n, f) for n, (s, f) in self.latest.items() if s > applied)

    async def wait_applied(self, seq: int, timeout_s: float = 10.0) -> bool:
        """True once every live replica (polled within ``live_s``) has applied ``seq``."""
        deadline = time.monotonic() + timeout_s
        while True:
            now = time.monotonic()
            if all(s >= seq for s, t in self.acks.values() if now - t < self.live_s):
                return True
            if now > deadline:
                return False
            await asyncio.sleep(0.05)
