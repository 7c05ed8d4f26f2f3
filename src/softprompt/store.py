"""The prompt store: one object, ``Store``, owns a store root and everything under it.

    <home>/prompts/<name>     stored prompts (directories in the format of ``promptdir.py``)
    <home>/models/<name>      converted models (the embedded GGUF default, ``models.resolve``)
    <home>/runs/<name>        training runs (the epoch checkpoint ``--resume`` reads)
    <data root>               task recipes' files (default ``<home>/data``); ``<data root>/hub`` is
                              the ``datasets`` cache for recipes fetched from the Hugging Face hub

Every reader and writer of the store takes a ``Store`` (the engine, the server, training, the
experiments, Ray replicas, benchmarks); nothing reads a process-wide location, so one process can
use two stores. The CLI builds the one it uses from flags, then the environment, then defaults
(``cli/environ.py``). A ``Store`` is a frozen dataclass of paths: it pickles (Ray sends it to
each replica) and compares by value.

Invariants: listing reports a bad entry (``status: invalid``), never fails; the first use of a
store in a process sweeps what killed writers left (``durable.sweep``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from softprompt import durable
from softprompt.adapter import (  # noqa: F401 - re-exported with the format
    StoredPrompt,
    adapter_config,
    check_shape,
    deep_tensor,
    deep_to_peft,
)
from softprompt.config import UserError
from softprompt.promptdir import (  # noqa: F401 - re-exported: the format is part of the store's surface
    CONFIG,
    META,
    NAME_RE,
    PROMPT_KEY,
    TENSORS,
    UPLOAD_PREFIX,
    InvalidPrompt,
    check_compatible,
    check_name,
    load_checkpoint,
    prefix_adapter_config,
    read_prompt_dir,
    save_checkpoint,
    save_prompt,
    validate_config,
    validate_embeddings,
    validate_meta,
    write_dir_atomic,
    write_files,
)
from softprompt.sides import SIDE_FILES, side_files  # noqa: F401 - SIDE_FILES re-exported with the format

_SWEPT: set[Path] = set()


@dataclass(frozen=True)
class Store:
    """A store root and the data root (paths only: cheap, picklable, compared by value)."""

    home: Path  # root of prompts/, models/, runs/
    data: Path | None = None  # where task recipes find their files; None = <home>/data
    hub_cache: Path | None = None  # the Hugging Face hub cache for models by id; None = the library's default
    offline: bool = False  # never reach the Hugging Face hub (models and data sets): only its caches

    def __post_init__(self) -> None:
        object.__setattr__(self, "home", Path(self.home))
        object.__setattr__(self, "data", Path(self.data) if self.data is not None else Path(self.home) / "data")
        if self.hub_cache is not None:
            object.__setattr__(self, "hub_cache", Path(self.hub_cache))

    @property
    def data_root(self) -> Path:
        return self.data  # type: ignore[return-value]  # set in __post_init__

    @property
    def datasets_cache(self) -> Path:
        """Where recipes fetched from the hub through ``datasets`` are cached."""
        return self.data_root / "hub"

    @property
    def models(self) -> Path:
        return self.home / "models"

    @property
    def runs(self) -> Path:
        return self.home / "runs"

    def prompts_dir(self) -> Path:
        """The prompts' folder; the first use in a process sweeps what killed writers left."""
        root = self.home / "prompts"
        if root not in _SWEPT:
            _SWEPT.add(root)
            for d in (root, self.models, *self.runs.glob("*/")):
                durable.sweep(d)
            durable.sweep_temp(UPLOAD_PREFIX)
        return root

    def prompt_path(self, name: str) -> Path:
        return self.prompts_dir() / check_name(name)

    def run_dir(self, name: str) -> Path:
        """A training run's folder (its ``checkpoint`` for ``--resume``)."""
        return self.runs / check_name(name)

    def save_prompt(self, name: str, embeddings, meta: dict, model_path: str = "", model_config=None, **sides) -> Path:
        """Validate and store a prompt under ``name``, with its side tensors (``promptdir.save_prompt``)."""
        return save_prompt(self.prompt_path(name), embeddings, meta, model_path, model_config, **sides)

    def load_prompt(self, name: str) -> StoredPrompt:
        return read_prompt_dir(self.prompt_path(name), name)

    def prompt_kind(self, name: str) -> str | None:
        """"deep" or "shallow" from the adapter config alone (cheap); None if unreadable."""
        try:
            peft_type = json.loads((self.prompt_path(name) / CONFIG).read_text()).get("peft_type")
        except (OSError, ValueError, AttributeError):
            return None
        return {"PREFIX_TUNING": "deep", "PROMPT_TUNING": "shallow"}.get(peft_type)

    def list_prompts(self) -> list[str]:
        root = self.prompts_dir()
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if NAME_RE.fullmatch(p.name) and p.is_dir())

    def prompt_summary(self, name: str) -> dict:
        """One registry entry for ``prompts list``/``show``; an invalid prompt is reported
        (``status: invalid`` and the reason), never raised."""
        path = self.prompt_path(name)
        try:
            sp = read_prompt_dir(path, name)
        except (UserError, OSError) as e:
            return {"name": name, "status": "invalid", "reason": str(e).replace("\n", " "), "path": str(path)}
        meta = sp.meta
        base = meta.get("base_model") or {}
        best = (meta.get("metrics") or {}).get("best_eval") or {}
        return {
            "name": name, "status": "ok", "path": str(path),
            "kind": sp.kind, "reparam": meta.get("reparam"), "num_virtual_tokens": sp.num_virtual_tokens,
            "hidden_size": None if sp.kv is not None else int(sp.embeddings.shape[1]),
            "kv_shape": None if sp.kv is None else [int(sp.kv.shape[i]) for i in (0, 2, 4)], "tensor_bytes": sp.nbytes,
            "base_model": base.get("name"), "fingerprint": base.get("fingerprint"),
            "task": meta.get("task"), "mode": meta.get("mode"), "template": meta.get("template"),
            "target_column": meta.get("target_column"), "text_column": meta.get("text_column"),
            "verbalizer": meta.get("verbalizer"), "accuracy": best.get("accuracy"), "metrics": meta.get("metrics"),
            "created": meta.get("created"), "imported_from": meta.get("imported_from"), "bytes": sp.file_bytes,
        }

    def remove_prompt(self, name: str) -> Path:
        """Delete a stored prompt (invalid ones too): the name vanishes at once, then its files."""
        path = self.prompt_path(name)
        if not durable.remove_dir(path):
            raise UserError(f"prompt {name!r} not found ({path})")
        return path

    def export_prompt(self, name: str, dest: Path) -> Path:
        """Copy a stored prompt to ``dest`` (a new or empty directory): a PEFT adapter directory."""
        sp = self.load_prompt(name)  # refuses an invalid prompt with its reason
        dest = Path(dest)
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise UserError(f"export target {dest} exists and is not an empty directory")
        files = {CONFIG: sp.config, **({META: sp.meta} if sp.meta else {}), **side_files(sp.offset, sp.memory)}
        with durable.new_dir(dest) as d:
            write_files(d, files, {PROMPT_KEY: sp.peft_tensor})
        return dest

    def import_prompt(self, src: Path, name: str | None = None, fingerprint: dict | None = None,
                      model_name: str | None = None, overwrite: bool = False,
                      kv_shape: tuple[int, int, int] | None = None, max_tokens: int | None = None) -> StoredPrompt:
        """Validate a prompt directory (ours, or a PEFT prompt-tuning or prefix-tuning adapter) and copy
        it into the store.

        A PEFT adapter has no ``softprompt.json``: one is written with what is known. Without a
        model (``fingerprint`` None) the base model is unknown and no fingerprint check happens
        later; with one, the shapes must fit (``check_shape``: hidden size, or ``kv_shape`` for a deep
        prompt) and its fingerprint is recorded. A prefix-tuning adapter trained with a projection
        (``prefix_projection``) is stored by PEFT already projected; its config is rewritten as the
        plain prefix it is. ``max_tokens`` bounds N (the server passes its ``--max-prompt-tokens``).
        """
        src = Path(src)
        name = check_name(name or src.name)
        sp = read_prompt_dir(src, name, max_tokens)
        meta = dict(sp.meta) if sp.meta else _imported_meta(sp.config, sp)
        meta["imported_from"] = str(src.resolve())
        if fingerprint is not None:
            check_shape(sp, fingerprint["hidden_size"], kv_shape)
            if not (meta.get("base_model") or {}).get("fingerprint"):
                meta["base_model"] = {"name": model_name, "path": model_name, "fingerprint": fingerprint}
        cfg = prefix_adapter_config(sp.kv, sp.config.get("base_model_name_or_path") or "") if sp.kv is not None else sp.config
        try:
            files = {CONFIG: cfg, META: meta, **side_files(sp.offset, sp.memory)}
            write_dir_atomic(self.prompt_path(name), files, {PROMPT_KEY: sp.peft_tensor}, exist_ok=overwrite)
        except FileExistsError:
            raise UserError(f"prompt {name!r} already exists; remove it first or import under --name") from None
        return self.load_prompt(name)


def _imported_meta(cfg: dict, sp: StoredPrompt) -> dict:
    base = cfg.get("base_model_name_or_path")
    return {"format": 1, "kind": sp.kind, "reparam": "mlp" if cfg.get("prefix_projection") else None, "base_model": {"name": base, "path": base, "fingerprint": None}, "task": None, "mode": None,
            "template": None, "text_column": None, "target_column": None, "verbalizer": None, "source": "peft",
            "peft_config": cfg}
