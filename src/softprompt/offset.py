"""A low-rank input offset (DePT, Shi & Lipani, ICLR 2024): ``A @ B`` added to the input tokens.

DePT pairs a shorter shallow prompt (N, H) with a position-wise offset of the real tokens'
input embeddings: ``offset = A @ B``, A (T_max, r), B (r, H); the token at input position t
(0 = the first real token, after the prompt) gets ``offset[t]`` added to its embedding, tokens at
t >= T_max get nothing. Input positions count from the first real token, so a row's offset does
not depend on the prompt's length or on padding; generated tokens continue the count, as target
tokens do in training (teacher forcing). A is initialised like DePT's (Kaiming-uniform, a =
sqrt(5)) and B at zero, so training starts exactly at the plain prompt.

The offset is per-task data like the prompt: a mixed batch gathers it row by row
(``inference/kv.py``). It is stored beside the PEFT prompt-tuning files as ``OFFSET_FILE``
(``OFFSET_A`` (T_max, r), ``OFFSET_B`` (r, H), float32), so PEFT still loads the prompt part;
``check_offset`` is the shape/value check the store's validator applies to it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

OFFSET_FILE = "input_offset.safetensors"
OFFSET_A, OFFSET_B = "offset_a", "offset_b"
MAX_ABS = 1e4  # as the store's bound on prompt values


def init_offset(length: int, rank: int, hidden: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (T_max, r) Kaiming-uniform with a = sqrt(5) as DePT's, B (r, H) zeros): the offset starts at 0."""
    bound = 1.0 / math.sqrt(rank)  # kaiming_uniform_(a=sqrt(5)) on a (T_max, r) matrix: fan_in = r
    a = (torch.rand(length, rank, generator=gen) * 2 - 1) * bound
    return a, torch.zeros(rank, hidden)


def offset_of(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The (T_max, H) offset ``A @ B``."""
    return a @ b


def add_offset(x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Input embeddings (B, T, H) with ``offset[t]`` added at input position t < T_max (right-padded rows)."""
    T = x.shape[1]
    off = offset[:T].to(x.dtype)
    return x + F.pad(off, (0, 0, 0, T - off.shape[0]))


def gather_offsets(offsets: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per-row offsets (B, T_max, H) at per-row input positions ``index`` (B, C): (B, C, H), zero
    where the position is outside [0, T_max) (padding, or past the offset's length)."""
    tm = offsets.shape[1]
    ok = (index >= 0) & (index < tm)
    got = torch.gather(offsets, 1, index.clamp(0, tm - 1).unsqueeze(-1).expand(-1, -1, offsets.shape[2]))
    return got * ok.unsqueeze(-1).to(got.dtype)


def stack_offsets(offsets: list[torch.Tensor | None], like: torch.Tensor) -> torch.Tensor | None:
    """Rows' (T_i, H) offsets (None: no offset) as one zero-padded (B, max T_i, H) on ``like``'s
    device and dtype (the embedding matrix); None if no row has one."""
    if all(o is None for o in offsets):
        return None
    tm = max(int(o.shape[0]) for o in offsets if o is not None)
    device, dtype = like.device, like.dtype
    out = torch.zeros(len(offsets), tm, like.shape[1], device=device, dtype=dtype)
    for i, o in enumerate(offsets):
        if o is not None:
            out[i, : o.shape[0]] = o.to(device, dtype)
    return out


def offset_bytes(a: torch.Tensor, b: torch.Tensor) -> bytes:
    """``OFFSET_FILE``'s content: A and B as float32 safetensors."""
    from safetensors.torch import save

    return save({OFFSET_A: a.detach().float().contiguous().cpu(), OFFSET_B: b.detach().float().contiguous().cpu()})


def read_offset(raw: bytes, emb: torch.Tensor | None, error) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) float32 from ``OFFSET_FILE``'s bytes beside the shallow prompt ``emb`` (no tensor: a deep
    one); ``error(field, problem)`` (the store's ``InvalidPrompt``) is raised if they are
    unreadable or fail ``check_offset``."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    if not isinstance(emb, torch.Tensor):
        raise error(OFFSET_FILE, "is there, but an input offset goes with a shallow prompt only")
    try:
        tensors = load(raw)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise error(OFFSET_FILE, f"is unreadable (corrupted or truncated: {e})") from None
    bad = check_offset(tensors, int(emb.shape[1]))
    if bad is not None:
        raise error(f"{OFFSET_FILE}:{bad[0]}", bad[1])
    return tensors[OFFSET_A].float(), tensors[OFFSET_B].float()


def check_offset(tensors: dict, hidden: int | None) -> tuple[str, str] | None:
    """(key, problem) if the offset file's tensors are not A (T_max, r), B (r, H) finite floats
    with H the prompt's hidden size; None if they are."""
    for key in (OFFSET_A, OFFSET_B):
        if key not in tensors:
            return key, "is missing"
        t = tensors[key]
        if not t.is_floating_point() or t.dim() != 2 or min(t.shape) < 1:
            return key, f"has shape {tuple(t.shape)} and dtype {str(t.dtype).removeprefix('torch.')}; expected 2-d floats"
        if not torch.isfinite(t.float()).all() or t.float().abs().max() > MAX_ABS:
            return key, f"holds NaN, infinite or values over {MAX_ABS:g}"
    a, b = tensors[OFFSET_A], tensors[OFFSET_B]
    if a.shape[1] != b.shape[0]:
        return OFFSET_B, f"has shape {tuple(b.shape)}; its rank must equal {OFFSET_A}'s ({a.shape[1]})"
    if hidden is not None and b.shape[1] != hidden:
        return OFFSET_B, f"has shape {tuple(b.shape)}; the prompt's hidden size is {hidden}"
    return None
