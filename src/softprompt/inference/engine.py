"""Inference: one frozen model, a bank of soft prompts, mixed-task batches, our own decode loop.

``Engine`` holds the model, a ``bank.PromptBank`` (prompts by name, loaded lazily from the store,
an LRU bound on how many stay resident, fingerprint-checked) and a ``bank.PrefixCache``
(per-prompt keys/values, byte-bounded LRU). ``Engine.generate`` and
``Engine.score`` take lists of requests, each naming its prompt (or none) and, for generation,
its own ``GenerateConfig``; all of them run as one batch (chunks of ``max_batch_rows``).

Decoder-only layout of row i (prompt length N_i, T_i input tokens), built per layer:

    cache columns  [pad x (maxN - N_i)][prefix keys/values of prompt i]    (B, kv, maxN, d)
    token block    [pad x (maxT - T_i)][tokens of row i]                   (B, maxT)

Pads carry attention_mask 0; position ids start at 0 at the first virtual token (tokens of row
i sit at N_i, N_i+1, ...), so each row computes exactly ``[its prompt][its tokens]``. The
prefix keys/values do not depend on the input (causal attention, prompt first), so they are
computed once per prompt and reused by every request. With
``use_prefix_cache=False`` the reference path runs ``[pad][P_i][x_i]`` through the whole model.

Rows that finish (EOS or their max_new_tokens) leave the batch: their rows are dropped from
the cache, and key columns that are padding for every remaining row are cut off. Everything
goes through public arguments (``inputs_embeds``, ``attention_mask``, ``position_ids``,
``past_key_values``); nothing in transformers is patched. Encoder-decoder models put the prompt
in front of the encoder input (``seq2seq.py``); they have no prefix cache.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from softprompt.config import EngineConfig, GenerateConfig, UserError
from softprompt.forward import embed, seq2seq
from softprompt.inference.bank import PrefixCache, PrefixKV, PromptBank, compute_prefix

log = logging.getLogger(__name__)
ANON = "<tensor>"  # bank name of the prompt tensor handed to the module-level generate()


@dataclass(frozen=True)
class GenerateRequest:
    text: str
    prompt: str | None = None  # a name in the bank/store; None = the plain model
    config: GenerateConfig = field(default_factory=GenerateConfig)
    token_ids: tuple[int, ...] | None = None  # already tokenised input; replaces ``text``


@dataclass(frozen=True)
class ScoreRequest:
    text: str  # the context
    targets: tuple[str, ...]  # continuations to score (tokenised separately from the context)
    prompt: str | None = None


@dataclass(frozen=True)
class ScoreRow:
    """``ScoreRequest`` at token level."""

    context: tuple[int, ...]
    targets: tuple[tuple[int, ...], ...]
    prompt: str | None = None


@dataclass
class ScoreResult:
    logprobs: list[float]  # summed log-probability of each target
    n_tokens: list[int]  # tokens of each target


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int  # real input tokens
    virtual_tokens: int  # N of the soft prompt (0 for the plain model)
    finish_reason: str  # "stop" (EOS) or "length"
    seconds: float  # wall time of the batch that produced it
    prompt: str | None = None  # the prompt's name
    logits: torch.Tensor | None = field(default=None, repr=False)  # (steps, V) raw, if asked for


# ---------------------------------------------------------------- sampling


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL / transformers rule: positive logits divided by the penalty, negative multiplied."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(-1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(-1, seen, picked)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(descending=True)
    probs = sorted_logits.softmax(-1)
    drop = probs.cumsum(-1) - probs > top_p  # keep the smallest set whose mass reaches top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def pick_token(logits: torch.Tensor, seen: torch.Tensor, cfg: GenerateConfig, gen: torch.Generator) -> int:
    """One next token from (V,) logits."""
    logits = apply_repetition_penalty(logits.float(), seen, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return int(logits.argmax())
    logits = top_p_filter(logits / cfg.temperature, cfg.top_p)
    return int(torch.multinomial(F.softmax(logits, -1), 1, generator=gen))


# ---------------------------------------------------------------- decoder-only batch state


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and mask, each row right-aligned."""
    T = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, T - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, T - len(s) :] = 1
    return ids, mask


def batch_prefix(prefixes: list[PrefixKV | None], config) -> tuple[DynamicCache, torch.Tensor]:
    """Per-row prefix keys/values right-aligned into one cache: layers (B, kv, maxN, d), mask (B, maxN)."""
    B = len(prefixes)
    maxN = max((p.n for p in prefixes if p is not None), default=0)
    ref = next((p for p in prefixes if p is not None), None)
    mask = torch.zeros(B, maxN, dtype=torch.long, device=None if ref is None else ref.keys.device)
    if maxN == 0:
        return DynamicCache(config=config), mask
    L, kv, _, d = ref.keys.shape
    keys = ref.keys.new_zeros(L, B, kv, maxN, d)
    values = ref.values.new_zeros(L, B, kv, maxN, d)
    for i, p in enumerate(prefixes):
        if p is not None:
            keys[:, i, :, maxN - p.n :] = p.keys
            values[:, i, :, maxN - p.n :] = p.values
            mask[i, maxN - p.n :] = 1
    return DynamicCache(ddp_cache_data=list(zip(keys.unbind(0), values.unbind(0))), config=config), mask


class DecoderState:
    """Cache, attention mask (B, L) and next position (B,) of a decoder-only batch."""

    def __init__(self, model, cache: DynamicCache, mask: torch.Tensor, next_pos: torch.Tensor):
        self.model, self.cache, self.mask, self.next_pos = model, cache, mask, next_pos

    def hidden(self, ids: torch.Tensor, tmask: torch.Tensor) -> torch.Tensor:
        """Run (B, C) tokens after the cache (``tmask`` 0 = right padding); hidden (B, C, H)."""
        pos = self.next_pos[:, None] + (tmask.cumsum(1) - 1).clamp(min=0)  # (B, C); pads: any value
        self.mask = torch.cat([self.mask, tmask], 1)
        out = self.model.base_model(inputs_embeds=embed(self.model, ids), attention_mask=self.mask,
                                    position_ids=pos, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        self.next_pos = self.next_pos + tmask.sum(1)
        return out.last_hidden_state

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,), return next-token logits (B, V)."""
        h = self.hidden(tokens[:, None], torch.ones(tokens.shape[0], 1, dtype=torch.long, device=tokens.device))
        return self.model.get_output_embeddings()(h[:, -1])

    def take(self, rows: list[int]) -> None:
        """Keep (or repeat) ``rows``; drop key columns that are padding for every kept row.

        Exact: positions are explicit and masked columns contribute nothing to attention.
        """
        idx = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask[idx]
        cols = mask.any(0).nonzero()[:, 0]  # (L',)
        if cols.numel() == mask.shape[1]:
            cols = slice(None)
        layers = [(ly.keys[idx][:, :, cols], ly.values[idx][:, :, cols]) for ly in self.cache.layers]
        self.cache = DynamicCache(ddp_cache_data=layers, config=self.model.config)
        self.mask, self.next_pos = mask[:, cols], self.next_pos[idx]


# ---------------------------------------------------------------- the engine


@dataclass
class _Row:
    ids: list[int]
    prompt: str | None
    emb: torch.Tensor | None  # (N, H)
    version: tuple | None

    @property
    def n(self) -> int:
        return 0 if self.emb is None else int(self.emb.shape[0])


class Engine:
    """One frozen model (``models.LoadedModel``) serving many prompts in mixed batches."""

    def __init__(self, lm, cfg: EngineConfig | None = None):
        self.lm, self.cfg = lm, cfg or EngineConfig()
        self.device = next(lm.model.parameters()).device  # inputs go here; sampling stays on the CPU
        self.bank = PromptBank(lm.fingerprint, self.cfg.max_resident_prompts, self.cfg.force)
        self.prefixes = PrefixCache(int(self.cfg.prefix_cache_mb * 2**20))
        tok = lm.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.eos_id = tok.eos_token_id

    @property
    def model(self):
        return self.lm.model

    def add_prompt(self, name: str, embeddings: torch.Tensor, meta: dict | None = None) -> None:
        self.bank.add(name, embeddings, meta)

    def encode(self, text: str) -> list[int]:
        return self.lm.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _rows(self, items: list[tuple[list[int], str | None]]) -> list[_Row]:
        """Resolve every prompt before any compute: a bad name fails the call, not half of it."""
        rows = []
        for ids, name in items:
            emb, version = None, None
            if name is not None:
                sp, version = self.bank.get(name)
                emb = sp.embeddings
            if not ids and emb is None:
                raise UserError("empty input text: give some text to continue (or a prompt)")
            rows.append(_Row(list(ids), name, emb, version))
        return rows

    def _prefix(self, row: _Row) -> PrefixKV | None:
        if row.emb is None:
            return None
        return self.prefixes.get((row.prompt, row.version), lambda: compute_prefix(self.model, row.emb.to(self.device)))

    def tensor(self, data, dtype=torch.long) -> torch.Tensor:
        """A tensor on the model's device."""
        return torch.as_tensor(data, dtype=dtype).to(self.device)

    # ------------------------------------------------ prefill

    def _prefill(self, rows: list[_Row]):
        """Decoder-only: run every row's [prompt][tokens]; (state, final hidden (B, H))."""
        if self.cfg.use_prefix_cache:
            return self._prefill_cached(rows)
        return self._prefill_naive(rows)

    def _prefill_cached(self, rows: list[_Row]):
        model = self.model
        prefixes = [self._prefix(r) for r in rows]
        cache, pmask = batch_prefix(prefixes, model.config)
        ids, tmask = (t.to(self.device) for t in left_pad([r.ids for r in rows], self.pad_id))  # (B, maxT)
        state = DecoderState(model, cache, pmask.to(self.device), self.tensor([r.n for r in rows]))
        h = state.hidden(ids, tmask) if ids.shape[1] else None  # (B, maxT, H)
        last = [h[i, -1] if r.ids else prefixes[i].last for i, r in enumerate(rows)]
        return state, torch.stack(last)

    def _prefill_naive(self, rows: list[_Row]):
        model = self.model
        seqs = []
        for r in rows:
            x = embed(model, self.tensor(r.ids))  # (T, H)
            seqs.append(x if r.emb is None else torch.cat([r.emb.to(x.device, x.dtype), x]))  # (N+T, H)
        L, H = max(s.shape[0] for s in seqs), seqs[0].shape[1]
        x = seqs[0].new_zeros(len(rows), L, H)
        mask = torch.zeros(len(rows), L, dtype=torch.long, device=self.device)
        for i, s in enumerate(seqs):
            x[i, L - s.shape[0] :], mask[i, L - s.shape[0] :] = s, 1
        pos = (mask.cumsum(1) - 1).clamp(min=0)  # 0 at the first real (virtual) token
        out = model.base_model(inputs_embeds=x, attention_mask=mask, position_ids=pos,
                               past_key_values=DynamicCache(config=model.config), use_cache=True)
        state = DecoderState(model, out.past_key_values, mask, mask.sum(1))
        return state, out.last_hidden_state[:, -1]

    def _start(self, rows: list[_Row]):
        """(state with .step/.take, first next-token logits (B, V))."""
        if self.lm.is_encoder_decoder:
            hidden, mask = seq2seq.encode(self.model, [r.emb for r in rows], [r.ids for r in rows])
            state = seq2seq.Seq2SeqState(self.model, hidden, mask)
            return state, state.step(state.start_tokens())
        state, last = self._prefill(rows)
        return state, self.model.get_output_embeddings()(last)

    # ------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, requests: list[GenerateRequest], return_logits: bool = False) -> list[Generation]:
        """Generate for every request in one mixed batch (chunks of ``max_batch_rows``)."""
        rows = self._rows([(list(r.token_ids) if r.token_ids is not None else self.encode(r.text), r.prompt)
                           for r in requests])
        out: list[Generation | None] = [None] * len(rows)
        for chunk in self._chunks(rows):
            gens = self._generate_chunk([rows[i] for i in chunk], [requests[i].config for i in chunk], return_logits)
            for i, g in zip(chunk, gens):
                out[i] = g
        return out  # type: ignore[return-value]

    def _chunks(self, rows: list[_Row]) -> list[list[int]]:
        """Row indices sorted by length (less padding), cut into batches."""
        order = sorted(range(len(rows)), key=lambda i: rows[i].n + len(rows[i].ids))
        size = self.cfg.max_batch_rows
        return [order[s : s + size] for s in range(0, len(order), size)]

    def _generate_chunk(self, rows: list[_Row], cfgs: list[GenerateConfig], return_logits: bool) -> list[Generation]:
        t0 = time.perf_counter()
        B = len(rows)
        log.debug("generate: %d rows, %d distinct prompts", B, len({r.prompt for r in rows}))
        state, logits = self._start(rows)
        gens = [torch.Generator().manual_seed(c.seed) for c in cfgs]
        seen = [list(r.ids) for r in rows]
        outs: list[list[int]] = [[] for _ in range(B)]
        steps: list[list[torch.Tensor]] = [[] for _ in range(B)]
        finish = ["length"] * B
        alive = list(range(B))  # original row of each state row
        while alive:
            picks = self._pick(logits, [cfgs[i] for i in alive], [seen[i] for i in alive], [gens[i] for i in alive])
            keep, feed = [], []
            for j, (i, t) in enumerate(zip(alive, picks)):
                if return_logits:
                    steps[i].append(logits[j].float().clone())
                if t == self.eos_id:
                    finish[i] = "stop"
                    continue
                outs[i].append(t)
                seen[i].append(t)
                if len(outs[i]) < cfgs[i].max_new_tokens:
                    keep.append(j)
                    feed.append(t)
            if not keep:
                break
            if len(keep) < len(alive):  # finished rows stop costing work
                state.take(keep)
                alive = [alive[j] for j in keep]
            logits = state.step(self.tensor(feed))
        dt = time.perf_counter() - t0
        tok = self.lm.tokenizer
        return [Generation(text=tok.decode(outs[i], skip_special_tokens=True), token_ids=outs[i],
                           prompt_tokens=len(r.ids), virtual_tokens=r.n, finish_reason=finish[i], seconds=dt,
                           prompt=r.prompt if r.prompt != ANON else None,
                           logits=torch.stack(steps[i]) if return_logits else None)
                for i, r in enumerate(rows)]

    @staticmethod
    def _pick(logits: torch.Tensor, cfgs, seen, gens) -> list[int]:
        """Next token per row; plain greedy rows in one argmax, the others one by one."""
        plain = [c.temperature == 0 and c.repetition_penalty == 1.0 for c in cfgs]
        out = logits.float().argmax(-1).tolist() if any(plain) else [0] * len(cfgs)
        for j, c in enumerate(cfgs):
            if not plain[j]:
                out[j] = pick_token(logits[j].cpu(), torch.tensor(seen[j], dtype=torch.long), c, gens[j])
        return out

    # ------------------------------------------------ scoring

    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        """Log-likelihood of each target after its context, under each request's prompt."""
        return self.score_rows([ScoreRow(tuple(self.encode(r.text)), tuple(tuple(self.encode(t)) for t in r.targets),
                                         r.prompt) for r in requests])

    @torch.no_grad()
    def score_rows(self, requests: list[ScoreRow]) -> list[ScoreResult]:
        for r in requests:
            if not r.targets or any(len(t) == 0 for t in r.targets):
                raise UserError("every score target must be non-empty text")
        rows = self._rows([(list(r.context), r.prompt) for r in requests])
        out: list[ScoreResult | None] = [None] * len(rows)
        for chunk in self._chunks(rows):
            lps = self._score_chunk([rows[i] for i in chunk], [requests[i].targets for i in chunk])
            for i, lp in zip(chunk, lps):
                out[i] = ScoreResult(logprobs=lp, n_tokens=[len(t) for t in requests[i].targets])
        return out  # type: ignore[return-value]

    def _score_chunk(self, rows: list[_Row], targets: list[tuple[tuple[int, ...], ...]]) -> list[list[float]]:
        if self.lm.is_encoder_decoder:
            hidden, mask = seq2seq.encode(self.model, [r.emb for r in rows], [r.ids for r in rows])
            idx = [i for i, ts in enumerate(targets) for _ in ts]
            flat = [list(t) for ts in targets for t in ts]
            lp = seq2seq.target_logprobs(self.model, hidden[idx], mask[idx], flat).tolist()
            return _unflatten(lp, targets)
        head = self.model.get_output_embeddings()
        state, last = self._prefill(rows)
        first = F.log_softmax(head(last).float(), -1)  # (B, V): predicts every target's first token
        scores = [[float(first[i, t[0]]) for t in ts] for i, ts in enumerate(targets)]
        longer = [(i, k) for i, ts in enumerate(targets) for k, t in enumerate(ts) if len(t) > 1]
        if longer:  # the rest of each target runs on top of a copy of its row's cache
            state.take([i for i, _ in longer])
            rest = [list(targets[i][k]) for i, k in longer]
            C = max(len(t) for t in rest) - 1
            feed = torch.full((len(rest), C), self.pad_id, dtype=torch.long)
            fmask = torch.zeros(len(rest), C, dtype=torch.long)
            for j, t in enumerate(rest):
                feed[j, : len(t) - 1], fmask[j, : len(t) - 1] = torch.tensor(t[:-1]), 1
            feed, fmask = feed.to(self.device), fmask.to(self.device)
            h = state.hidden(feed, fmask)  # (M, C, H); position c predicts token c+1
            sel = fmask.bool()
            gold = self.tensor([tok for t in rest for tok in t[1:]])
            lp = F.log_softmax(head(h[sel]).float(), -1).gather(-1, gold[:, None])[:, 0]
            per = torch.zeros(len(rest), device=self.device).index_add_(0, sel.nonzero()[:, 0], lp)
            for (i, k), v in zip(longer, per.tolist()):
                scores[i][k] += v
        return scores

    # ------------------------------------------------ bookkeeping

    def stats(self) -> dict:
        model_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return {"resident_prompts": self.bank.resident(), "prompt_bytes": self.bank.nbytes(),
                "prefix_cache": {"entries": len(self.prefixes), "bytes": self.prefixes.nbytes,
                                 "max_bytes": self.prefixes.max_bytes, "hits": self.prefixes.hits,
                                 "misses": self.prefixes.misses},
                "model_bytes": model_bytes}


def _unflatten(flat: list[float], targets) -> list[list[float]]:
    out, s = [], 0
    for ts in targets:
        out.append(flat[s : s + len(ts)])
        s += len(ts)
    return out


@torch.no_grad()
def generate(lm, prompt: torch.Tensor | None, text: str, cfg: GenerateConfig) -> Generation:
    """Generate a continuation of ``text`` under ``prompt`` (None = the plain model)."""
    eng = Engine(lm)
    if prompt is not None:
        eng.add_prompt(ANON, prompt)
    return eng.generate([GenerateRequest(text, ANON if prompt is not None else None, cfg)])[0]


# ---------------------------------------------------------------- step-wise decoding (continuous batching)


def merge_states(a: DecoderState, b: DecoderState) -> DecoderState:
    """Stack two decoder-only batches: key columns right-aligned, the narrower one left-padded.

    Exact: the added columns have attention mask 0 and positions are explicit (``next_pos``).
    """
    La, Lb = a.mask.shape[1], b.mask.shape[1]
    L = max(La, Lb)

    def pad(t: torch.Tensor, n: int) -> torch.Tensor:  # (B, kv, n, d) -> (B, kv, L, d)
        return t if n == L else torch.cat([t.new_zeros(*t.shape[:2], L - n, t.shape[3]), t], 2)

    layers = [(torch.cat([pad(x.keys, La), pad(y.keys, Lb)]), torch.cat([pad(x.values, La), pad(y.values, Lb)]))
              for x, y in zip(a.cache.layers, b.cache.layers, strict=True)]
    mask = torch.cat([F.pad(a.mask, (L - La, 0)), F.pad(b.mask, (L - Lb, 0))])  # (Ba+Bb, L)
    cache = DynamicCache(ddp_cache_data=layers, config=a.model.config)
    return DecoderState(a.model, cache, mask, torch.cat([a.next_pos, b.next_pos]))


@dataclass
class StepEvent:
    rid: int  # the id ``StepBatch.add`` gave the row
    token: int | None  # the new token; None when the row ended on EOS
    finish_reason: str | None  # "stop" (EOS) or "length" when the row left the batch, else None


@dataclass
class _Live:
    rid: int
    cfg: GenerateConfig
    seen: list[int]  # input + generated tokens (repetition penalty)
    gen: torch.Generator
    n_out: int = 0


class StepBatch:
    """Iteration-level scheduling: rows join (``add``) and leave (finish, ``cancel``) between steps.

    ``step`` picks one token for every live row with the same rules as ``Engine.generate``
    (per-row config and seeded generator), so a row's tokens do not depend on when it joined or
    on its neighbours. New decoder-only rows are prefilled together and stacked onto the running
    cache (``merge_states``). Encoder-decoder batches (T5: decoder positions are implicit) only
    take new rows while empty (``can_join``). Not thread-safe: one thread drives it.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.state = None
        self.logits: torch.Tensor | None = None  # (B, V) next-token logits of the live rows
        self.live: list[_Live] = []
        self._ids = 0

    def __len__(self) -> int:
        return len(self.live)

    @property
    def can_join(self) -> bool:
        return not self.live or not self.engine.lm.is_encoder_decoder

    @torch.no_grad()
    def add(self, requests: list[GenerateRequest]) -> list[int]:
        """Prefill ``requests`` (one forward) and join them; returns their row ids."""
        if not requests:
            return []
        if not self.can_join:
            raise RuntimeError("an encoder-decoder batch takes new rows only while empty")
        eng = self.engine
        rows = eng._rows([(list(r.token_ids) if r.token_ids is not None else eng.encode(r.text), r.prompt)
                          for r in requests])  # a bad prompt fails here, before any compute
        state, logits = eng._start(rows)
        if self.live:
            self.state, self.logits = merge_states(self.state, state), torch.cat([self.logits, logits])
        else:
            self.state, self.logits = state, logits
        ids = list(range(self._ids, self._ids + len(rows)))
        self._ids += len(rows)
        self.live += [_Live(i, r.config, list(row.ids), torch.Generator().manual_seed(r.config.seed))
                      for i, r, row in zip(ids, requests, rows, strict=True)]
        return ids

    @torch.no_grad()
    def step(self) -> list[StepEvent]:
        """One token for every live row; finished rows leave; the rest advance one position."""
        if not self.live:
            return []
        live = self.live
        picks = self.engine._pick(self.logits, [r.cfg for r in live], [r.seen for r in live], [r.gen for r in live])
        events, keep, feed = [], [], []
        for j, (r, t) in enumerate(zip(live, picks, strict=True)):
            if t == self.engine.eos_id:
                events.append(StepEvent(r.rid, None, "stop"))
                continue
            r.seen.append(t)
            r.n_out += 1
            done = r.n_out >= r.cfg.max_new_tokens
            events.append(StepEvent(r.rid, t, "length" if done else None))
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

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.live):
            return
        self.live = [self.live[j] for j in keep]
        if keep:
            self.state.take(keep)
            self.logits = self.logits[keep]
        else:
            self.state = self.logits = None
