"""serve_soak's streaming part (``serve_soak.py --mix``): healthy streams beside a hostile mix,
and the long-prompt reproducer, on one ``softprompt serve`` subprocess.

Healthy: 16 streamed greedy completions (``--stream-tokens`` tokens each) sent together; per
stream the time to its first token (TTFT) and between its tokens (ITL). Hostile mix, looping
while the healthy streams run, one client per kind, so every kind is under way at once: a
~1,500-token prompt, a classify request with 32 labels and 8 inputs of 100 words, a stream the
client drops after its first event, a chat request whose role is a list. Phases ``alone`` and ``mix`` alternate over rounds (so both see the same drift
of a shared machine); the server's peak resident set (``VmHWM`` summed over its process tree, reset through
``/proc/PID/clear_refs`` before each phase) is read after each phase.

Long-prompt reproducer: 16 short greedy requests (8 tokens) sent together, alone and with one
~2,000-token prompt, in alternating rounds; reported: the wall time until the last short one
finished, and the ratio.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import serve_load as SL

HEALTHY = 16


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (an engine may run its model in a child process)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return sorted(set(out))


def vm(pid: int, key: str) -> int:
    """``key`` (VmRSS, VmHWM) summed over the server's process tree, bytes (for VmHWM an upper
    bound of the tree's peak: the processes' peaks need not coincide)."""
    total = 0
    for p in tree(pid):
        try:
            lines = Path(f"/proc/{p}/status").read_text().splitlines()
        except OSError:
            continue
        total += next((int(ln.split()[1]) * 1024 for ln in lines if ln.startswith(key + ":")), 0)
    return total


def reset_peak(pid: int) -> None:
    for p in tree(pid):
        try:
            Path(f"/proc/{p}/clear_refs").write_text("5")
        except OSError:
            pass


async def stream_one(client, model: str, text: str, tokens: int) -> dict:
    """One streamed completion: TTFT, the gaps between its events, its status."""
    t0 = time.perf_counter()
    marks, status = [], None
    try:
        async with client.stream("POST", "/v1/completions", json={"model": model, "prompt": text, "max_tokens": tokens,
                                                                   "temperature": 0, "stream": True}) as r:
            status = r.status_code
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    marks.append(time.perf_counter())
    except Exception as e:  # noqa: BLE001 - a healthy failure, counted
        return {"status": None, "error": type(e).__name__}
    return {"status": status, "ttft": marks[0] - t0 if marks else None,
            "itl": [b - a for a, b in zip(marks, marks[1:])]}


def mix_requests(texts: list[str], chars: int) -> list[tuple[str, dict]]:
    long_text = " ".join(texts)[: chars * 3 // 4]  # ~1,500 tokens at the default 8,500
    return [
        ("long_prompt", {"path": "/v1/completions", "json": {"model": "task1", "prompt": long_text, "max_tokens": 4,
                                                            "temperature": 0}}),
        ("classify_32_labels", {"path": "/v1/classify", "json": {"prompt": "task2", "inputs": ["word " * (chars // 85)] * 8,
                                                                "verbalizer": [f"w{i}" for i in range(32)]}}),
        ("disconnect", {"path": "/v1/completions", "stream": True,
                        "json": {"model": "task3", "prompt": texts[0], "max_tokens": 64, "stream": True}}),
        ("chat_role_list", {"path": "/v1/chat/completions",
                            "json": {"model": "task0", "messages": [{"role": ["user"], "content": "hi"}]}}),
    ]


async def hostile_loop(client, mix, stop: asyncio.Event, out: list) -> None:
    k = 0
    while not stop.is_set():
        kind, req = mix[k % len(mix)]
        k += 1
        t = time.perf_counter()
        try:
            if req.get("stream"):
                async with client.stream("POST", req["path"], json=req["json"]) as r:
                    status = r.status_code
                    async for _ in r.aiter_lines():
                        break  # the client leaves after the first event
            else:
                status = (await client.post(req["path"], json=req["json"])).status_code
        except Exception:  # noqa: BLE001 - counted as no answer
            status = None
        out.append({"kind": kind, "status": status, "s": time.perf_counter() - t})


async def streams_phase(url: str, texts: list[str], tokens: int, mix) -> dict:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        stop, hostile = asyncio.Event(), []
        loops = [asyncio.ensure_future(hostile_loop(client, [m], stop, hostile)) for m in mix]  # a client per kind
        if mix:
            await asyncio.sleep(1.0)  # the mix is under way when the healthy streams arrive
        t0 = time.perf_counter()
        healthy = await asyncio.gather(*[stream_one(client, f"task{k % SL.PROMPTS}", texts[k + 10], tokens)
                                         for k in range(HEALTHY)])
        wall = time.perf_counter() - t0
        stop.set()
        await asyncio.gather(*loops)
    return {"healthy": healthy, "hostile": hostile, "wall_s": wall}


async def short_burst(url: str, texts: list[str], long_text: str | None) -> float:
    """Seconds until all 16 short requests finished (with the long prompt sent first, if given)."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        body = {"max_tokens": 8, "temperature": 0}
        long = (asyncio.ensure_future(client.post("/v1/completions", json={"model": "task0", "prompt": long_text, **body}))
                if long_text else None)
        t0 = time.perf_counter()
        rs = await asyncio.gather(*[client.post("/v1/completions", json={"model": f"task{k % SL.PROMPTS}",
                                                                          "prompt": texts[k], **body})
                                    for k in range(HEALTHY)])
        wall = time.perf_counter() - t0
        if long is not None:
            assert (await long).status_code == 200
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200][:1]
    return wall


def summarize_streams(res: dict) -> dict:
    ok = [h for h in res["healthy"] if h["status"] == 200 and h["ttft"] is not None]
    ttft, itl = [h["ttft"] for h in ok], [x for h in ok for x in h["itl"]]
    kinds: dict[str, dict[str, int]] = {}
    for h in res["hostile"]:
        kinds.setdefault(h["kind"], {})
        kinds[h["kind"]][str(h["status"])] = kinds[h["kind"]].get(str(h["status"]), 0) + 1
    return {"healthy_failures": HEALTHY - len(ok), "ttft": ttft, "itl": itl,
            "ttft_p50_s": SL.pct(ttft, 0.5), "ttft_p99_s": SL.pct(ttft, 0.99),
            "itl_p50_s": SL.pct(itl, 0.5), "itl_p99_s": SL.pct(itl, 0.99), "wall_s": res["wall_s"],
            "hostile_by_kind": kinds,
            "5xx": sum(1 for h in res["hostile"] if h["status"] is not None and h["status"] >= 500),
            "hostile_no_answer": sum(1 for h in res["hostile"] if h["status"] is None)}


def run_mix(a, srv, texts: list[str]) -> dict:
    """Rounds of (alone, mix) streams and of (alone, with long prompt) short bursts; peaks per phase."""
    pid, mix = srv.proc.pid, mix_requests(texts, a.long_chars)
    idle_rss = vm(pid, "VmRSS")
    long_text = " ".join(texts)[: a.long_chars]  # ~1,950 tokens at the default 8,500
    # Warm-up, not measured: one pass of each phase, so that shapes an engine compiles on first
    # sight (vLLM's torch.compile on a CPU) are compiled before the first measured round.
    asyncio.run(streams_phase(srv.url, texts, a.stream_tokens, mix))
    asyncio.run(short_burst(srv.url, texts, long_text))
    phases, bursts = [], []
    for rnd in range(a.rounds):
        order = ("alone", "mix") if rnd % 2 == 0 else ("mix", "alone")
        for name in order:
            reset_peak(pid)
            s = summarize_streams(asyncio.run(streams_phase(srv.url, texts, a.stream_tokens,
                                                            mix if name == "mix" else [])))
            s.update(round=rnd, phase=name, peak_rss=vm(pid, "VmHWM"))
            phases.append(s)
            print(f"round {rnd} {name:5s} TTFT p50 {s['ttft_p50_s']:.2f}s p99 {s['ttft_p99_s']:.2f}s  ITL p50 "
                  f"{s['itl_p50_s']:.3f}s p99 {s['itl_p99_s']:.3f}s  failures {s['healthy_failures']}  5xx {s['5xx']}  "
                  f"peak RSS {s['peak_rss'] / 2**20:.0f} MiB  {json.dumps(s['hostile_by_kind'])}", flush=True)
        for name in (("alone", "long") if rnd % 2 == 0 else ("long", "alone")):
            reset_peak(pid)
            wall = asyncio.run(short_burst(srv.url, texts, long_text if name == "long" else None))
            bursts.append({"round": rnd, "phase": name, "short_wall_s": wall, "peak_rss": vm(pid, "VmHWM")})
            print(f"round {rnd} 16 short requests {name:5s}: {wall:.2f}s", flush=True)
    return {"idle_rss": idle_rss, "phases": phases, "bursts": bursts, "long_prompt_chars": len(long_text)}


def mix_report(a, info, model, res: dict, max_request_mb: float) -> tuple[dict, str]:
    import common

    pooled = {n: {m: sorted(x for p in res["phases"] if p["phase"] == n for x in p[m]) for m in ("ttft", "itl")}
              for n in ("alone", "mix")}
    p99 = {n: {m: SL.pct(v, 0.99) for m, v in d.items()} for n, d in pooled.items()}
    ratio = {m: p99["mix"][m] / p99["alone"][m] for m in ("ttft", "itl")}
    burst = {n: [b["short_wall_s"] for b in res["bursts"] if b["phase"] == n] for n in ("alone", "long")}
    burst_ratio = sum(burst["long"]) / sum(burst["alone"])
    peak = max([p["peak_rss"] for p in res["phases"]] + [b["peak_rss"] for b in res["bursts"]])
    bound = res["idle_rss"] + max_request_mb * 2**20
    failures = sum(p["healthy_failures"] for p in res["phases"])
    fives = sum(p["5xx"] for p in res["phases"])
    met = {"ttft_p99": ratio["ttft"] <= 2, "itl_p99": ratio["itl"] <= 2, "healthy_failures": failures == 0,
           "5xx": fives == 0, "peak_rss": peak <= bound, "long_prompt": burst_ratio <= 2}
    for p in res["phases"]:
        for m in ("ttft", "itl"):
            p.pop(m)
    payload = {"benchmark": "serve_soak_mix", "model": model, "machine": info, "setup": {
        "engine": getattr(a, "engine", "native"), "dtype": getattr(a, "dtype", "float32"),
        "rounds": a.rounds, "stream_tokens": a.stream_tokens, "healthy_streams": HEALTHY, "threads": a.threads,
        "max_request_mb": max_request_mb}, **res, "p99": p99, "p99_ratio_mix_over_alone": ratio,
        "short_burst_ratio_long_over_alone": burst_ratio, "peak_rss": peak, "rss_bound": bound,
        "healthy_failures": failures, "hostile_5xx": fives, "targets_met": met}
    rows = [[p["round"], p["phase"], p["ttft_p50_s"], p["ttft_p99_s"], p["itl_p50_s"], p["itl_p99_s"],
             p["healthy_failures"], p["5xx"], round(p["peak_rss"] / 2**20), json.dumps(p["hostile_by_kind"])]
            for p in res["phases"]]
    engine = getattr(a, "engine", "native")
    md = (f"# serve_soak --mix{'' if engine == 'native' else ' --engine ' + engine}\n\n`softprompt serve` ({model}, "
          f"--engine {engine}, --dtype {getattr(a, 'dtype', 'float32')}, {a.threads} torch thread, defaults: --prefill-chunk, "
          f"--max-request-mb {max_request_mb:g}) on 127.0.0.1. {HEALTHY} healthy streamed greedy completions "
          f"({a.stream_tokens} tokens) sent together, alone or while 4 clients loop over a hostile mix, one kind each "
          f"(a ~1,500-token prompt, classify with 32 labels x 8 inputs of 100 words, a stream dropped after its first "
          f"event, a chat role that is a list); {a.rounds} rounds, order alternating, after one unmeasured warm-up pass of the mix and of the long-prompt burst. {info['cpu']} ({info['cores']} cores, shared "
          f"with other work: load average {info['loadavg_at_start'][0]:.1f} at start), so read the ratios.\n\n"
          + common.md_table(["round", "phase", "TTFT p50 s", "TTFT p99 s", "ITL p50 s", "ITL p99 s", "healthy failures",
                             "5xx", "peak RSS MiB", "hostile answers"], rows)
          + f"\nPooled p99: TTFT {p99['alone']['ttft']:.2f}s alone, {p99['mix']['ttft']:.2f}s with the mix: "
          f"**{ratio['ttft']:.2f}x**; ITL {p99['alone']['itl']:.3f}s alone, {p99['mix']['itl']:.3f}s with the mix: "
          f"**{ratio['itl']:.2f}x** (targets <= 2x). Healthy failures: {failures}. 5xx: {fives}. Server peak RSS "
          f"(its process tree) {peak / 2**20:.0f} MiB; bound = idle RSS after warm-up ({res['idle_rss'] / 2**20:.0f} MiB: model, runtime) "
          f"+ --max-request-mb = {bound / 2**20:.0f} MiB.\n\n"
          f"Long-prompt reproducer: 16 short requests (8 tokens) took "
          f"{', '.join(f'{x:.2f}' for x in burst['alone'])} s alone and {', '.join(f'{x:.2f}' for x in burst['long'])} s "
          f"with one {res['long_prompt_chars']}-character (~2,000-token) prompt sent first: **{burst_ratio:.2f}x** "
          f"(target <= 2x).\n\nTargets met: {json.dumps(met)}.\n")
    return payload, md
