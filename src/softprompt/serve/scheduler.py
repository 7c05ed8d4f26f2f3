"""Cross-task dynamic batching for the HTTP server: a bounded queue and ONE worker thread.

Request handlers (asyncio, ``serve/app.py``) turn a request into a ``Job`` and ``submit`` it; a full
queue is a 429 with Retry-After. The worker thread is the only code that touches the ``Engine``
(bank, caches, model). Each iteration it

1. takes waiting jobs: scoring jobs up to ``max_batch_rows`` rows, generation jobs in arrival
   order while their rows fit next to the rows already decoding (an idle worker first waits up
   to ``max_wait_ms`` for companions);
2. runs every taken scoring row, whatever its prompt, as one mixed ``Engine.score_rows`` batch;
3. prefills the new generation rows in one forward and stacks them onto the running
   ``engine.StepBatch`` (continuous batching: rows join while others are mid-way);
4. drops the rows of cancelled jobs (client gone, timeout, stop string) and decodes ONE step
   for all live rows; finished rows leave the batch at once.

Results travel back to the event loop with ``loop.call_soon_threadsafe`` as events on the job's
asyncio queue. A bad prompt fails only its own job; an unexpected exception fails the jobs in
the batch, and the worker goes on. Only this module's ``Scheduler`` and ``serve/app.py`` use it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict, deque

from softprompt.config import UserError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered as OpenAI's error JSON with ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------- metrics


class Metrics:
    """Counters and histograms, rendered by hand in the Prometheus text format."""

    LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
    ROWS = (1, 2, 4, 8, 16, 32, 64, 128)

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.hist: dict[tuple[str, str], list] = {}  # (metric, label) -> [bucket counts, sum, count]
        self.tokens = 0
        self.busy: dict[str, float] = defaultdict(float)  # worker seconds by phase
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last 10 s

    def observe(self, metric: str, label: str, value: float, buckets) -> None:
        with self.lock:
            h = self.hist.setdefault((metric, label), [[0] * len(buckets), 0.0, 0])
            for i, b in enumerate(buckets):
                h[0][i] += value <= b
            h[1] += value
            h[2] += 1

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(endpoint, status)] += 1
        self.observe("softprompt_request_latency_seconds", endpoint, seconds, self.LATENCY)

    def batch(self, kind: str, rows: int) -> None:
        self.observe("softprompt_batch_rows", kind, rows, self.ROWS)

    def worker(self, phase: str, seconds: float) -> None:
        with self.lock:
            self.busy[phase] += seconds

    def generated(self, n: int) -> None:
        now = time.monotonic()
        with self.lock:
            self.tokens += n
            self.recent.append((now, n))
            while self.recent and self.recent[0][0] < now - 10:
                self.recent.popleft()

    def render(self, gauges: dict[str, float]) -> str:
        out = ["# HELP softprompt_requests_total HTTP requests by endpoint and status.",
               "# TYPE softprompt_requests_total counter"]
        with self.lock:
            out += [f'softprompt_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(self.requests.items())]
            errors = defaultdict(int)
            for (e, s), n in self.requests.items():
                if s >= 400:
                    errors[e] += n
            out += ["# TYPE softprompt_request_errors_total counter"]
            out += [f'softprompt_request_errors_total{{endpoint="{e}"}} {n}' for e, n in sorted(errors.items())]
            out += ["# TYPE softprompt_generated_tokens_total counter", f"softprompt_generated_tokens_total {self.tokens}"]
            out += ["# HELP softprompt_worker_seconds_total Worker thread time by phase.",
                    "# TYPE softprompt_worker_seconds_total counter"]
            out += [f'softprompt_worker_seconds_total{{phase="{k}"}} {v:.6f}' for k, v in sorted(self.busy.items())]
            rate = sum(n for t, n in self.recent if t >= time.monotonic() - 10) / 10.0
            for metric, label_name, buckets in (("softprompt_request_latency_seconds", "endpoint", self.LATENCY),
                                                ("softprompt_batch_rows", "kind", self.ROWS)):
                out.append(f"# TYPE {metric} histogram")
                for (m, label), (counts, total, count) in sorted(self.hist.items()):
                    if m != metric:
                        continue
                    lab = f'{label_name}="{label}"'
                    out += [f'{metric}_bucket{{{lab},le="{b}"}} {c}' for b, c in zip(buckets, counts, strict=True)]
                    out += [f'{metric}_bucket{{{lab},le="+Inf"}} {count}', f"{metric}_sum{{{lab}}} {total:.6f}",
                            f"{metric}_count{{{lab}}} {count}"]
        gauges = {"softprompt_tokens_per_second": rate, **gauges}
        for name, value in gauges.items():
            out += [f"# TYPE {name} gauge", f"{name} {value:g}"]
        return "\n".join(out) + "\n"


# ---------------------------------------------------------------- jobs and the worker


class Job:
    """One request on its way through the worker; results come back as events on ``events``.

    ``kind`` "generate": ``rows`` are ``GenerateRequest``s. ``kind`` "score": ``prepare(engine)``
    runs in the worker (it reads prompt metadata from the bank) and returns (``ScoreRow``s, info).
    Events: ("admitted",), ("tokens", [(row, token|None, finish|None)]), ("scores", results,
    info), ("error", ApiError).
    """

    def __init__(self, kind: str, rows: list | None = None, prompts=(), prepare=None, size: int = 0):
        self.kind, self.rows, self.prompts, self.prepare = kind, rows or [], set(prompts), prepare
        self.size = size or len(self.rows)  # rows it will bring into a batch
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False  # set by the event loop; the worker drops the job's rows
        self.dropped: set[int] = set()  # rows to stop early (stop string hit)

    def put(self, *item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def fail(self, err: ApiError) -> None:
        self.put("error", err)


def resolve_prompt(engine, name: str):
    """The prompt from the bank, or a 404 (unknown name) / 422 (broken or incompatible file)."""
    from softprompt import store

    try:
        return engine.bank.get(name)[0]
    except UserError as e:
        try:
            exists = store.prompt_path(name).is_dir()
        except UserError:
            exists = False
        if not exists:
            raise ApiError(404, f"The model {name!r} does not exist (GET /v1/models lists them)",
                           param="model", code="model_not_found") from None
        raise ApiError(422, str(e), param="model", code="prompt_unusable") from None


class Scheduler:
    """The bounded queue and the one worker thread that batches across requests and prompts."""

    def __init__(self, engine, metrics: Metrics, max_batch_rows: int = 32, max_wait_ms: float = 5.0,
                 max_queue: int = 256, join_every: int = 4):
        from softprompt.inference.engine import StepBatch

        self.engine, self.metrics = engine, metrics
        self.max_batch_rows, self.max_wait_ms, self.max_queue = max_batch_rows, max_wait_ms, max_queue
        self.join_every = join_every
        self.steps = self.last_join = 0  # decode steps so far; the step new work last came in
        self.cv = threading.Condition()
        self.waiting: deque[Job] = deque()
        self.batch = StepBatch(engine)
        self.rows: dict[int, tuple[Job, int]] = {}  # batch row id -> (job, row index in the job)
        self.stopping = self.paused = False
        self.thread = threading.Thread(target=self._run, name="softprompt-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued and running, then end the worker."""
        with self.cv:
            self.stopping, self.paused = True, False
            self.cv.notify_all()
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
            self.waiting.append(job)
            self.cv.notify_all()

    def depth(self) -> int:
        return len(self.waiting)

    def active_rows(self) -> int:
        return len(self.batch)

    # ------------------------------------------------ worker side

    def _run(self) -> None:
        while True:
            jobs = self._next()
            if jobs is None:
                return
            try:
                self._iterate(jobs)
            except Exception:  # a bug, not a user error: fail the affected jobs, keep serving
                log.exception("worker iteration failed")
                err = ApiError(500, "internal error while running the batch", "server_error", code="internal_error")
                for job in {j for j, _ in self.rows.values()} | set(jobs):
                    job.fail(err)
                from softprompt.inference.engine import StepBatch

                self.batch, self.rows = StepBatch(self.engine), {}

    def _next(self) -> list[Job] | None:
        """Block until there is work; an idle worker waits ``max_wait_ms`` for companions."""
        with self.cv:
            while True:
                if self.stopping and not self.waiting and not len(self.batch):
                    return None
                if (self.waiting and not self.paused) or len(self.batch):
                    break
                self.cv.wait()
            if not len(self.batch) and self.max_batch_rows > 1 and self.max_wait_ms > 0:
                deadline = time.monotonic() + self.max_wait_ms / 1000
                while sum(j.size for j in self.waiting) < self.max_batch_rows and not self.stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self.cv.wait(left)
            return [] if self.paused else self._take()

    def _take(self) -> list[Job]:
        """Scoring jobs up to max_batch_rows; generation jobs in order while they fit the batch.

        While rows decode, new work comes in every ``join_every`` steps (or at once when it
        would fill the batch): a prefill or scoring forward costs about as much as a decode
        step however few rows it has, so joiners are gathered instead of paying one each.
        """
        free = self.max_batch_rows - len(self.batch) if self.batch.can_join else 0
        for job in [j for j in self.waiting if j.cancelled]:
            self.waiting.remove(job)
        busy = len(self.batch) > 0 and self.max_batch_rows > 1
        if busy and self.steps - self.last_join < self.join_every:
            gen = sum(j.size for j in self.waiting if j.kind == "generate")
            score = sum(j.size for j in self.waiting if j.kind == "score")
            if not (0 < free <= gen or score >= self.max_batch_rows):
                return []
        score_rows, taken, gen_blocked = 0, [], False
        for job in list(self.waiting):
            if job.kind == "score" and (score_rows == 0 or score_rows + job.size <= self.max_batch_rows):
                score_rows += job.size
                taken.append(job)
                self.waiting.remove(job)
            elif job.kind == "generate" and not gen_blocked:
                alone = not len(self.batch) and not any(j.kind == "generate" for j in taken)
                if len(job.rows) <= free or (alone and self.batch.can_join):
                    free -= len(job.rows)
                    taken.append(job)
                    self.waiting.remove(job)
                else:
                    gen_blocked = True  # first come, first served among generation requests
        if taken:
            self.last_join = self.steps
        return taken

    def _iterate(self, jobs: list[Job]) -> None:
        t0 = time.perf_counter()
        scores = [j for j in jobs if j.kind == "score"]
        if scores:
            self._score(scores)
        t1 = time.perf_counter()
        gens = [j for j in jobs if j.kind == "generate"]
        if gens:
            self._admit(gens)
        drop = [rid for rid, (j, k) in self.rows.items() if j.cancelled or k in j.dropped]
        if drop:
            self.batch.cancel(drop)
            for rid in drop:
                del self.rows[rid]
        t2 = time.perf_counter()
        if len(self.batch):
            self._step()
        t3 = time.perf_counter()
        for phase, dt in (("score", t1 - t0), ("join", t2 - t1), ("decode", t3 - t2)):
            if dt > 1e-4:
                self.metrics.worker(phase, dt)

    def _score(self, jobs: list[Job]) -> None:
        ready = []
        for job in jobs:
            try:
                job.rows, job.info = job.prepare(self.engine)
                ready.append(job)
            except ApiError as e:
                job.fail(e)
            except UserError as e:
                job.fail(ApiError(400, str(e), code="invalid_input"))
        if not ready:
            return
        try:
            results = self.engine.score_rows([r for j in ready for r in j.rows])
        except UserError:  # e.g. a prompt removed meanwhile: run the jobs one by one
            for job in ready:
                try:
                    job.put("scores", self.engine.score_rows(job.rows), job.info)
                except UserError as e:
                    job.fail(ApiError(422, str(e), code="prompt_unusable"))
            return
        self.metrics.batch("score", sum(len(j.rows) for j in ready))
        s = 0
        for job in ready:
            job.put("scores", results[s : s + len(job.rows)], job.info)
            s += len(job.rows)

    def _admit(self, jobs: list[Job]) -> None:
        """Resolve each job's prompt (a bad one fails only its job), then prefill all in one forward."""
        ready = []
        for job in jobs:
            try:
                for name in job.prompts:
                    resolve_prompt(self.engine, name)
                ready.append(job)
            except ApiError as e:
                job.fail(e)
        if not ready:
            return
        placed = []
        try:
            rids = iter(self.batch.add([r for j in ready for r in j.rows]))
            placed = [(job, [next(rids) for _ in job.rows]) for job in ready]
        except UserError:  # a prompt went bad between the check and the prefill: one by one
            for job in ready:
                try:
                    placed.append((job, self.batch.add(job.rows)))
                except UserError as e:
                    job.fail(ApiError(422, str(e), code="prompt_unusable"))
        for job, ids in placed:
            for k, rid in enumerate(ids):
                self.rows[rid] = (job, k)
            job.put("admitted")
        self.metrics.batch("prefill", sum(len(ids) for _, ids in placed))

    def _step(self) -> None:
        self.steps += 1
        self.metrics.batch("decode", len(self.batch))
        events = self.batch.step()
        self.metrics.generated(sum(e.token is not None for e in events))
        out: dict[Job, list] = defaultdict(list)
        for e in events:
            job, k = self.rows[e.rid]
            out[job].append((k, e.token, e.finish_reason))
            if e.finish_reason:
                del self.rows[e.rid]
        for job, items in out.items():
            job.put("tokens", items)


class EventReader:
    """Next event of a job, bounded by the request deadline and the client's presence."""

    def __init__(self, job: Job, request, timeout_s: float):
        self.job, self.timeout_s = job, timeout_s
        self.loop = asyncio.get_running_loop()
        self.deadline = self.loop.time() + timeout_s
        self.watch = asyncio.ensure_future(_until_disconnect(request)) if request is not None else None

    async def next(self) -> tuple:
        get = asyncio.ensure_future(self.job.events.get())
        try:
            waits = {get} if self.watch is None else {get, self.watch}
            done, _ = await asyncio.wait(waits, timeout=max(0.0, self.deadline - self.loop.time()),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not get.done():
                get.cancel()
        if get in done:
            return get.result()
        self.job.cancelled = True
        if self.watch is not None and self.watch in done:
            raise ClientGone()
        raise ApiError(504, f"the request did not finish within {self.timeout_s:g}s and was cancelled",
                       "timeout_error", code="timeout")

    def close(self) -> None:
        if self.watch is not None:
            self.watch.cancel()
            self.watch = None


class ClientGone(Exception):
    pass


async def _until_disconnect(request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass

