"""Speed on a GPU, side by side in one run: training steps and batched decode against their
anchors, on a model of real size built from a config with random weights.

The model has Llama-3.2-1B's shape (16 layers, H 2048, 32 heads over 8 key/value heads, MLP
8192, vocabulary 128256, tied embeddings) in bfloat16, random weights: speed does not depend on
the weights when lengths are fixed. Inputs are synthetic sentences through an in-memory
byte-level tokenizer (ids < 257, valid for any vocabulary). Measured, interleaved in rounds
(order rotated; every method of a round on the same batch), with CUDA events on a GPU:

* **train**: one AdamW step of a prompt-tuning step (``PromptMethod``, softprompt's defaults)
  vs PEFT's prompt tuning (``get_peft_model`` + its forward's loss + AdamW: the work of one
  Trainer step, without the Trainer's bookkeeping) vs the frozen model's forward + backward
  (the floor), at N = 20 and 100 (train_step.py's steppers); a deep-prompt step (N = 20, 100) vs
  a LoRA step (PEFT ``LoraConfig`` r 8 on q/v, its forward's loss). Batch 16, target-only loss.
* **decode**: ``Engine.generate`` vs ``model.generate`` (the plain model, greedy, left-padded)
  at batch 1, 8 and 32, 32 new tokens a row (8 with ``--tiny``) (EOS ignored on both sides: equal work); the engine
  also with every row under 1 prompt and under 8 prompts mixed (N = 20). PEFT's ``generate`` is
  not an anchor here (broken on transformers 5.24, benchmarks/peft_generate_gap.py).

For each: the fraction of the bf16 matmul peak measured in the same run (FLOPs counted from the
model's shapes, common.py). ``--tiny``: a 2-layer H 64 config, for the dry run on a CPU.

    python benchmarks/gpu_bench.py --device cuda --out DIR        # scripts/gpu_check.sh gives it 4 minutes
    python benchmarks/gpu_bench.py --device cpu --tiny --out DIR  # the dry run
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import gpu_report  # noqa: E402
import torch  # noqa: E402
import train_step as ts  # noqa: E402

from softprompt import models, precision  # noqa: E402
from softprompt.config import GenerateConfig  # noqa: E402
from softprompt.forward.packing import pack  # noqa: E402
from softprompt.inference.engine import Engine, GenerateRequest  # noqa: E402
from softprompt.prompt import init_random, make_deep_prompt  # noqa: E402

SHAPES = {
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=4096,
                         tie_word_embeddings=True),
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True),
}
BATCHES, TASKS, DECODE_N, NEW_TOKENS = (1, 8, 32), 8, 20, 32
LORA_RANK = 8


def build_lm(shape: str, device: torch.device, dtype: torch.dtype) -> models.LoadedModel:
    """A random Llama of ``shape``, built on ``device`` in ``dtype``, frozen, with the byte tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = common.byte_tokenizer()
    cfg = LlamaConfig(**SHAPES[shape], pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(common.SEED)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    models.freeze(model)
    return models.LoadedModel(model=model, tokenizer=tok, name=f"{shape} config, random weights, {dtype}",
                              path=Path(shape), fingerprint=models.fingerprint(model))


# ---------------------------------------------------------------- train


class LoraStepper(ts.Stepper):
    """PEFT's LoRA (r 8 on the attention's q and v projections) on a separate copy, its forward's loss."""

    def __init__(self, model: torch.nn.Module):
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(task_type="CAUSAL_LM", r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=["q_proj", "v_proj"])
        self.model = get_peft_model(common.separate_copy(model), cfg)
        super().__init__([p for p in self.model.parameters() if p.requires_grad])

    def loss(self, batch: dict) -> torch.Tensor:
        return self.model(**batch).loss


def train_batches(lm, device: torch.device, count: int) -> list[dict]:
    """Length-bucketed batches of 16 synthetic SST-2-like rows (train_step's template and
    targets), on ``device``."""
    rows = common.synthetic_sentences(ts.BATCH_SIZE * count)
    exs = [common.target_example(lm.tokenizer, ts.TEMPLATE.format(text=s), ts.VERBALIZER[str(i % 2)], ts.MAX_LENGTH)
           for i, s in enumerate(rows)]
    order = common.bucketed_batches(exs, ts.BATCH_SIZE)
    batches = [common.collate([exs[i] for i in b], lm.tokenizer.pad_token_id) for b in order]
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def train_steppers(lm, used: str) -> dict[str, ts.Stepper]:
    steppers = ts.build_steppers(lm, {n: ts.initial_prompt(lm.model, n) for n in ts.SIZES}, used)
    for n in ts.SIZES:
        deep = make_deep_prompt(lm.model, lm.tokenizer, n, "random", seed=common.SEED + n)
        steppers[f"deep_n{n}"] = ts.SoftpromptStepper(lm.model, deep, used)
    steppers["lora"] = LoraStepper(lm.model)
    return steppers


def step_flops(key: str, config, batch: dict) -> float:
    """FLOPs one step of ``key`` executes (train_step.method_flops; a deep prompt is the shallow
    path without the prefix pass; LoRA computes every padded position, full logits)."""
    kind, n = (key.split("_n")[0], int(key.split("_n")[1])) if "_n" in key else (key, 0)
    if kind in ("peft", "softprompt", "floor"):
        return ts.method_flops(kind, n, config, batch)
    mask = batch["attention_mask"]
    B, T = mask.shape
    if kind == "lora":
        return common.train_flops(config, B * T, common.causal_pairs([T] * B), B * T)
    tokens = pack(batch["input_ids"], mask, batch["labels"]).ids.numel() if ts.PACK else B * T
    targets = int((batch["labels"] != common.IGNORE).sum())
    return common.train_flops(config, tokens, common.causal_pairs(mask.sum(1).tolist(), n), targets)


def interleaved(fns: dict, rounds: int, warmup: int, device, arg=lambda r: ()) -> dict[str, list[float]]:
    """Rounds of every function once, order rotated, each timed by ``common.DeviceTimer``;
    ``arg(r)`` gives round r's arguments. The first ``warmup`` rounds are not kept."""
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(warmup + rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            with common.DeviceTimer(device) as t:
                fns[k](*arg(r))
            if r >= warmup:
                times[k].append(t.seconds)
        print(f"round {r + 1}/{warmup + rounds} " + " ".join(f"{k}={times[k][-1]:.4f}s" for k in names if times[k]),
              flush=True)
    return times


def paired(times: dict, a: str, b: str) -> float:
    """Median over rounds of a's time over b's (the same round, the same batch)."""
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


def train_section(lm, device: torch.device, rounds: int, warmup: int, peak: float) -> dict:
    used = precision.resolve("auto", device, lm.model.dtype)
    batches = train_batches(lm, device, 8)
    steppers = train_steppers(lm, used["used"])
    sanity = {n: ts.sanity_check(steppers[f"peft_n{n}"], steppers[f"softprompt_n{n}"], lm.model, batches[0])
              for n in ts.SIZES}
    print(f"sanity (PEFT vs softprompt, same prompt and batch): {sanity}", flush=True)
    pick = [batches[(r * 3) % len(batches)] for r in range(warmup + rounds)]
    times = interleaved({k: s.step for k, s in steppers.items()}, rounds, warmup, device, lambda r: (pick[r],))
    methods = {}
    for k, ts_ in times.items():
        flops = sum(step_flops(k, lm.model.config, b) for b in pick[warmup:])
        methods[k] = {"step_s": common.summary(ts_), "roofline": common.roofline(flops, sum(ts_), peak)}
    ratios = {f"n{n}": {"peft_time_over_softprompt": paired(times, f"peft_n{n}", f"softprompt_n{n}"),
                        "softprompt_time_over_floor": paired(times, f"softprompt_n{n}", "floor"),
                        "lora_time_over_deep": paired(times, "lora", f"deep_n{n}"),
                        "deep_time_over_floor": paired(times, f"deep_n{n}", "floor")} for n in ts.SIZES}
    return {"precision": used, "batch_size": ts.BATCH_SIZE, "measured_T": [b["input_ids"].shape[1] for b in pick[warmup:]],
            "lora": {"r": LORA_RANK, "target_modules": ["q_proj", "v_proj"]}, "sanity": sanity,
            "methods": methods, "ratios": ratios, "raw_seconds": times}


# ---------------------------------------------------------------- decode


def hf_generate(lm, texts: list[str], new_tokens: int) -> list[list[int]]:
    """``model.generate`` on the left-padded batch, greedy, exactly ``new_tokens`` a row."""
    tok = lm.tokenizer
    enc = tok(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt").to(lm.model.device)
    with torch.inference_mode():
        out = lm.model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                pad_token_id=tok.pad_token_id)
    return out[:, enc["input_ids"].shape[1]:].tolist()


def decode_engine(lm) -> Engine:
    """An engine with TASKS random prompts (N = DECODE_N) and no end of sequence (equal work)."""
    eng = Engine(lm)
    eng.eos_id, eng.stop_ids = -1, ()
    gen = torch.Generator().manual_seed(common.SEED)
    for k in range(TASKS):
        eng.add_prompt(f"task{k}", init_random(lm.model, DECODE_N, gen))
    return eng


def decode_configs(lm, eng: Engine, texts: list[str], new_tokens: int) -> dict:
    """name -> (function returning token lists, prompt length N of its rows)."""
    cfg = GenerateConfig(max_new_tokens=new_tokens)

    def engine(rows: list[str], prompts):
        return lambda: [g.token_ids for g in eng.generate([GenerateRequest(t, prompts(i), cfg) for i, t in enumerate(rows)])]

    out = {}
    for B in BATCHES:
        rows = texts[:B]
        out[f"generate B={B}"] = (lambda rows=rows: hf_generate(lm, rows, new_tokens), 0)
        out[f"engine B={B}"] = (engine(rows, lambda i: None), 0)
        out[f"engine 1 prompt B={B}"] = (engine(rows, lambda i: "task0"), DECODE_N)
        if B >= TASKS:
            out[f"engine {TASKS} prompts B={B}"] = (engine(rows, lambda i: f"task{i % TASKS}"), DECODE_N)
    return out


def decode_section(lm, device: torch.device, rounds: int, peak: float, new_tokens: int = NEW_TOKENS) -> dict:
    texts = common.synthetic_sentences(max(BATCHES), seed=common.SEED + 1)
    eng = decode_engine(lm)
    configs = decode_configs(lm, eng, texts, new_tokens)
    first = {k: fn() for k, (fn, _) in configs.items()}  # warm-up: kernels, the prefix cache
    assert all(len(t) == new_tokens for toks in first.values() for t in toks), "unequal work"
    agree = {B: sum(a == b for a, b in zip(first[f"engine B={B}"], first[f"generate B={B}"])) / B for B in BATCHES}
    times = interleaved({k: fn for k, (fn, _) in configs.items()}, rounds, 0, device)
    lengths = [len(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    methods = {}
    for k, (_, n) in configs.items():
        B = int(k.rsplit("B=", 1)[1])
        flops = common.forward_flops(lm.model.config, lengths[:B], [new_tokens] * B, prefix=n)
        med = statistics.median(times[k])
        methods[k] = {"seconds": common.summary(times[k]), "tokens_per_s": B * new_tokens / med,
                      "roofline": common.roofline(flops, med, peak)}
    ratios = {f"B={B}": {"engine_speed_over_generate": paired(times, f"generate B={B}", f"engine B={B}"),
                         "one_prompt_speed_over_plain": paired(times, f"engine B={B}", f"engine 1 prompt B={B}")}
              for B in BATCHES}
    for B in (b for b in BATCHES if b >= TASKS):
        ratios[f"B={B}"]["mixed_speed_over_one_prompt"] = paired(times, f"engine 1 prompt B={B}", f"engine {TASKS} prompts B={B}")
    return {"new_tokens": new_tokens, "prompt_tokens": DECODE_N, "tasks": TASKS, "greedy": True,
            "engine_tokens_equal_generate": agree, "methods": methods, "ratios": ratios, "raw_seconds": times}


# ---------------------------------------------------------------- run


def run(device: torch.device, tiny: bool, rounds: int, warmup: int, decode_rounds: int) -> dict:
    common.setup_torch(tiny, threads=None if device.type == "cpu" else torch.get_num_threads())
    dtype = torch.bfloat16
    info = {**common.machine_info(), **gpu_report.device_info(device)}
    n = 512 if tiny or device.type == "cpu" else 8192
    peak = max(common.matmul_peak_gflops(dtype, n, reps=10, device=device) for _ in range(2))
    print(f"bf16 matmul peak: {peak:.0f} GFLOPS", flush=True)
    shape = "tiny" if tiny else "llama-3.2-1b"
    lm = build_lm(shape, device, dtype)
    res = {"benchmark": "gpu_bench", "device": str(device), "tiny": tiny, "model": lm.name, "shape": SHAPES[shape],
           "machine": info, "peak_gflops": {"bf16": peak, "matmul_n": n}, "seed": common.SEED,
           "rounds": {"train": rounds, "train_warmup": warmup, "decode": decode_rounds}}
    res["train"] = train_section(lm, device, rounds, warmup, peak)
    res["decode"] = decode_section(lm, device, decode_rounds, peak, 8 if tiny else NEW_TOKENS)
    if device.type == "cuda":
        res["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    res["targets"] = gpu_report.targets(res)
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--tiny", action="store_true", help="a tiny config instead of Llama-3.2-1B's shape (the dry run)")
    ap.add_argument("--rounds", type=int, default=None, help="measured training rounds (default 20; 2 with --tiny)")
    ap.add_argument("--warmup", type=int, default=None, help="training warm-up rounds (default 3; 1 with --tiny)")
    ap.add_argument("--decode-rounds", type=int, default=None, help="decode rounds (default 5; 1 with --tiny)")
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_bench.json and gpu_bench.md")
    a = ap.parse_args(argv)
    device = models.parse_device(a.device)
    res = run(device, a.tiny, a.rounds or (2 if a.tiny else 20), a.warmup if a.warmup is not None else (1 if a.tiny else 3),
              a.decode_rounds or (1 if a.tiny else 5))
    js, md = common.write_results("gpu_bench", res, gpu_report.bench_markdown(res), a.out)
    print(f"wrote {js} and {md}")
    return res


if __name__ == "__main__":
    main()
