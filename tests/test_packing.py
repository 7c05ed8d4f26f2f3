"""Packed rows and chunked cross-entropy are exact.

* packed == unpacked: every row's summed loss and the prompt gradient of any weighted sum of
  row losses equal the unpacked prefix path (each row run alone), on Llama and GPT-2;
* chunked cross-entropy == ``F.cross_entropy`` on the full logits, loss and gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from batches import PACKING_SENTENCES, batch_of
from helpers import rel

from softprompt import data as D
from softprompt import forward as FW
from softprompt import models
from softprompt.forward import packing
from softprompt.forward.chunked_ce import linear_cross_entropy
from softprompt.prompt import make_prompt

TOL = 1e-4  # float32, as tests/test_forward.py
N = 5


@pytest.fixture(scope="module")
def lms(tiny_model_dir):
    from conftest import sharpen

    return {arch: sharpen(models.load(str(tiny_model_dir(arch)))) for arch in ("llama", "gpt2")}


def prompt_of(lm, seed: int = 0) -> torch.Tensor:
    return (make_prompt(lm.model, lm.tokenizer, N, "random", seed=seed) * 5).requires_grad_(True)


def test_bins_first_fit_decreasing():
    groups = packing.bins([5, 2, 9, 3, 1], capacity=9)
    assert sorted(b for g in groups for b in g) == [0, 1, 2, 3, 4]
    assert all(sum([5, 2, 9, 3, 1][b] for b in g) <= 9 for g in groups)
    assert len(groups) == 3  # 9 | 5+3+1 | 2


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("capacity", [None, 64])
def test_packed_rows_equal_unpacked(lms, arch, capacity):
    lm = lms[arch]
    batch = batch_of(lm.tokenizer)
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    p = packing.pack(*args, capacity=capacity)
    assert p.ids.shape[0] < len(PACKING_SENTENCES), "the rows must actually share bins"
    weights = torch.rand(len(PACKING_SENTENCES), generator=torch.Generator().manual_seed(0)) + 0.5

    prompt = prompt_of(lm)
    total, count = packing.packed_row_losses(lm.model, prompt, *args, capacity=capacity)
    (g_packed,) = torch.autograd.grad((total * weights).sum(), prompt)

    ref_prompt = prompt_of(lm)
    ref_total, ref_count = [], []
    for b in range(len(PACKING_SENTENCES)):  # each row alone: no padding, no neighbours
        n = int(batch["attention_mask"][b].sum())
        row = [a[b : b + 1, :n] for a in args]
        c = int((row[2][:, 1:] != D.IGNORE).sum() + (row[2][:, 0] != D.IGNORE).sum())
        ref_total.append(FW.prefix_loss(lm.model, ref_prompt, *row) * c)
        ref_count.append(c)
    ref_total = torch.stack(ref_total)
    (g_ref,) = torch.autograd.grad((ref_total * weights).sum(), ref_prompt)

    assert count.tolist() == ref_count
    assert rel(total.detach(), ref_total.detach()) < TOL
    assert ((total.detach() - ref_total.detach()).abs() / ref_total.detach().abs()).max() < TOL  # every row
    assert rel(g_packed, g_ref) < TOL and g_ref.norm() > 0
    # the mean over the batch equals the padded prefix path and the naive concat path
    mean = packing.packed_loss(lm.model, prompt.detach(), *args, capacity=capacity)
    naive = FW.naive_loss(lm.model, prompt.detach(), *args)
    assert abs(mean.item() - naive.item()) < TOL * abs(naive.item())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packing_without_the_row_mask_differs(lms, arch, monkeypatch):
    """The check can fail: letting rows see each other in their bin changes the losses."""
    lm = lms[arch]
    batch = batch_of(lm.tokenizer)
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    prompt = prompt_of(lm).detach()
    exact, _ = packing.packed_row_losses(lm.model, prompt, *args)
    leaky = packing.packed_mask

    def see_all_rows(row, n_prefix, dtype):
        return leaky(torch.where(row >= 0, 0, row), n_prefix, dtype)

    monkeypatch.setattr(packing, "packed_mask", see_all_rows)
    leaked, _ = packing.packed_row_losses(lm.model, prompt, *args)
    assert ((leaked - exact).abs() / exact.abs()).max() > 10 * TOL  # rows after another row change


@pytest.mark.parametrize("rows", [1, 3, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_ce_equals_full(rows, bias):
    torch.manual_seed(0)
    M, H, V = 11, 16, 37
    head = torch.nn.Linear(H, V, bias=bias).requires_grad_(False)
    hidden = torch.randn(M, H, requires_grad=True)
    targets = torch.randint(0, V, (M,))
    up = torch.rand(M)  # any weighting of the per-token losses

    chunked = linear_cross_entropy(hidden, head, targets, rows=rows)
    (g_chunked,) = torch.autograd.grad((chunked * up).sum(), hidden)
    full = F.cross_entropy(head(hidden), targets, reduction="none")
    (g_full,) = torch.autograd.grad((full * up).sum(), hidden, retain_graph=True)
    assert torch.allclose(chunked, full, rtol=1e-5, atol=1e-6)
    assert rel(g_chunked, g_full) < 1e-5
    assert rel(g_chunked, torch.autograd.grad(full.sum(), hidden)[0]) > 1e-2  # the weighting matters


def test_chunked_ce_trainable_head_equals_full():
    """A trainable head (LoRA, full fine-tuning) gets the same weight gradient too."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 37)
    hidden = torch.randn(9, 16, requires_grad=True)
    targets = torch.randint(0, 37, (9,))
    chunked = linear_cross_entropy(hidden, head, targets, rows=2).mean()
    grads = torch.autograd.grad(chunked, [hidden, head.weight, head.bias])
    full = F.cross_entropy(head(hidden), targets)
    ref = torch.autograd.grad(full, [hidden, head.weight, head.bias])
    assert abs(chunked.item() - full.item()) < 1e-6
    assert all(rel(a, b) < 1e-5 for a, b in zip(grads, ref, strict=True))


def test_chunked_ce_under_autocast_takes_float32_logits():
    """Under bf16 autocast the loss's logits are float32 products of the float32 head: the
    per-token losses and the hidden-state gradient equal the float32 computation, where the bf16
    product autocast would run rounds them (its result, checked here, is measurably off)."""
    torch.manual_seed(0)
    H, V, M = 64, 300, 9
    head = torch.nn.Linear(H, V, bias=False).requires_grad_(False)
    head.weight.mul_(8.0)  # logits of this model's magnitudes (tens), where bf16 steps are 0.125
    hidden = torch.randn(M, H, requires_grad=True)
    targets = torch.randint(0, V, (M,))
    up = torch.rand(M)
    full = F.cross_entropy(head(hidden), targets, reduction="none")  # float32 reference
    (g_full,) = torch.autograd.grad((full * up).sum(), hidden)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = linear_cross_entropy(hidden, head, targets, rows=2)
        rounded = F.cross_entropy(head(hidden).float(), targets, reduction="none")  # autocast's bf16 product
    (g_chunked,) = torch.autograd.grad((chunked * up).sum(), hidden)
    assert chunked.dtype == torch.float32
    assert torch.allclose(chunked, full, rtol=1e-5, atol=1e-5) and rel(g_chunked, g_full) < 1e-5
    assert (rounded - full).abs().max() > 1e-2  # bf16 logits would have moved the loss


def test_chunked_ce_with_bf16_logits_casts_the_head_once_with_the_same_result():
    """With bf16 logits (LM mode) the frozen head is cast once per call (``autocast_once``); the
    result equals letting autocast cast it at every chunk's product, bit for bit."""
    from softprompt import precision
    from softprompt.forward.chunked_ce import _FrozenHeadCE

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 37, bias=False).requires_grad_(False)
    hidden = torch.randn(9, 16, requires_grad=True)
    targets = torch.randint(0, 37, (9,))
    with precision.autocast("bf16", torch.device("cpu"), logits="bf16"):
        once = linear_cross_entropy(hidden, head, targets, rows=2)
        every = _FrozenHeadCE.apply(hidden, head.weight, None, targets, 2)  # autocast casts per product
    (g_once,) = torch.autograd.grad(once.sum(), hidden)
    (g_every,) = torch.autograd.grad(every.sum(), hidden)
    assert torch.equal(once, every) and torch.equal(g_once, g_every)
    full = F.cross_entropy(head(hidden), targets, reduction="none")  # float32: bf16 did round
    assert not torch.equal(once, full) and torch.allclose(once, full, atol=0.1)


def test_chunked_ce_trainable_head_under_autocast_takes_float32_logits():
    """The trainable-head path (LoRA on the output layer) computes float32 logits under autocast
    too: losses and every gradient equal the float32 computation."""
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 300)
    with torch.no_grad():
        head.weight.mul_(8.0)
    hidden = torch.randn(9, 64, requires_grad=True)
    targets = torch.randint(0, 300, (9,))
    full = F.cross_entropy(head(hidden), targets)
    ref = torch.autograd.grad(full, [hidden, head.weight, head.bias])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the forward, as training runs it
        chunked = linear_cross_entropy(hidden, head, targets, rows=2).mean()
    grads = torch.autograd.grad(chunked, [hidden, head.weight, head.bias])  # backward outside, as training
    assert abs(chunked.item() - full.item()) < 1e-5
    assert all(rel(a, b) < 1e-5 for a, b in zip(grads, ref, strict=True))


def test_chunked_ce_trainable_head_with_bf16_logits_recomputes_as_it_ran():
    """With bf16 logits the trainable-head path's checkpointed chunks are recomputed in the
    backward, outside the forward's context, as the forward ran them (bf16): the gradients equal
    autograd's through the same autocast forward without checkpointing."""
    from softprompt import precision

    torch.manual_seed(0)
    head = torch.nn.Linear(64, 300)
    hidden = torch.randn(9, 64, requires_grad=True)
    targets = torch.randint(0, 300, (9,))
    with precision.autocast("bf16", torch.device("cpu"), logits="bf16"):
        chunked = linear_cross_entropy(hidden, head, targets, rows=2).sum()
        direct = F.cross_entropy(head(hidden).float(), targets, reduction="sum")  # autocast's bf16 product
    grads = torch.autograd.grad(chunked, [hidden, head.weight, head.bias])
    ref = torch.autograd.grad(direct, [hidden, head.weight, head.bias])
    assert abs(chunked.item() - direct.item()) < 1e-4
    assert all(rel(a, b) < 1e-2 for a, b in zip(grads, ref, strict=True))  # bf16 weight gradients, summed per chunk
