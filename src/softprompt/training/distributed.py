"""Data-parallel prompt tuning over ``torch.distributed`` (launched by ``torchrun`` or
``accelerate launch``), optionally with the frozen model sharded by FSDP.

Each of the K processes holds the frozen model (whole, or its decoder layers sharded with
``torch.distributed.fsdp.fully_shard``) and the same (N, H) prompt. Every process reads the
whole data set and builds the same batches (batch order is a function of ``(seed, epoch)``);
row ``j`` of each global micro-batch goes to rank ``j % K``. A rank's loss is the mean over its
own target tokens, so it is weighted by ``its target tokens / the batch's target tokens``: the
sum over ranks of those weighted gradients is exactly the single-process gradient of the same
global batch. After the micro-batches of one optimiser step, ONE all-reduce (sum) carries the
prompt's gradient plus two numbers (loss, tokens): ``N*H*4 + 8`` bytes per step, whatever the
model size. Every rank then takes the same clipped AdamW step, so prompts stay identical.

Invariants: all ranks run the same number of forwards (a rank without rows in a micro-batch
runs one row with weight 0), which FSDP's per-layer collectives need; only rank 0 writes
checkpoints and the store; evaluation runs on every rank (identical results, so early
stopping agrees without communication).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from softprompt.config import Launch, UserError
from softprompt.data import IGNORE

if TYPE_CHECKING:
    from softprompt.models import LoadedModel, Model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    """This process's place in the process group."""

    rank: int
    world: int
    local_rank: int
    fsdp: bool = False  # the frozen model's decoder layers are sharded

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, examples: list, idx: list[int]) -> tuple[list[int], float]:
        """This rank's rows of a global micro-batch and their loss weight (target-token share)."""
        rows = idx[self.rank :: self.world]
        total = sum(_targets(examples[i]) for i in idx)
        if not rows:  # still run a forward (FSDP collectives), contributing nothing
            return idx[:1], 0.0
        return rows, sum(_targets(examples[i]) for i in rows) / max(1, total)

    def all_reduce(self, params: list[torch.nn.Parameter], loss: float, tokens: int) -> tuple[float, int]:
        """Sum the trainable gradients and (loss, tokens) over ranks in one collective."""
        import torch.distributed as td

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        stats = torch.tensor([loss, float(tokens)], dtype=grads[0].dtype, device=grads[0].device)
        flat = torch.cat([g.reshape(-1) for g in grads] + [stats])  # (sum numel + 2,)
        td.all_reduce(flat, op=td.ReduceOp.SUM)
        s = 0
        for p, g in zip(params, grads):
            p.grad = flat[s : s + g.numel()].view_as(p).clone()
            s += g.numel()
        return float(flat[-2]), int(round(float(flat[-1])))

    def broadcast(self, params: list[torch.nn.Parameter]) -> None:
        """Start every rank from rank 0's values (as DDP does)."""
        import torch.distributed as td

        with torch.no_grad():
            for p in params:
                td.broadcast(p.data, src=0)

    @staticmethod
    def bytes_per_step(params: list[torch.nn.Parameter]) -> int:
        """Payload of the one all-reduce per optimiser step."""
        return sum(p.numel() * p.element_size() for p in params) + 2 * params[0].element_size()


def _targets(example) -> int:
    """Target tokens of one row: what the prompted loss averages over."""
    return sum(1 for t in example.labels if t != IGNORE)


def setup(lm: LoadedModel, fsdp: bool = False, launch: Launch | None = None) -> Dist | None:
    """Join the process group the launcher described (``launch``, read at the edge); shard the
    model if asked.

    Returns None for a plain single-process run (then nothing here is used). The backend is
    NCCL when the model is on a GPU, gloo otherwise.
    """
    import torch.distributed as td

    launch = launch or Launch()
    if not launch.launched:
        if fsdp:
            raise UserError("--fsdp needs several processes: launch with torchrun or accelerate launch")
        return None
    device = next(lm.model.parameters()).device
    if not td.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        td.init_process_group(backend)
    dist = Dist(td.get_rank(), td.get_world_size(), launch.local_rank, fsdp)
    if fsdp:
        shard_model(lm.model)
    log.info("rank %d of %d (%s%s)", dist.rank, dist.world, td.get_backend(), ", FSDP" if fsdp else "")
    return dist


def decoder_layers(model: Model) -> list[torch.nn.Module]:
    """The repeated transformer blocks (Llama/Mistral/Qwen ``layers``, GPT-2 ``h``)."""
    base = model.base_model
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return list(layers)
    raise UserError(f"--fsdp: cannot find the decoder layers of {type(model).__name__}")


def shard_model(model: Model) -> None:
    """FSDP2: each decoder layer's frozen weights sharded over the ranks, gathered per layer.

    Embeddings, final norm and LM head stay replicated: the prompted forward calls them outside
    the decoder's ``forward`` (``inputs_embeds``, target-only logits), and they are a small part
    of a large model. The prompt is not an FSDP parameter: it is replicated and all-reduced.

    Training under FSDP uses the concatenating forward (``forward.naive_loss``): the shared-prefix
    path runs every layer twice (prefix, then rows) and the prefix keys' gradient reaches a
    layer's projections after FSDP has resharded that layer, which fails in backward.
    """
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)


def teardown() -> None:
    """Leave the process group (if this process joined one)."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        td.destroy_process_group()
