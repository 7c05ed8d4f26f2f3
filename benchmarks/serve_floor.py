"""The server's decode throughput against its floor: the plain model's batched ``generate``.

The same R generation requests (SST-2 test sentences, greedy, 32 new tokens, stopping where
``model.generate`` stops) are served two ways, interleaved in rounds on the same machine:

* **generate** (the anchor): transformers' ``model.generate`` in this process, batches of C
  rows, left-padded, no HTTP, no scheduler; what a user gets from the library directly;
* **server**: ``softprompt serve --max-batch-rows C`` in a subprocess with the same torch
  threads, C concurrent HTTP clients (asyncio + httpx, one request each at a time) until the R
  requests are answered; once with the plain model and once with each request under one of 8
  random prompts (N = 20).

Reported per side: generated tokens per second (each side's own count; the counts are checked to
be equal), the server over ``generate``, and where the server's time goes (its worker's busy
seconds by phase from ``/metrics``; the rest is HTTP, queueing and the client). Target
(issue: speed toward the machine's limit): server / generate >= 0.9 at C = 32. FLOPs are the
useful ones (real prompt tokens and generated tokens, no padding), the same for both sides, so
the fraction of the measured fp32 matmul peak shows how far either is from the machine.

    python benchmarks/serve_floor.py            # default model, about 5 min
    python benchmarks/serve_floor.py --quick    # tiny random model, seconds; results not written
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import serve_load  # noqa: E402 - the server subprocess, the temp store and the prompts

NEW_TOKENS, TARGET = 32, 0.9


def generate_round(lm, texts: list[str], rows: int) -> tuple[float, list[int]]:
    """Wall seconds and per-request generated token counts of ``model.generate`` over ``texts``
    in batches of ``rows`` (left padding, greedy, stopping at ``chat.stop_tokens``)."""
    import torch

    from softprompt import chat

    tok, stops = lm.tokenizer, sorted(chat.stop_tokens(lm))
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    counts: list[int] = []
    t0 = time.perf_counter()
    for i in range(0, len(texts), rows):
        ids = [chat.encode(tok, t) for t in texts[i:i + rows]]
        T = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (T - len(x)) + x for x in ids])  # (B, T) left-padded
        mask = torch.tensor([[0] * (T - len(x)) + [1] * len(x) for x in ids])
        with torch.inference_mode():
            out = lm.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                    do_sample=False, eos_token_id=stops, pad_token_id=pad)
        for row in out[:, T:].tolist():
            counts.append(next((j for j, t in enumerate(row) if t in stops), len(row)))  # tokens before the stop
    return time.perf_counter() - t0, counts


async def server_round(url: str, model_of, texts: list[str], concurrency: int) -> tuple[float, list[int]]:
    """Wall seconds and per-request completion tokens of the R requests through ``concurrency``
    clients (request k to model ``model_of(k)``), with ``serve_load``'s closed loop."""
    counts = [0] * len(texts)
    order = iter(range(len(texts)))  # the loop sends exactly len(texts) requests

    async def one(client, w: int, k: int) -> None:
        i = next(order)
        r = await client.post("/v1/completions", json={"model": model_of(i), "prompt": texts[i],
                                                       "max_tokens": NEW_TOKENS, "temperature": 0})
        r.raise_for_status()
        counts[i] = r.json()["usage"]["completion_tokens"]

    wall = await serve_load.closed_loop(url, concurrency, math.inf, len(texts), one)
    return wall, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model; results not written")
    ap.add_argument("--requests", type=int, default=64, help="generation requests per round (default %(default)s)")
    ap.add_argument("--concurrency", type=int, default=32, help="clients = generate's batch (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on both sides (default %(default)s)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    a = ap.parse_args()
    import httpx
    import torch

    from softprompt import chat, models

    torch.set_num_threads(a.threads)
    info = common.machine_info()
    peaks = common.matmul_peaks()
    home, model = serve_load.temp_home(a.quick)
    texts = serve_load.sentences(a.requests)
    srv = serve_load.Server(model, a.concurrency, a.threads, home / "server.log", home=home)
    try:
        serve_load.make_prompts(model, home)
        lm = models.load(model, store=common.store(home))
        srv.wait_ready()
        plain = httpx.get(srv.url + "/v1/models", timeout=60).json()["data"][0]["id"]
        sides = {"generate": None, "server_plain": lambda k: plain,
                 "server_prompts": lambda k: f"task{k % serve_load.PROMPTS}"}
        for k in range(serve_load.PROMPTS):  # warm-up: every prompt loaded, its prefix cached
            httpx.post(srv.url + "/v1/completions", json={"model": f"task{k}", "prompt": texts[0], "max_tokens": 2},
                       timeout=300).raise_for_status()
        generate_round(lm, texts[:a.concurrency], a.concurrency)  # warm-up
        runs: dict[str, list[dict]] = {s: [] for s in sides}
        for r in range(a.rounds):
            for s, model_of in sides.items():  # rotate the order each round
                if model_of is None:
                    wall, counts = generate_round(lm, texts, a.concurrency)
                    busy = None
                else:
                    before = serve_load.counters(srv.url)
                    wall, counts = asyncio.run(server_round(srv.url, model_of, texts, a.concurrency))
                    after = serve_load.counters(srv.url)
                    busy = {p: (after[p] - before[p]) / wall for p in serve_load.PHASES}
                    busy["mean_decode_rows"] = (after["rows"] - before["rows"]) / max(1.0, after["steps"] - before["steps"])
                runs[s].append({"round": r, "wall_s": wall, "tokens": sum(counts), "counts": counts,
                                "tokens_per_s": sum(counts) / wall, "server_busy": busy})
                print(f"round {r} {s:15s} {wall:7.2f}s {sum(counts):5d} tokens {sum(counts) / wall:7.1f} tok/s "
                      f"{'' if busy is None else busy}", flush=True)
            sides = dict(list(sides.items())[1:] + list(sides.items())[:1])
        prompt_lengths = [len(chat.encode(lm.tokenizer, t)) for t in texts]
        report(a, info, peaks, model, lm.model.config, runs, prompt_lengths)
    finally:
        srv.stop()
        shutil.rmtree(home, ignore_errors=True)


def report(a, info, peaks, model, config, runs, prompt_lengths) -> None:
    gen = runs["generate"]
    med = {s: statistics.median(r["tokens_per_s"] for r in rs) for s, rs in runs.items()}
    paired = {s: statistics.median(x["tokens_per_s"] / g["tokens_per_s"] for x, g in zip(rs, gen))
              for s, rs in runs.items() if s != "generate"}
    same_counts = {s: all(x["counts"] == gen[0]["counts"] for x in rs) for s, rs in runs.items()}
    flops = common.forward_flops(config, prompt_lengths, gen[0]["counts"])
    roof = {s: common.roofline(flops, statistics.median(r["wall_s"] for r in rs), peaks["fp32"]) for s, rs in runs.items()}
    busy = {s: {k: statistics.median(r["server_busy"][k] for r in rs) for k in rs[0]["server_busy"]}
            for s, rs in runs.items() if s != "generate"}
    payload = {"benchmark": "serve_floor", "model": model, "machine": info, "matmul_peak_gflops": peaks,
               "loadavg_at_end": os.getloadavg(),
               "setup": {"requests": a.requests, "concurrency": a.concurrency, "rounds": a.rounds, "threads": a.threads,
                         "new_tokens": NEW_TOKENS, "greedy": True, "prompts": serve_load.PROMPTS,
                         "num_virtual_tokens": serve_load.N},
               "runs": runs, "median_tokens_per_s": med, "server_over_generate_paired_median": paired,
               "same_token_counts_as_generate": same_counts, "roofline": roof, "server_busy_share_median": busy,
               "target": TARGET, "target_met": paired["server_plain"] >= TARGET}
    rows = [[s, med[s], paired.get(s, 1.0), roof[s]["achieved_gflops"], roof[s]["fraction_of_peak"],
             "-" if s == "generate" else " / ".join(f"{busy[s][p]:.0%}" for p in serve_load.PHASES),
             "-" if s == "generate" else f"{busy[s]['mean_decode_rows']:.1f}",
             "n/a (the prompts change the text)" if s == "server_prompts" else same_counts[s]] for s in runs]
    md = (f"# serve_floor\n\n{a.requests} greedy generation requests ({NEW_TOKENS} new tokens, SST-2 test "
          f"sentences), {a.concurrency} at a time, {a.rounds} interleaved rounds; model `{model}`, {a.threads} torch "
          f"thread(s) on both sides, {info['cpu']} ({info['cores']} cores, load average "
          f"{info['loadavg_at_start'][0]:.1f} at start, {payload['loadavg_at_end'][0]:.1f} at end). Measured fp32 "
          f"matmul peak {peaks['fp32']:.0f} GFLOPS.\n\n"
          + common.md_table(["side", "tokens/s (median)", "x generate (paired median)", "useful GFLOPS",
                             "fraction of fp32 peak", "server worker busy: score / join / decode",
                             "rows / decode step", "same token counts as generate"], rows)
          + f"\nServer (plain model) over `model.generate`: {paired['server_plain']:.2f}x (target >= {TARGET:g}): "
          f"{'met' if payload['target_met'] else 'missed'}. Under 8 mixed prompts: {paired['server_prompts']:.2f}x.\n"
          "\n`generate` is transformers' `model.generate` in-process (left-padded batches, no HTTP); the server "
          "answers the same requests over HTTP with rows joining and leaving its running batch. The worker busy "
          "shares are of each round's wall time: the rest of the server's time is HTTP, JSON, queueing and "
          "the wait for the first requests of a round.\n")
    print(md)
    if not a.quick:
        print("wrote", *common.write_results("serve_floor", payload, md, a.out or common.RESULTS))
    elif a.out:
        print("wrote", *common.write_results("serve_floor_tiny", payload, md, a.out))


if __name__ == "__main__":
    main()
