"""The method comparison: hand-written prompts vs prompt tuning vs LoRA vs full fine-tuning.

Fairness is by construction: every trained method runs through ``loop.fit`` (same loop,
schedule, batch order for a seed, step budget) and every method is scored by
``metrics.classify_metrics`` (the same label scoring); all methods see the same training set
for a (size, seed), the same dev set (early stopping, learning rate and template choice) and
the same test set (``compare_data.py``). Each trained method gets a small learning-rate sweep
and keeps the lr best on dev, so no method loses for a bad lr.

Invariants: the shared frozen model is never modified (LoRA and full fine-tuning train private
deep copies, see ``methods.py``; checked by a digest after the runs); every random choice is
seeded and the seeds are recorded. ``compare_report.py`` turns the result into JSON, Markdown
and plots.
"""

from __future__ import annotations

import functools
import gc
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from softprompt import data as D
from softprompt import metrics
from softprompt.adapter import PromptKind
from softprompt.config import (
    COMPARE_MIXED_BATCH as MIXED_BATCH,
)
from softprompt.config import (
    COMPARE_PROMPT_KINDS,
    CompareConfig,
    DataConfig,
    PromptConfig,
    TrainConfig,
    UserError,
)
from softprompt.config import (
    COMPARE_TRAINED as TRAINED,
)
from softprompt.experiments import compare_curve as CC
from softprompt.experiments import compare_data as CD
from softprompt.experiments.compare_runs import Journal, partial_path
from softprompt.experiments.measure import PeakMemory, latency_ms, weights_digest
from softprompt.provenance import loadavg, write_json
from softprompt.store import Store
from softprompt.training import methods
from softprompt.training import tune as TR
from softprompt.training.loop import fit, plan_steps

if TYPE_CHECKING:
    from softprompt.models import LoadedModel


def quick(cfg: CompareConfig) -> CompareConfig:
    """``--quick``: the whole pipeline at smoke-test size (one lr each, a few steps and rows; a curve's
    points capped at 3 steps)."""
    return replace(
        cfg,
        lr_sweep={m: v[:1] for m, v in cfg.lr_sweep.items()},
        budget=None if cfg.curve else cfg.budget or 3,
        curve=tuple(sorted({min(k, 3) for k in cfg.curve})),
        dev_sample=min(cfg.dev_sample or 8, 8),
        test_sample=min(cfg.test_sample or 16, 16),
        latency_requests=2,
        few_shot_tokens=min(cfg.few_shot_tokens, 128),
        few_shot_max_k=4,
    )


# ---------------------------------------------------------------- one comparison's shared state


@dataclass
class Context:
    lm: LoadedModel  # the shared frozen model
    splits: CD.CompareSplits
    ccfg: CompareConfig
    tcfg: TrainConfig
    pcfg: PromptConfig
    say: Callable[[str], None]
    progress: bool = False  # the training loop's progress bar
    hand_cfg: DataConfig | None = None  # the task's data settings with the best hand template
    tried: list[dict] = field(default_factory=list)  # every hand template's dev accuracy
    base_bytes: int = 0  # the shared model's weights file
    store: Store | None = None  # the prompts --init prompt:NAME reads

    @property
    def pad(self) -> int:
        return self.lm.tokenizer.pad_token_id

    def accuracy(self, score, examples) -> dict:
        tok, bs = self.lm.tokenizer, self.tcfg.eval_max_batch_rows
        return metrics.classify_metrics(score, tok, examples, self.splits.words, self.pad, bs)

    def latency(self, score, test) -> dict[str, float]:
        n = self.ccfg.latency_requests
        return latency_ms(score, self.lm.tokenizer, test, self.splits.words, self.pad, n)


# ---------------------------------------------------------------- hand-written prompts


def choose_template(ctx: Context) -> None:
    """The hand-written template best on dev with the plain model (zero-shot, first on ties)."""
    scorer = methods.HandPrompt(ctx.lm.model).score
    for tpl in ctx.splits.candidates:
        cfg = replace(ctx.splits.cfg, template=tpl)
        dev = ctx.splits.examples(cfg)[1]
        acc = ctx.accuracy(scorer, dev)["accuracy"] if dev else 0.0
        ctx.say(f"template {tpl!r}: zero-shot dev accuracy {acc:.4f}")
        ctx.tried.append({"template": tpl, "dev_accuracy": acc})
    best = max(ctx.tried, key=lambda t: t["dev_accuracy"])
    ctx.hand_cfg = replace(ctx.splits.cfg, template=best["template"])


def few_shot_budget(ctx: Context, examples) -> int:
    """Tokens left for demonstrations: the context minus the longest query and label word."""
    mc, tok = ctx.lm.model.config, ctx.lm.tokenizer
    ctx_len = getattr(mc, "max_position_embeddings", None) or getattr(mc, "n_positions", None) or ctx.ccfg.few_shot_tokens
    words = [len(D.encode(tok, " " + w)) for w in ctx.splits.words.values()]
    return min(ctx.ccfg.few_shot_tokens, ctx_len) - max(e.source_len for e in examples) - max(words) - 1


def run_hand(ctx: Context, method: str, train_idx: list[int], seed: int) -> dict:
    """Zero-shot or few-shot with the chosen template; few-shot draws its demonstrations from
    the run's training set."""
    cfg = ctx.hand_cfg
    if cfg is None:
        raise RuntimeError("run_hand needs the hand template chosen first (choose_template)")
    pool, dev, test = ctx.splits.examples(cfg)
    out: dict = {"template": cfg.template, "n_train": 0}
    hp = methods.HandPrompt(ctx.lm.model)
    if method == "few-shot":
        budget = max(0, few_shot_budget(ctx, dev + test))
        demos = [pool[i] for i in train_idx]
        ids, text, k = methods.choose_demos(
            ctx.lm.tokenizer, demos, ctx.splits.words, budget, seed, ctx.ccfg.few_shot_max_k
        )
        hp = methods.HandPrompt(ctx.lm.model, ids, text)
        out.update({"k": k, "demo_tokens": len(ids), "demo_budget_tokens": budget, "n_train": len(train_idx)})
    with PeakMemory() as mem:
        res = ctx.accuracy(hp.score, test)
    dev_acc = next(t["dev_accuracy"] for t in ctx.tried if t["template"] == cfg.template)
    dev_acc = dev_acc if method == "zero-shot" else None  # few-shot makes no choice on dev
    out.update(
        {
            "test_accuracy": res["accuracy"],
            "confusion": res["confusion"],
            "dev_accuracy": dev_acc,
            "trainable_params": 0,
            "train_time_s": 0.0,
            "peak_mem_mb": mem.delta_mb,
            "task_bytes": len(((cfg.template or "") + hp.text + str(cfg.verbalizer)).encode()),
            **ctx.latency(hp.score, test),
        }
    )
    return out


# ---------------------------------------------------------------- trained methods


def method_prompt(fields: PromptConfig | dict, method: str) -> PromptConfig:
    """A prompt method's config: the run's prompt fields with the method's kind; one line naming the method
    when a lever does not go with its kind (``run`` checks every method before the first run)."""
    kind, reparam = COMPARE_PROMPT_KINDS[method]
    try:
        return PromptConfig(**{**(fields if isinstance(fields, dict) else fields.to_dict()), "kind": PromptKind(kind), "reparam": reparam})
    except UserError as e:
        raise UserError(f"--methods {method}: {e}") from None


def make_method(ctx: Context, method: str, seed: int):
    torch.manual_seed(seed)
    if method in COMPARE_PROMPT_KINDS:
        pcfg = method_prompt(ctx.pcfg, method)
        prompt = TR.initial_prompt(ctx.lm, pcfg, ctx.splits.cfg, seed, store=ctx.store)
        return TR.prompt_method(ctx.lm, prompt, pcfg, ctx.tcfg.fast_forward, seed)
    if method == "lora":
        return methods.LoraMethod(ctx.lm.model)
    return methods.FullMethod(ctx.lm.model)


def steps_for(ctx: Context, n_train: int) -> int:
    if ctx.ccfg.budget:
        return ctx.ccfg.budget
    n_batches = -(-n_train // ctx.tcfg.batch_size)
    return max(plan_steps(n_batches, ctx.tcfg)[0], ctx.ccfg.min_steps)


def sweep_lr(ctx: Context, method: str, train, seed: int):
    """``loop.fit`` once per lr; (kept method with its best state loaded, its row, all rows)."""
    dev = ctx.splits.examples()[1]
    base = replace(ctx.tcfg, seed=seed, steps=steps_for(ctx, len(train)))
    rows, best = [], None
    for lr in ctx.ccfg.lr_sweep[method]:
        ctx.say(f"lr={lr:g}: {base.steps} steps on {len(train)} examples")
        cfg = replace(base, lr=lr)
        m = make_method(ctx, method, seed)
        ev = TR.make_evaluator(m, ctx.lm.tokenizer, dev, ctx.splits.cfg, cfg, ctx.pad)
        with PeakMemory() as mem:
            res = fit(m, train, cfg, ctx.pad, ev, progress=ctx.progress)
        score = res.best["score"] if res.best else -res.final_train_loss
        row = {
            "lr": lr,
            "dev_score": score,
            "dev_accuracy": (res.best or {}).get("accuracy"),
            "steps": len(res.history),
            "train_time_s": res.train_time_s,
            "train_cpu_s": res.train_cpu_s,
            "stopped": res.stopped.value,
            "peak_mem_mb": mem.delta_mb,
            "final_train_loss": res.final_train_loss,
        }
        rows.append(row)
        if best is None or score > best[0] + 1e-12:  # ties keep the earlier (default) lr
            best = (score, m, res.state, row)
        del m, ev, res
        gc.collect()
    if best is None:
        raise UserError(f"--lr-sweep gives {method} no learning rate to try")
    _, m, state, row = best
    m.load_state(state)
    return m, row, rows


def run_trained(ctx: Context, method: str, train, seed: int) -> dict:
    """The lr sweep through ``loop.fit``; the kept state is scored on test and saved once."""
    test = ctx.splits.examples()[2]
    if ctx.ccfg.curve:  # one run per lr along the curve; the kept lr's last point is the result
        m, row, rows = CC.race(ctx, method, train, seed, make_method)
        res = row["test"]
    else:
        m, row, rows = sweep_lr(ctx, method, train, seed)
        res = ctx.accuracy(m.score, test)
    with tempfile.TemporaryDirectory() as tmp:
        task_bytes = m.save(Path(tmp) / "artifact")  # bytes of the real saved artifact of one task
    out = {
        "template": ctx.splits.cfg.template,
        "n_train": len(train),
        "lr": row["lr"],
        "sweep": rows,
        "test_accuracy": res["accuracy"],
        "confusion": res["confusion"],
        "dev_accuracy": row["curve"][-1]["dev_accuracy"] if row.get("curve") else row["dev_accuracy"],
        "trainable_params": m.trainable_parameters(),
        "task_bytes": task_bytes,
        "train_time_s": row["train_time_s"],
        "train_cpu_s": row["train_cpu_s"],
        "step_cpu_ms": 1000 * row["train_cpu_s"] / max(1, row["steps"]),
        "sweep_time_s": sum(r["train_time_s"] for r in rows),
        "peak_mem_mb": row["peak_mem_mb"],
        "steps": row["steps"],
        "stopped": row["stopped"],
        **ctx.latency(m.score, test),
    }
    if ctx.ccfg.curve:
        out["curve"] = row["curve"]
    del m
    gc.collect()
    return out


# ---------------------------------------------------------------- the whole comparison


def plan(ccfg: CompareConfig) -> list[tuple[int | None, int, str]]:
    """(train size, seed, method) runs; zero-shot needs no training data, so it runs once."""
    first = (ccfg.train_sizes[0], ccfg.seeds[0])
    return [
        (n, s, m)
        for n in ccfg.train_sizes
        for s in ccfg.seeds
        for m in ccfg.methods
        if m != "zero-shot" or (n, s) == first
    ]


def run_one(ctx: Context, n: int | None, seed: int, method: str) -> dict:
    pool = ctx.splits.examples()[0]
    idx = CD.train_indices(len(pool), n, seed)
    t0 = time.perf_counter()
    if method in TRAINED:
        r = run_trained(ctx, method, [pool[i] for i in idx], seed)
    else:
        r = run_hand(ctx, method, idx, seed)
    K = ctx.ccfg.serve_tasks
    serve = K * r["task_bytes"] if method == "full" else ctx.base_bytes + K * r["task_bytes"]
    r.update(
        {
            "method": method,
            "train_size": n,
            "seed": None if method == "zero-shot" else seed,
            "mixed_task_batch": MIXED_BATCH[method],
            "serve_bytes": serve,
            "wall_s": time.perf_counter() - t0,
        }
    )
    return r


def prefixed(say: Callable[[str], None], head: str, msg: str) -> None:
    """``say(msg)`` under the run's heading."""
    say(f"{head}: {msg}")


def run_all(ctx: Context, book: Journal | None, t_start: float,
            finished: Callable[[list[dict], int], None] | None = None) -> list[dict]:
    """Every (size, seed, method) of the plan in order; finished ones come from the journal.
    ``finished(runs so far, runs planned)`` after each run this call made."""
    runs, jobs, outer = [], plan(ctx.ccfg), ctx.say
    for i, (n, seed, method) in enumerate(jobs, 1):
        head = f"[{i}/{len(jobs)} {time.perf_counter() - t_start:.0f}s] {method} n={n or 'all'} seed={seed}"
        ctx.say = functools.partial(prefixed, outer, head)
        done = book.done.get(Journal.key(n, seed, method)) if book else None
        if done is None:
            ctx.say("start")
            runs.append(run_one(ctx, n, seed, method))
            if book:
                book.add(runs[-1])
            if finished:
                finished(runs, len(jobs))
        else:
            runs.append(done)
        ctx.say(f"test accuracy {runs[-1]['test_accuracy']:.4f} ({runs[-1]['wall_s']:.0f}s{', from the journal' if done else ''})")
    ctx.say = outer
    return runs


def open_journal(path: Path, resume: bool, ctx: Context, task: str | None, data_cfg: DataConfig) -> Journal:
    """The comparison's journal at ``path``, for these settings (model, task, data, compare, train, prompt)."""
    settings = {"model": ctx.lm.fingerprint, "task": task, "data": data_cfg.to_dict(), "compare": ctx.ccfg.to_dict(),
                "train": ctx.tcfg.to_dict(), "prompt": ctx.pcfg.to_dict()}
    defaults = {"data": DataConfig().to_dict(), "compare": CompareConfig().to_dict(),
                "train": TrainConfig().to_dict(), "prompt": PromptConfig().to_dict()}
    return Journal(path, settings, resume, defaults)


def run(
    lm: LoadedModel,
    data_cfg: DataConfig,
    task: str | None,
    ccfg: CompareConfig,
    tcfg: TrainConfig | None = None,
    pcfg: PromptConfig | None = None,
    progress: bool = False,
    say: Callable[[str], None] | None = None,
    journal: Path | None = None,
    resume: bool = False,
    label: dict | None = None,
    store: Store | None = None,
) -> dict:
    """Every method x train size x seed; the result document (``compare_report.document``).
    With ``journal``, finished runs are recorded there and, with ``resume``, taken from it; on resuming and
    after each run, the document of the runs so far is written beside it (``partial_path``), with ``label``
    (tag, command) and ``"partial": {"finished", "planned"}``. ``data_cfg`` is resolved with the held-out
    policy (``recipes.resolve(..., held_out=True)``; ``task`` names it); ``store`` holds ``--init prompt:NAME``'s prompts."""
    from softprompt.experiments import compare_report as R

    [method_prompt(pcfg or PromptConfig(), m) for m in ccfg.methods if m in COMPARE_PROMPT_KINDS]  # a bad lever: no run
    t_start, load_start = time.perf_counter(), loadavg()
    splits = CD.compare_splits(lm.tokenizer, data_cfg, dev_sample=ccfg.dev_sample, test_sample=ccfg.test_sample,
                               dev_fraction=ccfg.dev_fraction, data_seed=ccfg.data_seed)
    ctx = Context(lm, splits, ccfg, tcfg or TrainConfig(), pcfg or PromptConfig(), say or (lambda _: None), progress,
                  store=store)
    before = weights_digest(lm.model)
    with tempfile.TemporaryDirectory() as tmp:
        ctx.base_bytes = methods.save_weights(lm.model, Path(tmp))
    ctx.hand_cfg = splits.cfg
    if {"zero-shot", "few-shot"} & set(ccfg.methods):
        choose_template(ctx)
    book = open_journal(journal, resume, ctx, task, data_cfg) if journal is not None else None

    def document(runs: list[dict], unchanged: bool) -> dict:
        """The result document; its time counts the runs taken from the journal at the time they took."""
        earlier = [r for r in runs if book is not None and book.done.get(Journal.key(r["train_size"], r["seed"], r["method"])) is r]
        doc = R.document(ctx, task, runs, time.perf_counter() - t_start + sum(r["wall_s"] for r in earlier), load_start,
                         unchanged)
        return {**doc, "journal_runs": len(earlier)} if earlier else doc

    def finished(runs: list[dict], planned: int) -> None:  # called only with a journal
        doc = document(runs, weights_digest(lm.model) == before)
        write_json({**doc, **(label or {}), "partial": {"finished": len(runs), "planned": planned}},
                   partial_path(cast(Path, journal)))

    if book is not None and book.done:  # their document at once, not after the next run (hours on a CPU)
        ctx.say(f"resuming: {len(book.done)} finished runs taken from {journal}")
        finished(book.in_plan(jobs := plan(ccfg)), len(jobs))
    runs = run_all(ctx, book, t_start, finished if journal is not None else None)
    unchanged = weights_digest(lm.model) == before
    if not unchanged:  # a bug, never a user error: the comparison would be unfair
        raise RuntimeError("the shared base model changed during the comparison")
    return document(runs, unchanged)
