"""Limits a prepared request must pass before any model work: the model's context length and
the request's estimated working memory.

Run in the worker right after a job's ``prepare`` (tokens and prompts known, nothing computed):
prompt tokens + virtual tokens + ``max_tokens`` (or the longest label) beyond the model's
context is a 400 naming the numbers, worded as vLLM words it; a request whose estimated peak
working memory (``inference.memory``: its cache, activations and copies, as the engine runs
it) is over ``--max-request-mb`` is a 413 naming the limit.
"""

from __future__ import annotations

from softprompt.inference.memory import MiB
from softprompt.serve.protocol import ApiError, bad


def group_bytes(engine, cfg) -> int:
    """Bytes of one scoring group (label copies): the engine's, at most a quarter of the request budget."""
    return int(min(engine.cfg.score_group_mb, cfg.max_request_mb / 4) * MiB)


def check_context(job, engine) -> None:
    """400 when a row of a prepared job does not fit the model's context."""
    limit = engine.context_length
    if limit is None or not job.rows:
        return
    gen = job.kind == "generate"
    names = {r.prompt for r in job.rows}
    n = {p: engine.bank.get(p)[0].num_virtual_tokens if p is not None else 0 for p in names}
    for r in job.rows:
        given = len(r.token_ids) if gen else len(r.context)
        more = r.config.max_new_tokens if gen else max(len(t) for t in r.targets)
        total = given + n[r.prompt] + more
        if total > limit:
            what = "in the completion" if gen else "in the longest label"
            raise bad(f"This model's maximum context length is {limit} tokens. However, you requested {total} "
                      f"tokens ({given} in the {job.source}, {n[r.prompt]} virtual, {more} {what}). Please reduce "
                      f"the length of the {job.source}{' or completion' if gen else ''}.", job.source,
                      "context_length_exceeded")


def check_memory(job, engine, cfg) -> int:
    """The job's estimated working memory in bytes; a 413 when it is over ``max_request_mb``."""
    if not job.rows:
        return 0
    if job.kind == "generate":
        est = engine.generate_bytes(job.rows, cfg.prefill_chunk)
    else:
        est = engine.score_bytes(job.rows, None, group_bytes(engine, cfg))
    if est > cfg.max_request_mb * MiB:
        raise ApiError(413, f"this request needs about {est / MiB:.0f} MiB of working memory ({len(job.rows)} rows: "
                            f"their key/value cache and activations); this server allows {cfg.max_request_mb:g} MiB "
                            "per request (--max-request-mb): send fewer or shorter inputs", code="request_too_large")
    return est
