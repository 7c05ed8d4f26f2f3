"""Mixed-task serving: 8 prompts x 4 requests, arriving interleaved, 32 new tokens each, greedy.

Requests are the first 32 SST-2 test sentences; request k uses task k mod 8, so no two
neighbours share a prompt. Each task's prompt is a random-init (N=20) soft prompt saved in a
temporary store as a PEFT prompt-tuning adapter directory. Methods:

* ``softprompt``: ONE ``Engine.generate`` call with all 32 requests (one mixed batch; each
  prompt's keys/values come from the per-prompt prefix cache);
* ``peft_grouped``: the 8 adapters loaded into one ``PeftModel`` (``from_pretrained`` +
  ``load_adapter``), then per task ``set_adapter`` and one left-padded ``generate`` for its 4
  requests;
* ``peft_single``: the same ``PeftModel``, one ``generate`` per request, in arrival order.

Equal work: every method produces exactly 32 tokens per request (EOS ignored by softprompt,
``min_new_tokens=32`` for PEFT). Timing: rounds with the method order rotated, the median
per method; the first (cold) softprompt call, which loads the prompts and fills the prefix
cache, is reported separately. Before timing, a correctness check (8 greedy tokens, ordinary
EOS handling) compares softprompt's mixed batch with PEFT one request at a time (unpadded: the
exact ``[P][x]`` reference) and with PEFT grouped (whose left padding puts the pads between the
prompt and the text, and whose position ids count the pads, so it may differ).

    python benchmarks/mixed_batch.py            # default model, ~4 min on 2 cores
    python benchmarks/mixed_batch.py --quick    # tiny random Llama, seconds, results not written

``--kinds`` measures prompt kinds instead (results ``mixed_batch_kinds.*``): the same 32
requests as ONE ``Engine.generate`` batch under 8 shallow prompts, under 8 deep prompts (random
keys/values at the model's own statistics), and mixed (even tasks shallow, odd tasks deep).
Target: mixed <= 1.1x the mean of the two single-kind batches. The
mixed batch's tokens are checked against the single-kind batches' for the same rows.
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

from softprompt.chat import encode  # noqa: E402
from softprompt.config import GenerateConfig  # noqa: E402
from softprompt.inference.engine import Engine, EngineConfig, GenerateRequest  # noqa: E402
from softprompt.prompt import init_random, make_deep_prompt  # noqa: E402

TASKS, PER_TASK, NEW_TOKENS, N = 8, 4, 32, 20
CHECK_TOKENS = 8  # tokens per request in the (untimed) correctness check
TARGET = 3.0  # softprompt throughput over PEFT grouped


def sentences(n: int, quick: bool) -> list[str]:
    path = common.data_root() / "sst2" / "test.txt"
    if path.is_file():
        return [s for _, s in common.read_label_lines(path, n)]
    return common.synthetic_sentences(n)


def make_prompts(store, lm, n_tasks: int, n_tokens: int) -> list[Path]:
    """Random-init prompts (embedding scale) saved in ``store`` as task{k}."""
    gen = torch.Generator().manual_seed(common.SEED)
    paths = []
    for k in range(n_tasks):
        emb = init_random(lm.model, n_tokens, gen)
        meta = {"base_model": {"name": lm.name, "fingerprint": lm.fingerprint}, "task": f"task{k}"}
        paths.append(store.save_prompt(f"task{k}", emb, meta, str(lm.path), lm.model.config))
    return paths


def peft_model(lm, paths: list[Path]):
    from peft import PeftModel

    model = PeftModel.from_pretrained(common.separate_copy(lm.model), str(paths[0]), adapter_name="task0")
    for k, p in enumerate(paths[1:], start=1):
        model.load_adapter(str(p), adapter_name=f"task{k}")
    return model.eval()


# ---------------------------------------------------------------- the three methods


def run_softprompt(lm, requests, new_tokens: int, ignore_eos: bool, engine: Engine | None = None, store=None):
    eng = engine or Engine(lm, EngineConfig(), store)
    if ignore_eos:
        eng.eos_id = -1  # equal work: every request produces exactly new_tokens tokens
    cfg = GenerateConfig(max_new_tokens=new_tokens)
    gens = eng.generate([GenerateRequest(text, f"task{k}", cfg) for k, text in requests])
    return [g.token_ids for g in gens]


def _peft_generate(pm, tok, texts: list[str], new_tokens: int, ignore_eos: bool) -> list[list[int]]:
    enc = tok(texts, add_special_tokens=False, return_tensors="pt", padding=True)
    kw = dict(min_new_tokens=new_tokens) if ignore_eos else {}
    with torch.no_grad():
        out = pm.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kw)
    rows = out[:, enc["input_ids"].shape[1] :].tolist()
    return [r[: r.index(tok.eos_token_id)] if tok.eos_token_id in r else r for r in rows]


def run_peft_grouped(pm, tok, requests, new_tokens: int, ignore_eos: bool):
    out: list[list[int] | None] = [None] * len(requests)
    for k in sorted({k for k, _ in requests}):
        idx = [i for i, (kk, _) in enumerate(requests) if kk == k]
        pm.set_adapter(f"task{k}")
        for i, toks in zip(idx, _peft_generate(pm, tok, [requests[i][1] for i in idx], new_tokens, ignore_eos)):
            out[i] = toks
    return out


def run_peft_single(pm, tok, requests, new_tokens: int, ignore_eos: bool):
    out = []
    for k, text in requests:
        pm.set_adapter(f"task{k}")
        out += _peft_generate(pm, tok, [text], new_tokens, ignore_eos)
    return out


# ---------------------------------------------------------------- measurement


# ---------------------------------------------------------------- --kinds: shallow, deep, mixed

KINDS_TARGET = 1.1  # mixed batch over the mean of the single-kind batches


def kinds_engine(lm) -> Engine:
    """One engine holding 8 shallow (s{k}) and 8 deep (d{k}) prompts, N=20 each; EOS ignored."""
    eng = Engine(lm, EngineConfig())
    gen = torch.Generator().manual_seed(common.SEED)
    for k in range(TASKS):
        eng.add_prompt(f"s{k}", init_random(lm.model, N, gen))
        eng.add_prompt(f"d{k}", make_deep_prompt(lm.model, lm.tokenizer, N, "random", seed=common.SEED + k))
    eng.eos_id = -1
    return eng


def run_kinds(lm, texts: list[str], rounds: int) -> dict:
    eng = kinds_engine(lm)
    cfg = GenerateConfig(max_new_tokens=NEW_TOKENS)
    names = {"shallow": lambda k: f"s{k}", "deep": lambda k: f"d{k}",
             "mixed": lambda k: f"s{k}" if k % 2 == 0 else f"d{k}"}
    sets = {m: [GenerateRequest(t, f(i % TASKS), cfg) for i, t in enumerate(texts)] for m, f in names.items()}
    outs = {m: [g.token_ids for g in eng.generate(reqs)] for m, reqs in sets.items()}  # warm-up, fills the cache
    same = [outs["mixed"][i] == outs["shallow" if (i % TASKS) % 2 == 0 else "deep"][i] for i in range(len(texts))]
    times: dict[str, list[float]] = {m: [] for m in sets}
    cpu: dict[str, list[float]] = {m: [] for m in sets}
    order = list(sets)
    for r in range(rounds):
        for m in order[r % 3 :] + order[: r % 3]:
            t, c = time.perf_counter(), time.process_time()
            eng.generate(sets[m])
            times[m].append(time.perf_counter() - t)
            cpu[m].append(time.process_time() - c)
            print(f"round {r} {m}: {times[m][-1]:.2f}s wall, {cpu[m][-1]:.2f}s CPU", flush=True)
    out = {"seconds": {m: common.summary(v) for m, v in times.items()},
           "cpu_seconds": {m: common.summary(v) for m, v in cpu.items()},
           "mixed_rows_equal_single_kind_rows": sum(same) / len(same)}
    for clock in ("seconds", "cpu_seconds"):
        med = {m: s["median"] for m, s in out[clock].items()}
        out[f"{clock}_ratios"] = {"mixed_over_mean_single": med["mixed"] / ((med["shallow"] + med["deep"]) / 2),
                                  "mixed_over_shallow": med["mixed"] / med["shallow"],
                                  "deep_over_shallow": med["deep"] / med["shallow"]}
    out["mixed_over_mean_single"] = out["cpu_seconds_ratios"]["mixed_over_mean_single"]  # the target's clock
    return out


def report_kinds(a, info, lm, res: dict) -> None:
    met = res["mixed_over_mean_single"] <= KINDS_TARGET
    payload = {"benchmark": "mixed_batch_kinds", "model": lm.name, "seed": common.SEED, "machine": info,
               "loadavg_at_end": os.getloadavg(),
               "setup": {"tasks": TASKS, "requests_per_task": PER_TASK, "new_tokens": NEW_TOKENS,
                         "num_virtual_tokens": N, "greedy": True, "rounds": a.rounds},
               **res, "target_mixed_over_mean_single": KINDS_TARGET, "target_met": met}
    rows = [[m, res["cpu_seconds"][m]["median"], res["cpu_seconds"][m]["median"] / res["cpu_seconds"]["shallow"]["median"],
             s["median"], s["median"] / res["seconds"]["shallow"]["median"]] for m, s in res["seconds"].items()]
    md = (f"# mixed_batch --kinds\n\n{TASKS * PER_TASK} requests ({TASKS} prompts x {PER_TASK}, interleaved), "
          f"N={N}, {NEW_TOKENS} new tokens each, greedy, ONE `Engine.generate` batch per configuration, model "
          f"`{lm.name}`, {info['torch_threads']} threads on {info['cpu']}; medians of {a.rounds} rounds, order "
          "rotated. CPU = process time (robust to other jobs on the cores), wall = elapsed time.\n\n"
          + common.md_table(["prompts", "CPU s (median)", "x shallow", "wall s (median)", "x shallow"], rows)
          + "\nMixed (4 shallow + 4 deep prompts) over the mean of the single-kind batches, CPU time: "
          + f"{res['mixed_over_mean_single']:.3f} (target <= {KINDS_TARGET}: {'met' if met else 'missed'}).\n"
          + "The mixed batch gives the same tokens as the single-kind batches for "
          + f"{res['mixed_rows_equal_single_kind_rows']:.0%} of the rows.\n"
          + roofline_line(res["roofline"])
          + "\n" + common.load_note(info, "configurations"))
    print(md)
    if not a.quick:
        print("wrote", *common.write_results("mixed_batch_kinds", payload, md))


def useful_roofline(lm, texts: list[str], seconds: dict[str, float]) -> dict:
    """Per method: the requests' useful FLOPs (``common.forward_flops``: prefill and 32 decoded
    tokens a row, attention over the N prompt positions, no padding, no prefix computation)
    over its median seconds, against the fp32 matmul peak measured now with the same threads."""
    lengths = [len(encode(lm.tokenizer, t)) for t in texts]
    flops = common.forward_flops(lm.model.config, lengths, [NEW_TOKENS] * len(texts), prefix=N)
    peak = common.matmul_peaks()
    return {"peak_gflops": peak, **{m: common.roofline(flops, s, peak["fp32"]) for m, s in seconds.items()}}


def roofline_line(roof: dict) -> str:
    fr = ", ".join(f"{m} {r['fraction_of_peak']:.1%}" for m, r in roof.items() if m != "peak_gflops")
    return (f"Fraction of the measured fp32 matmul peak ({roof['peak_gflops']['fp32']:.0f} GFLOPS, "
            f"{roof['peak_gflops']['threads']} threads), useful FLOPs only: {fr}. A decode step multiplies "
            f"{TASKS * PER_TASK}-row activations by each weight matrix: thin GEMMs, far from the 2048-square one the "
            "peak comes from, plus per-step work that is not a matmul (attention over the cache, sampling, Python).\n")


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model; results are not written")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds (default %(default)s)")
    ap.add_argument("--single-rounds", type=int, default=1, help="rounds that time peft_single, the slowest (default %(default)s)")
    ap.add_argument("--kinds", action="store_true", help="shallow vs deep vs mixed prompt kinds (mixed_batch_kinds.*)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: common.setup_torch's, 2; 1 is far faster when other jobs share the cores)")
    a = ap.parse_args()
    common.setup_torch(a.quick)
    if a.threads:
        torch.set_num_threads(a.threads)
    lm = common.load_lm(a.quick)  # from the user's store (the converted model lives there)
    st = common.temp_store("sp-mixed-")  # the prompts go into a temporary store
    if a.kinds:
        info = common.machine_info()
        a.rounds = max(a.rounds, 3)
        texts = sentences(TASKS * PER_TASK, a.quick)
        res = run_kinds(lm, texts, a.rounds)
        res["roofline"] = useful_roofline(lm, texts, {m: s["median"] for m, s in res["cpu_seconds"].items()})
        report_kinds(a, info, lm, res)
        return
    tok = lm.tokenizer
    tok.padding_side = "left"
    tasks, per_task, new_tokens = (TASKS, PER_TASK, NEW_TOKENS)
    texts = sentences(tasks * per_task, a.quick)
    requests = [(i % tasks, t) for i, t in enumerate(texts)]  # interleaved arrival
    paths = make_prompts(st, lm, tasks, N)
    pm = peft_model(lm, paths)
    info = common.machine_info()

    # correctness with ordinary EOS handling, CHECK_TOKENS per request (not timed)
    t0 = time.perf_counter()
    ours_chk = run_softprompt(lm, requests, CHECK_TOKENS, ignore_eos=False, store=st)
    single_chk = run_peft_single(pm, tok, requests, CHECK_TOKENS, ignore_eos=False)
    grouped_chk = run_peft_grouped(pm, tok, requests, CHECK_TOKENS, ignore_eos=False)
    correctness = {
        "new_tokens": CHECK_TOKENS, "requests": len(requests),
        "softprompt_mixed_vs_peft_single_identical": agreement(ours_chk, single_chk),
        "softprompt_mixed_vs_peft_grouped_identical": agreement(ours_chk, grouped_chk),
        "peft_grouped_vs_peft_single_identical": agreement(grouped_chk, single_chk),
    }
    print(f"correctness ({time.perf_counter() - t0:.0f}s)", correctness, flush=True)

    t0 = time.perf_counter()
    eng = Engine(lm, EngineConfig(), st)  # cold: loads 8 prompts from disk, computes 8 prefixes
    run_softprompt(lm, requests, new_tokens, ignore_eos=True, engine=eng)
    cold = time.perf_counter() - t0
    methods = {
        "softprompt": lambda: run_softprompt(lm, requests, new_tokens, True, engine=eng),
        "peft_grouped": lambda: run_peft_grouped(pm, tok, requests, new_tokens, True),
        "peft_single": lambda: run_peft_single(pm, tok, requests, new_tokens, True),
    }
    times: dict[str, list[float]] = {m: [] for m in methods}
    names = list(methods)
    for r in range(a.rounds):
        for m in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order
            if m == "peft_single" and len(times[m]) >= a.single_rounds:
                continue
            t = time.perf_counter()
            out = methods[m]()
            times[m].append(time.perf_counter() - t)
            assert all(len(x) == new_tokens for x in out), m
            print(f"round {r} {m}: {times[m][-1]:.2f}s", flush=True)
    roof = useful_roofline(lm, texts, {m: common.summary(v)["median"] for m, v in times.items()})
    report(a, info, lm, times, cold, correctness, len(requests) * new_tokens, roof)


def report(a, info, lm, times, cold, correctness, tokens, roof) -> None:
    med = {m: common.summary(v) for m, v in times.items()}
    tput = {m: tokens / s["median"] for m, s in med.items()}
    ratios = {"softprompt_over_peft_grouped": tput["softprompt"] / tput["peft_grouped"],
              "softprompt_over_peft_single": tput["softprompt"] / tput["peft_single"]}
    payload = {"benchmark": "mixed_batch", "model": lm.name, "seed": common.SEED, "machine": info, "loadavg_at_end": os.getloadavg(),
               "setup": {"tasks": TASKS, "requests_per_task": PER_TASK, "new_tokens": NEW_TOKENS,
                         "num_virtual_tokens": N, "greedy": True, "rounds": a.rounds,
                         "peft_single_rounds": a.single_rounds},
               "seconds": med, "tokens_per_second": tput, "softprompt_cold_seconds": cold,
               "ratios": ratios, "target_over_peft_grouped": TARGET,
               "target_met": ratios["softprompt_over_peft_grouped"] >= TARGET, "correctness": correctness,
               "roofline": roof}
    rows = [[m, med[m]["median"], tput[m], tput["softprompt"] / tput[m]] for m in times]
    md = (f"# mixed_batch\n\n{TASKS} prompts (N={N}) x {PER_TASK} requests, interleaved, {NEW_TOKENS} new "
          f"tokens each, greedy, model `{lm.name}`, {info['torch_threads']} threads on {info['cpu']}.\n\n"
          + common.md_table(["method", "seconds (median)", "tokens/s", "softprompt speed-up"], rows)
          + f"\nsoftprompt cold call (loads 8 prompts, computes 8 prefixes): {cold:.2f}s.\n"
          + f"Target: >= {TARGET}x PEFT grouped; measured {ratios['softprompt_over_peft_grouped']:.2f}x "
          + f"({'met' if payload['target_met'] else 'missed'}).\n\n"
          + f"Correctness ({correctness['new_tokens']} greedy tokens per request, ordinary EOS handling, all "
          + f"{correctness['requests']} requests): softprompt's mixed batch gives the same tokens as PEFT one "
          + "request at a time (unpadded, the exact [P][x] reference) for "
          + f"{correctness['softprompt_mixed_vs_peft_single_identical']:.0%} of the requests, as PEFT grouped "
          + f"(left-padded) for {correctness['softprompt_mixed_vs_peft_grouped_identical']:.0%}; PEFT grouped "
          + f"equals PEFT single for {correctness['peft_grouped_vs_peft_single_identical']:.0%}.\n\n"
          + roofline_line(roof))
    md += ("\n" + common.load_note(info, "methods"))
    print(md)
    if not a.quick:
        print("wrote", *common.write_results("mixed_batch", payload, md))


if __name__ == "__main__":
    main()
