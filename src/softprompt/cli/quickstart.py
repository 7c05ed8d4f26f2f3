"""The walk-through (``softprompt quickstart``): base vs tuned generation on the default model.

The classic prompt-tuning walk-through (PEFT's documentation example): 4 virtual tokens,
random init, lr 5e-3, 5 epochs, a shallow prompt, on the ``prompt`` column of the first 50 rows
of awesome-chatgpt-prompts, then generate for "I want you to act as a logistician. ". These
settings are spelled out here, so ``softprompt train``'s default (``--kind auto``) never changes
the walk-through. A second run uses the recommended settings, which are what ``--kind auto``
chooses for this data (language modelling: ``training/auto.py``), so the difference is visible.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from softprompt.config import (
    DataConfig,
    GenerateConfig,
    PromptConfig,
    TrainConfig,
    UserError,
)
from softprompt.data import WALKTHROUGH_CSV

if TYPE_CHECKING:
    from softprompt.models import LoadedModel

INPUT = "I want you to act as a logistician. "
GEN = GenerateConfig(max_new_tokens=100, repetition_penalty=1.5)
# the walk-through as it is usually written
CLASSIC = (PromptConfig(num_virtual_tokens=4, init="random", kind="shallow"),
           TrainConfig(lr=5e-3, epochs=5, batch_size=8, patience=None, warmup_ratio=0.0, max_grad_norm=0.0))
# the recommended settings: what softprompt train chooses by default (--kind auto; docs/tuning.md)
RECOMMENDED = (PromptConfig(kind="auto"), TrainConfig(batch_size=8, patience=None))


def walkthrough_data(root: Path | None = None) -> DataConfig:
    """The walk-through's data: the copy shipped inside the package, or ``root``'s
    ``awesome-chatgpt-prompts/prompts.csv`` when a data root is given explicitly."""
    path = WALKTHROUGH_CSV if root is None else Path(root) / "awesome-chatgpt-prompts" / "prompts.csv"
    if not path.is_file():
        raise UserError(f"walk-through data not found: {path}")
    return DataConfig(path=str(path), text_column="prompt", limit=50, max_length=256, dev_fraction=0.0)


def sparkline(values: list[float], width: int = 60) -> str:
    if not values:
        return ""
    bars = "▁▂▃▄▅▆▇█"
    step = max(1, len(values) // width)
    pts = [sum(values[i : i + step]) / len(values[i : i + step]) for i in range(0, len(values), step)]
    lo, hi = min(pts), max(pts)
    return "".join(bars[int((v - lo) / (hi - lo + 1e-12) * (len(bars) - 1))] for v in pts)


def _tune(store, lm: LoadedModel, data, prompt_cfg: PromptConfig, train_cfg: TrainConfig, name, print_fn):
    from softprompt.inference import engine
    from softprompt.training.tune import train

    res = train(lm, data, prompt_cfg, train_cfg, name=name, progress=True, store=store, given=set(), say=print_fn)
    used, lr = res.meta["prompt"], res.meta["training"]["lr"]  # after --kind auto, what it chose
    losses = [h["loss"] for h in res.history]
    gen = engine.generate(lm, res.prompt, INPUT, GEN)
    print_fn(f"\n== tuned: {name}  ({used['kind']}, N={used['num_virtual_tokens']}, init {used['init']}, lr {lr}, "
             f"{len(losses)} steps in {res.train_time_s:.1f}s)")
    print_fn(f"loss  {losses[0]:.3f} {sparkline(losses)} {losses[-1]:.3f}   (epoch means: "
             + ", ".join(f"{e['train_loss']:.3f}" for e in res.epochs) + ")")
    print_fn(f"saved {res.path}")
    print_fn(f"--- generation with the tuned prompt ---\n{INPUT}{gen.text}")
    return res


def run(store, print_fn=print, recommended: bool = True) -> dict:
    """The walk-through on the default model (converted into ``store`` on first use); the tuned
    prompts are saved in ``store``."""
    from softprompt import models
    from softprompt.inference import engine

    data = walkthrough_data()
    lm = models.load(None, store=store)
    print_fn(f"model {lm.name}: {sum(p.numel() for p in lm.model.parameters()):,} frozen parameters ({lm.path})")
    base = engine.generate(lm, None, INPUT, GEN)
    print_fn(f"--- generation with the plain model ---\n{INPUT}{base.text}")
    out = {"base": base.text, "classic": _tune(store, lm, data, *CLASSIC, "quickstart", print_fn)}
    if recommended:
        print_fn("\n== recommended settings: what `softprompt train` chooses by default (--kind auto)")
        out["recommended"] = _tune(store, lm, data, *RECOMMENDED, "quickstart-recommended", print_fn)
        a, b = out["classic"].final_train_loss, out["recommended"].final_train_loss
        print_fn(f"\nfinal training loss: walk-through settings {a:.3f}, recommended settings {b:.3f}")
    return out
