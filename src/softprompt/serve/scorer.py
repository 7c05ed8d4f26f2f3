"""Scoring jobs in the worker: one mixed scoring task at a time, one forward per iteration.

Prepared scoring jobs wait in ``ready``; when no task runs, the next ones whose estimated
working memory fits ``max_request_mb`` together (at least one) become ONE task
(``Engine.score_task`` over all their rows, whatever their prompts). ``plan(budget)`` gives its
next forward of at most ``budget()`` token slots, which the scheduler runs inside its decode
step's forward and hands back (``done``), so scoring shares the worker with decoding rows a
slice at a time. When the task ends each job gets its ``Scores``; when it fails, each job is
scored apart so that only the culprit fails; a task whose jobs were all cancelled is dropped.
Runs in the worker thread only.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING

from softprompt.inference import fused
from softprompt.inference.footprint import MiB
from softprompt.inference.fused import Forward
from softprompt.serve.events import Scores
from softprompt.serve.limits import group_bytes

if TYPE_CHECKING:
    import torch

    from softprompt.inference.engine import Engine


class Scorer:
    def __init__(self, engine: Engine, metrics, cfg, fault: Callable):
        self.engine, self.metrics, self.cfg, self.fault = engine, metrics, cfg, fault
        self.ready: deque = deque()  # prepared scoring jobs, in arrival order
        self.jobs: list = []  # the running task's jobs
        self.task: Generator[Forward | None, torch.Tensor | None, list] | None = None
        self.reply: torch.Tensor | None = None  # the hidden states that resume the task (``done``)

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

    def plan(self, budget: Callable[[], int]) -> Forward | None:
        """Resume the running task (started from ``ready`` if none runs) up to the next forward
        it needs, of at most ``budget()`` token slots: the caller runs it (in its decode step:
        ``StepBatch.step(side=...)``) and hands it back to ``done``. None: nothing to run now
        (the task ended, failed, ran its own forward, or no task)."""
        if self.task is None:
            self._start(budget)
            if self.task is None:
                return None
        if all(j.cancelled for j in self.jobs):  # every client left: its work is dropped
            self.task, self.jobs, self.reply = None, [], None
            return None
        reply, self.reply = self.reply, None
        try:
            return self.task.send(reply)
        except StopIteration as done:
            results = done.value
        except Exception:  # noqa: BLE001 - retried apart below; a real fault is logged there
            self._apart()
            return None
        self.metrics.batch("score", sum(len(j.rows) for j in self.jobs))
        s = 0
        for job in self.jobs:
            job.put(Scores(results[s : s + len(job.rows)], job.info))
            s += len(job.rows)
        self.task, self.jobs = None, []
        return None

    def done(self, fwd: Forward) -> None:
        """``plan``'s forward has run (else it runs now, on its own): its hidden states resume the
        task at the next ``plan``; if it failed, each job is scored apart."""
        if fwd.out is None and fwd.error is None:
            fused.run(self.engine.model, [fwd])
        if fwd.error is not None:
            self._apart()
        else:
            self.reply = fwd.out

    def _apart(self) -> None:
        jobs, self.task, self.jobs, self.reply = self.jobs, None, [], None
        for job in jobs:
            try:
                job.put(Scores(self.engine.score_rows(job.rows), job.info))
            except Exception as e:  # noqa: BLE001 - this job alone is failed
                job.fail(self.fault(e, "scoring", job))
