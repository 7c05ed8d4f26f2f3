"""Decoder-only scoring in bounded memory, as generators that pause at every forward.

``prefill_steps`` runs rows' ``[prompt][context]`` in forwards of at most ``budget()`` token
slots (column slices of the left-padded block). ``target_steps`` scores targets after it: each
target's first token from the context's last hidden state, the rest of each target on top of
a copy of its row's cache, in groups of (row, target) pairs whose copies and forward fit
``group_bytes`` and whose tokens fit ``budget()`` (at least one pair per group): the cache is
never copied once per input x label at once. A scheduler advances one forward per step (with
``budget`` the tokens it may spend beside decoding rows); ``run`` drives one to the end.
Each pause yields the forward it needs (``fused.Forward``, or None when the step ran its own)
and is resumed with its hidden states, so a scheduler can run it inside its decode step's
forward (``fused.run``).

Exact: positions are explicit and masked columns contribute nothing, so slicing the prefill
and grouping the pairs change batch shapes only (results equal the one-shot path to float
rounding, checked in ``tests/test_engine.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Generator

import torch
import torch.nn.functional as F

from softprompt.forward import lm_logits
from softprompt.inference.fused import Forward
from softprompt.inference.kv import DecoderState, batch_prefix, left_pad, row_extras
from softprompt.inference.logprobs import pick_logprobs

Steps = Generator[Forward | None, torch.Tensor | None, object]


def run(steps: Steps):
    """Drive a generator of this module to its end, each forward it asks for run on its own; its
    return value."""
    reply = None
    while True:
        try:
            want = steps.send(reply)
        except StopIteration as done:
            return done.value
        reply = None if want is None else want.run()


def prefill_steps(engine, rows: list, budget: Callable[[], int]):
    """Generator -> (state, final hidden (B, H)): ``Engine.prefill`` in slices of at most
    ``budget()`` token slots per forward (one forward on the reference path)."""
    if not engine.cfg.use_prefix_cache:
        out = engine.prefill(rows)
        yield None
        return out
    model = engine.model
    prefixes = [engine.prefix(r) for r in rows]
    cache, pmask = batch_prefix(prefixes, model.config)
    ids, tmask = (t.to(engine.device) for t in left_pad([r.ids for r in rows], engine.pad_id))  # (B, maxT)
    state = DecoderState(model, cache, pmask.to(engine.device), engine.tensor([r.n for r in rows]), *row_extras(model, rows))
    T, s = ids.shape[1], 0
    h: torch.Tensor | None = None
    while s < T:
        w = max(1, budget() // len(rows))
        h = yield Forward(state, ids[:, s : s + w], tmask[:, s : s + w])  # left pads in a slice: masked columns
        s += w
    last = [h[i, -1] if r.ids and h is not None else prefixes[i].last for i, r in enumerate(rows)]
    return state, torch.stack(last)


def target_steps(engine, rows: list, targets: list[tuple[tuple[int, ...], ...]], top_k: list[int] | None,
                 budget: Callable[[], int], group_bytes: int):
    """Generator -> (summed log-probability of each target after its row's [prompt][context],
    and with ``top_k`` (one k per row) every target token's ``TokenLogprob``, else None)."""
    state, last = yield from prefill_steps(engine, rows, budget)
    first = F.log_softmax(lm_logits(engine.model, last).float(), -1)  # (B, V): every target's first token
    scores = [[float(first[i, t[0]]) for t in ts] for i, ts in enumerate(targets)]
    toks = None
    if top_k is not None:
        pairs = [(i, k) for i, ts in enumerate(targets) for k in range(len(ts))]
        firsts = pick_logprobs(first[[i for i, _ in pairs]], [targets[i][k][0] for i, k in pairs],
                               [top_k[i] for i, _ in pairs])
        toks = [[[] for _ in ts] for ts in targets]
        for (i, k), tl in zip(pairs, firsts, strict=True):
            toks[i][k].append(tl)
    todo = [(i, k) for i, ts in enumerate(targets) for k, t in enumerate(ts) if len(t) > 1]
    width = [int(m.sum()) for m in state.mask]  # cache columns of each row
    while todo:
        group, used, tokens = [], 0, 0
        for i, k in todo:  # the next pairs whose copies fit the byte budget and whose tokens fit the step
            rest = len(targets[i][k]) - 1
            cost = engine.dims.pair_bytes(width[i], rest)
            if group and (used + cost > group_bytes or tokens + rest > budget()):
                break
            group.append((i, k))
            used, tokens = used + cost, tokens + rest
        todo = todo[len(group) :]
        yield from _score_rest(engine, state.gather([i for i, _ in group]), group, targets, scores, toks, top_k)
    return scores, toks


def _score_rest(engine, state: DecoderState, pairs: list[tuple[int, int]], targets, scores, toks, top_k
                ) -> Generator[Forward, torch.Tensor, None]:
    """Generator: the later tokens of ``pairs``' targets on ``state`` (one row per pair), added into
    ``scores`` (and ``toks``)."""
    rest = [list(targets[i][k]) for i, k in pairs]
    C = max(len(t) for t in rest) - 1
    feed = torch.full((len(rest), C), engine.pad_id, dtype=torch.long)
    fmask = torch.zeros(len(rest), C, dtype=torch.long)
    for j, t in enumerate(rest):
        feed[j, : len(t) - 1], fmask[j, : len(t) - 1] = torch.tensor(t[:-1]), 1
    feed, fmask = feed.to(engine.device), fmask.to(engine.device)
    h = yield Forward(state, feed, fmask)  # (M, C, H); position c predicts token c+1
    sel = fmask.bool()
    gold = [tok for t in rest for tok in t[1:]]
    logp = F.log_softmax(lm_logits(engine.model, h[sel]).float(), -1)  # (S, V), rows in target order
    lp = logp.gather(-1, engine.tensor(gold)[:, None])[:, 0]
    per = torch.zeros(len(rest), device=engine.device).index_add_(0, sel.nonzero()[:, 0], lp)
    for (i, k), v in zip(pairs, per.tolist()):
        scores[i][k] += v
    if toks is not None:
        more = iter(pick_logprobs(logp, gold, [top_k[i] for (i, _), t in zip(pairs, rest) for _ in t[1:]]))
        for (i, k), t in zip(pairs, rest, strict=True):
            toks[i][k] += [next(more) for _ in t[1:]]
