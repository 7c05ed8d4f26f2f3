"""Prompt directories on disk: the format, the one validator for what enters the store, and
atomic writes (the store's registry and locations are ``store.py``).

A saved prompt is a directory that PEFT itself loads as an adapter (the format: ``adapter.py``):

    adapter_config.json          shallow: PROMPT_TUNING (N, H); deep: PREFIX_TUNING (layers, kv heads, ...)
    adapter_model.safetensors    {"prompt_embeddings": (N, H) float32}, deep: (N, L*2*kv*d) float32
    softprompt.json              our metadata: kind (shallow | deep), reparam, base model identity and
                                 fingerprint, template, verbalizer, training config, seed, metrics, versions
    input_offset.safetensors,    side files (``sides.py``): DePT's input offset (shallow), PrefixMemory's
    prefix_memory.safetensors    per-head memory (deep); only when trained with them; PEFT ignores them

Invariants: every way in (training, import, HTTP upload, Ray sync) and every load passes one
validator (``read_prompt_dir``: field types, 1 <= N <= a limit, finite float values) that raises
``InvalidPrompt`` naming the field. A prompt directory is a symlink to its current version,
replaced under the name's lock by one rename (``durable.replace_dir``): a reader sees the old
prompt or the new one, whole. Checkpoints for ``--resume`` are written the same way: safetensors
for tensors, JSON for the rest.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import load_file, save_file

from softprompt import durable
from softprompt.adapter import (
    StoredPrompt,
    adapter_config,
    check_shape,
    deep_tensor,
    deep_to_peft,
    prefix_adapter_config,
)
from softprompt.config import UserError
from softprompt.prompt import is_deep
from softprompt.sides import SIDE_FILES, read_sides, side_files

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # always fullmatch: "x\n" is no name
PROMPT_KEY = "prompt_embeddings"
META = "softprompt.json"
CONFIG = "adapter_config.json"
TENSORS = "adapter_model.safetensors"
UPLOAD_PREFIX = "sp-upload-"  # staging folders of HTTP uploads in the temp directory: sp-upload-PID-*
MAX_ABS = 1e4  # trained prompts sit at the embedding scale (|x| ~ 1); 1e4 still fits float16 (max 65504)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class InvalidPrompt(UserError):
    """A prompt directory that must not enter the store or be served; ``field`` names what is wrong."""

    def __init__(self, name: str, field: str, problem: str):
        self.field = field
        super().__init__(f"prompt {name!r}: {field} {problem}")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise UserError(f"invalid prompt name {name!r}: use letters, digits, '.', '-', '_' (max 128)")
    return name




# ---------------------------------------------------------------- the validator

_OBJ, _STR, _INT, _NUM = "an object", "a string", "an integer", "a number"
META_FIELDS = {  # softprompt.json: field -> type (null is always allowed); other fields pass through
    "format": _INT, "base_model": _OBJ, "task": _STR, "mode": _STR, "template": _STR, "text_column": _STR,
    "target_column": _STR, "verbalizer": _OBJ, "data": _OBJ, "prompt": _OBJ, "training": _OBJ, "seed": _INT,
    "metrics": _OBJ, "versions": _OBJ, "created": _STR, "imported_from": _STR,
    "source": _STR, "peft_config": _OBJ, "transfer": _OBJ, "distributed": _OBJ, "kind": _STR, "reparam": _STR,
}
BASE_FIELDS = {"name": _STR, "path": _STR, "fingerprint": _OBJ}
FINGERPRINT_FIELDS = {"model_type": _STR, "hidden_size": _INT, "vocab_size": _INT, "embedding_sha256": _STR}
METRIC_FIELDS = {"best_eval": _OBJ, "final_train_loss": _NUM, "train_time_s": _NUM, "stopped": _STR}
CONFIG_FIELDS = {"peft_type": _STR, "task_type": _STR, "num_virtual_tokens": _INT, "token_dim": _INT,
                 "num_transformer_submodules": _INT, "num_layers": _INT, "num_attention_heads": _INT,
                 "base_model_name_or_path": _STR, "prompt_tuning_init": _STR}


def _kind(v) -> str:
    if v is None or isinstance(v, bool):
        return json.dumps(v)
    for t, word in ((dict, _OBJ), (list, "a list"), (str, _STR), (int, _INT), (float, _NUM)):
        if isinstance(v, t):
            return word
    return type(v).__name__


def _is(v, want: str) -> bool:
    if isinstance(v, bool):
        return False
    types = {_OBJ: dict, _STR: str, _INT: int, _NUM: (int, float)}[want]
    return isinstance(v, types) and (want != _NUM or math.isfinite(v))


def _check_fields(name: str, where: str, obj, spec: dict[str, str]) -> dict:
    if not isinstance(obj, dict):
        raise InvalidPrompt(name, where.rstrip(".:"), f"must be a JSON object, got {_kind(obj)}")
    for key, want in spec.items():
        v = obj.get(key)
        if v is not None and not _is(v, want):
            raise InvalidPrompt(name, f"{where}{key}", f"must be {want} or null, got {_kind(v)}")
    return obj


def validate_meta(name: str, meta) -> dict:
    """Type-check softprompt.json, every field a reader of the store relies on."""
    _check_fields(name, f"{META}:", meta, META_FIELDS)
    base = _check_fields(name, f"{META}:base_model.", meta.get("base_model") or {}, BASE_FIELDS)
    _check_fields(name, f"{META}:base_model.fingerprint.", base.get("fingerprint") or {}, FINGERPRINT_FIELDS)
    metrics = _check_fields(name, f"{META}:metrics.", meta.get("metrics") or {}, METRIC_FIELDS)
    _check_fields(name, f"{META}:metrics.best_eval.", metrics.get("best_eval") or {}, {"accuracy": _NUM})
    for label, word in (meta.get("verbalizer") or {}).items():
        if not isinstance(word, str) or not word:
            raise InvalidPrompt(name, f"{META}:verbalizer.{label}", f"must be a non-empty label word, got {_kind(word)}")
    return meta


def validate_config(name: str, cfg) -> dict:
    """Type-check adapter_config.json: a single PEFT prompt-tuning block in front of the input, or
    a prefix-tuning (deep) adapter (its geometry is checked against the tensor by ``deep_tensor``)."""
    _check_fields(name, f"{CONFIG}:", cfg, CONFIG_FIELDS)
    if cfg.get("peft_type") not in ("PROMPT_TUNING", "PREFIX_TUNING"):
        raise InvalidPrompt(name, f"{CONFIG}:peft_type", f"is {cfg.get('peft_type')!r}: a {cfg.get('peft_type')} "
                            "adapter, not PROMPT_TUNING or PREFIX_TUNING")
    if cfg["peft_type"] == "PREFIX_TUNING":
        return cfg
    subs = cfg.get("num_transformer_submodules") or 1
    if subs != 1 or cfg.get("task_type") not in (None, "CAUSAL_LM", "SEQ_2_SEQ_LM"):
        raise InvalidPrompt(name, f"{CONFIG}:task_type", f"{cfg.get('task_type')} with {subs} prompt blocks is not "
                            "supported (only a single prompt in front of the input)")
    return cfg


def validate_embeddings(name: str, tensors: dict, cfg: dict, max_tokens: int | None = None) -> torch.Tensor:
    """The stored (N, H) prompt (deep: PEFT's (N, L*2*kv*d)): floating point, 1 <= N <= max_tokens,
    finite, |x| <= MAX_ABS."""
    where = f"{TENSORS}:{PROMPT_KEY}"
    if PROMPT_KEY not in tensors:
        raise InvalidPrompt(name, TENSORS, f"has no {PROMPT_KEY!r} tensor")
    emb = tensors[PROMPT_KEY]
    if emb.dtype not in FLOAT_DTYPES:
        raise InvalidPrompt(name, where, f"has dtype {str(emb.dtype).removeprefix('torch.')}; a prompt is floating point")
    if emb.dim() != 2 or emb.shape[0] < 1 or emb.shape[1] < 1:
        raise InvalidPrompt(name, where, f"has shape {tuple(emb.shape)}, expected (N, H) with N, H >= 1")
    if max_tokens is not None and emb.shape[0] > max_tokens:
        raise InvalidPrompt(name, where, f"has {emb.shape[0]} virtual tokens; at most {max_tokens} are allowed here")
    sizes = (("num_virtual_tokens", emb.shape[0]),) + ((("token_dim", emb.shape[1]),) if cfg.get("peft_type") != "PREFIX_TUNING" else ())
    for key, size in sizes:
        if cfg.get(key) is not None and cfg[key] != size:
            raise InvalidPrompt(name, f"{CONFIG}:{key}", f"is {cfg[key]}, the tensor has {size}")
    emb = emb.float()
    if not torch.isfinite(emb).all():
        raise InvalidPrompt(name, where, "holds NaN or infinite values")
    if emb.abs().max() > MAX_ABS:
        raise InvalidPrompt(name, where, f"holds values of magnitude {emb.abs().max():.3g} (more than {MAX_ABS:g})")
    return emb


def _read_files(version: Path, name: str) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for fname in (CONFIG, TENSORS, META, *SIDE_FILES):
        try:
            out[fname] = (version / fname).read_bytes()
        except FileNotFoundError:
            if fname not in (META, *SIDE_FILES):
                raise
            out[fname] = None
        except IsADirectoryError:
            raise UserError(f"prompt {name!r}: {fname} is a directory") from None
    return out


def _no_constant(c: str):
    raise ValueError(f"{c} is not allowed in JSON")


def _parse_json(raw: bytes, name: str, path: Path):
    try:  # NaN and Infinity are refused, like json.dumps(allow_nan=False)
        return json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InvalidPrompt(name, path.name, f"is not valid JSON (corrupted?): {str(e)[:80]}") from None


def read_prompt_dir(path: Path, name: str | None = None, max_tokens: int | None = None) -> StoredPrompt:
    """Load and validate a prompt directory (ours or a PEFT prompt-tuning adapter); a clear
    ``UserError`` (``InvalidPrompt`` naming the field) if it is missing, broken or invalid."""
    path = Path(path)
    name = name or path.name
    for _ in range(8):  # a writer may swap the version between resolving and reading: read again
        version = durable.current_version(path)
        if version is None:
            raise UserError(f"prompt {name!r} not found ({path})")
        try:
            raw = _read_files(version, name)
            break
        except FileNotFoundError as e:
            if durable.current_version(path) == version:
                raise UserError(f"prompt {name!r} is incomplete: {Path(e.filename).name} is missing in {path}") from None
    else:
        raise durable.Busy(f"prompt {name!r} is being replaced; try again")
    cfg = validate_config(name, _parse_json(raw[CONFIG], name, path / CONFIG))
    try:
        tensors = load_tensors(raw[TENSORS])
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise UserError(f"prompt {name!r}: {path / TENSORS} is unreadable (corrupted or truncated: {e})") from None
    validate_embeddings(name, tensors, cfg, max_tokens)
    emb = tensors[PROMPT_KEY].float()  # (N, H), deep: (N, L*2*kv*d)
    kv = deep_tensor(cfg, emb, name) if cfg["peft_type"] == "PREFIX_TUNING" else None  # (L, 2, kv, N, d)
    meta = validate_meta(name, _parse_json(raw[META], name, path / META)) if raw[META] is not None else {}
    sides = read_sides(raw, None if kv is not None else emb, kv, lambda f, p: InvalidPrompt(name, f, p))
    return StoredPrompt(name=name, path=path, embeddings=None if kv is not None else emb, meta=meta, kv=kv,
                        config=cfg, file_bytes=sum(len(b) for b in raw.values() if b is not None), **sides)


def write_files(d: Path, files: dict[str, bytes | dict], tensors: dict[str, torch.Tensor]) -> None:
    for fname, content in files.items():
        data = json.dumps(content, indent=2, sort_keys=True, allow_nan=False).encode() if isinstance(content, dict) else content
        (d / fname).write_bytes(data)
    if tensors:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(d / TENSORS))


def write_dir_atomic(target: Path, files: dict[str, bytes | dict], tensors: dict[str, torch.Tensor],
                     exist_ok: bool = True) -> Path:
    """Replace ``target`` by a directory of these files (dicts as JSON) and one safetensors file:
    a new version and one symlink swap, under the name's lock (``durable.replace_dir``)."""
    return durable.replace_dir(Path(target), lambda d: write_files(d, files, tensors), exist_ok=exist_ok)


def save_prompt(path: Path, embeddings: torch.Tensor, meta: dict, model_path: str = "", model_config=None, **sides) -> Path:
    """Validate and store a shallow (N, H) or deep (L, 2, kv, N, d) prompt (the kind is in the
    tensor's shape), with its side tensors (``offset``, ``memory``: ``sides.py``); anything invalid is refused whole."""
    path = Path(path)
    if is_deep(embeddings):
        cfg, flat = prefix_adapter_config(embeddings, model_path), deep_to_peft(embeddings.detach())
    else:
        n, h = embeddings.shape if embeddings.dim() == 2 else (0, 0)
        cfg, flat = adapter_config(n, h, model_path, model_config), embeddings.detach()
    validate_embeddings(path.name, {PROMPT_KEY: flat}, cfg)
    meta = json.loads(json.dumps(meta, default=str), parse_constant=lambda c: None)  # JSON has no NaN: a diverged loss is null
    meta = validate_meta(path.name, meta)
    read_sides(extra := side_files(**sides), *((None, embeddings) if is_deep(embeddings) else (flat, None)), lambda f, p: InvalidPrompt(path.name, f, p))
    return write_dir_atomic(path, {CONFIG: cfg, META: meta, **extra}, {PROMPT_KEY: flat})


def check_compatible(stored: StoredPrompt, fingerprint: dict, force: bool = False,
                     kv_shape: tuple[int, int, int] | None = None) -> None:
    """Refuse a prompt trained on another base model (``force`` still needs fitting shapes, ``check_shape``)."""
    check_shape(stored, fingerprint["hidden_size"], kv_shape)
    theirs = (stored.meta.get("base_model") or {}).get("fingerprint")
    if theirs and not force and theirs != fingerprint:
        diff = [k for k in fingerprint if theirs.get(k) != fingerprint[k]]
        raise UserError(f"prompt {stored.name!r} was trained on another base model (differs in {', '.join(diff)}); "
                        "use --force to load it anyway")


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], state: dict) -> None:
    write_dir_atomic(Path(path), {"state.json": state}, tensors)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    path = Path(path)
    if not (path / "state.json").is_file():
        return None
    version = durable.current_version(path)  # read both files from one version
    try:
        return load_file(str(version / TENSORS)), json.loads((version / "state.json").read_text())
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {path} is unreadable ({e}); delete it to start over") from None


# ---------------------------------------------------------------- registry: list, show, rm, export, import
