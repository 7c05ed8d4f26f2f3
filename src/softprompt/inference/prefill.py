"""Chunked prefill: rows whose prompts are fed a piece at a time, beside rows that decode.

``Filling`` holds the rows still being prefilled as one ``DecoderState`` (their prompt
prefixes, then the tokens fed so far). ``plan(budget, cap)`` gives every such row its next
piece as ONE forward (``fused.Forward``) of at most ``budget`` token slots, which the caller
runs (alone, or inside the decode step's forward: ``fused.run``), and ``finish`` takes its
result; ``advance`` does the three. The pieces are as wide as the longest
prompt left that fits ``cap``, so every short prompt finishes in this forward (and starts
decoding) while a long one reads as much, and at most ``cap`` per row, even a lone row, so a
request that arrives meanwhile waits for one piece, not a whole long prompt. No row is padded
beyond the pieces' width, never to another request's prompt. Rows whose prompt is consumed
leave with their first next-token logits, to join the decoding batch (``steps.StepBatch``).

Exact: positions are explicit (``DecoderState``) and pad columns are masked, so a row's keys,
values and logits equal a one-shot prefill's up to float rounding; ``tests/test_engine.py``
checks greedy outputs and logits against the one-shot path.
"""

from __future__ import annotations

import torch

from softprompt.forward import lm_logits
from softprompt.inference.fused import Forward
from softprompt.inference.kv import (
    DecoderState,
    batch_prefix,
    merge_states,
    row_extras,
    with_layers,
)


class Filling:
    """Rows being prefilled, in the order they were added (``add``)."""

    def __init__(self, engine):
        self.engine = engine
        self.state: DecoderState | None = None
        self.ids: list[list[int]] = []  # each row's input tokens
        self.fed: list[int] = []  # tokens of each row already run
        self.last: list[torch.Tensor | None] = []  # hidden state of each row's last token so far (or its prompt's)

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, rows: list) -> None:
        """Resolved engine rows (``Engine.request_rows``): their prompts' keys/values, no tokens yet."""
        eng = self.engine
        prefixes = [eng.prefix(r) for r in rows]
        cache, pmask = batch_prefix(prefixes, eng.model.config)
        dtype = eng.model.get_input_embeddings().weight.dtype
        state = with_layers(DecoderState(eng.model, cache, pmask.to(eng.device), eng.tensor([r.n for r in rows]),
                                         *row_extras(eng.model, rows)),
                            eng.lm.kv_shape, dtype)
        self.state = state if self.state is None else merge_states(self.state, state)
        self.ids += [list(r.ids) for r in rows]
        self.fed += [0] * len(rows)
        self.last += [None if p is None else p.last for p in prefixes]

    @property
    def width(self) -> int:
        """Cache columns the rows' next tokens attend to (their prompts and the tokens read so far)."""
        return 0 if self.state is None else int(self.state.mask.shape[1])

    def remaining(self) -> list[int]:
        return [len(ids) - f for ids, f in zip(self.ids, self.fed, strict=True)]

    @torch.no_grad()
    def advance(self, budget: int, cap: int | None = None) -> tuple[list[int], DecoderState | None, torch.Tensor | None]:
        """``plan`` one forward of at most ``budget`` token slots, run it alone and ``finish`` it."""
        fwd = self.plan(budget, cap)
        if fwd is not None:
            fwd.run()
        return self.finish(fwd)

    def plan(self, budget: int, cap: int | None = None) -> Forward | None:
        """The next forward (None if no row has tokens left to read): at most ``budget`` token
        slots (rows x the pieces' width; at least one token per row), each row's piece at most
        ``cap`` tokens: as wide as the longest prompt left that fits ``cap`` (so every such row
        finishes), else ``cap``. Nothing changes until ``finish``."""
        rem = self.remaining()
        if not any(rem):
            return None
        cap = min(cap or budget, max(1, budget))
        short = [r for r in rem if 0 < r <= cap]
        width = max(short) if short else cap  # the short rows finish now; the long ones read as much
        width = max(1, min(width, budget // len(rem)))  # every row is in the forward: slots = rows x width
        take = [min(r, width) for r in rem]
        pieces = [ids[f : f + n] for ids, f, n in zip(self.ids, self.fed, take, strict=True)]
        C = max(len(p) for p in pieces)
        feed = torch.full((len(pieces), C), self.engine.pad_id, dtype=torch.long)
        fmask = torch.zeros(len(pieces), C, dtype=torch.long)
        for j, p in enumerate(pieces):
            if p:
                feed[j, : len(p)], fmask[j, : len(p)] = torch.tensor(p), 1
        assert self.state is not None  # rows are waiting, so there is a state
        return Forward(self.state, feed.to(self.engine.device), fmask.to(self.engine.device))

    @torch.no_grad()
    def finish(self, fwd: Forward | None) -> tuple[list[int], DecoderState | None, torch.Tensor | None]:
        """After ``plan``'s forward ran (``fwd.out``; None: there was none): returns the rows
        (indices at call time) whose prompt is now consumed, their state and their first
        next-token logits (B', V), and keeps the rest."""
        if fwd is not None:
            h = fwd.hidden  # (P, C, H)
            for j, n in enumerate(fwd.tmask.sum(1).tolist()):
                if n:
                    self.fed[j] += n
                    self.last[j] = h[j, n - 1]
        done = [j for j, r in enumerate(self.remaining()) if r == 0]
        if not done:
            return [], None, None
        state = self.state.gather(done)
        logits = lm_logits(self.engine.model, torch.stack([self.last[j] for j in done]))
        self.keep([j for j in range(len(self)) if j not in set(done)])
        return done, state, logits

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (indices), in order."""
        if len(rows) == len(self):
            return
        self.ids, self.fed, self.last = ([x[j] for j in rows] for x in (self.ids, self.fed, self.last))
        if rows:
            self.state.take(rows)
        else:
            self.state = None
