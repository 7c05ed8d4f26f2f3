"""Rendering an admitted generation job: the choices' texts the worker publishes, written whole
(one JSON answer) or as Server-Sent Events, in one of two shapes:

* ``TextShape``: ``/v1/completions`` (``text_completion``; ``echo``; legacy ``logprobs`` with
  ``text_offset`` counted over the whole choice text, the echoed prompt included);
* ``ChatShape``: ``/v1/chat/completions`` (``chat.completion`` with ``message``, or
  ``chat.completion.chunk`` events whose first delta per choice is the assistant role).

``Completion`` drives either: it reads the job's events, keeps a ``StreamText`` per choice, and
asks the shape for each choice's JSON. Runs on the event loop; touches no tokenizer.
"""

from __future__ import annotations

import time
import uuid

from fastapi.responses import Response, StreamingResponse

from softprompt.serve.events import Failed, Tokens
from softprompt.serve.logprob_json import chat_logprobs, completion_logprobs
from softprompt.serve.protocol import ApiError
from softprompt.serve.streams import DONE, ClientGone, EventReader, StreamText, sse


async def respond(request, ctx, job, stream: bool, render):
    """Submit a generation ``job``, wait until the worker admitted it (or answer its error as
    plain JSON), then answer ``render(reader, info)`` (a ``Completion``) whole or as SSE."""
    ctx.scheduler.submit(job)
    reader = EventReader(job, request, ctx.cfg.request_timeout_s)
    try:
        event = await reader.next()
        if isinstance(event, Failed):
            raise event.error
    except (ApiError, ClientGone):
        reader.close()
        raise
    run = render(reader, event.info)
    if not stream:
        return await run.whole()
    reader.close()  # from here on the streaming response notices a disconnect itself
    return StreamingResponse(run.events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class TextShape:
    """``/v1/completions`` choices: choice i continues input i // n."""

    object = chunk_object = "text_completion"
    prefix = "cmpl"

    def __init__(self, n: int, logprobs: bool, info: dict):
        self.n, self.logprobs = n, logprobs
        self.echoes, self.echo_pieces = info["echoes"], info.get("echo_pieces")
        self.offsets: dict[int, int] = {}  # choice -> where its next streamed token starts

    def _echo_logprobs(self, i: int) -> dict | None:
        return completion_logprobs(self.echo_pieces[i // self.n]) if self.echo_pieces else None

    def choice(self, i: int, t: StreamText) -> dict:
        echo, lp = self.echoes[i // self.n], None
        if self.logprobs:
            lp = completion_logprobs(t.pieces, len(echo))
            if self.echo_pieces:
                head = self._echo_logprobs(i)
                lp = {k: head[k] + lp[k] for k in lp}
        return {"index": i, "text": echo + t.text, "logprobs": lp, "finish_reason": t.finish}

    def opening(self, i: int) -> dict | None:
        echo = self.echoes[i // self.n]
        self.offsets[i] = len(echo)
        if not echo and not self.echo_pieces:
            return None
        return {"index": i, "text": echo, "logprobs": self._echo_logprobs(i), "finish_reason": None}

    def delta(self, i: int, text: str, pieces: list, finish: str | None) -> dict:
        lp = None
        if self.logprobs:
            lp = completion_logprobs(pieces, self.offsets[i])
            self.offsets[i] += sum(len(p.text) for p in pieces)
        return {"index": i, "text": text, "logprobs": lp, "finish_reason": finish}


class ChatShape:
    """``/v1/chat/completions`` choices: choice i is the i-th sample of the one conversation."""

    object, chunk_object = "chat.completion", "chat.completion.chunk"
    prefix = "chatcmpl"

    def __init__(self, logprobs: bool):
        self.logprobs = logprobs

    def choice(self, i: int, t: StreamText) -> dict:
        return {"index": i, "message": {"role": "assistant", "content": t.text, "refusal": None},
                "logprobs": chat_logprobs(t.pieces) if self.logprobs else None, "finish_reason": t.finish}

    def opening(self, i: int) -> dict:
        return {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def delta(self, i: int, text: str, pieces: list, finish: str | None) -> dict:
        return {"index": i, "delta": {"content": text} if text else {},
                "logprobs": chat_logprobs(pieces) if self.logprobs and pieces else None, "finish_reason": finish}


class Completion:
    """One admitted generation job rendered in ``shape``, whole or as SSE."""

    def __init__(self, shape, size: int, stops: list[str], model: str, job, reader: EventReader, info: dict,
                 include_usage: bool = False, done: bool = False):
        self.shape, self.job, self.reader, self.info, self.include_usage = shape, job, reader, info, include_usage
        self.texts = [StreamText(stops) for _ in range(size)]
        if done:  # nothing to generate (max_tokens 0 with echo)
            for t in self.texts:
                t.finish = "length"
        self.id = f"{shape.prefix}-{uuid.uuid4().hex[:24]}"
        self.created, self.model = int(time.time()), model

    def head(self, stream: bool) -> dict:
        return {"id": self.id, "object": self.shape.chunk_object if stream else self.shape.object,
                "created": self.created, "model": self.model}

    def usage(self) -> dict:
        p, c = self.info["prompt_tokens"], sum(t.n_tokens for t in self.texts)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def advance(self) -> None:
        event = await self.reader.next()
        if isinstance(event, Failed):
            raise event.error
        for u in event.rows if isinstance(event, Tokens) else []:
            self.texts[u.row].update(u.text, u.n_tokens, u.finish, u.pieces)

    async def whole(self):
        try:
            while not all(t.finish for t in self.texts):
                await self.advance()
        except ClientGone:
            return Response(status_code=499)
        finally:
            self.reader.close()
        choices = [self.shape.choice(i, t) for i, t in enumerate(self.texts)]
        return {**self.head(False), "choices": choices, "usage": self.usage()}

    def chunk(self, choices: list, extra: dict | None = None) -> str:
        return sse({**self.head(True), "choices": choices, **(extra or {})})

    async def events(self):
        texts, sent_finish = self.texts, [False] * len(self.texts)
        try:
            opening = [c for c in (self.shape.opening(i) for i in range(len(texts))) if c is not None]
            if opening:
                yield self.chunk(opening)
            while True:
                out = []
                for i, t in enumerate(texts):
                    delta, pieces = t.delta(), t.new_pieces()
                    if delta or pieces or (t.finish and not sent_finish[i]):
                        sent_finish[i] = bool(t.finish)
                        out.append(self.shape.delta(i, delta, pieces, t.finish))
                if out:
                    yield self.chunk(out)
                if all(sent_finish):
                    break
                await self.advance()
            if self.include_usage:
                yield self.chunk([], {"usage": self.usage()})
            yield DONE
        except ApiError as e:
            yield sse(e.body())
        finally:
            self.job.cancelled = not all(sent_finish)
