"""Prompt directories and the prompt store.

A saved prompt is a directory that PEFT itself loads as an adapter:

    adapter_config.json          shallow: peft_type PROMPT_TUNING, task_type CAUSAL_LM (T5: SEQ_2_SEQ_LM), N, H
                                 deep: peft_type PREFIX_TUNING, num_layers L, num_attention_heads = kv heads,
                                 token_dim = kv heads x head dim (PEFT's grouped-query layout), no projection
    adapter_model.safetensors    {"prompt_embeddings": (N, H) float32}, deep: (N, L*2*kv*d) float32
    softprompt.json              our metadata: kind (shallow | deep), reparam, base model identity and
                                 fingerprint, template, verbalizer, training config, seed, metrics, versions

A deep prompt is held as (L, 2, kv, N, d) (``prompt.is_deep``); PEFT's flat row n is
``[layer 0 keys, layer 0 values, layer 1 keys, ...]``, each (kv, d) flattened, which is how
``PeftModel.get_prompt`` views it. A training-time reparameterisation is folded before saving:
the artifact is always the plain tensor.

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
from softprompt.prompt import is_deep

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
PROMPT_KEY = "prompt_embeddings"
META = "softprompt.json"


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
    embeddings: torch.Tensor | None  # (N, H) float32; None for a deep prompt
    meta: dict
    kv: torch.Tensor | None = None  # (L, 2, kv, N, d) float32 for a deep prompt

    @property
    def kind(self) -> str:
        return "deep" if self.kv is not None else "shallow"

    @property
    def tensor(self) -> torch.Tensor:
        """What the forward takes: (N, H) or (L, 2, kv, N, d)."""
        return self.kv if self.kv is not None else self.embeddings

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.kv.shape[3]) if self.kv is not None else int(self.embeddings.shape[0])

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def shallow(self, what: str) -> torch.Tensor:
        """The (N, H) embeddings, or one line saying that ``what`` needs a shallow prompt."""
        if self.kv is not None:
            raise UserError(f"prompt {self.name!r} is a deep prompt (per-layer keys/values): {what} needs a shallow "
                            "(N, H) prompt")
        return self.embeddings


def deep_to_peft(kv: torch.Tensor) -> torch.Tensor:
    """(L, 2, kv, N, d) -> PEFT's prefix-tuning ``prompt_embeddings`` (N, L*2*kv*d)."""
    L, two, h, n, d = kv.shape
    return kv.permute(3, 0, 1, 2, 4).reshape(n, L * two * h * d)


def deep_from_peft(flat: torch.Tensor, layers: int, heads: int, head_dim: int) -> torch.Tensor:
    """PEFT's (N, L*2*kv*d) -> (L, 2, kv, N, d)."""
    return flat.reshape(flat.shape[0], layers, 2, heads, head_dim).permute(1, 2, 3, 0, 4).contiguous()


def prefix_adapter_config(kv: torch.Tensor, model_path: str) -> dict:
    """The adapter_config.json of PEFT's PrefixTuningConfig for a decoder-only model (after PEFT's
    grouped-query adjustment: heads = key/value heads, token_dim = kv heads x head dim)."""
    L, _, h, n, d = kv.shape
    return {
        "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": int(n),
        "token_dim": int(h * d), "num_transformer_submodules": 1, "num_attention_heads": int(h),
        "num_layers": int(L), "encoder_hidden_size": int(h * d), "prefix_projection": False,
        "base_model_name_or_path": str(model_path), "revision": None, "inference_mode": True,
        "modules_to_save": None, "auto_mapping": None,
    }


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
    """Write a shallow (N, H) or deep (L, 2, kv, N, d) prompt directory (the kind is in the tensor's shape)."""
    if is_deep(embeddings):
        files = {"adapter_config.json": prefix_adapter_config(embeddings, model_path), META: meta}
        return write_dir_atomic(Path(path), files, {PROMPT_KEY: deep_to_peft(embeddings)})
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
    if cfg.get("peft_type") not in ("PROMPT_TUNING", "PREFIX_TUNING"):
        raise UserError(f"prompt {name!r}: {cfg_file.name} is a {cfg.get('peft_type')} adapter, "
                        "not PROMPT_TUNING or PREFIX_TUNING")
    try:
        tensors = load_file(str(st_file))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"prompt {name!r}: {st_file} is unreadable (corrupted or truncated: {e})") from None
    if PROMPT_KEY not in tensors:
        raise UserError(f"prompt {name!r}: {st_file.name} has no {PROMPT_KEY!r} tensor")
    emb = tensors[PROMPT_KEY].float()
    if emb.dim() != 2:
        raise UserError(f"prompt {name!r}: {PROMPT_KEY} has shape {tuple(emb.shape)}, expected (N, H)")
    if not bool(torch.isfinite(emb).all()):
        raise UserError(f"prompt {name!r}: {PROMPT_KEY} holds NaN or infinite values")
    kv = _deep_tensor(cfg, emb, name) if cfg.get("peft_type") == "PREFIX_TUNING" else None
    meta = {}
    if (path / META).is_file():
        try:
            meta = json.loads((path / META).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"prompt {name!r}: {path / META} is not valid JSON (corrupted?)") from None
    return StoredPrompt(name=name, path=path, embeddings=None if kv is not None else emb, meta=meta, kv=kv)


def _deep_tensor(cfg: dict, flat: torch.Tensor, name: str) -> torch.Tensor:
    """A PREFIX_TUNING adapter's (N, L*2*kv*d) as (L, 2, kv, N, d), checked against its config."""
    if (cfg.get("num_transformer_submodules") or 1) != 1 or cfg.get("task_type") not in (None, "CAUSAL_LM"):
        raise UserError(f"prompt {name!r}: a {cfg.get('task_type')} prefix-tuning adapter is not supported "
                        "(deep prompts are for decoder-only causal language models)")
    try:
        L, heads, dim, n = (int(cfg[k]) for k in ("num_layers", "num_attention_heads", "token_dim", "num_virtual_tokens"))
    except (KeyError, TypeError, ValueError):
        raise UserError(f"prompt {name!r}: adapter_config.json lacks num_layers, num_attention_heads, token_dim "
                        "or num_virtual_tokens") from None
    if heads <= 0 or dim % heads or tuple(flat.shape) != (n, L * 2 * dim):
        raise UserError(f"prompt {name!r}: {PROMPT_KEY} has shape {tuple(flat.shape)}, adapter_config.json "
                        f"says ({n}, {L} layers x 2 x {dim})")
    return deep_from_peft(flat, L, heads, dim // heads)


def load_prompt(name: str) -> StoredPrompt:
    return read_prompt_dir(prompt_path(name), name)


def prompt_kind(name: str) -> str | None:
    """"deep" or "shallow" from the adapter config alone (cheap); None if unreadable."""
    try:
        peft_type = json.loads((prompt_path(name) / "adapter_config.json").read_text()).get("peft_type")
    except (OSError, ValueError, AttributeError):
        return None
    return {"PREFIX_TUNING": "deep", "PROMPT_TUNING": "shallow"}.get(peft_type)


def list_prompts() -> list[str]:
    root = prompts_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and NAME_RE.match(p.name))


def check_shape(stored: StoredPrompt, hidden_size: int, kv_shape: tuple[int, int, int] | None) -> None:
    """One line if the prompt's shape does not fit the model: hidden size H for a shallow prompt,
    the key/value geometry (layers, kv heads, head dim; None: no decoder-only cache, as T5) for a deep one."""
    if stored.kv is None:
        if stored.embeddings.shape[1] != hidden_size:
            raise UserError(f"prompt {stored.name!r} has hidden size {stored.embeddings.shape[1]}, the model has "
                            f"{hidden_size}; it was trained for another model")
        return
    theirs = tuple(int(stored.kv.shape[i]) for i in (0, 2, 4))
    if kv_shape is None:
        raise UserError(f"prompt {stored.name!r} is a deep prompt (per-layer keys/values); this model has no "
                        "decoder-only key/value cache to put it in")
    if theirs != tuple(kv_shape):
        raise UserError(f"prompt {stored.name!r} is a deep prompt for layers x kv heads x head dim {theirs}; "
                        f"the model has {tuple(kv_shape)}: it was trained for another model")


def check_compatible(stored: StoredPrompt, fingerprint: dict, force: bool = False,
                     kv_shape: tuple[int, int, int] | None = None) -> None:
    """Refuse a prompt trained on another base model (``force`` still needs fitting shapes, ``check_shape``)."""
    check_shape(stored, fingerprint["hidden_size"], kv_shape)
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
        "kind": sp.kind, "reparam": meta.get("reparam"), "num_virtual_tokens": sp.num_virtual_tokens,
        "hidden_size": None if sp.kv is not None else int(sp.embeddings.shape[1]),
        "kv_shape": None if sp.kv is None else [int(sp.kv.shape[i]) for i in (0, 2, 4)],
        "tensor_bytes": sp.nbytes,
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
    return write_dir_atomic(dest, files, {PROMPT_KEY: _flat(sp)})


def _flat(sp: StoredPrompt) -> torch.Tensor:
    """The tensor as PEFT stores it."""
    return deep_to_peft(sp.kv) if sp.kv is not None else sp.embeddings


def import_prompt(src: Path, name: str | None = None, fingerprint: dict | None = None,
                  model_name: str | None = None, overwrite: bool = False,
                  kv_shape: tuple[int, int, int] | None = None) -> StoredPrompt:
    """Copy a prompt directory (ours, or a PEFT prompt-tuning or prefix-tuning adapter) into the store.

    A PEFT adapter has no ``softprompt.json``: one is written with what is known. Without a
    model (``fingerprint`` None) the base model is unknown and no fingerprint check happens
    later; with one, the shapes must fit (``check_shape``: hidden size, or ``kv_shape`` for a deep
    prompt) and its fingerprint is recorded. A prefix-tuning adapter trained with a projection
    (``prefix_projection``) is stored by PEFT already projected; its config is rewritten as the
    plain prefix it is.
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
    meta = dict(sp.meta) if sp.meta else _imported_meta(cfg, sp)
    meta["imported_from"] = str(src.resolve())
    if fingerprint is not None:
        check_shape(sp, fingerprint["hidden_size"], kv_shape)
        if not (meta.get("base_model") or {}).get("fingerprint"):
            meta["base_model"] = {"name": model_name, "path": model_name, "fingerprint": fingerprint}
    if sp.kv is not None:
        cfg = prefix_adapter_config(sp.kv, cfg.get("base_model_name_or_path") or "")
    files = {"adapter_config.json": cfg, META: meta}
    write_dir_atomic(target, files, {PROMPT_KEY: _flat(sp)})
    return load_prompt(name)


def _imported_meta(cfg: dict, sp: StoredPrompt) -> dict:
    return {
        "format": 1, "kind": sp.kind, "reparam": "mlp" if cfg.get("prefix_projection") else None,
        "base_model": {"name": cfg.get("base_model_name_or_path"), "path": cfg.get("base_model_name_or_path"),
                       "fingerprint": None},
        "task": None, "mode": None, "template": None, "text_column": None, "target_column": None,
        "verbalizer": None, "source": "peft", "peft_config": cfg,
    }
