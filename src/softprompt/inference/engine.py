"""Inference: one frozen model, a bank of soft prompts, mixed-task batches, our own decode loop.

``Engine`` holds the model, a ``bank.PromptBank`` (prompts by name, loaded lazily from its ``store.Store``,
an LRU bound on how many stay resident, fingerprint-checked) and a ``bank.PrefixCache`` (per-prompt keys/values,
byte-bounded LRU). ``Engine.generate``/``score`` take requests, each naming its prompt (or none) and, for
generation, its own ``GenerateConfig``; all run as one batch (chunks of ``max_batch_rows``).

Row API (the decode loop ``steps.StepBatch`` and the server): ``request_rows`` resolves requests to ``Row``s
(every prompt first), ``start`` prefills them (state, first logits); ``generate`` runs ``StepBatch`` to the end.

Decoder-only rows are laid out as ``kv.py`` describes: each row's prompt as a key/value prefix
(computed once per prompt and reused by every request: causal attention, prompt first), then its
tokens, all left-padded, positions explicit. With ``use_prefix_cache=False`` the reference path
runs ``[pad][P_i][x_i]`` through the whole model. Only public arguments (``inputs_embeds``, ``attention_mask``,
``position_ids``, ``past_key_values``, ``prefix_memory`` for ``memory.py``'s attention); nothing is patched.
Encoder-decoder models put the prompt in front of the encoder input (``forward.seq2seq``; no prefix cache).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator
from dataclasses import dataclass, field

import torch

from softprompt.chat import encode, stop_tokens
from softprompt.compat import cache_kw, returned_cache
from softprompt.config import EngineConfig, GenerateConfig, UserError
from softprompt.forward import embed, lm_logits, seq2seq
from softprompt.inference import footprint, scoring
from softprompt.inference.bank import PrefixCache, PrefixKV, PromptBank, compute_prefix, deep_prefix
from softprompt.inference.footprint import MiB
from softprompt.inference.fused import Forward
from softprompt.inference.kv import DecoderState, batch_prefix, left_pad, memory_kw, row_extras
from softprompt.inference.logprobs import TokenLogprob
from softprompt.inference.steps import StepBatch
from softprompt.offset import add_offset
from softprompt.store import Store

__all__ = ["ANON", "Engine", "EngineConfig", "GenerateRequest", "Generation", "PromptLogprobRow", "Row",
           "ScoreRequest", "ScoreResult", "ScoreRow", "StepBatch", "generate", "stop_tokens"]

log = logging.getLogger(__name__)
ANON = "<tensor>"  # bank name of the prompt tensor handed to the module-level generate()


@dataclass(frozen=True)
class GenerateRequest:
    text: str
    prompt: str | None = None  # a name in the bank/store; None = the plain model
    config: GenerateConfig = field(default_factory=GenerateConfig)
    token_ids: tuple[int, ...] | None = None  # already tokenised input; replaces ``text``
    logprobs: int | None = None  # None: no log-probabilities; k: each token's and its top k (0..20)
    stop_ids: tuple[int, ...] = ()  # tokens that end the row like EOS (a chat template's end of turn)


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


@dataclass(frozen=True)
class PromptLogprobRow:
    """Input tokens whose log-probabilities ``Engine.prompt_logprobs`` returns."""

    token_ids: tuple[int, ...]
    prompt: str | None = None
    top_k: int = 0  # most likely alternatives to return per token (0..20)


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
    logprobs: list[TokenLogprob] | None = None  # one per generated token, if the request asked for them


# ---------------------------------------------------------------- the engine


@dataclass
class Row:
    """One request resolved: its tokens and its prompt (looked up in the bank)."""

    ids: list[int]
    prompt: str | None
    emb: torch.Tensor | None  # (N, H) shallow prompt
    version: tuple | None
    deep: torch.Tensor | None = None  # (L, 2, kv, N, d) deep prompt
    offset: torch.Tensor | None = None  # (T_max, H) DePT input offset of a shallow prompt (``offset.py``)
    memory: torch.Tensor | None = None  # (L, heads, d, d) PrefixMemory of a deep prompt (``memory.py``)

    @property
    def n(self) -> int:
        if self.deep is not None:
            return int(self.deep.shape[3])
        return 0 if self.emb is None else int(self.emb.shape[0])


class Engine:
    """One frozen model (``models.LoadedModel``) serving many prompts in mixed batches."""

    def __init__(self, lm, cfg: EngineConfig | None = None, store: Store | None = None):  # no store: in-memory only
        self.lm, self.cfg, self.store = lm, cfg or EngineConfig(), store
        self.device = next(lm.model.parameters()).device  # inputs go here; sampling stays on the CPU
        self.bank = PromptBank(lm.fingerprint, self.cfg.max_resident_prompts, self.cfg.force, lm.kv_shape, store)
        self.prefixes = PrefixCache(int(self.cfg.prefix_cache_mb * 2**20))
        tok = lm.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.eos_id = tok.eos_token_id
        self.stop_ids = stop_tokens(lm)
        self.dims = footprint.Dims.of(lm)

    @property
    def model(self):
        return self.lm.model

    def add_prompt(self, name: str, embeddings: torch.Tensor, meta: dict | None = None, **sides) -> None:
        self.bank.add(name, embeddings, meta, **sides)  # sides: a stored prompt's offset / memory (``sides.py``)

    def encode(self, text: str) -> list[int]:
        return encode(self.lm.tokenizer, text)

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(self.lm.is_encoder_decoder)

    def request_rows(self, requests: list[GenerateRequest]) -> list[Row]:
        """``GenerateRequest``s resolved (tokenised, prompts looked up) into rows."""
        return self.rows([(list(r.token_ids) if r.token_ids is not None else self.encode(r.text), r.prompt)
                          for r in requests])

    def rows(self, items: list[tuple[list[int], str | None]]) -> list[Row]:
        """Resolve every prompt before any compute: a bad name fails the call, not half of it."""
        rows = []
        for ids, name in items:
            sp, version = self.bank.get(name) if name is not None else (None, None)
            emb, deep = (None, None) if sp is None else (sp.embeddings, sp.kv)
            if not ids and emb is None:
                raise UserError("empty input text: give some text to continue"
                                + (" (a deep prompt has no token of its own to continue from)" if deep is not None
                                   else " (or a prompt)"))
            rows.append(Row(list(ids), name, emb, version, deep, *((None, None) if sp is None else (sp.input_offset, sp.memory))))
        return rows

    def prefix(self, row: Row) -> PrefixKV | None:
        """The row's prompt as keys/values (prefix cache): computed for a shallow prompt, as stored for a deep one."""
        if row.deep is not None:
            dtype = self.model.get_input_embeddings().weight.dtype
            return self.prefixes.get((row.prompt, row.version), lambda: deep_prefix(row.deep, self.device, dtype))
        if row.emb is None:
            return None
        return self.prefixes.get((row.prompt, row.version), lambda: compute_prefix(self.model, row.emb.to(self.device)))

    def tensor(self, data, dtype=torch.long) -> torch.Tensor:
        """A tensor on the model's device."""
        return torch.as_tensor(data, dtype=dtype).to(self.device)

    # ------------------------------------------------ prefill

    def prefill(self, rows: list[Row]):
        """Decoder-only: run every row's [prompt][tokens]; (state, final hidden (B, H))."""
        if self.cfg.use_prefix_cache:
            return self._prefill_cached(rows)
        return self._prefill_naive(rows)

    def _prefill_cached(self, rows: list[Row]):
        model = self.model
        prefixes = [self.prefix(r) for r in rows]
        cache, pmask = batch_prefix(prefixes, model.config)
        ids, tmask = (t.to(self.device) for t in left_pad([r.ids for r in rows], self.pad_id))  # (B, maxT)
        state = DecoderState(model, cache, pmask.to(self.device), self.tensor([r.n for r in rows]), *row_extras(model, rows))
        h = state.hidden(ids, tmask) if ids.shape[1] else None  # (B, maxT, H)
        last = [h[i, -1] if r.ids else prefixes[i].last for i, r in enumerate(rows)]
        return state, torch.stack(last)

    def _prefill_naive(self, rows: list[Row]):
        """Reference: ``[pad][P_i][x_i]`` through the whole model; deep prompts (keys/values by
        nature) sit in the cache in front, their rows' positions starting at N_i."""
        model = self.model
        dtype = model.get_input_embeddings().weight.dtype
        cache, pmask = batch_prefix([None if r.deep is None else deep_prefix(r.deep, self.device, dtype) for r in rows],
                                    model.config)
        deep_n = self.tensor([r.n if r.deep is not None else 0 for r in rows])  # (B,)
        seqs = []
        for r in rows:
            x = embed(model, self.tensor(r.ids))  # (T, H)
            x = x if r.offset is None else add_offset(x[None], r.offset.to(x.device))[0]
            seqs.append(x if r.emb is None else torch.cat([r.emb.to(x.device, x.dtype), x]))  # (N+T, H)
        L, H = max(s.shape[0] for s in seqs), seqs[0].shape[1]
        x = seqs[0].new_zeros(len(rows), L, H)
        mask = torch.zeros(len(rows), L, dtype=torch.long, device=self.device)
        for i, s in enumerate(seqs):
            x[i, L - s.shape[0] :], mask[i, L - s.shape[0] :] = s, 1
        pos = deep_n[:, None] + (mask.cumsum(1) - 1).clamp(min=0)  # 0 at the first virtual token
        full = torch.cat([pmask.to(self.device), mask], 1)  # (B, maxN_deep + L)
        extras = row_extras(model, rows)  # (offsets, start, memory)
        out = model.base_model(inputs_embeds=x, attention_mask=full, position_ids=pos,
                               **cache_kw(model.base_model, cache), use_cache=True, **memory_kw(extras[2]))
        state = DecoderState(model, returned_cache(out), full, deep_n + mask.sum(1), *extras)
        return state, out.last_hidden_state[:, -1]

    def start(self, rows: list[Row]):
        """Prefill ``rows``: (state with .step/.take, first next-token logits (B, V))."""
        if self.lm.is_encoder_decoder:
            hidden, mask = seq2seq.encode(self.model, [r.emb for r in rows], [r.ids for r in rows])
            state = seq2seq.Seq2SeqState(self.model, hidden, mask)
            return state, state.step(state.start_tokens())
        state, last = self.prefill(rows)
        return state, lm_logits(self.model, last)

    # ------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, requests: list[GenerateRequest], return_logits: bool = False) -> list[Generation]:
        """Generate for every request in one mixed batch (chunks of ``max_batch_rows``)."""
        rows = self.request_rows(requests)
        out: list[Generation | None] = [None] * len(rows)
        for chunk in self.chunks(rows):
            gens = self._run_chunk([rows[i] for i in chunk], [requests[i].config for i in chunk], return_logits,
                                   [requests[i].logprobs for i in chunk], [requests[i].stop_ids for i in chunk])
            for i, g in zip(chunk, gens):
                out[i] = g
        return out  # type: ignore[return-value]

    def chunks(self, rows: list[Row]) -> list[list[int]]:
        """Row indices sorted by length (less padding), cut into batches."""
        order = sorted(range(len(rows)), key=lambda i: rows[i].n + len(rows[i].ids))
        size = self.cfg.max_batch_rows
        return [order[s : s + size] for s in range(0, len(order), size)]

    def _run_chunk(self, rows: list[Row], cfgs: list[GenerateConfig], return_logits: bool,
                   logprobs: list[int | None], stop_ids: list[tuple[int, ...]]) -> list[Generation]:
        """Every row of one chunk through the decode loop (``StepBatch``) until all have finished."""
        t0 = time.perf_counter()
        log.debug("generate: %d rows, %d distinct prompts", len(rows), len({r.prompt for r in rows}))
        batch = StepBatch(self, keep_logits=return_logits)
        where = {rid: j for j, rid in enumerate(batch.add_rows(rows, cfgs, logprobs, stop_ids))}
        outs: list[list[int]] = [[] for _ in rows]
        steps: list[list[torch.Tensor]] = [[] for _ in rows]
        lps: list[list[TokenLogprob]] = [[] for _ in rows]
        finish = ["length"] * len(rows)
        while len(batch):
            for e in batch.step():
                j = where[e.rid]
                if e.token is not None:
                    outs[j].append(e.token)
                if e.logits is not None:
                    steps[j].append(e.logits)
                if e.logprob is not None:
                    lps[j].append(e.logprob)
                if e.finish_reason is not None:
                    finish[j] = e.finish_reason
        dt = time.perf_counter() - t0
        tok = self.lm.tokenizer
        return [Generation(text=tok.decode(outs[j], skip_special_tokens=True), token_ids=outs[j],
                           prompt_tokens=len(r.ids), virtual_tokens=r.n, finish_reason=finish[j], seconds=dt,
                           prompt=r.prompt if r.prompt != ANON else None,
                           logits=torch.stack(steps[j]) if return_logits else None,
                           logprobs=None if logprobs[j] is None else lps[j])
                for j, r in enumerate(rows)]

    # ------------------------------------------------ scoring

    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        """Log-likelihood of each target after its context, under each request's prompt."""
        return self.score_rows([ScoreRow(tuple(self.encode(r.text)), tuple(tuple(self.encode(t)) for t in r.targets),
                                         r.prompt) for r in requests])

    def score_rows(self, requests: list[ScoreRow]) -> list[ScoreResult]:
        """Log-likelihood of each target after its context, under each row's prompt (in bounded
        memory: ``scoring``)."""
        return scoring.run(self.score_task(requests, self.forward_budget))

    def forward_budget(self) -> int:  # token slots one prefill or scoring forward may take
        return self.cfg.max_forward_tokens

    @torch.no_grad()
    def score_task(self, requests: list[ScoreRow], budget, group_bytes: int | None = None
                   ) -> Generator[Forward | None, torch.Tensor | None, list[ScoreResult]]:
        """``score_rows`` as a generator that yields every forward it needs (``scoring``), each of at most
        ``budget()`` slots, label groups of at most ``group_bytes`` (default ``score_group_mb``)."""
        group_bytes = group_bytes or int(self.cfg.score_group_mb * MiB)
        for r in requests:
            if not r.targets or any(len(t) == 0 for t in r.targets):
                raise UserError("every score target must be non-empty text")
        rows = self.rows([(list(r.context), r.prompt) for r in requests])
        out: list[ScoreResult | None] = [None] * len(rows)
        for chunk in self.chunks(rows):
            targets, crows = [requests[i].targets for i in chunk], [rows[i] for i in chunk]
            if self.lm.is_encoder_decoder:
                hidden, mask = seq2seq.encode(self.model, [r.emb for r in crows], [r.ids for r in crows])
                idx = [i for i, ts in enumerate(targets) for _ in ts]
                flat = [list(t) for ts in targets for t in ts]
                lps = _unflatten(seq2seq.target_logprobs(self.model, hidden[idx], mask[idx], flat).tolist(), targets)
                yield None
            else:
                lps = (yield from scoring.target_steps(self, crows, targets, None, budget, group_bytes))[0]
            for i, lp in zip(chunk, lps):
                out[i] = ScoreResult(logprobs=lp, n_tokens=[len(t) for t in requests[i].targets])
        return out

    # ------------------------------------------------ memory and context

    @property
    def context_length(self) -> int | None:
        """Positions the model was trained for (None: no fixed limit, e.g. T5's relative positions)."""
        c = self.model.config
        n = None if self.is_encoder_decoder else getattr(c, "max_position_embeddings", None)
        return int(n) if n else None

    def score_bytes(self, requests: list[ScoreRow], forward_tokens: int | None = None,
                    group_bytes: int | None = None) -> int:
        """Estimated peak working memory of ``score_rows(requests)`` (``footprint.score_bytes``)."""
        rows = self.rows([(list(r.context), r.prompt) for r in requests])
        return footprint.score_bytes(self.dims, [(r.n, len(r.ids), [len(t) for t in q.targets])
                                              for r, q in zip(rows, requests, strict=True)],
                                  self.cfg.max_batch_rows, forward_tokens or self.cfg.max_forward_tokens,
                                  group_bytes or int(self.cfg.score_group_mb * MiB))

    def generate_bytes(self, requests: list[GenerateRequest], chunk: int | None = None) -> int:
        """Estimated peak working memory ``requests`` bring into a decoding batch (``footprint.generate_bytes``)."""
        rows = self.request_rows(requests)
        return footprint.generate_bytes(self.dims, [(r.n, len(r.ids), q.config.max_new_tokens)
                                                 for r, q in zip(rows, requests, strict=True)],
                                     max(chunk or 0, self.cfg.max_forward_tokens))

    @torch.no_grad()
    def prompt_logprobs(self, requests: list[PromptLogprobRow]) -> list[list[TokenLogprob | None]]:
        """Each input token's log-probability given the tokens before it, under the row's prompt
        (OpenAI's ``echo`` with ``logprobs``): the same forward as ``score_rows``. The first token's
        entry is None, as OpenAI gives it (also under a soft prompt, which would predict it)."""
        if self.lm.is_encoder_decoder:
            raise UserError("prompt log-probabilities (echo) need a decoder-only model")
        out: list[list[TokenLogprob | None]] = [[None] if r.token_ids else [] for r in requests]
        todo = [j for j, r in enumerate(requests) if len(r.token_ids) > 1]
        rows = self.rows([(list(requests[j].token_ids[:1]), requests[j].prompt) for j in todo])
        for chunk in self.chunks(rows):
            reqs = [requests[todo[c]] for c in chunk]
            _, toks = scoring.run(scoring.target_steps(self, [rows[c] for c in chunk], [(r.token_ids[1:],) for r in reqs],
                                                       [r.top_k for r in reqs], self.forward_budget,
                                                       int(self.cfg.score_group_mb * MiB)))
            for c, tl in zip(chunk, toks, strict=True):
                out[todo[c]] += tl[0]
        return out

    # ------------------------------------------------ bookkeeping

    def stats(self) -> dict:
        model_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return {"resident_prompts": self.bank.resident(), "prompt_bytes": self.bank.nbytes(),
                "resident_deep_prompts": self.bank.resident_deep(),
                "prefix_cache": {"entries": len(self.prefixes), "bytes": self.prefixes.nbytes,
                                 "max_bytes": self.prefixes.max_bytes, "hits": self.prefixes.hits,
                                 "misses": self.prefixes.misses}, "model_bytes": model_bytes}


def _unflatten(flat: list[float], targets) -> list[list[float]]:
    out, s = [], 0
    for ts in targets:
        out.append(flat[s : s + len(ts)])
        s += len(ts)
    return out


@torch.no_grad()
def generate(lm, prompt: torch.Tensor | None, text: str, cfg: GenerateConfig,
             token_ids: list[int] | None = None, sides: dict | None = None) -> Generation:
    """Generate a continuation of ``text`` (or of ``token_ids``, e.g. ``chat.encode_chat``'s)
    under ``prompt`` (None = the plain model) and its ``sides`` (a stored prompt's offset/memory)."""
    eng = Engine(lm)
    if prompt is not None:
        eng.add_prompt(ANON, prompt, **(sides or {}))
    ids = tuple(token_ids) if token_ids is not None else None
    return eng.generate([GenerateRequest(text, ANON if prompt is not None else None, cfg, token_ids=ids)])[0]
