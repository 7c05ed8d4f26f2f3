"""Prometheus metrics of the server, rendered by hand in the text exposition format.

Request counters and latency histograms by endpoint and status (written by the gate), batch
sizes and worker time by phase (written by the scheduler). Engine gauges are not read here:
the scheduler publishes a snapshot and ``/metrics`` passes it to ``render`` as gauges, so
nothing on the event loop touches the engine. Thread-safe: one lock around the counters.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque


class Metrics:
    """Counters and histograms, rendered by hand in the Prometheus text format."""

    LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
    ROWS = (1, 2, 4, 8, 16, 32, 64, 128)
    STEPS = (0, 1, 2, 4, 8, 16, 32, 64, 128)

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
                                                ("softprompt_batch_rows", "kind", self.ROWS),
                                                ("softprompt_wait_steps", "kind", self.STEPS)):
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


