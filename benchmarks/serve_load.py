"""Serving under load: the HTTP server with cross-task batching vs the same server unbatched.

``softprompt serve`` runs as a subprocess on a free loopback port, once with
``--max-batch-rows 32`` (batching: requests for any mix of prompts share each forward,
generation rows join and leave the running batch) and once with ``--max-batch-rows 1``
(batching off: one row per forward). A bounded closed-loop load generator (asyncio + httpx)
keeps C requests in flight, C = 1, 8, 32, for 12 s per level; requests already sent then
finish and count, so no latency is censored. That drain sets the run time: unbatched at C = 32
the last of the 32+ requests in flight waits for all the others (about 32 x 5 s here), which is
why the window is short and the request counts small. Request k of worker w uses prompt (w + k) mod 8 and alternates between

* classification: ``POST /v1/classify`` with one SST-2 test sentence (the prompt's template and
  verbalizer, two label words), and
* generation: ``POST /v1/completions`` continuing one SST-2 sentence, 32 new tokens, greedy.

The 8 prompts are random-init (N = 20) in a temporary store; the model is the default one
(read from the user's store, ``$SOFTPROMPT_HOME`` or ~/.cache/softprompt); the server runs on 1 torch thread
(``--threads``: on 2 cores shared with other jobs, 2 threads measured 3-5x slower). Greedy decoding makes both servers
produce the same tokens for the same request (checked on a sample), so they do equal work; a
generation may end before 32 tokens on EOS, and the mean completion length is reported.

With ``--baseline DIR`` a third server, batched like the first, runs the source tree DIR (an
older checkout, e.g. the main branch) on the same load, the levels interleaved in rounds
(each level: every server in turn), so "is the new code slower?" is answered by ratios
measured minutes apart on the same machine: ``batched / baseline`` throughput and p50 per level.

Reported per server and level: throughput (requests/s, generated tokens/s), latency p50/p99
(all requests, and per kind), errors, and the server's mean rows per decode step (from
/metrics). Targets: batched throughput >= 4x unbatched at C = 32, and batched p99 at C = 32
<= 2x the unbatched p50 at C = 32.

    python benchmarks/serve_load.py            # default model, about 8 min on 2 shared cores
    python benchmarks/serve_load.py --quick    # tiny random model, seconds; results not written (--out: serve_load_tiny)
    python benchmarks/serve_load.py --baseline /path/to/older/checkout
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PROMPTS, N, NEW_TOKENS = 8, 20, 32
TEMPLATE, VERBALIZER = "Review: {text}\nSentiment:", {"0": "negative", "1": "positive"}
TARGET_SPEEDUP, TARGET_P99_OVER_P50 = 4.0, 2.0


def sentences(n: int) -> list[str]:
    path = common.data_root() / "sst2" / "test.txt"
    if path.is_file():
        return [s for _, s in common.read_label_lines(path, n)]
    return common.synthetic_sentences(n)


def temp_home(quick: bool) -> tuple[Path, str]:
    """A temporary store that shares the user's converted default model (symlink); (its root,
    --model). The server runs with ``--home`` at that root."""
    from softprompt import models

    real = common.store()
    tmp = Path(tempfile.mkdtemp(prefix="sp-serve-load-"))
    if quick:
        lm = common.load_lm(True)
        model_arg = str(tmp / "tiny-model")
        lm.model.save_pretrained(model_arg)
        lm.tokenizer.save_pretrained(model_arg)
    else:
        models.resolve(models.DEFAULT_MODEL, real)  # converts into the user's store on first use only
        (tmp / "models").symlink_to(real.models, target_is_directory=True)
        model_arg = models.DEFAULT_MODEL
    return tmp, model_arg


def make_prompts(model_arg: str, home: Path) -> None:
    """8 random-init prompts (embedding scale) with a classification template and verbalizer."""
    import torch

    from softprompt import models
    from softprompt.prompt import init_random

    store = common.store(home)
    lm = models.load(model_arg, store=store)
    gen = torch.Generator().manual_seed(common.SEED)
    for k in range(PROMPTS):
        meta = {"base_model": {"name": lm.name, "fingerprint": lm.fingerprint}, "task": f"task{k}",
                "mode": "target", "template": TEMPLATE, "target_column": "label", "verbalizer": VERBALIZER}
        store.save_prompt(f"task{k}", init_random(lm.model, N, gen), meta, str(lm.path),
                          lm.model.config)


class Server:
    """``softprompt serve`` in a subprocess on a free loopback port."""

    def __init__(self, model: str, max_batch_rows: int, threads: int, log: Path, src: Path = common.REPO / "src",
                 home: Path | None = None, extra: tuple[str, ...] = (), python: str = sys.executable,
                 dtype: str = "float32"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [python, "-m", "softprompt", "serve", "--model", model, "--port", str(self.port),
               "--max-batch-rows", str(max_batch_rows), "--max-queue", "4096", "--max-wait-ms", "5",
               *(["--home", str(home)] if home else []),
               "--dtype", dtype, *extra]  # float32: as the committed results were measured (serve's default is auto)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(src)}
        self.log = log.open("w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx

        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server did not start")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)  # graceful: in-flight requests finish first
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def request_for(w: int, k: int, texts: list[str]) -> tuple[str, str, dict]:
    """(kind, path, body) of worker w's k-th request: the same sequence for every server."""
    prompt, text = f"task{(w + k) % PROMPTS}", texts[(w * 7919 + k) % len(texts)]
    if (w + k) % 2:
        return "classify", "/v1/classify", {"prompt": prompt, "inputs": [text]}
    return "generate", "/v1/completions", {"model": prompt, "prompt": text, "max_tokens": NEW_TOKENS,
                                           "temperature": 0}


async def closed_loop(url: str, concurrency: int, seconds: float, max_requests: int, one, timeout: float = 600) -> float:
    """``concurrency`` workers, each awaiting ``one(client, w, k)`` for its k-th request until
    ``seconds`` pass or ``max_requests`` are sent (those in flight then finish); wall seconds."""
    import httpx

    sent = 0
    t0 = time.perf_counter()

    async def worker(w: int, client) -> None:
        nonlocal sent
        k = 0
        while time.perf_counter() - t0 < seconds and sent < max_requests:
            sent += 1
            await one(client, w, k)
            k += 1

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        await asyncio.gather(*(worker(w, client) for w in range(concurrency)))
    return time.perf_counter() - t0


async def load(url: str, concurrency: int, seconds: float, max_requests: int, texts: list[str]) -> dict:
    """Closed loop: ``concurrency`` workers, each sends its next request when the last returns."""
    records: list[tuple[str, float, int, int, int]] = []  # (kind, latency s, status, completion, prompt tokens)

    async def one(client, w: int, k: int) -> None:
        kind, path, body = request_for(w, k, texts)
        t = time.perf_counter()
        r = await client.post(path, json=body)
        usage = r.json().get("usage", {}) if r.status_code == 200 else {}
        records.append((kind, time.perf_counter() - t, r.status_code, usage.get("completion_tokens", 0),
                        usage.get("prompt_tokens", 0)))

    wall = await closed_loop(url, concurrency, seconds, max_requests, one)
    return summarize(records, wall, concurrency)


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))] if v else float("nan")


def summarize(records, wall: float, concurrency: int) -> dict:
    ok = [r for r in records if r[2] == 200]
    lat = [r[1] for r in ok]
    out = {"concurrency": concurrency, "requests": len(records), "errors": len(records) - len(ok),
           "seconds": wall, "requests_per_s": len(ok) / wall, "tokens_per_s": sum(r[3] for r in ok) / wall,
           "p50_s": pct(lat, 0.5), "p99_s": pct(lat, 0.99), "mean_s": statistics.fmean(lat) if lat else None}
    for kind in ("classify", "generate"):
        kl = [r[1] for r in ok if r[0] == kind]
        out[kind] = {"n": len(kl), "p50_s": pct(kl, 0.5), "p99_s": pct(kl, 0.99)}
    gens = [r[3] for r in ok if r[0] == "generate"]
    out["mean_completion_tokens"] = statistics.fmean(gens) if gens else None
    out["generation_usage"] = [(r[4], r[3]) for r in ok if r[0] == "generate"]  # (prompt, completion) tokens
    return out


def generation_roofline(results: dict, config, peak: dict) -> dict:
    """Per server and level: the generation requests' useful FLOPs (``common.forward_flops``
    with the N prompt positions) over the level's wall time, against the fp32 matmul peak. The
    classification requests are left out, so this is a lower bound on the work done."""
    out = {}
    for name, levels in results.items():
        for r in levels:
            use = r.pop("generation_usage")
            flops = common.forward_flops(config, [p for p, _ in use], [c for _, c in use], prefix=N)
            out[f"{name} C={r['concurrency']}"] = common.roofline(flops, r["seconds"], peak["fp32"])
    return out


PHASES = ("score", "join", "decode")


def counters(url: str) -> dict[str, float]:
    """The server's decode-step histogram (rows sum, steps) and worker seconds by phase."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
    names = {"rows": 'softprompt_batch_rows_sum{kind="decode"}', "steps": 'softprompt_batch_rows_count{kind="decode"}',
             **{p: f'softprompt_worker_seconds_total{{phase="{p}"}}' for p in PHASES}}
    return {k: sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(n)) for k, n in names.items()}


def same_answers(url_a: str, url_b: str, texts: list[str], n: int = 4) -> float:
    """Share of a sample of requests that both servers answer identically."""
    import httpx

    same = 0
    for k in range(n):
        kind, path, body = request_for(k, 0 if k % 2 == 0 else 1, texts)
        a, b = (httpx.post(u + path, json=body, timeout=300).json() for u in (url_a, url_b))
        key = "choices" if kind == "generate" else "data"
        if kind == "generate":
            same += a[key][0]["text"] == b[key][0]["text"]
        else:
            same += a[key][0]["label"] == b[key][0]["label"] and all(
                abs(a[key][0]["probabilities"][lab] - b[key][0]["probabilities"][lab]) < 1e-4 for lab in VERBALIZER)
    return same / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model, short levels; results not written")
    ap.add_argument("--concurrency", default="1,8,32", help="load levels (default %(default)s)")
    ap.add_argument("--seconds", type=float, default=None, help="time per level (default 12, quick 3)")
    ap.add_argument("--max-requests", type=int, default=400, help="cap per level (default %(default)s)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the server (default %(default)s: on 2 cores shared with other jobs, "
                         "2 threads were 3-5x slower, as OpenMP barriers wait for a time slice)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="an older checkout (its src/ is served by a third, batched server) to compare against")
    a = ap.parse_args()
    import httpx
    seconds = a.seconds or (3.0 if a.quick else 12.0)
    levels = [int(x) for x in a.concurrency.split(",")]
    t_start = time.perf_counter()
    info = common.machine_info()
    home, model = temp_home(a.quick)
    texts = sentences(200)
    results: dict[str, list[dict]] = {}
    src = common.REPO / "src"
    servers = {"batched": (32, src), "unbatched": (1, src)}
    if a.baseline:
        servers["baseline"] = (32, a.baseline.resolve() / "src")
    running = {}
    try:
        urls = {}
        for name, (rows, tree) in servers.items():  # all start (import, load the model) while prompts are made
            running[name] = Server(model, rows, a.threads, home / f"server-{name}.log", tree, home=home)
        make_prompts(model, home)  # the servers read the store lazily
        for name, srv in running.items():
            srv.wait_ready()
            urls[name] = srv.url
            for k in range(PROMPTS):  # warm-up: every prompt loaded and its prefix cached
                _, path, body = request_for(k, 1 - k % 2, texts)  # (w + k) odd: a classification
                httpx.post(srv.url + path, json=body, timeout=300).raise_for_status()
        agreement = min(same_answers(urls["batched"], u, texts) for n, u in urls.items() if n != "batched")
        print(f"the servers give the same answers on {agreement:.0%} of a sample", flush=True)
        results = {name: [] for name in running}
        for c in levels:  # rounds: each level on every server in turn, one at a time (the others idle)
            for name, srv in running.items():
                before = counters(srv.url)
                res = asyncio.run(load(srv.url, c, seconds, a.max_requests, texts))
                d = {k: v - before[k] for k, v in counters(srv.url).items()}
                res["mean_decode_rows"] = d["rows"] / max(1.0, d["steps"])
                res["worker_busy_share"] = {p: d[p] / res["seconds"] for p in PHASES}  # of the level's wall time
                res["seconds_per_decode_step"] = d["decode"] / max(1.0, d["steps"])
                results[name].append(res)
                print(f"{name:9s} C={c:<3d} {res['requests']:4d} req  {res['requests_per_s']:6.2f} req/s  "
                      f"{res['tokens_per_s']:7.1f} tok/s  p50 {res['p50_s']:6.2f}s  p99 {res['p99_s']:6.2f}s  "
                      f"rows/step {res['mean_decode_rows']:.1f}  s/step {res['seconds_per_decode_step']:.2f}  "
                      f"busy {res['worker_busy_share']}  errors {res['errors']}", flush=True)
    finally:
        for srv in running.values():
            srv.stop()
    import torch
    from transformers import AutoConfig

    from softprompt import models

    torch.set_num_threads(a.threads)  # the peak with the server's threads
    peak = common.matmul_peaks()
    roof = generation_roofline(results, AutoConfig.from_pretrained(models.resolve(model)[1]), peak)
    report(a, info, model, levels, seconds, results, agreement, time.perf_counter() - t_start, roof, peak)
    shutil.rmtree(home, ignore_errors=True)


def report(a, info, model, levels, seconds, results, agreement, total, roof, peak) -> None:
    top = max(levels)
    b, u = (next(r for r in results[m] if r["concurrency"] == top) for m in ("batched", "unbatched"))
    u1 = next((r for r in results["unbatched"] if r["concurrency"] == 1), None)
    speedup = b["requests_per_s"] / u["requests_per_s"]
    p99_ratio = b["p99_s"] / u["p50_s"]
    payload = {"benchmark": "serve_load", "model": model, "seed": common.SEED, "machine": info,
               "loadavg_at_end": os.getloadavg(), "total_seconds": total,
               "setup": {"prompts": PROMPTS, "num_virtual_tokens": N, "new_tokens": NEW_TOKENS, "greedy": True,
                         "mix": "alternating classify (1 input, 2 labels) / completions (32 tokens)",
                         "seconds_per_level": seconds, "max_requests_per_level": a.max_requests,
                         "server_threads": a.threads, "batched_max_batch_rows": 32, "max_wait_ms": 5,
                         "join_every": 4},
               "results": results, "same_answers_batched_vs_unbatched": agreement,
               "speedup_at_top_concurrency": speedup, "batched_p99_over_unbatched_p50": p99_ratio,
               "batched_p99_over_unbatched_p50_at_c1": b["p99_s"] / u1["p50_s"] if u1 else None,
               "targets": {"speedup": TARGET_SPEEDUP, "p99_over_p50": TARGET_P99_OVER_P50},
               "target_met": speedup >= TARGET_SPEEDUP and p99_ratio <= TARGET_P99_OVER_P50,
               "matmul_peak_gflops": peak, "generation_roofline": roof}
    vs = versus_baseline(results)
    if vs:
        payload["baseline"] = {"source": str(a.baseline), "batched_over_baseline": vs}
    rows = [[m, r["concurrency"], r["requests"], r["errors"], r["requests_per_s"], r["tokens_per_s"], r["p50_s"],
             r["p99_s"], r["classify"]["p50_s"], r["generate"]["p50_s"], r["mean_decode_rows"],
             r["seconds_per_decode_step"], " / ".join(f"{r['worker_busy_share'][p]:.0%}" for p in PHASES)]
            for m in results for r in results[m]]
    md = (f"# serve_load\n\n`softprompt serve` under a closed-loop load on loopback: {PROMPTS} random prompts "
          f"(N={N}) mixed, requests alternating classification (one SST-2 sentence) and {NEW_TOKENS}-token greedy "
          f"generation; {seconds:g}s per level; model `{model}`, server on {a.threads} torch threads, {info['cpu']} "
          f"({info['cores']} cores, shared: load average {info['loadavg_at_start'][0]:.1f} at start).\n\n"
          + common.md_table(["server", "C", "requests", "errors", "req/s", "tok/s", "p50 s", "p99 s",
                             "classify p50", "generate p50", "rows/decode step", "s/decode step",
                             "worker busy: score / join / decode"], rows)
          + f"\nAt C={top}: batched throughput {speedup:.2f}x unbatched (target >= {TARGET_SPEEDUP:g}x); batched "
          f"p99 {b['p99_s']:.2f}s = {p99_ratio:.2f}x the unbatched p50 {u['p50_s']:.2f}s (target <= "
          f"{TARGET_P99_OVER_P50:g}x): {'met' if payload['target_met'] else 'missed'}."
          + (f" Against the unbatched p50 at C=1 ({u1['p50_s']:.2f}s, one request alone) the batched p99 is "
             f"{payload['batched_p99_over_unbatched_p50_at_c1']:.1f}x." if u1 else "")
          + f"\nThe servers gave identical answers on {agreement:.0%} of a sample of requests. Mean completion "
          f"length (EOS may end a generation early, identically for both): {b['mean_completion_tokens'] or 0:.1f} "
          f"tokens. Whole run: {total:.0f}s.\n"
          f"\nFraction of the measured fp32 matmul peak ({peak['fp32']:.0f} GFLOPS, {peak['threads']} threads as the server), counting only the generation requests' useful FLOPs (a lower bound): "
          + ", ".join(f"{k} {v['fraction_of_peak']:.1%}" for k, v in roof.items())
          + ". `serve_floor` sets the server's decoding against `model.generate` on the same requests.\n")
    if vs:
        md += (f"\nAgainst the baseline source tree (`{a.baseline}`, served batched on the same load, levels "
               "interleaved in rounds), batched / baseline:\n\n"
               + common.md_table(["C", "req/s ratio", "tok/s ratio", "p50 ratio", "classify p50 ratio",
                                  "generate p50 ratio"],
                                 [[v["concurrency"], v["requests_per_s"], v["tokens_per_s"], v["p50_s"],
                                   v["classify_p50_s"], v["generate_p50_s"]] for v in vs]))
    print(md)
    if not a.quick:
        print("wrote", *common.write_results("serve_load", payload, md, a.out or common.RESULTS))
    elif a.out:  # the tiny model: Python overhead per step shows most
        print("wrote", *common.write_results("serve_load_tiny", payload, md, a.out))


def versus_baseline(results: dict) -> list[dict]:
    """Per level, the batched server's figures over the baseline server's (throughput > 1 and
    latency < 1 mean the new code is faster)."""
    if "baseline" not in results:
        return []
    out = []
    for b, o in zip(results["batched"], results["baseline"], strict=True):
        out.append({"concurrency": b["concurrency"], "requests_per_s": b["requests_per_s"] / o["requests_per_s"],
                    "tokens_per_s": b["tokens_per_s"] / max(o["tokens_per_s"], 1e-9), "p50_s": b["p50_s"] / o["p50_s"],
                    "classify_p50_s": b["classify"]["p50_s"] / o["classify"]["p50_s"],
                    "generate_p50_s": b["generate"]["p50_s"] / o["generate"]["p50_s"]})
    return out


if __name__ == "__main__":
    main()
