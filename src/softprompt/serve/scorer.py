"""Scoring jobs in the worker: one mixed scoring task at a time, one forward per iteration.

Prepared scoring jobs wait in ``ready``; when no task runs, the next ones whose estimated
working memory fits ``max_request_mb`` together (at least one) become ONE task
(``Engine.score_task`` over all their rows, whatever their prompts). ``step(budget)`` runs one
forward of at most ``budget()`` token slots, so scoring shares the worker with decoding rows a
slice at a time. When the task ends each job gets its ``Scores``; when it fails, each job is
scored apart so that only the culprit fails; a task whose jobs were all cancelled is dropped.
Runs in the worker thread only.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from softprompt.inference.memory import MiB
from softprompt.serve.events import Scores
from softprompt.serve.limits import group_bytes


class Scorer:
    def __init__(self, engine, metrics, cfg, fault: Callable):
        self.engine, self.metrics, self.cfg, self.fault = engine, metrics, cfg, fault
        self.ready: deque = deque()  # prepared scoring jobs, in arrival order
        self.jobs: list = []  # the running task's jobs
        self.task = None

    @property
    def busy(self) -> bool:
        return self.task is not None or bool(self.ready)

    def add(self, jobs: list) -> None:
        self.ready.extend(jobs)

    def _start(self, budget: Callable[[], int]) -> None:
        jobs, used = [], 0
        while self.ready and (not jobs or used + self.ready[0].memory <= self.cfg.max_request_mb * MiB):
            jobs.append(self.ready.popleft())
            used += jobs[-1].memory
        self.jobs = [j for j in jobs if not j.cancelled]
        if self.jobs:
            self.task = self.engine.score_task([r for j in self.jobs for r in j.rows], budget,
                                               group_bytes(self.engine, self.cfg))

    def step(self, budget: Callable[[], int]) -> None:
        """One forward of the running task (started from ``ready`` if none runs)."""
        if self.task is None:
            self._start(budget)
            if self.task is None:
                return
        if all(j.cancelled for j in self.jobs):  # every client left: its work is dropped
            self.task, self.jobs = None, []
            return
        try:
            next(self.task)
            return
        except StopIteration as done:
            results = done.value
        except Exception:  # noqa: BLE001 - retried apart below; a real fault is logged there
            self._apart()
            return
        self.metrics.batch("score", sum(len(j.rows) for j in self.jobs))
        s = 0
        for job in self.jobs:
            job.put(Scores(results[s : s + len(job.rows)], job.info))
            s += len(job.rows)
        self.task, self.jobs = None, []

    def _apart(self) -> None:
        jobs, self.task, self.jobs = self.jobs, None, []
        for job in jobs:
            try:
                job.put(Scores(self.engine.score_rows(job.rows), job.info))
            except Exception as e:  # noqa: BLE001 - this job alone is failed
                job.fail(self.fault(e, "scoring", job))
