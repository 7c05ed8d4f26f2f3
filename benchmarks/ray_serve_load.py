"""serve_load through Ray Serve: the single-process server vs Ray Serve with 1 and 2 replicas.

The load, prompts and requests are those of ``serve_load.py`` (8 random prompts, N = 20,
alternating one-sentence classification and 32-token greedy generation, closed loop with C
requests in flight). Three servers, measured one after the other in one run:

* ``single``: ``softprompt serve`` in a subprocess (1 torch thread, batching on);
* ``ray x1`` / ``ray x2``: ``softprompt.serve.ray_serve.build_app`` on a local Ray cluster started
  here, 1 then 2 replicas (each 1 torch thread, batching on), behind Serve's HTTP proxy and our
  ingress (prompt affinity through Ray's multiplexed routing).

On this machine (2 cores shared with other work) two replicas compete for the same two cores,
so the figures show Ray's per-request overhead and the affinity routing at work, not what two
machines would give. Answers through Ray are checked against the single server on a sample.

    python benchmarks/ray_serve_load.py --quick   # tiny random model, results not written
    python benchmarks/ray_serve_load.py           # default model, ~6 min on 2 shared cores
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import serve_load as SL  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy(model: str, replicas: int, home: Path, port: int) -> str:
    from ray import serve

    from softprompt.serve.app import ServerConfig
    from softprompt.serve.ray_serve import APP, build_app

    cfg = ServerConfig(max_batch_rows=32, max_queue=4096, max_wait_ms=5)
    serve.run(build_app(cfg, model, replicas=replicas, replica_cpus=1, env={"OMP_NUM_THREADS": "1"},
                        store=common.store(home)), name=APP, route_prefix="/")
    return f"http://127.0.0.1:{port}"


def warm(url: str, texts: list[str]) -> None:
    import httpx

    for _ in range(2):  # every prompt seen (and its prefix cached) on the replica it sticks to
        for k in range(SL.PROMPTS):  # request_for(0, k) uses prompt k (with the kind it always has)
            _, path, body = SL.request_for(0, k, texts)
            httpx.post(url + path, json=body, timeout=300).raise_for_status()


def measure(name: str, url: str, levels: list[int], seconds: float, max_requests: int, texts) -> list[dict]:
    out = []
    for c in levels:
        res = asyncio.run(SL.load(url, c, seconds, max_requests, texts))
        res["server"] = name
        out.append(res)
        print(f"{name:7s} C={c:<3d} {res['requests']:4d} req  {res['requests_per_s']:6.2f} req/s  "
              f"{res['tokens_per_s']:7.1f} tok/s  p50 {res['p50_s']:6.2f}s  p99 {res['p99_s']:6.2f}s  "
              f"errors {res['errors']}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model, short levels; results not written")
    ap.add_argument("--concurrency", default="8,32", help="load levels (default %(default)s)")
    ap.add_argument("--seconds", type=float, default=None, help="time per level (default 12, quick 3)")
    ap.add_argument("--max-requests", type=int, default=400)
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    a = ap.parse_args()
    import ray
    from ray import serve

    seconds = a.seconds or (3.0 if a.quick else 12.0)
    levels = [int(x) for x in a.concurrency.split(",")]
    info, t_start = common.machine_info(), time.perf_counter()
    home, model = SL.temp_home(a.quick)
    texts = SL.sentences(200)
    SL.make_prompts(model, home)
    results: dict[str, list[dict]] = {}
    single = SL.Server(model, 32, 1, home / "server-single.log", home=home)
    try:
        single.wait_ready()
        warm(single.url, texts)
        results["single"] = measure("single", single.url, levels, seconds, a.max_requests, texts)
    finally:
        single.stop()
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    agreement = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        ref = SL.Server(model, 32, 1, home / "server-ref.log", home=home)  # reference answers, idle during the load
        ref.wait_ready()
        for replicas in (1, 2):
            url = deploy(model, replicas, home, port)
            warm(url, texts)
            agreement[f"ray x{replicas}"] = SL.same_answers(url, ref.url, texts)
            results[f"ray x{replicas}"] = measure(f"ray x{replicas}", url, levels, seconds, a.max_requests, texts)
        ref.stop()
    finally:
        serve.shutdown()
        ray.shutdown()
    report(a, info, model, levels, seconds, results, agreement, time.perf_counter() - t_start)
    shutil.rmtree(home, ignore_errors=True)


def report(a, info, model, levels, seconds, results, agreement, total) -> None:
    rows = [[name, r["concurrency"], r["requests"], r["errors"], r["requests_per_s"], r["tokens_per_s"], r["p50_s"],
             r["p99_s"]] for name, rs in results.items() for r in rs]
    top = max(levels)
    at_top = {name: next(r for r in rs if r["concurrency"] == top)["requests_per_s"] for name, rs in results.items()}
    payload = {"benchmark": "ray_serve_load", "model": model, "seed": common.SEED, "machine": info,
               "loadavg_at_end": os.getloadavg(), "total_seconds": total,
               "setup": {"prompts": SL.PROMPTS, "num_virtual_tokens": SL.N, "new_tokens": SL.NEW_TOKENS,
                         "seconds_per_level": seconds, "levels": levels, "replica_threads": 1,
                         "max_batch_rows": 32, "routing": "Ray Serve multiplexed_model_id = prompt name"},
               "results": results, "same_answers_as_single_server": agreement,
               "requests_per_s_at_top_concurrency": at_top}
    md = (f"# ray_serve_load\n\nThe `serve_load` mix ({SL.PROMPTS} random prompts, N={SL.N}, classification and "
          f"{SL.NEW_TOKENS}-token greedy generation alternating), closed loop, {seconds:g}s per level; model "
          f"`{model}`, every server/replica on 1 torch thread; {info['cpu']} ({info['cores']} cores, shared: load "
          f"average {info['loadavg_at_start'][0]:.1f} at start). `single` is `softprompt serve`; `ray xR` is "
          "`softprompt serve --ray --replicas R`'s application on a local Ray cluster.\n\n"
          + common.md_table(["server", "C", "requests", "errors", "req/s", "tok/s", "p50 s", "p99 s"], rows)
          + f"\nAt C={top}: " + ", ".join(f"{k} {v:.2f} req/s" for k, v in at_top.items())
          + ". Same answers as the single server on a sample: "
          + ", ".join(f"{k} {v:.0%}" for k, v in agreement.items())
          + f". Both replicas share this machine's 2 cores. Whole run: {total:.0f}s.\n")
    print(md)
    if not a.quick:
        print("wrote", *common.write_results("ray_serve_load", payload, md, a.out or common.RESULTS))


if __name__ == "__main__":
    main()
