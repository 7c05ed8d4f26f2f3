"""Cross-task dynamic batching for the HTTP server: a bounded queue and ONE worker thread.

Request handlers (asyncio) turn a parsed request into a ``Job`` and ``submit`` it; a full queue
is a 429 with Retry-After. The worker thread is the only code that touches the ``Engine``
(bank, caches, model) and the tokenizer. Each iteration it

1. takes waiting jobs as the pure ``Admission`` policy says: scoring jobs up to
   ``max_batch_rows`` rows (none while a scoring task runs), generation jobs in arrival order
   while their rows fit next to the rows already in the batch (an idle worker first waits up
   to ``max_wait_ms`` for companions);
2. prepares each taken job (``job.prepare(engine)``: tokenisation, prompt metadata) and
   checks its context length (400) and estimated working memory (413, ``limits``), so a bad
   or oversized request fails only its own job, before any model work;
3. scoring: the taken scoring rows, whatever their prompts, become ONE mixed scoring task
   (``scorer``) that needs one forward per iteration;
4. new generation rows join the ``StepBatch``, are prefilled a chunk per iteration (chunked
   prefill) and start decoding when their prompt is consumed (continuous batching);
5. drops the rows of cancelled jobs and decodes ONE step for all decoding rows, with either the
   scoring slice or the prefill chunk (turn about when both wait; each within the step budget)
   in the same forward (``inference/fused.py``); each row's text is decoded here
   (``streams.RowText``), a stop string ends its row, finished rows leave the batch at once.

So no request's prompt or labels stall the decoding rows by more than the step budget's
tokens in their forward. Results travel
back to the event loop with ``loop.call_soon_threadsafe`` as typed events (``events``) on the
job's asyncio queue. After each iteration the worker publishes ``snapshot`` (engine statistics)
for ``/metrics``. An unexpected exception fails the jobs in the batch, and the worker goes on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from softprompt.config import UserError
from softprompt.serve.events import Admitted, Failed, RowUpdate, Tokens
from softprompt.serve.prometheus import Metrics
from softprompt.serve.protocol import ApiError, with_request_id
from softprompt.serve.streams import RowText

log = logging.getLogger(__name__)


class Job:
    """One request on its way through the worker; results come back as events on ``events``.

    ``prepare(engine)`` runs in the worker and returns (rows, info): ``GenerateRequest``s for
    ``kind`` "generate", ``ScoreRow``s for "score". ``size`` is the rows it will bring into a
    batch, known before ``prepare``; ``source`` names the request field its tokens come from
    (in a context-length error). Events: ``events.Event``.
    """

    def __init__(self, kind: str, prepare: Callable, size: int, stops: Sequence[str] = (), request_id: str = "",
                 source: str | None = None):
        self.kind, self.prepare, self.size, self.stops = kind, prepare, size, list(stops)
        self.request_id = request_id  # the gate's id: in a 5xx answer and in the fault's log line
        self.source = source or ("prompt" if kind == "generate" else "inputs")
        self.queued_at = 0  # the scheduler's decode step when the job was submitted
        self.rows: list = []
        self.info = None
        self.memory = 0  # estimated working memory, bytes (set when prepared)
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False  # set by the event loop; the worker drops the job's rows

    def put(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def fail(self, err: ApiError) -> None:
        self.put(Failed(with_request_id(err, self.request_id)))


def resolve_prompt(engine, name: str, max_tokens: int | None = None):
    """The prompt from the bank (the store's reader checks its files and values), with
    1 <= N <= ``max_tokens``; else a 404 (unknown name) or 422 (unusable here, saying why)."""
    try:
        sp = engine.bank.get(name)[0]
    except UserError as e:
        try:
            exists = engine.store is not None and engine.store.prompt_path(name).is_dir()
        except UserError:
            exists = False
        if not exists:
            raise ApiError(404, f"The model {name!r} does not exist (GET /v1/models lists them)",
                           param="model", code="model_not_found") from None
        raise ApiError(422, str(e), param="model", code="prompt_unusable") from None
    n = sp.num_virtual_tokens
    if n < 1 or (max_tokens is not None and n > max_tokens):
        raise ApiError(422, f"prompt {name!r} has {n} virtual tokens; this server serves 1 to {max_tokens}",
                       param="model", code="prompt_unusable")
    return sp


@dataclass(frozen=True)
class Admission:
    """Which waiting jobs join the batch now: a pure function of the queue and the batch.

    While rows decode, new work comes in every ``join_every`` steps (or at once when it would
    fill the batch): a prefill or scoring forward costs about as much as a decode step however
    few rows it has, so joiners are gathered instead of paying one each. Scoring jobs are taken
    up to ``max_batch_rows`` rows; generation jobs first come, first served while they fit.
    """

    max_batch_rows: int
    join_every: int

    def take(self, waiting: Sequence, running: int, can_join: bool, since_join: int, scoring: bool = False) -> list:
        """The jobs (with ``kind`` and ``size``) to take from ``waiting``, in order; no scoring
        job while ``scoring`` (a scoring task is under way)."""
        free = self.max_batch_rows - running if can_join else 0
        if running and self.max_batch_rows > 1 and since_join < self.join_every:
            gen = sum(j.size for j in waiting if j.kind == "generate")
            score = sum(j.size for j in waiting if j.kind == "score")
            if not (0 < free <= gen or score >= self.max_batch_rows):
                return []
        score_rows, taken, gen_blocked = 0, [], False
        for job in waiting:
            if job.kind == "score" and not scoring and (score_rows == 0 or score_rows + job.size <= self.max_batch_rows):
                score_rows += job.size
                taken.append(job)
            elif job.kind == "generate" and not gen_blocked:
                alone = not running and not any(j.kind == "generate" for j in taken)
                if job.size <= free or (alone and can_join):
                    free -= job.size
                    taken.append(job)
                else:
                    gen_blocked = True  # first come, first served among generation requests
        return taken


class Scheduler:
    """The bounded queue and the one worker thread that batches across requests and prompts."""

    def __init__(self, engine, metrics: Metrics, cfg):
        from softprompt.serve.scorer import Scorer

        self.engine, self.metrics, self.cfg = engine, metrics, cfg  # cfg: config.ServerConfig
        self.max_batch_rows, self.max_wait_ms, self.max_queue = cfg.max_batch_rows, cfg.max_wait_ms, cfg.max_queue
        self.policy = Admission(cfg.max_batch_rows, cfg.join_every)
        self.steps = self.last_join = 0  # decode steps so far; the step new work last came in
        self.cv = threading.Condition()
        self.waiting: deque[Job] = deque()
        self.batch = self._new_batch()
        self.scorer = Scorer(engine, metrics, cfg, self._fault)
        self.turn = 0  # iterations with both prefill and scoring work waiting: they take turns
        self.rows: dict[int, tuple[Job, int, RowText]] = {}  # batch row id -> (job, row in job, its text)
        self.snapshot: dict = {}  # engine statistics, published by the worker for /metrics
        self.stopping = self.paused = False
        self.thread = threading.Thread(target=self._run, name="softprompt-worker", daemon=True)

    def _new_batch(self):
        from softprompt.inference.steps import StepBatch

        return StepBatch(self.engine, prefill_chunk=self.cfg.prefill_chunk, strict=False)

    def budget(self) -> int:
        """Token slots the scoring slice may take now (``StepBatch.budget``), at most ``prefill_chunk``
        even with nothing decoding: a request arriving meanwhile waits for one slice at most."""
        if self.scorer.busy and not self.batch.pending:  # every label token goes through the output head
            return min(self.batch.budget(0, head=True), self.cfg.prefill_chunk)
        return min(self.batch.budget(), self.cfg.prefill_chunk)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued and running, then end the worker."""
        with self.cv:
            self.stopping, self.paused = True, False
            self.cv.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def pause(self, on: bool = True) -> None:
        """Stop admitting new work (running rows go on); for maintenance and tests."""
        with self.cv:
            self.paused = on
            self.cv.notify_all()

    def submit(self, job: Job) -> None:
        with self.cv:
            if self.stopping:
                raise ApiError(503, "the server is shutting down", "server_error", code="shutting_down")
            if len(self.waiting) >= self.max_queue:
                raise ApiError(429, f"the request queue is full ({self.max_queue} waiting); retry shortly",
                               "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
            job.queued_at = self.steps
            self.waiting.append(job)
            self.cv.notify_all()

    def depth(self) -> int:
        return len(self.waiting)

    def active_rows(self) -> int:
        return len(self.rows)

    # ------------------------------------------------ worker side

    def _run(self) -> None:
        self._publish()
        while True:
            jobs = self._next()
            if jobs is None:
                return
            try:
                self._iterate(jobs)
            except Exception:  # a bug, not a user error: fail the affected jobs, keep serving
                hit = {j for j, _, _ in self.rows.values()} | set(jobs)
                log.exception("worker iteration failed", extra={"fields": {"ids": sorted(j.request_id for j in hit)}})
                err = ApiError(500, "internal error while running the batch", "server_error", code="internal_error")
                for job in hit:
                    job.fail(err)
                self.batch, self.rows = self._new_batch(), {}
            self._publish()

    def _publish(self) -> None:
        st = self.engine.stats()
        self.snapshot = {"softprompt_prefix_cache_bytes": st["prefix_cache"]["bytes"],
                         "softprompt_resident_prompts": len(st["resident_prompts"]),
                         "softprompt_resident_deep_prompts": st["resident_deep_prompts"]}

    def _next(self) -> list[Job] | None:
        """Block until there is work; an idle worker waits ``max_wait_ms`` for companions."""
        with self.cv:
            while True:
                busy = len(self.batch) or self.scorer.busy
                if self.stopping and not self.waiting and not busy:
                    return None
                if (self.waiting and not self.paused) or busy:
                    break
                self.cv.wait()
            if not busy and self.max_batch_rows > 1 and self.max_wait_ms > 0:
                deadline = time.monotonic() + self.max_wait_ms / 1000
                while sum(j.size for j in self.waiting) < self.max_batch_rows and not self.stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self.cv.wait(left)
            if self.paused:
                return []
            for job in [j for j in self.waiting if j.cancelled]:
                self.waiting.remove(job)
            since = self.steps - self.last_join if self.batch.live else self.cfg.join_every  # gather only beside decoding
            taken = self.policy.take(self.waiting, len(self.batch), self.batch.can_join, since, self.scorer.busy)
            for job in taken:
                self.waiting.remove(job)
                self.metrics.observe("softprompt_wait_steps", job.kind, self.steps - job.queued_at, Metrics.STEPS)
            if taken:
                self.last_join = self.steps
            return taken

    def _iterate(self, jobs: list[Job]) -> None:
        t0 = time.perf_counter()
        self.scorer.add(self._prepared([j for j in jobs if j.kind == "score"]))
        gens = self._prepared([j for j in jobs if j.kind == "generate"])
        if gens:
            self._admit(gens)
        self._drop([rid for rid, (j, _, _) in self.rows.items() if j.cancelled])
        prefilling, scoring = bool(self.batch.pending), self.scorer.busy
        self.turn += prefilling and scoring
        t1 = time.perf_counter()
        side = self.scorer.plan(self.budget) if scoring and not (prefilling and self.turn % 2) else None
        fill = prefilling and not (scoring and not self.turn % 2)
        t2 = time.perf_counter()
        if len(self.batch):
            self._step(side, fill)  # one forward: the decoding rows, the prefill piece, the scoring slice
        if side is not None:
            self.scorer.done(side)  # run on its own first if nothing decodes
        t3 = time.perf_counter()
        for phase, dt in (("score", t2 - t1), ("join", t1 - t0), ("decode", t3 - t2)):
            if dt > 1e-4:
                self.metrics.worker(phase, dt)

    def _prepared(self, jobs: list[Job]) -> list[Job]:
        """Jobs whose ``prepare`` and limits (context, memory) passed; each failure is answered
        to its own job alone, before any model work."""
        from softprompt.serve.limits import check_context, check_memory

        ready = []
        for job in jobs:
            try:
                job.rows, job.info = job.prepare(self.engine)
                check_context(job, self.engine)
                job.memory = check_memory(job, self.engine, self.cfg)
                ready.append(job)
            except ApiError as e:
                job.fail(e)
            except UserError as e:
                job.fail(ApiError(400, str(e), code="invalid_input"))
            except Exception as e:  # noqa: BLE001 - a fault in one request's preparation is its own
                job.fail(self._fault(e, "preparation", job))
        return ready

    def _admit(self, jobs: list[Job]) -> None:
        """Join every job's rows (prefilled chunk by chunk from the next iteration on; with an
        encoder-decoder model in one forward); if that fails, each job apart."""
        placed = []
        try:
            rids = iter(self.batch.add([r for j in jobs for r in j.rows]))
            placed = [(job, [next(rids) for _ in job.rows]) for job in jobs]
        except Exception:  # noqa: BLE001 - a prompt went bad meanwhile, or a row breaks the forward
            for job in jobs:
                try:
                    placed.append((job, self.batch.add(job.rows)))
                except Exception as e:  # noqa: BLE001 - this job alone is failed
                    job.fail(self._fault(e, "prefill", job))
        tok = self.engine.lm.tokenizer
        for job, ids in placed:
            for k, rid in enumerate(ids):
                self.rows[rid] = (job, k, RowText(tok, job.stops))
            job.put(Admitted(job.info))
        self.metrics.batch("prefill", sum(len(ids) for _, ids in placed))

    def _fill_failed(self, e: Exception) -> None:
        """A prefill piece failed: the jobs of the rows being prefilled fail (the decoding rows go on)."""
        jobs = {self.rows[r.rid][0] for r in self.batch.pending}
        for job in jobs:
            job.fail(self._fault(e, "prefill", job))
            job.cancelled = True
        self._drop([rid for rid, (job, _, _) in self.rows.items() if job in jobs])

    def _fault(self, e: Exception, phase: str, job: Job) -> ApiError:
        """The error one job gets when its own rows failed: 422 for a user error, else a 500 logged
        with the job's request id."""
        if isinstance(e, ApiError):
            return e
        if isinstance(e, UserError):
            return ApiError(422, str(e), code="prompt_unusable")
        log.exception("a request failed in the %s", phase, exc_info=e, extra={"fields": {"id": job.request_id}})
        return ApiError(500, f"this request failed in the {phase} ({type(e).__name__}); the others were not affected",
                        "server_error", code="internal_error")

    def _drop(self, rids: list[int]) -> None:
        if rids:
            self.batch.cancel(rids)
            for rid in rids:
                del self.rows[rid]

    def _step(self, side=None, fill: bool = False) -> None:
        """One decode step (``StepBatch.step``); each row's text grows here, a stop string ends its row."""
        self.steps += 1
        self.metrics.batch("decode", len(self.batch.live))
        live = list(self.batch.live)
        states = [r.gen.get_state() for r in live]  # a failed step may have drawn from some rows' generators
        try:
            events = self.batch.step(side, fill)
        except Exception as e:  # noqa: BLE001 - find the rows that break it, fail their jobs, go on
            if self.batch.touched:  # past the token choice: not one row's fault
                raise
            for r, state in zip(live, states, strict=True):
                r.gen.set_state(state)
            self._fail_culprits(e)
            events = self.batch.step(side, fill)
        if self.batch.fill_error is not None:
            self._fill_failed(self.batch.fill_error)
        self.metrics.generated(sum(e.token is not None for e in events))
        out: dict[Job, list[RowUpdate]] = defaultdict(list)
        stopped = []
        for e in events:
            job, k, text = self.rows[e.rid]
            text.add(e.token, e.finish_reason, e.logprob)
            out[job].append(RowUpdate(k, text.text, len(text.ids), text.finish, text.fresh()))
            if e.finish_reason:
                del self.rows[e.rid]
            elif text.finish:
                stopped.append(e.rid)
        self._drop(stopped)
        for job, items in out.items():
            job.put(Tokens(items))

    def _fail_culprits(self, error: Exception) -> None:
        """Retry each row's token choice apart (on a copy of its generator) to find the rows
        that fail; their jobs get the error and leave, the rest decode on. With no culprit (the
        fault is not one row's) the error goes up and every job in the batch fails."""
        import torch

        from softprompt.inference.sampling import pick_token

        culprits, logits = set(), self.batch.logits  # the groups' logits, concatenated once
        for j, r in enumerate(self.batch.live):
            gen = torch.Generator().manual_seed(0)
            gen.set_state(r.gen.get_state())
            try:
                pick_token(logits[j].cpu(), torch.tensor(r.seen, dtype=torch.long), r.cfg, gen)
            except Exception:  # noqa: BLE001 - this row is a culprit
                culprits.add(r.rid)
        if not culprits:
            raise error
        for job in {self.rows[rid][0] for rid in culprits}:
            job.fail(self._fault(error, "decode step", job))
            job.cancelled = True
        self._drop([rid for rid, (job, _, _) in self.rows.items() if job.cancelled])
