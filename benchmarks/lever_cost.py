"""What the prompt levers cost: a training step against LoRA's, a request against the plain model's.

Training (SST-2, batch 16, target-only loss, length-bucketed batches): one AdamW step
(``loop.make_optimizer``, forward, backward, update) of each method as ``softprompt train`` and
``softprompt compare`` build it, in rounds on the same batch, order rotated, medians:

* ``lora``: LoRA rank 8 on the attention projections (``methods.LoraMethod``), the anchor;
* ``shallow N=20``, ``deep N=20``: the plain prompt kinds;
* ``deep N=20 +levers``: prefix dropout 0.1 and a frozen first virtual token (in training mode);
* ``deep N=20 +memory``: PrefixMemory, the deep prompt plus its per-head memory;
* ``dept N=10 r=8``: DePT, a shallow prompt plus a rank-8 input offset over 256 positions.

Serving (one request, batch 1, an SST-2 test sentence, greedy, 32 new tokens, EOS ignored):
the plain model, a cached shallow prompt, a deep prompt, a PrefixMemory prompt and a DePT prompt (stored in a temporary
store, served like any other), CPU time (process time), medians of rounds.

Sizes: each method's trainable parameters and the bytes of the tensor files it saves
(``method.save``: PEFT's adapter layout, plus our files for the memory and the offset; float32),
all in one table with the two costs.

Targets (issue): a step <= 1.1x LoRA's; a request <= 1.05x the plain model's.

    python benchmarks/lever_cost.py            # default model
    python benchmarks/lever_cost.py --quick    # tiny random Llama, seconds, results not written
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
from train_step import sst2_examples  # noqa: E402

from softprompt.config import GenerateConfig, TrainConfig  # noqa: E402
from softprompt.inference.engine import Engine, GenerateRequest  # noqa: E402
from softprompt.memory import memory_shape  # noqa: E402
from softprompt.offset import init_offset  # noqa: E402
from softprompt.prompt import init_random, make_deep_prompt  # noqa: E402
from softprompt.training import methods as M  # noqa: E402
from softprompt.training.loop import make_optimizer  # noqa: E402

BATCH, LR, NEW_TOKENS, N, RANK = 16, 5e-3, 32, 20, 8
STEP_TARGET, REQUEST_TARGET = 1.1, 1.05


def methods(lm) -> dict:
    gen = torch.Generator().manual_seed(common.SEED)
    deep = make_deep_prompt(lm.model, lm.tokenizer, N, "random", seed=common.SEED)
    out = {"lora": M.LoraMethod(lm.model), "shallow N=20": M.PromptMethod(lm.model, init_random(lm.model, N, gen)),
           "deep N=20": M.DeepPromptMethod(lm.model, deep),
           "deep N=20 +levers": M.DeepPromptMethod(lm.model, deep, dropout=0.1, freeze_first=True),
           "deep N=20 +memory": M.MemoryPromptMethod(lm.model, deep),
           "dept N=10 r=8": M.OffsetPromptMethod(lm.model, init_random(lm.model, 10, gen), RANK, 256)}
    return {k: (m, make_optimizer(m, TrainConfig(lr=LR))) for k, m in out.items()}


def step(method, opt, batch: dict, k: int) -> None:
    opt.zero_grad(set_to_none=True)
    if hasattr(method, "set_step"):
        method.set_step(k)  # training mode: dropout on
    method.loss(batch).backward()
    opt.step()
    if hasattr(method, "set_step"):
        method.set_step(None)


def sizes(ms: dict) -> dict[str, dict[str, int]]:
    """Trainable parameters and saved bytes (its ``.safetensors`` files) of each method, saved to a temp folder."""
    import tempfile

    out = {}
    with tempfile.TemporaryDirectory(prefix="sp-lever-sizes-") as tmp:
        for name, (m, _) in ms.items():
            folder = Path(tmp) / name.replace(" ", "_").replace("=", "")
            m.save(folder)
            out[name] = {"trainable_params": m.trainable_parameters(),  # every tensor file it wrote
                         "saved_bytes": sum(f.stat().st_size for f in folder.rglob("*.safetensors")),
                         "files": sorted(f.name for f in folder.rglob("*.safetensors"))}
    return out


def time_steps(lm, quick: bool, warmup: int, rounds: int) -> tuple[dict[str, list[float]], dict]:
    ms = methods(lm)
    size = sizes(ms)
    exs = sst2_examples(lm.tokenizer, quick)
    data = [common.collate([exs[i] for i in b], lm.tokenizer.pad_token_id) for b in common.bucketed_batches(exs, BATCH)]
    names, times = list(ms), {m: [] for m in ms}
    for r in range(warmup + rounds):
        batch = data[(r * 7) % len(data)]
        for m in names[r % len(names):] + names[: r % len(names)]:
            c = time.process_time()
            step(*ms[m], batch, r)
            if r >= warmup:
                times[m].append(time.process_time() - c)
        print("step round", r, {m: round(v[-1], 3) for m, v in times.items() if v}, flush=True)
    return times, size


def time_requests(lm, text: str, rounds: int, st) -> dict[str, list[float]]:
    """Per-request CPU time of each prompt kind; the stored ones are written to the store ``st``."""
    gen = torch.Generator().manual_seed(common.SEED + 1)
    eng = Engine(lm, store=st)
    eng.eos_id = -1  # equal work: EOS never ends a request
    eng.add_prompt("shallow", init_random(lm.model, N, gen))
    eng.add_prompt("deep", make_deep_prompt(lm.model, lm.tokenizer, N, "random", seed=common.SEED))
    a, b = init_offset(256, RANK, lm.hidden_size, gen)
    b = torch.randn(b.shape, generator=gen) * 0.01  # a trained offset is non-zero
    st.save_prompt("dept", init_random(lm.model, 10, gen), {}, offset=(a, b))
    L, h, d = memory_shape(lm.model)
    st.save_prompt("memory", make_deep_prompt(lm.model, lm.tokenizer, N, "random"), {},
                   memory=torch.randn(L, h, d, d, generator=gen) * 0.01)
    names = {"plain": None, "shallow N=20": "shallow", "deep N=20": "deep", "deep N=20 +memory": "memory",
             "dept N=10 r=8": "dept"}
    times = {m: [] for m in names}
    cfg = GenerateConfig(max_new_tokens=NEW_TOKENS)
    for r in range(rounds + 1):
        order = list(names)[r % len(names):] + list(names)[: r % len(names)]
        for m in order:
            c = time.process_time()
            eng.generate([GenerateRequest(text, names[m], cfg)])
            if r:  # round 0 warms up (and fills the prefix cache)
                times[m].append(time.process_time() - c)
        print("request round", r, {m: round(v[-1], 3) for m, v in times.items() if v}, flush=True)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model; results are not written")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default 2, 1 for --quick; 1 when another job holds one of the 2 cores)")
    ap.add_argument("--render", action="store_true", help="rebuild the Markdown from the JSON of the last run")
    a = ap.parse_args()
    if a.render:
        return common.render("lever_cost", markdown)
    common.setup_torch(a.quick, threads=a.threads)
    lm = common.load_lm(a.quick)
    info = common.machine_info()
    steps, size = time_steps(lm, a.quick, a.warmup, a.rounds)
    path = common.data_root() / "sst2" / "test.txt"
    text = "Review: " + (common.read_label_lines(path, 1)[0][1] if path.is_file() else "a fine film") + "\nSentiment:"
    reqs = time_requests(lm, text, a.rounds, common.temp_store("sp-lever-cost-"))  # a temporary prompt store
    report(a, info, lm, steps, reqs, size)


def report(a, info, lm, steps: dict, reqs: dict, size: dict) -> None:
    s_med = {m: common.summary(v)["median"] for m, v in steps.items()}
    r_med = {m: common.summary(v)["median"] for m, v in reqs.items()}
    payload = {"benchmark": "lever_cost", "model": lm.name, "machine": info, "loadavg_at_end": os.getloadavg(),
               "setup": {"batch": BATCH, "new_tokens": NEW_TOKENS, "rounds": a.rounds, "warmup": a.warmup},
               "step_cpu_s": steps, "request_cpu_s": reqs, "sizes": size,
               "step_over_lora": {m: v / s_med["lora"] for m, v in s_med.items()},
               "request_over_plain": {m: v / r_med["plain"] for m, v in r_med.items()},
               "step_over_lora_per_round": per_round(steps, "lora"),
               "request_over_plain_per_round": per_round(reqs, "plain"),
               "targets": {"step_over_lora": STEP_TARGET, "request_over_plain": REQUEST_TARGET}}
    md = markdown(payload)
    print(md)
    if not a.quick:
        print("wrote", *common.write_results("lever_cost", payload, md))


def per_round(times: dict[str, list[float]], anchor: str) -> dict[str, dict[str, float]]:
    """Each method's time over the anchor's in the same round: median, min and max over the rounds."""
    out = {}
    for m, v in times.items():
        s = common.summary([x / y for x, y in zip(v, times[anchor], strict=True)])
        out[m] = {k: s[k] for k in ("median", "min", "max")}
    return out


def markdown(p: dict) -> str:
    """The results tables from a payload (``--render`` rebuilds them from a run's JSON)."""
    info, setup = p["machine"], p["setup"]

    def table(what: str, anchor: str, target: float) -> str:
        times, ratio, rounds = p[f"{what}_cpu_s"], p[f"{what}_over_{anchor}"], p[f"{what}_over_{anchor}_per_round"]
        rows = [[m, common.summary(v)["median"], ratio[m], "{median:.2f} [{min:.2f}, {max:.2f}]".format(**rounds[m]),
                 "yes" if ratio[m] <= target else "no"]
                for m, v in sorted(times.items(), key=lambda kv: kv[0] != anchor)]  # the anchor first
        return common.md_table(["method" if what == "step" else "prompt", f"CPU s / {what} (median)",
                                f"x {anchor} (ratio of medians)", f"x {anchor}, same round: median [min, max]",
                                f"<= {target}x {anchor}"], rows)

    start, end = info["loadavg_at_start"][0], p["loadavg_at_end"][0]
    busy = start > 0.5 or end > info["torch_threads"] + 1  # the start is read before this run is busy
    return (f"# lever_cost\n\nModel `{p['model']}`, {info['torch_threads']} thread(s) on {info['cpu']}; CPU time "
            f"(process time), medians of {setup['rounds']} interleaved rounds (order rotated each round, "
            f"{setup['warmup']} warm-up rounds dropped).\n\n## Training step (SST-2, batch {setup['batch']})\n\n"
            + table("step", "lora", STEP_TARGET)
            + f"\n## One request ({setup['new_tokens']} new tokens, batch 1)\n\n"
            + table("request", "plain", REQUEST_TARGET)
            + ("\n## Every kind: size and cost\n\n" + together(p) if "sizes" in p else "")
            + f"\nLoad average (1 min) at start {start:.1f}, at end {end:.1f}, on {info['cores']} cores: "
            + ("other jobs shared the machine, so absolute times are inflated; " if busy else "the machine was otherwise idle; ")
            + "each ratio compares times taken in the same rounds.\n")


SERVED_AS = {"lora": "plain", "deep N=20 +levers": "deep N=20"}  # LoRA: no prompt rows; the levers act in training only


def together(p: dict) -> str:
    """Trainable parameters, bytes per task, step time vs LoRA and request cost vs the plain model,
    one row per method (a request of LoRA is not measured: it is not served beside the prompts)."""
    rows = []
    for m, sz in p["sizes"].items():
        req = p["request_over_plain"].get(SERVED_AS.get(m, m)) if m != "lora" else None
        rows.append([m, f"{sz['trainable_params']:,}", f"{sz['saved_bytes'] / 1e3:,.1f} kB", f"{p['step_over_lora'][m]:.2f}",
                     "-" if req is None else f"{req:.2f}" + (" (as deep N=20)" if m in SERVED_AS else "")])
    return common.md_table(["method", "trainable params", "bytes per task (tensor files)", "step x lora",
                            "request x plain"], rows)


if __name__ == "__main__":
    main()
