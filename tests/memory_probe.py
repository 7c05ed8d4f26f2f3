"""Peak memory of one engine or server call, measured in a fresh process (run by the tests).

``python memory_probe.py MODEL_DIR JOB_JSON`` prints a JSON list, one entry per case of the job:
``{"case", "measured", "estimate"}`` in bytes. ``measured`` is the rise of the process's peak
resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) over its resident set just
before the call; the tests start it with ``MALLOC_MMAP_THRESHOLD_`` low, so that large buffers
are mapped and unmapped as torch allocates and frees them (the peak then tracks the tensors
alive at once, not what the allocator happened to keep).

Jobs: ``{"kind": "engine", ...}`` scores and generates through ``Engine`` (with the estimates
the server checks); ``{"kind": "server", ...}`` sends one ``/v1/classify`` request to a real
server in this process and reports its status.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure(fn):
    """(fn's result, rise of the peak resident set while it ran, in bytes)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = _status("VmRSS")
    out = fn()
    return out, _status("VmHWM") - before


def engine_cases(lm, job: dict) -> list[dict]:
    import torch

    from softprompt.config import EngineConfig, GenerateConfig
    from softprompt.inference.engine import Engine, GenerateRequest, ScoreRow
    from softprompt.inference.steps import StepBatch

    eng = Engine(lm, EngineConfig(max_batch_rows=job.get("max_batch_rows", 32), score_group_mb=job["group_mb"]))
    eng.add_prompt("p", torch.randn(job.get("n_virtual", 4), lm.hidden_size) * 0.02)
    out = []
    for case in job["cases"]:
        ctx = tuple(lm.tokenizer(case["text"], add_special_tokens=False)["input_ids"])
        if case["kind"] == "score":
            labels = [tuple(lm.tokenizer(f" w{i}", add_special_tokens=False)["input_ids"]) for i in range(case["labels"])]
            rows = [ScoreRow(ctx, tuple(labels), case.get("prompt")) for _ in range(case["rows"])]
            eng.score_rows(rows[:1])  # warm: the prompt's prefix, first-call allocations
            _, peak = measure(lambda rows=rows: eng.score_rows(rows))
            est = eng.score_bytes(rows)
        else:
            reqs = [GenerateRequest("", case.get("prompt"), GenerateConfig(max_new_tokens=case["max_tokens"]),
                                    token_ids=ctx) for _ in range(case["rows"])]

            def run(reqs=reqs, chunk=case["chunk"]):
                batch = StepBatch(eng, prefill_chunk=chunk)
                batch.add(reqs)
                while len(batch):
                    batch.step()

            run(reqs[:1])
            _, peak = measure(run)
            est = eng.generate_bytes(reqs, case["chunk"])
        out.append({"case": case["name"], "measured": peak, "estimate": est, "tokens": len(ctx)})
    return out


def server_case(lm, job: dict) -> list[dict]:
    import socket

    import httpx
    import uvicorn

    from softprompt.config import EngineConfig, ServerConfig
    from softprompt.inference.engine import Engine
    from softprompt.serve.app import create_app

    known = {f.name for f in dataclasses.fields(ServerConfig)}  # limits an older server lacks are left out
    cfg = ServerConfig(model_id="tiny", **{k: v for k, v in job["server"].items() if k in known})
    app = create_app(Engine(lm, EngineConfig(max_batch_rows=32)), cfg)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    while not server.started:
        th.join(0.01)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/classify"
    warm = httpx.post(url, json={**job["body"], "inputs": job["body"]["inputs"][:1]}, timeout=600)
    r, peak = measure(lambda: httpx.post(url, json=job["body"], timeout=600))
    server.should_exit = True
    th.join(20)
    return [{"case": "server", "measured": peak, "status": r.status_code, "warm_status": warm.status_code,
             "body": r.json()}]


def main() -> None:
    import torch

    from softprompt import models

    torch.set_num_threads(1)
    lm = models.load(sys.argv[1])
    job = json.loads(sys.argv[2])
    print(json.dumps(engine_cases(lm, job) if job["kind"] == "engine" else server_case(lm, job)))


if __name__ == "__main__":
    main()
