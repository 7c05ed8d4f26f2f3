"""Prompt directories and the prompt store.

A saved prompt is a directory that PEFT itself loads as a prompt-tuning adapter:

    adapter_config.json          peft_type PROMPT_TUNING, task_type CAUSAL_LM (T5: SEQ_2_SEQ_LM), N, H, ...
    adapter_model.safetensors    {"prompt_embeddings": (N, H) float32}
    softprompt.json              our metadata: base model identity and fingerprint, template,
                                 verbalizer, training config, seed, metrics, versions

Every write goes to a temporary directory beside the target and is renamed into place, so a
reader never sees half a prompt. Names are letters, digits and ``.-_`` (no path traversal).
Checkpoints for ``--resume`` use the same rule: safetensors for tensors, JSON for the rest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from softprompt.config import UserError, home

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
PROMPT_KEY = "prompt_embeddings"
META = "softprompt.json"


class InvalidPrompt(UserError):
    """A prompt that must not be served; ``field`` names what is wrong."""

    def __init__(self, name: str, field: str, problem: str):
        self.field = field
        super().__init__(f"prompt {name!r}: {field} {problem}")


def validate_meta(name: str, meta) -> dict:
    """The softprompt.json fields a reader relies on: an object; template a string; verbalizer
    an object of non-empty label words; metrics an object."""
    if not isinstance(meta, dict):
        raise InvalidPrompt(name, META, "must be a JSON object")
    for key, kind in (("template", str), ("verbalizer", dict), ("metrics", dict)):
        if meta.get(key) is not None and not isinstance(meta[key], kind):
            raise InvalidPrompt(name, f"{META}:{key}", f"must be {'a string' if kind is str else 'an object'} or null")
    for label, word in (meta.get("verbalizer") or {}).items():
        if not isinstance(word, str) or not word:
            raise InvalidPrompt(name, f"{META}:verbalizer.{label}", "must be a non-empty label word")
    return meta


def validate_embeddings(name: str, tensors: dict, cfg: dict, max_tokens: int | None = None) -> torch.Tensor:
    """The (N, H) prompt: floating point, 1 <= N <= max_tokens, finite values."""
    where = f"adapter_model.safetensors:{PROMPT_KEY}"
    emb = tensors.get(PROMPT_KEY)
    if emb is None:
        raise InvalidPrompt(name, "adapter_model.safetensors", f"has no {PROMPT_KEY!r} tensor")
    if not emb.is_floating_point():
        raise InvalidPrompt(name, where, f"has dtype {emb.dtype}; a prompt is floating point")
    if emb.dim() != 2 or emb.shape[0] < 1 or emb.shape[1] < 1:
        raise InvalidPrompt(name, where, f"has shape {tuple(emb.shape)}, expected (N, H) with N, H >= 1")
    if max_tokens is not None and emb.shape[0] > max_tokens:
        raise InvalidPrompt(name, where, f"has {emb.shape[0]} virtual tokens; at most {max_tokens} are allowed here")
    if not torch.isfinite(emb).all():
        raise InvalidPrompt(name, where, "holds NaN or infinite values")
    return emb


def prompts_dir() -> Path:
    return home() / "prompts"


def check_name(name: str) -> str:
    if not NAME_RE.match(name or "") or ".." in name:
        raise UserError(f"invalid prompt name {name!r}: use letters, digits, '.', '-', '_' (max 128)")
    return name


def prompt_path(name: str) -> Path:
    return prompts_dir() / check_name(name)


@dataclass
class StoredPrompt:
    name: str
    path: Path
    embeddings: torch.Tensor  # (N, H) float32
    meta: dict

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.embeddings.shape[0])


def adapter_config(n: int, h: int, model_path: str, model_config=None, init: str = "RANDOM") -> dict:
    """The adapter_config.json that PEFT's PromptTuningConfig writes: a causal LM, or for an
    encoder-decoder (T5) a SEQ_2_SEQ_LM adapter whose one prompt block goes in front of the
    encoder input, where softprompt puts it (``seq2seq.py``)."""
    cfg = model_config
    seq2seq = bool(getattr(cfg, "is_encoder_decoder", False))
    return {
        "peft_type": "PROMPT_TUNING",
        "task_type": "SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM",
        "num_virtual_tokens": n,
        "token_dim": h,
        "num_transformer_submodules": 1,
        "num_attention_heads": getattr(cfg, "num_attention_heads", None),
        "num_layers": getattr(cfg, "num_hidden_layers", None),
        "prompt_tuning_init": init,
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
        "base_model_name_or_path": str(model_path),
        "revision": None,
        "inference_mode": True,
        "modules_to_save": None,
        "auto_mapping": None,
    }


def write_dir_atomic(target: Path, files: dict[str, bytes | dict], tensors: dict[str, torch.Tensor]) -> Path:
    """Write files (bytes, or dicts as JSON) and one safetensors file into ``target`` atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        for fname, content in files.items():
            data = json.dumps(content, indent=2, sort_keys=True).encode() if isinstance(content, dict) else content
            (tmp / fname).write_bytes(data)
        if tensors:
            save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "adapter_model.safetensors"))
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def save_prompt(path: Path, embeddings: torch.Tensor, meta: dict, model_path: str = "", model_config=None) -> Path:
    n, h = embeddings.shape
    files = {"adapter_config.json": adapter_config(n, h, model_path, model_config), META: meta}
    return write_dir_atomic(Path(path), files, {PROMPT_KEY: embeddings})


def read_prompt_dir(path: Path, name: str | None = None) -> StoredPrompt:
    """Load a prompt directory (ours or a PEFT prompt-tuning adapter); clear errors if broken."""
    path = Path(path)
    name = name or path.name
    cfg_file, st_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not path.is_dir():
        raise UserError(f"prompt {name!r} not found ({path})")
    for f in (cfg_file, st_file):
        if not f.is_file():
            raise UserError(f"prompt {name!r} is incomplete: {f.name} is missing in {path}")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"prompt {name!r}: {cfg_file} is not valid JSON (corrupted?)") from None
    if cfg.get("peft_type") != "PROMPT_TUNING":
        raise UserError(f"prompt {name!r}: {cfg_file.name} is a {cfg.get('peft_type')} adapter, not PROMPT_TUNING")
    try:
        tensors = load_file(str(st_file))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"prompt {name!r}: {st_file} is unreadable (corrupted or truncated: {e})") from None
    if PROMPT_KEY not in tensors:
        raise UserError(f"prompt {name!r}: {st_file.name} has no {PROMPT_KEY!r} tensor")
    emb = tensors[PROMPT_KEY].float()
    if emb.dim() != 2:
        raise UserError(f"prompt {name!r}: {PROMPT_KEY} has shape {tuple(emb.shape)}, expected (N, H)")
    meta = {}
    if (path / META).is_file():
        try:
            meta = json.loads((path / META).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"prompt {name!r}: {path / META} is not valid JSON (corrupted?)") from None
    return StoredPrompt(name=name, path=path, embeddings=emb, meta=meta)


def load_prompt(name: str) -> StoredPrompt:
    return read_prompt_dir(prompt_path(name), name)


def list_prompts() -> list[str]:
    root = prompts_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and NAME_RE.match(p.name))


def check_compatible(stored: StoredPrompt, fingerprint: dict, force: bool = False) -> None:
    """Refuse a prompt trained on another base model (``force`` still needs equal H)."""
    h = fingerprint["hidden_size"]
    if stored.embeddings.shape[1] != h:
        raise UserError(
            f"prompt {stored.name!r} has hidden size {stored.embeddings.shape[1]}, the model has {h}; it was trained for another model"
        )
    theirs = stored.meta.get("base_model", {}).get("fingerprint")
    if theirs and not force and theirs != fingerprint:
        diff = [k for k in fingerprint if theirs.get(k) != fingerprint[k]]
        raise UserError(
            f"prompt {stored.name!r} was trained on another base model (differs in {', '.join(diff)}); use --force to load it anyway"
        )


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], state: dict) -> None:
    write_dir_atomic(Path(path), {"state.json": state}, tensors)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    path = Path(path)
    if not (path / "state.json").is_file():
        return None
    try:
        return load_file(str(path / "adapter_model.safetensors")), json.loads((path / "state.json").read_text())
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {path} is unreadable ({e}); delete it to start over") from None


# ---------------------------------------------------------------- registry: list, show, rm, export, import


def prompt_summary(name: str) -> dict:
    """One registry entry for ``prompts list``/``show``; a broken prompt is reported, not raised."""
    path = prompt_path(name)
    try:
        sp = read_prompt_dir(path, name)
    except UserError as e:
        return {"name": name, "status": "broken", "error": str(e), "path": str(path)}
    meta = sp.meta
    base = meta.get("base_model") or {}
    best = (meta.get("metrics") or {}).get("best_eval") or {}
    return {
        "name": name, "status": "ok", "path": str(path),
        "num_virtual_tokens": sp.num_virtual_tokens, "hidden_size": int(sp.embeddings.shape[1]),
        "base_model": base.get("name"), "fingerprint": base.get("fingerprint"),
        "task": meta.get("task"), "mode": meta.get("mode"), "template": meta.get("template"),
        "target_column": meta.get("target_column"), "text_column": meta.get("text_column"),
        "verbalizer": meta.get("verbalizer"), "accuracy": best.get("accuracy"),
        "created": meta.get("created"), "imported_from": meta.get("imported_from"),
        "bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
    }


def remove_prompt(name: str) -> Path:
    """Delete a stored prompt (broken ones too): renamed aside first, so it vanishes at once."""
    path = prompt_path(name)
    if not path.is_dir():
        raise UserError(f"prompt {name!r} not found ({path})")
    trash = path.with_name(f".{path.name}.rm-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
    return path


def export_prompt(name: str, dest: Path) -> Path:
    """Copy a stored prompt to ``dest`` (a new or empty directory): a PEFT adapter directory."""
    sp = load_prompt(name)  # refuses a broken prompt with its reason
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UserError(f"export target {dest} exists and is not an empty directory")
    files = {f.name: f.read_bytes() for f in sp.path.iterdir() if f.is_file() and f.name != "adapter_model.safetensors"}
    if dest.is_dir():
        dest.rmdir()
    return write_dir_atomic(dest, files, {PROMPT_KEY: sp.embeddings})


def import_prompt(src: Path, name: str | None = None, fingerprint: dict | None = None,
                  model_name: str | None = None, overwrite: bool = False) -> StoredPrompt:
    """Copy a prompt directory (ours, or a PEFT prompt-tuning adapter) into the store.

    A PEFT adapter has no ``softprompt.json``: one is written with what is known. Without a
    model (``fingerprint`` None) the base model is unknown and no fingerprint check happens
    later; with one, the hidden size must agree and its fingerprint is recorded.
    """
    src = Path(src)
    name = check_name(name or src.name)
    sp = read_prompt_dir(src, name)
    cfg = json.loads((src / "adapter_config.json").read_text())
    subs = cfg.get("num_transformer_submodules") or 1
    if subs != 1 or cfg.get("task_type") not in (None, "CAUSAL_LM", "SEQ_2_SEQ_LM"):
        raise UserError(f"{src}: a {cfg.get('task_type')} adapter with {subs} prompt blocks is not supported "
                        "(only a single prompt in front of the input)")
    n_cfg = cfg.get("num_virtual_tokens")
    if n_cfg is not None and int(n_cfg) != sp.num_virtual_tokens:
        raise UserError(f"{src}: adapter_config.json says {n_cfg} virtual tokens, the tensor has {sp.num_virtual_tokens}")
    target = prompt_path(name)
    if target.exists() and not overwrite:
        raise UserError(f"prompt {name!r} already exists; remove it first or import under --name")
    meta = dict(sp.meta) if sp.meta else _imported_meta(cfg)
    meta["imported_from"] = str(src.resolve())
    if fingerprint is not None:
        if fingerprint["hidden_size"] != sp.embeddings.shape[1]:
            raise UserError(f"{src}: prompt has hidden size {sp.embeddings.shape[1]}, the model has {fingerprint['hidden_size']}")
        if not (meta.get("base_model") or {}).get("fingerprint"):
            meta["base_model"] = {"name": model_name, "path": model_name, "fingerprint": fingerprint}
    files = {"adapter_config.json": cfg, META: meta}
    write_dir_atomic(target, files, {PROMPT_KEY: sp.embeddings})
    return load_prompt(name)


def _imported_meta(cfg: dict) -> dict:
    return {
        "format": 1,
        "base_model": {"name": cfg.get("base_model_name_or_path"), "path": cfg.get("base_model_name_or_path"),
                       "fingerprint": None},
        "task": None, "mode": None, "template": None, "text_column": None, "target_column": None,
        "verbalizer": None, "source": "peft", "peft_config": cfg,
    }
