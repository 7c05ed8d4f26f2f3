"""Step-wise decoding: the one decode loop, used by ``Engine.generate`` and by the server.

``StepBatch`` is iteration-level scheduling: rows join (``add``) and leave (EOS, their
``max_new_tokens``, ``cancel``) between steps. ``step`` is ``advance`` (prefill) then
``decode``, which picks one token for every decoding row (``sampling.pick_tokens``: per-row
config and seeded generator), so a row's tokens depend neither on when it joined nor on its
neighbours.

New decoder-only rows are prefilled and stacked onto the running cache (``kv.merge_states``):
in one forward at ``add`` (``prefill_chunk=None``, what ``Engine.generate`` does), or chunked
(``prefill_chunk=C``): ``add`` only queues them (``prefill.Filling``) and each ``advance`` feeds
them at most C tokens while rows decode (``max_forward_tokens`` when none do), so a long
prompt never stalls the decoding rows for more than one chunk per step; a row joins the
decoding rows when its prompt is consumed. Encoder-decoder batches (T5: decoder positions are
implicit) only take new rows while empty (``can_join``). Not thread-safe: one thread drives
it. It talks to the engine through its public row API only (``request_rows``, ``start``,
``prefix``, ``tensor``, ``eos_id``, ``is_encoder_decoder``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from softprompt.config import GenerateConfig
from softprompt.inference.kv import merge_states
from softprompt.inference.logprobs import TokenLogprob, step_logprobs
from softprompt.inference.prefill import Filling
from softprompt.inference.sampling import pick_tokens


@dataclass
class StepEvent:
    rid: int  # the id ``StepBatch.add`` gave the row
    token: int | None  # the new token; None when the row ended on EOS (or one of its stop ids)
    finish_reason: str | None  # "stop" (EOS, stop id) or "length" when the row left the batch, else None
    logits: torch.Tensor | None = None  # (V,) raw logits the token was picked from (``keep_logits``)
    logprob: TokenLogprob | None = None  # the token's log-probability, if the row asked for them


@dataclass
class _Live:
    rid: int
    cfg: GenerateConfig
    seen: list[int]  # input + generated tokens (repetition penalty)
    gen: torch.Generator
    n_out: int = 0
    logprobs: int | None = None  # top-k alternatives per token; None = no log-probabilities
    stops: frozenset[int] = frozenset()  # tokens that end the row like EOS (EOS included)


class StepBatch:
    """Rows that decode together; see the module docstring."""

    def __init__(self, engine, keep_logits: bool = False, prefill_chunk: int | None = None):
        self.engine = engine
        self.keep_logits = keep_logits  # each event carries its step's logits (float32 copy)
        self.state = None
        self.logits: torch.Tensor | None = None  # (B, V) next-token logits of the live rows
        self.live: list[_Live] = []
        chunked = prefill_chunk is not None and not engine.is_encoder_decoder and engine.cfg.use_prefix_cache
        self.chunk = prefill_chunk if chunked else None
        self.filling = Filling(engine)  # rows being prefilled (chunked), aligned with ``pending``
        self.pending: list[_Live] = []
        self._ids = 0

    def __len__(self) -> int:
        """Rows in the batch: decoding and still being prefilled."""
        return len(self.live) + len(self.pending)

    @property
    def can_join(self) -> bool:
        return not len(self) or not self.engine.is_encoder_decoder

    @torch.no_grad()
    def add(self, requests) -> list[int]:
        """Prefill ``GenerateRequest``s (one forward) and join them; returns their row ids."""
        if not requests:
            return []
        rows = self.engine.request_rows(requests)  # a bad prompt fails here, before any compute
        return self.add_rows(rows, [r.config for r in requests], [r.logprobs for r in requests],
                             [r.stop_ids for r in requests])

    @torch.no_grad()
    def add_rows(self, rows: list, cfgs: list[GenerateConfig], logprobs: list[int | None] | None = None,
                 stop_ids: list[tuple[int, ...]] | None = None) -> list[int]:
        """Join already resolved engine rows (``Engine.request_rows``), one config each; per row
        optionally a ``logprobs`` k (None = none) and token ids that end it like EOS."""
        if not self.can_join:
            raise RuntimeError("an encoder-decoder batch takes new rows only while empty")
        ids = list(range(self._ids, self._ids + len(rows)))
        ks, extra = logprobs or [None] * len(rows), stop_ids or [()] * len(rows)
        eos = set(self.engine.stop_ids)  # EOS, generation_config EOS ids, the chat end of turn
        new = [_Live(i, c, list(row.ids), torch.Generator().manual_seed(c.seed), logprobs=k, stops=frozenset(eos | set(x)))
               for i, c, row, k, x in zip(ids, cfgs, rows, ks, extra, strict=True)]
        if self.chunk is not None:
            self.filling.add(rows)  # prompts resolved and their prefixes built; tokens run in ``advance``
            self.pending += new
        else:
            state, logits = self.engine.start(rows)
            self._join(new, state, logits)
        self._ids += len(rows)
        return ids

    def _join(self, rows: list[_Live], state, logits: torch.Tensor) -> None:
        """Prefilled rows start decoding."""
        if self.live:
            self.state, self.logits = merge_states(self.state, state), torch.cat([self.logits, logits])
        else:
            self.state, self.logits = state, logits
        self.live += rows

    @torch.no_grad()
    def advance(self) -> None:
        """One prefill chunk for the rows still being prefilled (``prefill_chunk`` tokens while
        rows decode; when none do, up to ``max_forward_tokens``, still at most ``prefill_chunk``
        per row while several share the step); finished ones start decoding."""
        if not self.pending:
            return
        budget = self.chunk if self.live else max(self.chunk, self.engine.cfg.max_forward_tokens)
        done, state, logits = self.filling.advance(budget, self.chunk)
        if done:
            self._join([self.pending[j] for j in done], state, logits)
            self.pending = [r for j, r in enumerate(self.pending) if j not in set(done)]

    def step(self) -> list[StepEvent]:
        """``advance`` then ``decode``."""
        self.advance()
        return self.decode()

    @torch.no_grad()
    def decode(self) -> list[StepEvent]:
        """One token for every decoding row; finished rows leave; the rest advance one position."""
        if not self.live:
            return []
        live = self.live
        picks = pick_tokens(self.logits, [r.cfg for r in live], [r.seen for r in live], [r.gen for r in live])
        asked = [j for j, (r, t) in enumerate(zip(live, picks, strict=True))
                 if r.logprobs is not None and t not in r.stops]
        lps = dict(zip(asked, step_logprobs(self.logits, asked, [picks[j] for j in asked],
                                            [live[j].logprobs for j in asked]), strict=True))
        events, keep, feed = [], [], []
        for j, (r, t) in enumerate(zip(live, picks, strict=True)):
            logits = self.logits[j].float().clone() if self.keep_logits else None
            if t in r.stops:
                events.append(StepEvent(r.rid, None, "stop", logits))
                continue
            r.seen.append(t)
            r.n_out += 1
            done = r.n_out >= r.cfg.max_new_tokens
            events.append(StepEvent(r.rid, t, "length" if done else None, logits, lps.get(j)))
            if not done:
                keep.append(j)
                feed.append(t)
        self._keep(keep)
        if self.live:
            self.logits = self.state.step(self.engine.tensor(feed))
        return events

    def cancel(self, rids) -> None:
        """Drop rows (client gone, stop string hit); the others are unaffected."""
        drop = set(rids)
        self._keep([j for j, r in enumerate(self.live) if r.rid not in drop])
        kept = [j for j, r in enumerate(self.pending) if r.rid not in drop]
        self.filling.keep(kept)
        self.pending = [self.pending[j] for j in kept]

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.live):
            return
        self.live = [self.live[j] for j in keep]
        if keep:
            self.state.take(keep)
            self.logits = self.logits[keep]
        else:
            self.state = self.logits = None
