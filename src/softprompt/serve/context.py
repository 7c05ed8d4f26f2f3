"""What the route handlers share, kept on ``app.state.served``: the server's config, the
scheduler, the metrics and the served model's identity (read once at start-up, so no handler
needs the engine, which only the scheduler's worker thread touches).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: this module stays import-light (the gate imports it)
    from starlette.requests import Request

    from softprompt.config import ServerConfig
    from softprompt.serve.prometheus import Metrics
    from softprompt.serve.scheduler import Scheduler
    from softprompt.store import Store


@dataclass(frozen=True)
class Served:
    """What every handler may read; nothing here is the engine."""

    cfg: ServerConfig
    scheduler: Scheduler
    metrics: Metrics
    base_id: str  # the plain model's id in /v1/models
    fingerprint: dict[str, Any]  # the served model's fingerprint (uploads must match it)
    model_name: str  # the served model's name (written into uploaded prompts' metadata)
    force: bool  # accept prompts trained on another base model of the same hidden size
    kv_shape: tuple[int, int, int] | None  # (layers, kv heads, head dim) a deep prompt must have; None: no KV cache
    started: int  # unix time the app was built (the plain model's "created")
    web: Path  # the web page's assets
    chat: bool = False  # the tokenizer has a chat template (/v1/chat/completions works; the page uses it)
    store: Store | None = None  # the prompt registry (the engine's store); None: in-memory prompts only


def served(request: Request) -> Served:
    return request.app.state.served


def request_id(request: Request) -> str:
    """The id the gate gave this request (its ``x-request-id`` header and log lines)."""
    return getattr(request.state, "request_id", "")
