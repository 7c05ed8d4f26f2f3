"""Step-wise decoding: the one decode loop, used by ``Engine.generate`` and by the server.

``StepBatch`` is iteration-level scheduling: rows join (``add``) and leave (EOS, their
``max_new_tokens``, ``cancel``) between steps. ``step`` is ``advance`` (prefill) then
``decode``, which picks one token for every decoding row (``sampling.pick_tokens``: per-row
config and seeded generator), so a row's tokens depend neither on when it joined nor on its
neighbours.

New decoder-only rows are prefilled and stacked onto a running cache (``kv.merge_states``):
in one forward at ``add`` (``prefill_chunk=None``, what ``Engine.generate`` does), or chunked
(``prefill_chunk=C``): ``add`` only queues them (``prefill.Filling``) and each ``advance`` feeds
them a piece (``budget``), so a long prompt never stalls the decoding rows for more than one
piece per step; a row joins the decoding rows when its prompt is consumed.

Decode groups: decoding rows are kept in a few groups (at most ``MAX_GROUPS``), each one
``DecoderState``, of rows whose caches have similar lengths (``fits``): a row is never padded
to, nor copied beside, the cache of a much longer one, so one long request does not slow the
decode step of short ones by its length. Groups whose widths come together again merge. Exact:
each row's computation is its own whatever its group (``kv``).

The step budget (``budget``): while rows decode, the prefill piece or a caller's side forward
(a scoring slice) runs inside the decode step's own forward (``fused.run``: one pass over the
weights) and may take as many token slots as cost ``SIDE_SHARE`` of what the decode step
itself costs (``footprint.Dims.token_flops``: the decoding rows over their caches against the
new tokens over the prompt read so far), at least ``MIN_SIDE_TOKENS`` and at most C, so a step
costs about 1.4x a plain decode step however long the waiting prompts are; with no row
decoding, ``max_forward_tokens``, at most C per row. Encoder-decoder batches (T5: decoder positions are
implicit) only take new rows while empty (``can_join``). Not thread-safe: one thread drives
it. It talks to the engine through its public row API only (``request_rows``, ``start``,
``prefix``, ``tensor``, ``eos_id``, ``is_encoder_decoder``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from softprompt.config import GenerateConfig
from softprompt.forward import lm_logits
from softprompt.inference import fused
from softprompt.inference.fused import Forward
from softprompt.inference.kv import DecoderState, merge_states
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


MAX_GROUPS = 4  # decode groups at most: each costs a forward per step
GROUP_SLACK = 128  # cache columns a row may be padded by beyond its own length in a group
SIDE_SHARE = 0.42  # the prefill or scoring tokens in a decode step cost about this share of the step
MIN_SIDE_TOKENS = 8  # ... and may always take this many token slots


def fits(width: int, own: int) -> bool:
    """Whether a row whose cache holds ``own`` columns decodes in a group ``width`` columns wide:
    the padding it carries, or brings to the others, stays within its own length (or theirs,
    the shorter) plus ``GROUP_SLACK``."""
    return abs(width - own) <= min(width, own) + GROUP_SLACK


@dataclass
class _Group:
    """Decoding rows with similar cache lengths: one state, their next-token logits (B, V)."""

    rows: list[_Live]
    state: DecoderState
    logits: torch.Tensor

    @property
    def width(self) -> int:
        """Cache columns (an encoder-decoder state has no decoder cache mask: 0)."""
        mask = getattr(self.state, "mask", None)
        return 0 if mask is None else int(mask.shape[1])


@dataclass
class _Picks:
    """One group's chosen tokens and log-probabilities, before anything changes."""

    group: _Group
    tokens: list[int]
    logprobs: dict[int, TokenLogprob] = field(default_factory=dict)
    feed: list[int] = field(default_factory=list)  # the tokens its remaining rows run next


class StepBatch:
    """Rows that decode together; see the module docstring."""

    def __init__(self, engine, keep_logits: bool = False, prefill_chunk: int | None = None, strict: bool = True):
        self.engine = engine
        self.strict = strict  # a failed prefill piece raises (else ``fill_error``: ``step``)
        self.touched = False  # ``step``: past the token choice
        self.fill_error: BaseException | None = None  # ``step``: the prefill piece that failed (strict=False)
        self.keep_logits = keep_logits  # each event carries its step's logits (float32 copy)
        self.groups: list[_Group] = []
        chunked = prefill_chunk is not None and not engine.is_encoder_decoder and engine.cfg.use_prefix_cache
        self.chunk = prefill_chunk if chunked else None
        self.filling = Filling(engine)  # rows being prefilled (chunked), aligned with ``pending``
        self.pending: list[_Live] = []
        self._ids = 0

    def __len__(self) -> int:
        """Rows in the batch: decoding and still being prefilled."""
        return len(self.live) + len(self.pending)

    @property
    def live(self) -> list[_Live]:
        """The decoding rows, group by group (the order of ``logits``)."""
        return [r for g in self.groups for r in g.rows]

    @property
    def logits(self) -> torch.Tensor | None:
        """(B, V) next-token logits of ``live``."""
        return torch.cat([g.logits for g in self.groups]) if self.groups else None

    @property
    def can_join(self) -> bool:
        return not len(self) or not self.engine.is_encoder_decoder

    def budget(self, context: int | None = None, head: bool = False) -> int:
        """Token slots the next prefill or scoring forward may take (module docstring);
        ``context``: the cache columns its tokens attend to (default: the prompts being read);
        ``head``: its tokens go through the output head too (scoring's label tokens)."""
        chunk = self.chunk or self.engine.cfg.max_forward_tokens
        if not self.groups:
            return max(chunk, self.engine.cfg.max_forward_tokens)
        dims = self.engine.dims
        if context is None:
            context = self.filling.width
        step = sum(len(g.rows) * dims.token_flops(g.width, head=True) for g in self.groups)
        return max(MIN_SIDE_TOKENS, min(chunk, int(SIDE_SHARE * step) // dims.token_flops(context, head)))

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
        """Prefilled rows start decoding, each in the group whose width fits its cache (``fits``),
        else in a new group (the nearest one when there are ``MAX_GROUPS``). An encoder-decoder
        batch (which takes rows only while empty) is one group."""
        if getattr(state, "mask", None) is None:
            self.groups.append(_Group(rows, state, logits))
            return
        own = state.mask.sum(1).tolist()
        widths = [g.width for g in self.groups]
        parts: dict[int, list[int]] = {}
        for j in sorted(range(len(rows)), key=own.__getitem__):
            near = sorted(range(len(widths)), key=lambda k: abs(widths[k] - own[j]))
            k = next((k for k in near if fits(widths[k], own[j])), None)
            if k is None and len(widths) < MAX_GROUPS:
                k = len(widths)
                widths.append(own[j])
            k = near[0] if k is None else k
            widths[k] = max(widths[k], own[j])
            parts.setdefault(k, []).append(j)
        for k, js in sorted(parts.items()):
            js.sort()
            part = state if len(js) == len(rows) else state.gather(js)
            new = _Group([rows[j] for j in js], part, logits[js])
            if k < len(self.groups):
                self._merge(self.groups[k], new)
            else:
                self.groups.append(new)

    @staticmethod
    def _merge(g: _Group, other: _Group) -> None:
        g.state, g.logits = merge_states(g.state, other.state), torch.cat([g.logits, other.logits])
        g.rows += other.rows

    def _regroup(self) -> None:
        """Merge groups whose widths have come together (rows left, the others grew)."""
        self.groups.sort(key=lambda g: g.width)
        k = 1
        while k < len(self.groups):
            a, b = self.groups[k - 1], self.groups[k]
            if fits(b.width, a.width):
                self._merge(a, b)
                del self.groups[k]
            else:
                k += 1

    @torch.no_grad()
    def advance(self) -> None:
        """One prefill forward of its own, of at most ``budget()`` tokens (at most ``prefill_chunk``
        per row), for the rows still being prefilled; finished ones start decoding."""
        if self.pending:
            self._joined(self.filling.advance(self.budget(), self.chunk))

    def _joined(self, finished) -> None:
        done, state, logits = finished
        if done:
            self._join([self.pending[j] for j in done], state, logits)
            self.pending = [r for j, r in enumerate(self.pending) if j not in set(done)]

    @torch.no_grad()
    def step(self, side: Forward | None = None, fill: bool = True) -> list[StepEvent]:
        """One token for every decoding row; finished rows leave; the rest advance one position.
        In the same forward (``fused.run``): with ``fill``, the next prefill piece of the rows
        being prefilled (those whose prompt is consumed start decoding, their first token at the
        next step), and ``side``, a forward of the caller's (a scoring slice: it gets its
        ``out`` or ``error``). Every group's tokens are chosen before anything changes
        (``touched`` stays False), so a failure there leaves the batch as it was. A failed
        prefill piece is raised, or with ``strict=False`` kept in ``fill_error`` while the
        decoding rows go on."""
        self.touched, self.fill_error = False, None
        picks = [self._pick(g) for g in self.groups]
        self.touched = True
        piece = self.filling.plan(self.budget(), self.chunk) if fill and self.pending else None
        events, decoding = [], []
        for p in picks:
            events += self._apply(p)
            g = p.group
            if g.rows and not isinstance(g.state, DecoderState):  # encoder-decoder: its own step
                g.logits = g.state.step(self.engine.tensor(p.feed))
            elif g.rows:
                decoding.append((g, Forward(g.state, self.engine.tensor(p.feed)[:, None],
                                            torch.ones(len(p.feed), 1, dtype=torch.long, device=self.engine.device))))
        fused.run(self.engine.model, [f for f in (piece, side) if f is not None] + [f for _, f in decoding])
        for g, f in decoding:
            if f.error is not None:
                raise f.error
            g.logits = lm_logits(self.engine.model, f.hidden[:, -1])
        self.groups = [g for g in self.groups if g.rows]
        if fill and self.pending:
            if piece is not None and piece.error is not None:
                self.fill_error = piece.error
                if self.strict:
                    raise piece.error
            else:
                self._joined(self.filling.finish(piece))
        if len(self.groups) > 1:
            self._regroup()
        return events

    def decode(self) -> list[StepEvent]:
        """``step`` without prefilling."""
        return self.step(fill=False)

    def _pick(self, g: _Group) -> _Picks:
        rows = g.rows
        tokens = pick_tokens(g.logits, [r.cfg for r in rows], [r.seen for r in rows], [r.gen for r in rows])
        asked = [j for j, (r, t) in enumerate(zip(rows, tokens, strict=True)) if r.logprobs is not None and t not in r.stops]
        lps = step_logprobs(g.logits, asked, [tokens[j] for j in asked], [rows[j].logprobs for j in asked])
        return _Picks(g, tokens, dict(zip(asked, lps, strict=True)))

    def _apply(self, p: _Picks) -> list[StepEvent]:
        """The group's events; its finished rows leave; ``p.feed``: the tokens the rest run next."""
        g = p.group
        events, keep = [], []
        for j, (r, t) in enumerate(zip(g.rows, p.tokens, strict=True)):
            logits = g.logits[j].float().clone() if self.keep_logits else None
            if t in r.stops:
                events.append(StepEvent(r.rid, None, "stop", logits))
                continue
            r.seen.append(t)
            r.n_out += 1
            done = r.n_out >= r.cfg.max_new_tokens
            events.append(StepEvent(r.rid, t, "length" if done else None, logits, p.logprobs.get(j)))
            if not done:
                keep.append(j)
                p.feed.append(t)
        self._keep(g, keep)
        return events

    def cancel(self, rids) -> None:
        """Drop rows (client gone, stop string hit); the others are unaffected."""
        drop = set(rids)
        for g in self.groups:
            self._keep(g, [j for j, r in enumerate(g.rows) if r.rid not in drop])
        self.groups = [g for g in self.groups if g.rows]
        kept = [j for j, r in enumerate(self.pending) if r.rid not in drop]
        self.filling.keep(kept)
        self.pending = [self.pending[j] for j in kept]

    @staticmethod
    def _keep(g: _Group, keep: list[int]) -> None:
        if len(keep) == len(g.rows):
            return
        g.rows = [g.rows[j] for j in keep]
        if keep:
            g.state.take(keep)
            g.logits = g.logits[keep]
