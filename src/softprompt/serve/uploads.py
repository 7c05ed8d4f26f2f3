"""Prompt uploads over HTTP: a zip (or the three files) validated and installed into the store
atomically, and the registry entries the API returns.

Invariant: nothing becomes visible in the store unless the upload reads as a prompt directory,
fits the served model and the store write succeeds; unsafe archives are refused whole.
"""

import io
import os
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from softprompt.config import UserError
from softprompt.serve.protocol import ApiError, bad, without_paths

if TYPE_CHECKING:
    from softprompt.store import Store

PROMPT_FILES = ("adapter_config.json", "adapter_model.safetensors", "softprompt.json", "input_offset.safetensors",
                "prefix_memory.safetensors")
KNOWN_COMPRESSION = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """A member's bytes, whole and intact (CRC checked at its end), or a 400 naming it."""
    if info.flag_bits & 0x1:
        raise bad(f"{info.filename} in the zip is encrypted; send it unencrypted", "body", "invalid_upload")
    if info.compress_type not in KNOWN_COMPRESSION:
        raise bad(f"{info.filename} in the zip uses unknown compression method {info.compress_type}",
                  "body", "invalid_upload")
    try:
        with zf.open(info) as src:
            return src.read(limit + 1)  # up to limit bytes means the end, and so the CRC, was reached
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError) as e:
        raise bad(f"{info.filename} in the zip is corrupt ({str(e)[:80]})", "body", "invalid_upload") from None


def _unzip(data: bytes, dest: Path, limit: int) -> None:
    """Extract the prompt files of a zip (flat, or inside one folder); refuse unsafe archives."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise bad("the upload is not a zip archive of a prompt directory", "body", "invalid_upload") from None
    infos = [i for i in zf.infolist() if not i.is_dir()]
    if len(infos) > 32:
        raise bad(f"the zip has {len(infos)} files; a prompt directory has 3 (4 with a side file)", "body", "invalid_upload")
    total = 0
    for info in infos:
        parts = PurePosixPath(info.filename).parts
        if info.filename.startswith(("/", "\\")) or ".." in parts or len(parts) > 2:
            raise bad(f"unsafe path in the zip: {info.filename!r}", "body", "invalid_upload")
        if parts[-1] not in PROMPT_FILES:
            continue
        if (dest / parts[-1]).exists():
            raise bad(f"the zip holds {parts[-1]} twice", "body", "invalid_upload")
        content = _read_member(zf, info, limit)
        total += len(content)
        if total > limit:
            raise ApiError(413, f"the unpacked upload is larger than {limit} bytes", code="upload_too_large")
        (dest / parts[-1]).write_bytes(content)


def install_prompt(store: "Store", name: str, files: dict[str, bytes], fingerprint: dict, model_name: str, force: bool,
                   limit: int, kv_shape: tuple[int, int, int] | None = None, max_tokens: int | None = None) -> bool:
    """Validate an uploaded prompt (files or a zip) and move it into ``store`` atomically.

    Returns True if it replaced an existing prompt. Nothing becomes visible unless the directory
    passes the store's validator (``store.read_prompt_dir``: 422 naming the field), fits the
    model (hidden size, fingerprint, a deep prompt's key/value shape ``kv_shape``) and the store
    write succeeds (409 while another upload of the name holds it too long). ``max_tokens``
    bounds N (the server's ``--max-prompt-tokens``).
    """
    from softprompt import durable
    from softprompt.store import UPLOAD_PREFIX, InvalidPrompt, check_compatible, read_prompt_dir

    with tempfile.TemporaryDirectory(prefix=f"{UPLOAD_PREFIX}{os.getpid()}-") as tmp:  # swept if we are killed
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
            sp = read_prompt_dir(d, name, max_tokens)
            check_compatible(sp, fingerprint, force=force, kv_shape=kv_shape)
        except UserError as e:
            param = e.field if isinstance(e, InvalidPrompt) else "body"
            raise ApiError(422, str(e).replace(str(d), "upload"), param=param, code="invalid_prompt") from None
        existed = store.prompt_path(name).is_dir()
        try:  # the upload is valid: what fails from here on is a race with another writer of the name
            store.import_prompt(d, name=name, fingerprint=fingerprint, model_name=model_name, overwrite=True,
                                kv_shape=kv_shape, max_tokens=max_tokens)
        except durable.Busy as e:
            raise ApiError(409, str(e), param="name", code="busy") from None
        except UserError:  # written, then deleted before the store read it back
            raise changed_meanwhile(name) from None
    return existed


def changed_meanwhile(name: str) -> ApiError:
    return ApiError(409, f"prompt {name!r} was deleted by another request while this upload was stored; try again",
                    param="name", code="busy")


def prompt_info(store: "Store", name: str) -> dict | None:
    """Registry entry for the API: the store summary minus server paths (an invalid prompt is
    listed with ``status: invalid`` and its reason, without paths); None when the name is gone
    (deleted meanwhile: a prompt being deleted is listed whole or not at all)."""
    s = store.prompt_summary(name)
    if s["status"] != "ok" and not store.prompt_path(name).is_dir():  # the delete unlinks the name first
        return None
    s.pop("path")
    s.pop("imported_from", None)
    if "reason" in s:
        s["reason"] = without_paths(s["reason"])
    s["id"], s["object"] = name, "prompt"
    return s
