"""``/v1/chat/completions``: OpenAI chat through the model's own chat template.

Parse (pure: body -> ``ChatSpec``, 4xx naming the field), submit (a ``Job`` whose ``prepare``
runs in the worker: the messages become tokens through ``chat.encode_chat``, the template's
end-of-turn marker becomes a stop id), render (``choices.Completion`` with the chat shape:
``chat.completion``, or ``chat.completion.chunk`` events with the role first). The soft
prompt goes in front of the templated tokens, as in training with ``--chat``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from fastapi import Request

from softprompt.config import ServerConfig, UserError
from softprompt.serve.choices import ChatShape, Completion, respond
from softprompt.serve.context import request_id, served
from softprompt.serve.protocol import ChatRequest, bad, prompt_of, refuse_unsupported
from softprompt.serve.routes_openai import GenerationSettings, check_cost, sampling, virtual_tokens
from softprompt.serve.scheduler import Job


@dataclass(frozen=True)
class ChatSpec:
    """A parsed ``/v1/chat/completions`` body."""

    model: str  # as the client named it (echoed back)
    prompt_name: str | None  # the stored prompt it runs under; None = the plain model
    messages: list[dict[str, str]]  # validated {"role", "content"} copies
    n: int
    gen: GenerationSettings
    seed: int
    stops: list[str]
    stream: bool
    include_usage: bool
    logprobs: int | None  # top_logprobs k when logprobs is true, else None

    @property
    def size(self) -> int:
        return self.n


def parse_chat(body: ChatRequest, cfg: ServerConfig, base_id: str) -> ChatSpec:
    """The request's spec, after the checks the schema cannot make (roles, limits, combinations)."""
    from softprompt import chat

    prompt_name = prompt_of(body.model, base_id)
    refuse_unsupported(body)
    try:
        messages = chat.check_messages(body.messages)
    except chat.MessageError as e:
        raise bad(str(e), e.field) from None
    if body.n > cfg.max_rows:
        raise bad(f"n={body.n} is more than {cfg.max_rows} rows", "n")
    if body.top_logprobs is not None and not body.logprobs:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    if body.stream_options is not None and not body.stream:
        raise bad("'stream_options' is only allowed with 'stream': true", "stream_options")
    gen, seed = sampling(body, cfg, body.max_completion_tokens or body.max_tokens or cfg.max_tokens)
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return ChatSpec(body.model, prompt_name, messages, body.n, gen, seed, stops, body.stream,
                    body.stream and body.stream_options is not None and body.stream_options.include_usage,
                    (body.top_logprobs or 0) if body.logprobs else None)


def chat_rows(spec: ChatSpec, cfg: ServerConfig, engine) -> tuple[list, dict]:
    """Worker side: the templated tokens as ``n`` ``GenerateRequest``s (seeds seed + i)."""
    from softprompt import chat
    from softprompt.inference.engine import GenerateRequest

    tok = engine.lm.tokenizer
    if not chat.has_template(tok):
        raise bad(f"the model {engine.lm.name!r} has no chat template; use /v1/completions", "model",
                  "no_chat_template")
    try:
        ids = chat.encode_chat(tok, spec.messages)
    except UserError as e:
        raise bad(str(e), "messages") from None
    if len(ids) > cfg.max_prompt_tokens:
        raise bad(f"the messages have {len(ids)} tokens; this server takes at most {cfg.max_prompt_tokens}",
                  "messages", "context_length_exceeded")
    check_cost((virtual_tokens(engine, spec.prompt_name, cfg) + len(ids) + spec.gen.max_new_tokens) * spec.n, cfg)
    rows = [GenerateRequest("", spec.prompt_name, spec.gen.config(spec.seed + c), token_ids=tuple(ids),
                            logprobs=spec.logprobs) for c in range(spec.n)]
    return rows, {"prompt_tokens": len(ids)}


async def chat_completions(request: Request, body: ChatRequest):
    ctx = served(request)
    spec = parse_chat(body, ctx.cfg, ctx.base_id)
    job = Job("generate", partial(chat_rows, spec, ctx.cfg), spec.size, spec.stops, request_id(request))
    return await respond(request, ctx, job, spec.stream, lambda reader, info: Completion(
        ChatShape(spec.logprobs is not None), spec.size, spec.stops, spec.model, job, reader, info,
        spec.include_usage))
