"""Prompt uploads over HTTP: every malformed upload gets a 4xx naming what is wrong (never a 500),
nothing half-made becomes visible, one bad entry never breaks the registry, and parallel
uploads of one name each get 2xx or 409 and leave one whole prompt.

The server runs in-process (Starlette's TestClient, lifespan included) on a tiny model.
"""

from __future__ import annotations

import io
import json
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from upload_helpers import MAX_N, prompt_dir, zipped

from softprompt import durable, store

pytestmark = pytest.mark.usefixtures("one_thread")


def rewrite(path: Path, fname: str, text: str | None = None, tensor: torch.Tensor | None = None) -> Path:
    (path / fname).unlink()
    if tensor is not None:
        save_file({store.PROMPT_KEY: tensor}, str(path / fname))
    else:
        (path / fname).write_text(text)
    return path


def patch_headers(data: bytes, flags: int | None = None, method: int | None = None) -> bytes:
    """Set the general-purpose flags / compression method of every member, in the local and the
    central headers (what a hostile client can send)."""
    b = bytearray(data)
    for sig, off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        i = b.find(sig)
        while i >= 0:
            if flags is not None:
                b[i + off:i + off + 2] = flags.to_bytes(2, "little")
            if method is not None:
                b[i + off + 2:i + off + 4] = method.to_bytes(2, "little")
            i = b.find(sig, i + 4)
    return bytes(b)


def corrupt_member(data: bytes, stored: bool) -> bytes:
    """Flip a byte in the middle of the first member's data: a CRC mismatch (stored) or broken
    deflate data."""
    b = bytearray(data)
    name_len, extra_len = int.from_bytes(b[26:28], "little"), int.from_bytes(b[28:30], "little")
    size = int.from_bytes(b[18:22], "little")
    start = 30 + name_len + extra_len
    b[start + size // 2] ^= 0xFF if stored else 0x55
    return bytes(b)


def test_malformed_uploads_get_422_naming_the_field(app_http, tiny_lm, tmp_path, sp_store):
    H = tiny_lm.hidden_size
    fp = tiny_lm.fingerprint
    cases = {  # the reproducers, each -> the field the answer must name
        "adapter_config.json": lambda d: rewrite(d, store.CONFIG, "[1]"),
        "adapter_config.json:num_virtual_tokens": lambda d: rewrite(
            d, store.CONFIG, json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": "abc"})),
        "softprompt.json": lambda d: rewrite(d, store.META, "[1]"),
        "softprompt.json:base_model": lambda d: rewrite(d, store.META, json.dumps({"base_model": "x"})),
        "softprompt.json:base_model.fingerprint": lambda d: rewrite(
            d, store.META, json.dumps({"base_model": {"fingerprint": "abc"}})),
        "softprompt.json:metrics": lambda d: rewrite(
            d, store.META, json.dumps({"base_model": {"fingerprint": fp}, "metrics": "x"})),
        "softprompt.json:verbalizer": lambda d: rewrite(d, store.META, json.dumps({"verbalizer": "ab"})),
        "softprompt.json:template": lambda d: rewrite(d, store.META, json.dumps({"template": 5})),
    }
    tensors = [torch.full((3, H), float("nan")), torch.full((3, H), float("inf")), torch.full((3, H), 3e38),
               torch.zeros(0, H), torch.ones(3, H, dtype=torch.bool), torch.ones(3, H, dtype=torch.int32),
               torch.ones(MAX_N + 1, H)]
    uploads = [(field, damage(prompt_dir(tiny_lm, tmp_path / f"c{i}"))) for i, (field, damage) in enumerate(cases.items())]
    uploads += [("adapter_model.safetensors:prompt_embeddings",
                 rewrite(prompt_dir(tiny_lm, tmp_path / f"t{i}"), store.TENSORS, tensor=t)) for i, t in enumerate(tensors)]
    for field, d in uploads:
        r = app_http.put("/v1/prompts/bad", content=zipped(d))
        assert r.status_code == 422 and r.json()["error"]["param"] == field, (field, r.text)
        assert field in r.json()["error"]["message"] and str(d) not in r.text
    assert "bad" not in sp_store.list_prompts() and app_http.get("/v1/prompts/bad").status_code == 404


def test_damaged_zips_get_400_naming_the_member(app_http, tiny_lm, tmp_path, sp_store):
    src = prompt_dir(tiny_lm, tmp_path / "ok")
    stored = io.BytesIO()
    with zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as z:
        z.write(src / store.CONFIG, store.CONFIG)
    ok = zipped(src)
    cases = {
        "CRC": corrupt_member(stored.getvalue(), stored=True),
        "deflate": corrupt_member(ok, stored=False),
        "encrypted": patch_headers(ok, flags=0x1),
        "method 99": patch_headers(ok, method=99),
    }
    for what, data in cases.items():
        r = app_http.put("/v1/prompts/bad", content=data)
        assert r.status_code == 400, (what, r.text)
        assert r.json()["error"]["code"] == "invalid_upload" and "adapter_" in r.json()["error"]["message"], what
    assert "bad" not in sp_store.list_prompts()


def test_a_name_with_a_newline_is_refused(app_http, tiny_lm, tmp_path, sp_store):
    r = app_http.put("/v1/prompts/x%0A", content=zipped(prompt_dir(tiny_lm, tmp_path / "ok")))
    assert r.status_code == 400 and r.json()["error"]["param"] == "name"
    assert sp_store.list_prompts() == [] and not (sp_store.prompts_dir() / "x\n").exists()


def test_an_invalid_entry_is_listed_and_the_rest_served(app_http, tiny_lm, tmp_path, sp_store):
    app_http.put("/v1/prompts/good", content=zipped(prompt_dir(tiny_lm, tmp_path / "good")))
    bad = prompt_dir(tiny_lm, tmp_path / "bad")  # stored behind the validator's back, as before
    rewrite(bad, store.META, json.dumps({"metrics": "x"}))
    sp_store.prompt_path("bad").symlink_to(bad)
    r = app_http.get("/v1/prompts")
    assert r.status_code == 200
    entries = {e["id"]: e for e in r.json()["data"]}
    assert entries["good"]["status"] == "ok" and entries["bad"]["status"] == "invalid"
    assert "softprompt.json:metrics" in entries["bad"]["reason"]
    assert app_http.get("/v1/prompts/bad").json()["status"] == "invalid"
    nan = prompt_dir(tiny_lm, tmp_path / "nan")
    rewrite(nan, store.TENSORS, tensor=torch.full((3, tiny_lm.hidden_size), float("nan")))
    sp_store.prompt_path("nan").symlink_to(nan)
    assert app_http.get("/v1/prompts/nan").json()["status"] == "invalid"
    for name, temperature in (("bad", 0), ("nan", 1.0)):  # refused when loaded, before any model work
        body = {"model": name, "prompt": "the movie", "max_tokens": 2, "temperature": temperature}
        r = app_http.post("/v1/completions", json=body)
        assert r.status_code == 422 and r.json()["error"]["code"] == "prompt_unusable", r.text
    body["model"] = "good"
    assert app_http.post("/v1/completions", json=body).status_code == 200
    for name in ("bad", "nan"):
        assert app_http.delete(f"/v1/prompts/{name}").json()["deleted"] is True
    assert [e["id"] for e in app_http.get("/v1/prompts").json()["data"]] == ["good"]


def test_ten_parallel_uploads_of_one_name_answer_2xx_or_409(app_http, tiny_lm, tmp_path, sp_store):
    bodies = [zipped(prompt_dir(tiny_lm, tmp_path / f"p{i}", n=1 + i, value=i / 10)) for i in range(10)]
    status: list[int] = [0] * 10
    go = threading.Barrier(10)

    def put(i):
        go.wait()
        status[i] = app_http.put("/v1/prompts/same", content=bodies[i]).status_code

    threads = [threading.Thread(target=put, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(status) <= {200, 201, 409} and 201 in status, status
    sp = sp_store.load_prompt("same")
    i = round(sp.meta["value"] * 10)
    assert sp.num_virtual_tokens == 1 + i and torch.equal(sp.embeddings, torch.full((1 + i, tiny_lm.hidden_size), i / 10))
    assert app_http.put("/v1/prompts/same", content=bodies[0]).status_code == 200  # the name still takes uploads


def test_an_upload_that_waits_too_long_for_the_name_gets_409(app_http, tiny_lm, tmp_path, monkeypatch, sp_store):
    body = zipped(prompt_dir(tiny_lm, tmp_path / "p"))
    monkeypatch.setattr(durable, "LOCK_WAIT_S", 0.05)
    with durable.locked(sp_store.prompt_path("held")):
        r = app_http.put("/v1/prompts/held", content=body)
    assert r.status_code == 409 and r.json()["error"]["code"] == "busy"
    assert app_http.put("/v1/prompts/held", content=body).status_code == 201


def test_a_multipart_upload_with_too_many_parts_says_so(app_http, tiny_lm, tmp_path):
    d = prompt_dir(tiny_lm, tmp_path / "p")
    parts = [("f", (f.name, f.read_bytes())) for f in sorted(d.iterdir())]
    r = app_http.put("/v1/prompts/nine", files=parts + [(f"x{i}", (f"x{i}.txt", b"x")) for i in range(6)])
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "invalid_upload" and err["param"] == "body", r.text
    assert "at most 8 parts" in err["message"] and "JSON" not in err["message"]
    assert app_http.put("/v1/prompts/nine", files=parts).status_code == 201  # the same files alone are a prompt


# ---------------------------------------------------------------- registry races and what errors reveal


def no_path(text: str, home: Path) -> bool:
    return str(home) not in text and str(home.resolve()) not in text and "/prompts/" not in text


def test_a_put_racing_a_delete_answers_2xx_or_409_and_names_no_path(app_http, tiny_lm, tmp_path, sp_home, monkeypatch, sp_store):
    body = zipped(prompt_dir(tiny_lm, tmp_path / "p"))
    real = store.write_dir_atomic

    def deleted_right_after(target, *a, **kw):  # a DELETE lands between the write and the store's re-read
        out = real(target, *a, **kw)
        sp_store.remove_prompt(Path(target).name)
        return out

    monkeypatch.setattr(store, "write_dir_atomic", deleted_right_after)
    r = app_http.put("/v1/prompts/race", content=body)
    assert r.status_code == 409 and r.json()["error"]["code"] == "busy", r.text
    assert no_path(r.text, sp_home), r.text
    monkeypatch.setattr(store, "write_dir_atomic", real)
    # and with real threads: PUTs and DELETEs of one name, each 2xx, 404 (nothing to delete) or 409
    status: dict[str, list[int]] = {"put": [], "delete": []}
    texts: list[str] = []

    listed: list[str] = []

    def churn(kind: str):
        for _ in range(12):
            if kind == "list":  # a prompt being deleted is listed whole or not at all
                listed.extend(e["status"] for e in app_http.get("/v1/prompts").json()["data"])
                continue
            r = app_http.put("/v1/prompts/race", content=body) if kind == "put" else app_http.delete("/v1/prompts/race")
            status[kind].append(r.status_code)
            texts.append(r.text)

    threads = [threading.Thread(target=churn, args=(k,)) for k in ("put", "put", "delete", "delete", "list")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(status["put"]) <= {200, 201, 409} and set(status["delete"]) <= {200, 404, 409}, status
    assert all(no_path(t, sp_home) for t in texts) and set(listed) <= {"ok"}, listed


def test_a_prompt_being_deleted_is_listed_whole_or_not_at_all(app_http, tiny_lm, tmp_path, monkeypatch, sp_store):
    for name in ("a", "gone"):
        assert app_http.put(f"/v1/prompts/{name}", content=zipped(prompt_dir(tiny_lm, tmp_path / name))).status_code == 201
    real = store.read_prompt_dir

    def deleted_while_read(path, name=None, *a, **kw):  # the DELETE runs while the listing reads the prompt
        if name == "gone" and sp_store.prompt_path("gone").is_dir():
            sp_store.remove_prompt("gone")
        return real(path, name, *a, **kw)

    monkeypatch.setattr(store, "read_prompt_dir", deleted_while_read)
    assert [(e["id"], e["status"]) for e in app_http.get("/v1/prompts").json()["data"]] == [("a", "ok")]
    assert app_http.put("/v1/prompts/gone", content=zipped(tmp_path / "gone")).status_code in (200, 201, 409)
    r = app_http.get("/v1/prompts/gone")  # removed while GET read it: not found, not 'invalid'
    assert r.status_code == 404 and r.json()["error"]["code"] == "prompt_not_found", r.text


def test_no_registry_error_names_a_server_path(app_http, tiny_lm, tmp_path, sp_home, sp_store):
    good = prompt_dir(tiny_lm, tmp_path / "good")
    broken = prompt_dir(tiny_lm, tmp_path / "broken")  # stored behind the validator's back, then damaged
    sp_store.prompts_dir().mkdir(parents=True, exist_ok=True)
    sp_store.prompt_path("broken").symlink_to(broken)
    (broken / store.TENSORS).unlink()
    answers = [
        app_http.put("/v1/prompts/x", content=zipped(rewrite(prompt_dir(tiny_lm, tmp_path / "j"), store.META, "{"))),
        app_http.put("/v1/prompts/x", content=zipped(rewrite(prompt_dir(tiny_lm, tmp_path / "n"), store.TENSORS,
                                                         tensor=torch.full((3, tiny_lm.hidden_size), float("nan"))))),
        app_http.put("/v1/prompts/x", content=b"PK\x03\x04 not a zip"),
        app_http.get("/v1/prompts/missing"), app_http.delete("/v1/prompts/missing"),
        app_http.post("/v1/completions", json={"model": "broken", "prompt": "the movie", "max_tokens": 2}),
        app_http.post("/v1/classify", json={"prompt": "broken", "inputs": ["x"], "verbalizer": ["a", "b"]}),
    ]
    assert [r.status_code for r in answers] == [422, 422, 400, 404, 404, 422, 422], [r.text for r in answers]
    entry = app_http.get("/v1/prompts/broken").json()
    assert entry["status"] == "invalid" and "adapter_model.safetensors" in entry["reason"]
    listed = app_http.get("/v1/prompts").text
    for text in [r.text for r in answers] + [json.dumps(entry), listed]:
        assert no_path(text, sp_home) and str(tmp_path) not in text, text
    assert app_http.put("/v1/prompts/good", content=zipped(good)).status_code == 201


def test_registry_store_work_never_runs_on_the_event_loop(app_http, tiny_lm, monkeypatch, sp_store):
    """A 64 MB prompt's delete (or read) cannot stall /healthz: the store is touched only in the
    thread pool (a thread without a running event loop)."""
    import asyncio

    emb = torch.full((4096, tiny_lm.hidden_size), 0.5)  # 1 MB; what matters is where the work runs
    meta = {"base_model": {"name": tiny_lm.name, "fingerprint": tiny_lm.fingerprint}}
    sp_store.save_prompt("big", emb, meta)
    on_loop: list[str] = []

    def spy(fn):
        def run(*a, **kw):
            try:
                asyncio.get_running_loop()
                on_loop.append(fn.__name__)
            except RuntimeError:
                pass
            return fn(*a, **kw)
        return run

    monkeypatch.setattr(store, "read_prompt_dir", spy(store.read_prompt_dir))
    monkeypatch.setattr(durable, "remove_dir", spy(durable.remove_dir))
    assert app_http.get("/v1/prompts/big").json()["num_virtual_tokens"] == 4096
    assert [e["id"] for e in app_http.get("/v1/prompts").json()["data"]] == ["big"]
    assert app_http.delete("/v1/prompts/big").json()["deleted"] is True
    assert app_http.delete("/v1/prompts/big").status_code == 404
    assert on_loop == []
