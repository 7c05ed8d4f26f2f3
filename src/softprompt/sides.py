"""Per-task tensors stored beside a prompt's PEFT files, and their checks.

* ``input_offset.safetensors``: DePT's input offset A (T_max, r), B (r, H), beside a shallow
  prompt (``offset.py``);
* ``prefix_memory.safetensors``: PrefixMemory's per-head memory (L, heads, d, d), beside a deep
  prompt (``memory.py``).

PEFT loads the prompt part of such a directory and ignores these files. ``read_sides`` is the
part of the store's validator that reads them: ``error(field, problem)`` (the store's
``InvalidPrompt``) names the file and tensor at fault.
"""

from __future__ import annotations

import torch

from softprompt.memory import MEMORY_FILE, MEMORY_KEY, check_memory
from softprompt.offset import OFFSET_FILE, offset_bytes, read_offset

SIDE_FILES = (OFFSET_FILE, MEMORY_FILE)


def side_files(offset: tuple[torch.Tensor, torch.Tensor] | None = None, memory: torch.Tensor | None = None) -> dict[str, bytes]:
    """The side files' bytes for a prompt directory (none for what is None)."""
    from safetensors.torch import save

    out = {} if offset is None else {OFFSET_FILE: offset_bytes(*offset)}
    if memory is not None:
        out[MEMORY_FILE] = save({MEMORY_KEY: memory.detach().float().contiguous().cpu()})
    return out


def read_memory(raw: bytes, kv: torch.Tensor | None, error) -> torch.Tensor:
    """The (L, heads, d, d) memory beside the deep prompt ``kv`` (L, 2, kv, N, d), checked."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    if kv is None:
        raise error(MEMORY_FILE, "is there, but a prefix memory goes with a deep prompt only")
    try:
        tensors = load(raw)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise error(MEMORY_FILE, f"is unreadable (corrupted or truncated: {e})") from None
    bad = check_memory(tensors, None)
    m = tensors.get(MEMORY_KEY)
    if bad is None and (m.shape[0] != kv.shape[0] or m.shape[3] != kv.shape[4]):
        bad = MEMORY_KEY, f"has shape {tuple(m.shape)}; the deep prompt has {kv.shape[0]} layers of head dim {kv.shape[4]}"
    if bad is not None:
        raise error(f"{MEMORY_FILE}:{bad[0]}", bad[1])
    return m.float()


def read_sides(raw: dict[str, bytes | None], emb: torch.Tensor | None, kv: torch.Tensor | None, error) -> dict:
    """{"offset": (A, B) or None, "memory": (L, heads, d, d) or None} from the side files in ``raw``."""
    return {"offset": None if raw.get(OFFSET_FILE) is None else read_offset(raw[OFFSET_FILE], emb, error),
            "memory": None if raw.get(MEMORY_FILE) is None else read_memory(raw[MEMORY_FILE], kv, error)}
