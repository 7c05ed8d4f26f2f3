"""Prompt uploads over HTTP: a zip (or the three files) validated and installed into the store
atomically, and the registry entries the API returns.

Invariant: nothing becomes visible in the store unless the upload reads as a prompt directory,
fits the served model and the store write succeeds; unsafe archives are refused whole.
"""

import io
import json
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from softprompt.config import UserError
from softprompt.serve.protocol import ApiError, bad

PROMPT_FILES = ("adapter_config.json", "adapter_model.safetensors", "softprompt.json")


def _unzip(data: bytes, dest: Path, limit: int) -> None:
    """Extract the prompt files of a zip (flat, or inside one folder); refuse unsafe archives."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise bad("the upload is not a zip archive of a prompt directory", "body", "invalid_upload") from None
    infos = [i for i in zf.infolist() if not i.is_dir()]
    if len(infos) > 32:
        raise bad(f"the zip has {len(infos)} files; a prompt directory has 3", "body", "invalid_upload")
    total = 0
    for info in infos:
        parts = PurePosixPath(info.filename).parts
        if info.filename.startswith(("/", "\\")) or ".." in parts or len(parts) > 2:
            raise bad(f"unsafe path in the zip: {info.filename!r}", "body", "invalid_upload")
        if parts[-1] not in PROMPT_FILES:
            continue
        if (dest / parts[-1]).exists():
            raise bad(f"the zip holds {parts[-1]} twice", "body", "invalid_upload")
        with zf.open(info) as src:
            content = src.read(limit + 1)
        total += len(content)
        if total > limit:
            raise ApiError(413, f"the unpacked upload is larger than {limit} bytes", code="upload_too_large")
        (dest / parts[-1]).write_bytes(content)


def install_prompt(name: str, files: dict[str, bytes], fingerprint: dict, model_name: str, force: bool,
                   limit: int, kv_shape: tuple[int, int, int] | None = None) -> bool:
    """Validate an uploaded prompt (files or a zip) and move it into the store atomically.

    Returns True if it replaced an existing prompt. Nothing becomes visible unless the directory
    reads as a prompt, fits the model (hidden size, fingerprint, a deep prompt's key/value shape
    ``kv_shape``) and the store write succeeds.
    """
    from softprompt import store

    with tempfile.TemporaryDirectory(prefix="sp-upload-") as tmp:
        d = Path(tmp) / name
        d.mkdir()
        for fname, content in files.items():
            if content[:4] == b"PK\x03\x04":
                _unzip(content, d, limit)
            elif fname in PROMPT_FILES:
                (d / fname).write_bytes(content)
            else:
                raise bad(f"unexpected file {fname!r}: send a zip, or the files {', '.join(PROMPT_FILES)}",
                           "body", "invalid_upload")
        try:
            sp = store.read_prompt_dir(d, name)
            store.check_compatible(sp, fingerprint, force=force, kv_shape=kv_shape)
            existed = store.prompt_path(name).is_dir()
            store.import_prompt(d, name=name, fingerprint=fingerprint, model_name=model_name, overwrite=True,
                                kv_shape=kv_shape)
        except UserError as e:
            raise ApiError(422, str(e).replace(str(d), "upload"), param="body", code="invalid_prompt") from None
    return existed


def prompt_info(name: str) -> dict:
    """Registry entry for the API: the store summary (minus server paths) plus training metrics."""
    from softprompt import store

    s = store.prompt_summary(name)
    path = Path(s.pop("path"))
    s.pop("imported_from", None)
    try:
        meta = json.loads((path / store.META).read_text())
        s["metrics"] = meta.get("metrics")
    except (OSError, ValueError):
        s["metrics"] = None
    s["id"], s["object"] = name, "prompt"
    return s
