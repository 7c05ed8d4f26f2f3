"""What a tuned request costs over the plain model, and what many prompts cost in memory.

Latency: one request (an SST-2 test sentence, batch 1), greedy, EOS ignored so every run makes
the same number of tokens; time to first token (``max_new_tokens=1``: prefill only) and the
full request (32 new tokens). Configurations, timed in rounds with the order rotated, median:

* ``plain``: the model alone;
* ``cached N=20`` / ``cached N=100``: a random-init prompt whose keys/values are already in the
  engine's prefix cache (the steady state of a server);
* ``uncached N=20`` / ``uncached N=100``: the reference path, ``[P][x]`` through the whole
  model on every request (what PEFT does);
* ``deep N=20`` / ``deep N=100``: a deep prompt (random keys/values at the model's own
  key/value statistics) in the same engine: its keys/values are the prompt itself.

Target: cached / plain <= 1.05 and deep / plain <= 1.05.

Memory: 100 prompts (N=20) registered in a temporary store, an engine with at most 10
resident prompts, requests spread over 10 "hot" prompts. Reported: bytes of the model's
parameters, of the resident prompts and of their prefix keys/values (exact, from the tensors),
and the process's resident set size (``VmRSS``) before and after.

    python benchmarks/prefix_cache.py            # default model, ~3 min on 2 cores
    python benchmarks/prefix_cache.py --quick    # tiny random Llama, seconds, results not written
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402

from softprompt.config import GenerateConfig  # noqa: E402
from softprompt.data import encode  # noqa: E402
from softprompt.inference.engine import Engine, EngineConfig, GenerateRequest  # noqa: E402
from softprompt.prompt import init_random, make_deep_prompt  # noqa: E402

SIZES, NEW_TOKENS, TARGET = (20, 100), 32, 1.05
REGISTERED, HOT = 100, 10


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def sentence(quick: bool) -> str:
    path = common.data_root() / "sst2" / "test.txt"
    rows = common.read_label_lines(path, 1) if path.is_file() else [("0", common.synthetic_sentences(1)[0])]
    return "Review: " + rows[0][1] + "\nSentiment:"


def engines(lm) -> dict[str, tuple[Engine, str | None]]:
    gen = torch.Generator().manual_seed(common.SEED)
    cached, naive = Engine(lm), Engine(lm, EngineConfig(use_prefix_cache=False))
    for n in SIZES:
        emb = init_random(lm.model, n, gen)
        cached.add_prompt(f"n{n}", emb)
        naive.add_prompt(f"n{n}", emb)
        cached.add_prompt(f"d{n}", make_deep_prompt(lm.model, lm.tokenizer, n, "random", seed=common.SEED + n))
    for eng in (cached, naive):
        eng.eos_id = -1  # equal work: EOS never ends a request
    out: dict[str, tuple[Engine, str | None]] = {"plain": (cached, None)}
    out.update({f"cached N={n}": (cached, f"n{n}") for n in SIZES})
    out.update({f"uncached N={n}": (naive, f"n{n}") for n in SIZES})
    out.update({f"deep N={n}": (cached, f"d{n}") for n in SIZES})
    return out


def time_latency(lm, text: str, rounds: int) -> dict[str, dict[str, dict[str, dict]]]:
    """{clock: {kind: {configuration: summary}}}, clock = wall (perf_counter) or cpu (process_time)."""
    confs = engines(lm)
    names = list(confs)
    res = {c: {k: {m: [] for m in names} for k in ("first_token", "request")} for c in ("wall", "cpu")}
    for kind, n_new in (("first_token", 1), ("request", NEW_TOKENS)):
        cfg = GenerateConfig(max_new_tokens=n_new)
        for eng, p in confs.values():  # warm-up; fills the prefix cache of the cached engine
            eng.generate([GenerateRequest(text, p, cfg)])
        for r in range(rounds):
            for m in names[r % len(names) :] + names[: r % len(names)]:
                eng, p = confs[m]
                w, c = time.perf_counter(), time.process_time()
                g = eng.generate([GenerateRequest(text, p, cfg)])[0]
                res["cpu"][kind][m].append(time.process_time() - c)
                res["wall"][kind][m].append(time.perf_counter() - w)
                assert len(g.token_ids) == n_new
        for clock in ("wall", "cpu"):
            print(kind, clock, {m: round(common.summary(v)["median"], 4) for m, v in res[clock][kind].items()}, flush=True)
    return {c: {k: {m: common.summary(v) for m, v in d.items()} for k, d in kinds.items()} for c, kinds in res.items()}


def memory(lm, text: str, store) -> dict:
    gen = torch.Generator().manual_seed(common.SEED + 1)
    for k in range(REGISTERED):
        store.save_prompt(f"p{k:03d}", init_random(lm.model, SIZES[0], gen),
                          {"base_model": {"name": lm.name, "fingerprint": lm.fingerprint}}, str(lm.path), lm.model.config)
    disk = sum(f.stat().st_size for f in store.prompts_dir().rglob("*") if f.is_file())
    before = rss_bytes()
    eng = Engine(lm, EngineConfig(max_resident_prompts=HOT), store)
    cfg = GenerateConfig(max_new_tokens=2)
    eng.generate([GenerateRequest(text, f"p{k:03d}", cfg) for k in range(0, REGISTERED, REGISTERED // HOT)])
    after = rss_bytes()
    st = eng.stats()
    extra = st["prompt_bytes"] + st["prefix_cache"]["bytes"]
    deep = make_deep_prompt(lm.model, lm.tokenizer, SIZES[0], "random")
    deep_eng = Engine(lm)  # one deep prompt: the bank and the prefix cache each hold its keys/values
    deep_eng.add_prompt("deep", deep)
    deep_eng.generate([GenerateRequest(text, "deep", cfg)])
    dst = deep_eng.stats()
    return {"deep_prompt_bytes": dst["prompt_bytes"], "deep_prefix_kv_bytes": dst["prefix_cache"]["bytes"],
            "shallow_prompt_bytes": st["prompt_bytes"] // max(1, len(st["resident_prompts"])),
            "shallow_prefix_kv_bytes": st["prefix_cache"]["bytes"] // max(1, st["prefix_cache"]["entries"]),"registered": REGISTERED, "hot": HOT, "num_virtual_tokens": SIZES[0], "store_bytes_on_disk": disk,
            "resident_prompts": len(st["resident_prompts"]), "model_bytes": st["model_bytes"],
            "prompt_bytes": st["prompt_bytes"], "prefix_kv_bytes": st["prefix_cache"]["bytes"],
            "overhead_bytes": extra, "overhead_over_model": extra / st["model_bytes"],
            "rss_before": before, "rss_after": after, "rss_delta": after - before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model; results are not written")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds (default %(default)s)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: common.setup_torch's, 2; 1 is far faster when other jobs share the cores)")
    a = ap.parse_args()
    common.setup_torch(a.quick)
    if a.threads:
        torch.set_num_threads(a.threads)
    lm = common.load_lm(a.quick)  # from the user's store (the converted model lives there)
    st = common.temp_store("sp-prefix-")  # the prompts go into a temporary store
    text = sentence(a.quick)
    info = common.machine_info()
    lat = time_latency(lm, text, a.rounds)
    mem = memory(lm, text, st)
    print("memory", mem, flush=True)
    lat["peak_gflops"] = common.matmul_peaks()
    report(a, info, lm, text, lat, mem)


def report(a, info, lm, text, lat, mem) -> None:
    T = len(encode(lm.tokenizer, text))
    peak = lat.pop("peak_gflops")
    flops = common.forward_flops(lm.model.config, [T], [NEW_TOKENS])  # the plain request's useful work
    roof = {m: common.roofline(flops, s["median"], peak["fp32"]) for m, s in lat["cpu"]["request"].items()}
    ratios = {c: {k: {m: v["median"] / d["plain"]["median"] for m, v in d.items()} for k, d in kinds.items()}
              for c, kinds in lat.items()}
    met = {c: all(ratios[c]["request"][f"{k} N={n}"] <= TARGET for n in SIZES for k in ("cached", "deep"))
           for c in ratios}
    payload = {"benchmark": "prefix_cache", "model": lm.name, "seed": common.SEED, "machine": info,
               "loadavg_at_end": os.getloadavg(),
               "setup": {"input_tokens": T, "new_tokens": NEW_TOKENS, "batch": 1, "rounds": a.rounds, "sizes": SIZES},
               "seconds": lat, "ratio_over_plain": ratios, "target_cached_over_plain": TARGET, "target_met": met,
               "memory": mem, "peak_gflops": peak, "roofline_request_cpu": roof}
    rows = [[m] + [x for c in ("cpu", "wall") for k in ("first_token", "request")
                   for x in (lat[c][k][m]["median"], ratios[c][k][m])] for m in lat["cpu"]["request"]]
    mb = 2**20
    md = (f"# prefix_cache\n\nOne request ({T} input tokens, batch 1), greedy, model `{lm.name}`, "
          f"{info['torch_threads']} thread(s) on {info['cpu']}; medians of {a.rounds} rounds, configurations "
          "interleaved. CPU = process time (robust to other jobs on the cores), wall = elapsed time.\n\n"
          + common.md_table(["configuration", "first token CPU (s)", "x plain", f"{NEW_TOKENS} tokens CPU (s)", "x plain",
                             "first token wall (s)", "x plain", f"{NEW_TOKENS} tokens wall (s)", "x plain"], rows)
          + f"\nTarget: cached / plain and deep / plain <= {TARGET} for the full request: "
          + f"{'met' if met['cpu'] else 'missed'} in CPU time, {'met' if met['wall'] else 'missed'} in wall time.\n"
          + f"The plain request's useful work ({flops / 1e9:.2f} GFLOP) runs at "
          + f"{roof['plain']['achieved_gflops']:.1f} GFLOPS, {roof['plain']['fraction_of_peak']:.1%} of the measured fp32 "
          + f"matmul peak ({peak['fp32']:.0f} GFLOPS, {peak['threads']} threads): one row decoding reads every "
          + "weight once per token, so batch-1 latency is bound by memory, not arithmetic; batching "
          + "(`mixed_batch`, `serve_floor`) is what uses the arithmetic.\n\n"
          + f"## Memory: {mem['registered']} prompts registered (N={mem['num_virtual_tokens']}), {mem['hot']} hot\n\n"
          + common.md_table(["item", "MiB"], [
              ["model parameters", mem["model_bytes"] / mb],
              [f"{mem['resident_prompts']} resident prompts", mem["prompt_bytes"] / mb],
              ["their prefix keys/values", mem["prefix_kv_bytes"] / mb],
              ["overhead over the plain model", f"{mem['overhead_bytes'] / mb:.2f} ({mem['overhead_over_model']:.2%})"],
              ["process RSS change while loading and serving them", mem["rss_delta"] / mb],
              [f"{mem['registered']} prompts on disk", mem["store_bytes_on_disk"] / mb],
              [f"one shallow prompt (N={mem['num_virtual_tokens']}): tensor / its cached keys/values",
               f"{mem['shallow_prompt_bytes'] / mb:.3f} / {mem['shallow_prefix_kv_bytes'] / mb:.3f}"],
              [f"one deep prompt (N={mem['num_virtual_tokens']}): tensor / its cached keys/values",
               f"{mem['deep_prompt_bytes'] / mb:.3f} / {mem['deep_prefix_kv_bytes'] / mb:.3f}"]]))
    md += ("\n" + common.load_note(info, "configurations"))
    print(md)
    if not a.quick:
        print("wrote", *common.write_results("prefix_cache", payload, md))


if __name__ == "__main__":
    main()
