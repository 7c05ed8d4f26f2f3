"""The prompt bank and the per-prompt prefix cache, used by the inference engine.

* ``PromptBank``: prompts by name. In-memory prompts (``add``) are pinned; prompts of its store
  (``store.Store``; a bank without one holds in-memory prompts only) are loaded on first use,
  checked against the model's fingerprint (``store.check_compatible``),
  kept in an LRU of at most ``max_resident`` entries, and re-read when their file changes on
  disk. A missing or broken prompt is a ``UserError`` naming the file; it never poisons the
  bank for the other prompts.
* ``PrefixCache``: for decoder-only models a prompt's keys/values in every layer do not depend
  on the input (causal attention, prompt first), so they are computed once per prompt version
  (``forward.prefix_cache``) and kept in an LRU bounded in bytes. A deep prompt is its keys and
  values already (``deep_prefix``: a cast and a move, no compute); its entry counts its bytes
  like any other.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from softprompt.config import UserError
from softprompt.forward import prefix_cache
from softprompt.prompt import is_deep
from softprompt.store import (
    Store,
    StoredPrompt,
    check_compatible,
    check_name,
    check_shape,
    read_prompt_dir,
)

if TYPE_CHECKING:
    from softprompt.models import Model


@dataclass
class PrefixKV:
    """A prompt's keys/values in every layer and its last hidden state (input-independent)."""

    keys: torch.Tensor  # (layers, kv, N, d)
    values: torch.Tensor  # (layers, kv, N, d)
    last: torch.Tensor | None  # (H,) hidden state of the last virtual token (predicts the first token); None: deep

    @property
    def n(self) -> int:
        return int(self.keys.shape[2])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.last) if t is not None)


def compute_prefix(model: Model, embeddings: torch.Tensor) -> PrefixKV:
    cache, last = prefix_cache(model, embeddings.to(model.dtype))
    keys = torch.stack([layer.keys[0] for layer in cache.layers])  # (layers, kv, N, d)
    values = torch.stack([layer.values[0] for layer in cache.layers])
    return PrefixKV(keys, values, last)


def deep_prefix(kv: torch.Tensor, device, dtype) -> PrefixKV:
    """A deep prompt (L, 2, kv, N, d) as a prefix: its keys and values as they are."""
    kv = kv.to(device=device, dtype=dtype)
    return PrefixKV(kv[:, 0], kv[:, 1], None)


IN_MEMORY = Path("<in memory>")  # the path of a prompt added by ``add``


class PromptBank:
    """Prompts by name: pinned in-memory ones, plus store prompts loaded lazily (LRU-bounded).

    A store prompt is re-read when its file changes on disk (checked by mtime and size on every
    lookup), so ``prompts rm`` or a retrain is seen by a long-running engine. ``get`` returns a
    version key that changes whenever the tensor does; the prefix cache is keyed by it.
    """

    def __init__(self, fingerprint: dict, max_resident: int = 64, force: bool = False,
                 kv_shape: tuple[int, int, int] | None = None, store: Store | None = None):
        self.fingerprint, self.max_resident, self.force, self.store = fingerprint, max_resident, force, store
        self.kv_shape = kv_shape  # (layers, kv heads, head dim) a deep prompt must fit; None: no deep prompts
        self._pinned: dict[str, tuple[StoredPrompt, tuple]] = {}
        self._resident: OrderedDict[str, tuple[StoredPrompt, tuple]] = OrderedDict()
        self._adds = 0

    def add(self, name: str, embeddings: torch.Tensor, meta: dict | None = None, offset=None, memory=None) -> None:
        """Register an in-memory (N, H) or deep (L, 2, kv, N, d) prompt under ``name`` (never evicted),
        with a stored prompt's side tensors (``offset``, ``memory``: ``sides.py``, validated by the store)."""
        h = self.fingerprint["hidden_size"]
        t = embeddings.detach().float()
        if is_deep(t):
            sp = StoredPrompt(name=name, path=IN_MEMORY, embeddings=None, meta=meta or {}, kv=t, memory=memory)
            check_shape(sp, h, self.kv_shape)
        elif t.dim() != 2 or t.shape[1] != h:
            raise UserError(f"prompt {name!r} has shape {tuple(t.shape)}; the model needs (N, {h})")
        else:
            sp = StoredPrompt(name=name, path=IN_MEMORY, embeddings=t, meta=meta or {}, offset=offset)
        self._adds += 1
        self._pinned[name] = (sp, ("pinned", self._adds))

    def get(self, name: str) -> tuple[StoredPrompt, tuple]:
        if name in self._pinned:
            return self._pinned[name]
        if self.store is None:
            raise UserError(f"prompt {check_name(name)!r} not found (no store: only prompts added in memory)")
        path = self.store.prompt_path(name)
        stamp = _stamp(path)
        hit = self._resident.get(name)
        if hit is not None and hit[1] == stamp:
            self._resident.move_to_end(name)
            return hit
        self._resident.pop(name, None)
        sp = read_prompt_dir(path, name)  # UserError naming the file if missing or broken
        check_compatible(sp, self.fingerprint, force=self.force, kv_shape=self.kv_shape)
        if sp.offset is not None and self.kv_shape is None:
            raise UserError(f"prompt {name!r} has an input offset (DePT); it needs a decoder-only model")
        self._resident[name] = (sp, stamp)
        while len(self._resident) > self.max_resident:
            self._resident.popitem(last=False)
        return self._resident[name]

    def resident(self) -> list[str]:
        return list(self._pinned) + list(self._resident)

    def resident_deep(self) -> int:
        """How many resident prompts are deep (per-layer keys/values)."""
        return sum(sp.kv is not None for sp, _ in list(self._pinned.values()) + list(self._resident.values()))

    def nbytes(self) -> int:
        items = list(self._pinned.values()) + list(self._resident.values())
        return sum(sp.nbytes for sp, _ in items)


def _stamp(path) -> tuple:
    try:
        st = os.stat(path / "adapter_model.safetensors")
        return (os.path.realpath(path), st.st_mtime_ns, st.st_size)  # the version directory changes on every write
    except OSError:
        return ("missing",)


class PrefixCache:
    """LRU of ``PrefixKV`` by (name, version), bounded in bytes (the newest entry always stays)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, PrefixKV] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: tuple, compute) -> PrefixKV:
        if key in self._items:
            self.hits += 1
            self._items.move_to_end(key)
            return self._items[key]
        self.misses += 1
        kv = compute()
        self._items[key] = kv
        while len(self._items) > 1 and self.nbytes > self.max_bytes:
            self._items.popitem(last=False)
        return kv

    @property
    def nbytes(self) -> int:
        return sum(kv.nbytes for kv in self._items.values())

    def __len__(self) -> int:
        return len(self._items)
