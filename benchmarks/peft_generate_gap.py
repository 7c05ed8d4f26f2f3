"""The PEFT generate() gap: three greedy decodes of one PEFT-made prompt-tuning adapter.

On the default model, PEFT builds a prompt-tuning adapter (text init "Answer like a pirate
captain on the high seas", 8 virtual tokens). For the input "The weather today is" we decode
greedily, the same number of new tokens, three ways:

1. ``peft_model.generate()``: PEFT's patched generation;
2. PEFT's own forward, decoded token by token: ``peft_model(input_ids=...)`` on the whole
   sequence each step, argmax of the last logits (no cache: the reference of what the adapter
   computes);
3. softprompt: the adapter directory read by ``store.read_prompt_dir`` and decoded by our engine.

(2) and (3) must agree token for token (they compute ``[P][x]`` through the same model); (1) is
what a PEFT user gets from ``generate()``. Wall time of each decode is measured in interleaved
rounds (median), reported as a ratio to softprompt's.

    python benchmarks/peft_generate_gap.py            # default model; writes results/peft_generate_gap.*
    python benchmarks/peft_generate_gap.py --quick    # tiny random model, smoke test only
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import common
import torch

INIT_TEXT = "Answer like a pirate captain on the high seas"
INPUT = "The weather today is"
N_VIRTUAL = 8


def peft_adapter(lm, folder: Path):
    """A PEFT prompt-tuning model over a separate copy of the base model, and its saved adapter."""
    from peft import PromptTuningConfig, get_peft_model

    cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL, prompt_tuning_init="TEXT",
                             prompt_tuning_init_text=INIT_TEXT, tokenizer_name_or_path=str(lm.path))
    if not Path(lm.path).is_dir():  # --quick: an in-memory tokenizer, so PEFT cannot read one from a path
        cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL)
    pm = get_peft_model(common.separate_copy(lm.model), cfg).eval()
    pm.save_pretrained(str(folder))
    return pm


@torch.no_grad()
def peft_generate(pm, ids: list[int], n: int, eos: int | None) -> list[int]:
    out = pm.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos)[0].tolist()
    out = out[len(ids):] if out[: len(ids)] == ids else out  # PEFT returns the input too (or not)
    return out[: out.index(eos)] if eos in out else out


@torch.no_grad()
def peft_forward_greedy(pm, ids: list[int], n: int, eos: int | None) -> list[int]:
    seq, out = list(ids), []
    for _ in range(n):
        logits = pm(input_ids=torch.tensor([seq]), attention_mask=torch.ones(1, len(seq), dtype=torch.long)).logits
        nxt = int(logits[0, -1].argmax())
        if nxt == eos:
            break
        out.append(nxt)
        seq.append(nxt)
    return out


def ours(lm, prompt: torch.Tensor, n: int) -> list[int]:
    from softprompt.config import GenerateConfig
    from softprompt.inference import engine

    return engine.generate(lm, prompt, INPUT, GenerateConfig(max_new_tokens=n)).token_ids


def run(quick: bool, rounds: int, n: int) -> dict:
    from softprompt import store

    lm = common.load_lm(quick)
    tok = lm.tokenizer
    ids = tok(INPUT, add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    saved = Path(tempfile.mkdtemp(prefix="sp-peft-gap-")) / "adapter"
    pm = peft_adapter(lm, saved)
    prompt = store.read_prompt_dir(saved).embeddings  # (N, H), what `softprompt prompts import` stores
    assert torch.equal(prompt, pm.get_prompt_embedding_to_save("default").float())
    decoders = {"peft_generate": lambda: peft_generate(pm, ids, n, eos),
                "peft_forward": lambda: peft_forward_greedy(pm, ids, n, eos),
                "softprompt": lambda: ours(lm, prompt, n)}
    times: dict[str, list[float]] = {k: [] for k in decoders}
    tokens: dict[str, list[int]] = {}
    for _ in range(rounds):  # interleaved: each round runs all three
        for name, fn in decoders.items():
            t0 = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - t0)
            assert tokens.setdefault(name, out) == out, f"{name} is not deterministic"
    med = {k: common.summary(v)["median"] for k, v in times.items()}
    return {
        "model": lm.name, "input": INPUT, "init_text": INIT_TEXT, "num_virtual_tokens": N_VIRTUAL,
        "max_new_tokens": n, "rounds": rounds,
        "decodes": {k: {"text": tok.decode(v, skip_special_tokens=True), "token_ids": v,
                        "median_s": med[k], "time_vs_softprompt": med[k] / med["softprompt"]}
                    for k, v in tokens.items()},
        "softprompt_equals_peft_forward": tokens["softprompt"] == tokens["peft_forward"],
        "peft_generate_equals_peft_forward": tokens["peft_generate"] == tokens["peft_forward"],
        "machine": common.machine_info(),
    }


def markdown(res: dict) -> str:
    m = res["machine"]
    rows = [[f"`{k}`", repr(d["text"]), d["median_s"], d["time_vs_softprompt"]] for k, d in res["decodes"].items()]
    return (f"# PEFT generate() gap\n\nModel {res['model']}; a PEFT prompt-tuning adapter, text init "
            f"\"{res['init_text']}\", {res['num_virtual_tokens']} virtual tokens; input \"{res['input']}\"; greedy, "
            f"at most {res['max_new_tokens']} new tokens; transformers {m['transformers']}, peft {m['peft']}, "
            f"torch {m['torch']}; {res['rounds']} interleaved rounds.\n\n"
            + common.md_table(["decode", "text", "median s", "time / softprompt"], rows)
            + f"\nsoftprompt == PEFT forward token by token: **{res['softprompt_equals_peft_forward']}**; "
            f"PEFT generate() == PEFT forward: **{res['peft_generate_equals_peft_forward']}**.\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model (smoke test)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--tag", default="", help="suffix of the result files (e.g. the transformers version)")
    a = ap.parse_args()
    common.setup_torch(a.quick)
    res = run(a.quick, a.rounds, a.max_new_tokens)
    js, md = common.write_results("peft_generate_gap" + (f"_{a.tag}" if a.tag else ""), res, markdown(res),
                                  common.out_dir(a.out, a.quick))
    print(markdown(res))
    print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
