"""Streams between the worker thread and HTTP clients: a job's events read on the event loop,
the text of a generated choice as it grows, and Server-Sent Events framing.

Split by thread: ``RowText`` runs in the worker (it decodes with the tokenizer, which only the
worker touches, and cuts the text at stop strings); ``StreamText`` runs on the event loop over
the strings the worker publishes (what is safe to send yet). ``EventReader`` waits for a job's
next event, bounded by the request deadline and the client's presence.
"""

from __future__ import annotations

import asyncio
import json

from softprompt.serve.logprob_json import pieces
from softprompt.serve.protocol import ApiError

DONE = "data: [DONE]\n\n"


def sse(obj: dict) -> str:
    """One Server-Sent Event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj)}\n\n"


class RowText:
    """One choice's text, decoded as tokens arrive; stop strings cut it and end the row.

    Runs in the worker thread (it owns the tokenizer); the event loop sees only the strings it
    publishes (``StreamText``). Tokens that come with a log-probability are also kept as
    ``logprob_json.Piece``s; ``fresh()`` hands over the ones not yet published.
    """

    def __init__(self, tokenizer, stops: list[str]):
        self.tok, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.text, self.finish = "", None
        self.pieces: list = []  # logprob_json.Piece of the tokens not yet published

    def add(self, token: int | None, finish: str | None, logprob=None) -> None:
        if self.finish:  # already ended on a stop string; tokens in flight are dropped
            return
        if token is not None:
            self.ids.append(token)
            if logprob is not None:
                self.pieces += pieces(self.tok, [token], [logprob])
            self.text = self.tok.decode(self.ids, skip_special_tokens=True)
            hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
            if hits:
                self.text, self.finish = self.text[: min(hits)], "stop"
                return
        self.finish = finish

    def fresh(self) -> list:
        out, self.pieces = self.pieces, []
        return out


class StreamText:
    """The event loop's view of one choice: the latest text the worker published, and what was sent."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.text, self.n_tokens, self.finish, self.sent = "", 0, None, 0
        self.pieces: list = []  # logprob_json.Piece of every token so far (when asked for)
        self.pieces_sent = 0

    def update(self, text: str, n_tokens: int, finish: str | None, pieces: list = ()) -> None:
        self.text, self.n_tokens, self.finish = text, n_tokens, finish
        self.pieces += pieces

    def new_pieces(self) -> list:
        """The pieces not streamed yet."""
        out, self.pieces_sent = self.pieces[self.pieces_sent :], len(self.pieces)
        return out

    def delta(self) -> str:
        """New text safe to send: holds back a partial UTF-8 character and a possible stop prefix."""
        end = len(self.text)
        if not self.finish:
            while end > self.sent and self.text[end - 1] == "\ufffd":
                end -= 1
            for s in self.stops:
                for n in range(min(len(s) - 1, end), 0, -1):
                    if self.text[end - n : end] == s[:n]:
                        end -= n
                        break
        end = max(end, self.sent)
        out, self.sent = self.text[self.sent : end], end
        return out


class EventReader:
    """Next event of a job, bounded by the request deadline and the client's presence."""

    def __init__(self, job, request, timeout_s: float):  # job: a scheduler.Job
        self.job, self.timeout_s = job, timeout_s
        self.loop = asyncio.get_running_loop()
        self.deadline = self.loop.time() + timeout_s
        self.watch = asyncio.ensure_future(_until_disconnect(request)) if request is not None else None

    async def next(self):
        """The job's next ``events.Event``; ``ClientGone`` or a 504 instead when it ends first."""
        get = asyncio.ensure_future(self.job.events.get())
        try:
            waits = {get} if self.watch is None else {get, self.watch}
            done, _ = await asyncio.wait(waits, timeout=max(0.0, self.deadline - self.loop.time()),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not get.done():
                get.cancel()
        if get in done:
            return get.result()
        self.job.cancelled = True
        if self.watch is not None and self.watch in done:
            raise ClientGone()
        raise ApiError(504, f"the request did not finish within {self.timeout_s:g}s and was cancelled",
                       "timeout_error", code="timeout")

    def close(self) -> None:
        if self.watch is not None:
            self.watch.cancel()
            self.watch = None


class ClientGone(Exception):
    """The client closed the connection; its job is cancelled."""


async def _until_disconnect(request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass

