"""The prompt registry over HTTP: ``GET /v1/prompts[/{name}]``, ``PUT`` and ``DELETE
/v1/prompts/{name}``.

Store work (reading metadata, unzipping, validating, moving into place) runs in the thread
pool, never on the event loop; the engine is not involved: the bank sees a changed prompt on
its next request (it checks the store's version).
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from softprompt.config import UserError
from softprompt.serve.context import served
from softprompt.serve.protocol import ApiError, bad
from softprompt.serve.uploads import PROMPT_FILES, changed_meanwhile, install_prompt, prompt_info
from softprompt.store import Store

MAX_PARTS = 8  # parts of a multipart upload: a prompt directory has 3 files (4 with a side file)
UPLOAD_BODY = {"requestBody": {"required": True, "description": "the prompt directory: a zip, or its files as parts",
                               "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}},
                                           "multipart/form-data": {"schema": {"type": "object"}}}}}


def check_name(name: str) -> str:
    from softprompt import store

    try:
        return store.check_name(name)
    except UserError as e:
        raise bad(str(e), "name", "invalid_name") from None


def not_found(name: str) -> ApiError:
    return ApiError(404, f"prompt {name!r} not found", param="name", code="prompt_not_found")


def registry(request: Request) -> Store:
    """The served store (a server without one has an empty registry that takes no uploads)."""
    store = served(request).store
    if store is None:
        raise ApiError(404, "this server has no prompt store", code="no_store")
    return store


def info_or_404(store: Store, name: str) -> dict:
    info = prompt_info(store, check_name(name))
    if info is None:
        raise not_found(name)
    return info


def listing(store: Store | None) -> list[dict]:
    if store is None:
        return []
    return [info for info in (prompt_info(store, n) for n in store.list_prompts()) if info is not None]


async def prompts_list(request: Request):
    ctx = served(request)
    data = await run_in_threadpool(listing, ctx.store)
    return {"object": "list", "model": ctx.base_id, "chat": ctx.chat, "data": data}


async def prompts_get(name: str, request: Request):
    return await run_in_threadpool(info_or_404, registry(request), name)


async def upload_files(request: Request, limit: int) -> dict[str, bytes]:
    """The uploaded files: one zip body, or the parts of a multipart form."""
    raw = await request.body()
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=MAX_PARTS, max_fields=MAX_PARTS, max_part_size=limit)
        except (HTTPException, MultiPartException) as e:  # Starlette answers a bad form with a bare 400
            why = getattr(e, "detail", None) or getattr(e, "message", "")
            raise bad(f"the multipart upload cannot be read ({why}); send at most {MAX_PARTS} parts, the files "
                      f"{', '.join(PROMPT_FILES)}, or one zip", "body", "invalid_upload") from None
        files = {v.filename or k: await v.read() for k, v in form.multi_items() if hasattr(v, "read")}
    else:
        files = {"upload.zip": raw}
    if not files or not any(files.values()):
        raise bad("empty upload: send the prompt directory as a zip body or as multipart files", "body", "invalid_upload")
    return files


async def prompts_put(name: str, request: Request):
    ctx = served(request)
    check_name(name)
    if name == ctx.base_id:
        raise bad(f"{name!r} is the plain model's id; pick another name", "name", "invalid_name")
    files = await upload_files(request, ctx.cfg.max_upload_bytes)
    store = registry(request)
    replaced = await run_in_threadpool(install_prompt, store, name, files, ctx.fingerprint, ctx.model_name, ctx.force,
                                       ctx.cfg.max_upload_bytes, ctx.kv_shape, ctx.cfg.max_prompt_tokens)
    info = await run_in_threadpool(prompt_info, store, name)
    if info is None:
        raise changed_meanwhile(name)
    return JSONResponse({**info, "replaced": replaced}, status_code=200 if replaced else 201)


async def prompts_delete(name: str, request: Request):
    """Remove the prompt in the thread pool (the name first, then its files): nothing is read or
    deleted on the event loop, however large the prompt."""
    from softprompt import durable

    store = registry(request)
    check_name(name)
    try:
        await run_in_threadpool(store.remove_prompt, name)
    except durable.Busy as e:
        raise ApiError(409, str(e), param="name", code="busy") from None
    except UserError:
        raise not_found(name) from None
    return {"id": name, "object": "prompt", "deleted": True}
