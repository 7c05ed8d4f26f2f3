"""Each speed lever of the training step, measured on its own, on the walk-through batches.

Language modelling on every token (the walk-through: 50 rows, N=4, batch 8, max_length 256).
Variants of one forward + backward of the prompt, on the SAME batches, interleaved in rounds
(variant order rotated each round), one torch thread, process CPU time (a busy machine takes
our time slices away but does not add CPU seconds to our process):

* ``naive_fp32``: the prompt concatenated to every row, full logits (the PEFT way);
* ``prefix_fp32``: shared prefix, target-only chunked cross-entropy;
* ``prefix_fullce_fp32``: the same with the full (M, V) float32 logits (the chunking lever);
* ``packed_fp32``: rows packed into bins (the packing lever);
* ``prefix_bf16_recast``: bf16 autocast as torch does it, every frozen weight cast again at
  every product (the precision lever);
* ``prefix_bf16`` / ``packed_bf16``: bf16 autocast with the frozen weights cast once
  (``precision.FrozenCasts``, what training runs; the cast-once lever against the one above),
  the loss's logits left to autocast (bf16), as LM mode trains;
* ``prefix_bf16_fp32logits``: the same with float32 logits (``precision.logits_context``), as
  training on input -> target data runs: what they would cost in LM mode, where every token
  is a target;

on length-bucketed batches (softprompt's batches) and on random batches (the Trainer's). Each
variant's FLOPs are counted from the model's shapes (``common.train_flops``) and set against
the measured one-thread matmul peak of its precision.

    python benchmarks/levers.py [--rounds 4]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from softprompt import data as D  # noqa: E402
from softprompt import forward as FW  # noqa: E402
from softprompt.forward import packing  # noqa: E402
from softprompt.precision import FrozenCasts, autocast  # noqa: E402
from softprompt.splits import load_splits  # noqa: E402

N_VIRTUAL, BATCH = 4, 8


def fullce_prefix_loss(model, prompt, input_ids, attention_mask, labels) -> torch.Tensor:
    """The prefix path with the (M, V) float32 logits held whole (before chunking)."""
    cache, last = FW.prefix_cache(model, prompt)
    hidden = FW.prefix_forward_hidden(model, prompt, input_ids, attention_mask, cache)  # (B, T, H)
    head = model.get_output_embeddings()
    tgt = labels[:, 1:]
    sel = tgt != D.IGNORE
    total = F.cross_entropy(head(hidden[:, :-1][sel]).float(), tgt[sel], reduction="sum")  # (M, V) logits
    first = labels[:, 0]
    has = first != D.IGNORE
    total = total - F.log_softmax(head(last).float(), -1)[first[has]].sum()
    return total / (sel.sum() + has.sum())


VARIANTS = {  # name: (loss function, precision: fp32 | bf16 autocast | bf16 autocast with the frozen weights cast once,
    # bf16 logits unless _fp32logits)
    "naive_fp32": (FW.naive_loss, "fp32"),
    "prefix_fp32": (FW.prefix_loss, "fp32"),
    "prefix_fullce_fp32": (fullce_prefix_loss, "fp32"),
    "packed_fp32": (packing.packed_loss, "fp32"),
    "prefix_bf16_recast": (FW.prefix_loss, "bf16_recast"),
    "prefix_bf16": (FW.prefix_loss, "bf16"),
    "packed_bf16": (packing.packed_loss, "bf16"),
    "prefix_bf16_fp32logits": (FW.prefix_loss, "bf16_fp32logits"),
}
CASTS: dict[int, FrozenCasts] = {}  # id(model) -> its frozen weights cast once (precision.FrozenCasts)


def step_cpu(name: str, model, prompt, batch) -> tuple[float, float]:
    fn, mode = VARIANTS[name]
    cast_once = mode in ("bf16", "bf16_fp32logits")
    if cast_once and id(model) not in CASTS:
        CASTS[id(model)] = FrozenCasts(model)
    casts = CASTS.get(id(model)) if cast_once else None
    logits = "fp32" if mode == "bf16_fp32logits" else "bf16"  # LM mode's own: autocast's logits
    t = time.process_time()
    with autocast("bf16" if mode.startswith("bf16") else "fp32", torch.device("cpu"), casts, logits):
        loss = fn(model, prompt, **batch)
    loss.backward()
    prompt.grad = None
    return time.process_time() - t, loss.item()


def variant_flops(name: str, config, batch: dict) -> float:
    """FLOPs the variant executes on ``batch``: padded or packed tokens, logits where computed."""
    mask = batch["attention_mask"]
    lengths = mask.sum(1).tolist()
    B, T = mask.shape
    targets = int((batch["labels"] != D.IGNORE).sum())
    if name.startswith("naive"):  # every padded position, full logits, the prompt per row
        return common.train_flops(config, B * (N_VIRTUAL + T), common.causal_pairs([N_VIRTUAL + T] * B), B * (N_VIRTUAL + T))
    prefix = common.train_flops(config, N_VIRTUAL, common.causal_pairs([N_VIRTUAL]), 1)
    if name.startswith("packed"):
        p = packing.pack(batch["input_ids"], mask, batch["labels"])
        tokens = p.ids.numel()
    else:
        tokens = B * T
    return prefix + common.train_flops(config, tokens, common.causal_pairs(lengths, N_VIRTUAL), targets)


def batches_of(ex, kind: str, pad: int) -> list[dict]:
    if kind == "bucketed":
        idx = D.bucketed_batches(ex, BATCH, common.SEED, 0)
    else:  # random order, as the Trainer's sampler
        order = list(range(len(ex)))
        random.Random(common.SEED).shuffle(order)
        idx = [order[i : i + BATCH] for i in range(0, len(order), BATCH)]
    return [D.collate([ex[i] for i in b], pad) for b in idx]


def run(rounds: int) -> dict:
    from softprompt import models
    from softprompt.cli.quickstart import walkthrough_data

    common.setup_torch(threads=1)
    lm = models.load(store=common.store())
    cfg = walkthrough_data(common.data_root())
    ex = load_splits(lm.tokenizer, replace(cfg, dev_fraction=0.0)).train
    prompt = torch.nn.Parameter(torch.randn(N_VIRTUAL, lm.hidden_size) * 0.05)
    peaks = common.matmul_peaks()
    out = {"benchmark": "levers", "model": lm.name, "machine": common.machine_info(), "peaks_gflops": peaks,
           "config": {"rows": len(ex), "batch_size": BATCH, "num_virtual_tokens": N_VIRTUAL, "rounds": rounds}}
    for kind in ("bucketed", "random"):
        batches = batches_of(ex, kind, lm.tokenizer.pad_token_id)[:rounds]
        names = list(VARIANTS)
        times = {k: [] for k in names}
        losses = {k: [] for k in names}
        for r, batch in enumerate(batches):
            for name in names[r % len(names):] + names[: r % len(names)]:
                dt, loss = step_cpu(name, lm.model, prompt, batch)
                times[name].append(dt)
                losses[name].append(loss)
            print(kind, r, {k: round(v[-1], 2) for k, v in times.items()}, flush=True)
        out[kind] = summarise(times, losses, batches, lm.model.config, peaks)
    return out


def summarise(times, losses, batches, config, peaks) -> dict:
    base = times["prefix_fp32"]
    res = {}
    for name, ts in times.items():
        flops = sum(variant_flops(name, config, b) for b in batches)
        res[name] = {"cpu_s_per_step": statistics.median(ts), "cpu_s_total": sum(ts),
                     "prefix_fp32_over_this_paired_median": statistics.median(a / b for a, b in zip(base, ts)),
                     "max_loss_diff_vs_prefix_fp32": max(abs(a - b) for a, b in zip(losses[name], losses["prefix_fp32"])),
                     **common.roofline(flops, sum(ts), peaks["bf16" if "bf16" in name else "fp32"])}
    res["tokens"] = {"real": sum(int(b["attention_mask"].sum()) for b in batches),
                     "padded": sum(b["attention_mask"].numel() for b in batches),
                     "packed": sum(packing.pack(b["input_ids"], b["attention_mask"], b["labels"]).ids.numel() for b in batches)}
    return res


def markdown(res: dict) -> str:
    m, p = res["machine"], res["peaks_gflops"]
    parts = [f"""# Speed levers of the training step (walk-through batches, LM mode)

Model {res['model']}; N={N_VIRTUAL}, batch {BATCH}; {res['config']['rounds']} batches per kind, all
variants on each batch, order rotated; one torch thread, process CPU seconds. Machine: {m['cpu']},
bf16 native: {m['cpu_bf16_native']} ({m['cpu_bf16_detail']}). Measured one-thread matmul peak:
fp32 {p['fp32']:.0f} GFLOPS, bf16 {p['bf16']:.0f} GFLOPS.
"""]
    for kind in ("bucketed", "random"):
        r = res[kind]
        rows = [[k, v["cpu_s_per_step"], v["prefix_fp32_over_this_paired_median"], v["gflop"] / res["config"]["rounds"],
                 v["achieved_gflops"], v["fraction_of_peak"], v["max_loss_diff_vs_prefix_fp32"]]
                for k, v in r.items() if k != "tokens"]
        t = r["tokens"]
        parts.append(f"\n## {kind} batches (tokens: real {t['real']}, padded {t['padded']}, packed {t['packed']})\n\n"
                     + common.md_table(["variant", "CPU s / step (median)", "speed-up vs prefix_fp32 (paired median)",
                                        "GFLOP / step", "achieved GFLOPS", "fraction of peak", "max |loss diff|"], rows))
    return "".join(parts)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=4, help="batches per kind (each runs every variant)")
    a = ap.parse_args(argv)
    res = run(a.rounds)
    js, md = common.write_results("levers", res, markdown(res))
    print(markdown(res))
    print(f"wrote {js} and {md}")
    return res


if __name__ == "__main__":
    main()
