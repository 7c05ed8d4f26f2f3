"""Measurements the experiments share: peak memory, per-request latency, and a bit-for-bit digest
of a model's weights (the base model must be the same before and after a comparison)."""

from __future__ import annotations

import hashlib
import os
import statistics
import threading
import time
from typing import TYPE_CHECKING

import torch

from softprompt import metrics

if TYPE_CHECKING:
    from softprompt.models import Model, Tokenizer


class PeakMemory:
    """Peak resident memory above the level at entry, sampled every 10 ms from /proc/self/statm
    (Linux); elsewhere the growth of ru_maxrss, which only sees new process-wide peaks."""

    def __enter__(self):
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _poll(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def latency_ms(
    score, tokenizer: Tokenizer, examples, verbalizer: dict[str, str], pad_id: int, n: int
) -> dict[str, float]:
    """Median time to classify one request (its label words scored as one batch): wall
    milliseconds ``latency_ms`` and process CPU milliseconds ``latency_cpu_ms`` (another job on
    the machine stretches the first, hardly the second)."""
    words = list(verbalizer.values())
    wall, cpu = [], []
    for ex in [examples[0]] + examples[:n]:  # the first call warms up and is not counted
        t0, c0 = time.perf_counter(), time.process_time()
        metrics.label_scores(score, tokenizer, [ex], words, pad_id, batch_size=len(words))
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"latency_ms": 1000 * statistics.median(wall[1:]), "latency_cpu_ms": 1000 * statistics.median(cpu[1:])}


def weights_digest(model: Model) -> str:
    """sha256 over every tensor of the state dict, bit for bit."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
