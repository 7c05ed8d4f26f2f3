"""transformers calls whose names differ between the releases softprompt supports (5.23, 5.24).

One home for them, so the rest of the code calls the model the same way on every release and
none of them warns: 5.24 renamed the forward's ``past_key_values`` argument and output to
``cache`` (the old names still work there, with a deprecation warning, until 5.40).
"""

from __future__ import annotations

import functools
import inspect

import torch


@functools.cache
def _cache_kw(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def cache_kw(model: torch.nn.Module, cache) -> dict:
    """``{name: cache}`` for a model's forward: transformers 5.24 renamed ``past_key_values`` to
    ``cache`` (the old name still works there, with a deprecation warning); this passes the name
    the installed release declares, so no release warns."""
    return {_cache_kw(type(model)): cache}


def returned_cache(out):
    """The key/value cache a forward returned (``out.cache`` from 5.24, ``out.past_key_values``
    before; reading the old name on a new release warns, so it is read only where it exists)."""
    cache = out.get("cache")
    return cache if cache is not None else out.get("past_key_values")
