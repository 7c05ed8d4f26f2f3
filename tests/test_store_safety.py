"""What enters the store is valid, or nothing enters; the store survives concurrent writers and
``kill -9``; reading it never fails because of one bad entry.

Each malformed prompt here is a reproducer from probing the server: it used to be stored (or
to answer 500); now the one validator (``store.read_prompt_dir``) refuses it, naming the field.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

from softprompt import durable, store
from softprompt.config import UserError

H = 16
FP = {"model_type": "llama", "hidden_size": H, "vocab_size": 10, "embedding_sha256": "0" * 16}


def good_dir(path: Path, n: int = 3, value: float = 0.5, **meta) -> Path:
    meta = {"base_model": {"name": "m", "fingerprint": FP}, "template": "{text}", "verbalizer": {"0": "no"},
            "metrics": {"best_eval": {"accuracy": 0.5}}, "value": value, "n": n, **meta}
    return store.save_prompt(path, torch.full((n, H), value), meta)


def leftovers(root: Path) -> list[str]:
    """Hidden entries that are neither a name's current version nor a lock file."""
    if not root.exists():
        return []
    live = {(root / p).resolve().name for p in os.listdir(root) if not p.startswith(".")}
    return sorted(p for p in os.listdir(root) if p.startswith(".") and p not in live and not p.endswith("@lock"))


def edit_json(fname: str, change):
    def apply(d: Path):
        f = d / fname
        f.unlink()  # the version file is a fresh inode: never edit through to another copy
        f.write_text(change)
    return apply


def put_tensor(t: torch.Tensor):
    def apply(d: Path):
        (d / store.TENSORS).unlink()
        save_file({store.PROMPT_KEY: t}, str(d / store.TENSORS))
    return apply


def meta_with(**kv) -> str:
    return json.dumps({"base_model": {"name": "m", "fingerprint": FP}, **kv})


MALFORMED = [  # (damage, the field the error must name)
    (edit_json(store.CONFIG, "[1]"), "adapter_config.json"),
    (edit_json(store.CONFIG, '{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": "abc"}'),
     "adapter_config.json:num_virtual_tokens"),
    (edit_json(store.CONFIG, '{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 7}'),
     "adapter_config.json:num_virtual_tokens"),
    (edit_json(store.META, "[1, 2]"), "softprompt.json"),
    (edit_json(store.META, json.dumps({"base_model": "x"})), "softprompt.json:base_model"),
    (edit_json(store.META, json.dumps({"base_model": {"fingerprint": "abc"}})), "softprompt.json:base_model.fingerprint"),
    (edit_json(store.META, meta_with(metrics="x")), "softprompt.json:metrics"),
    (edit_json(store.META, meta_with(metrics={"best_eval": {"accuracy": "high"}})),
     "softprompt.json:metrics.best_eval.accuracy"),
    (edit_json(store.META, meta_with(verbalizer="ab")), "softprompt.json:verbalizer"),
    (edit_json(store.META, meta_with(verbalizer={"0": 5})), "softprompt.json:verbalizer.0"),
    (edit_json(store.META, meta_with(template=5)), "softprompt.json:template"),
    (edit_json(store.META, meta_with(seed="7")), "softprompt.json:seed"),
    (edit_json(store.META, '{"metrics": {"final_train_loss": NaN}}'), "softprompt.json"),
    (edit_json(store.META, "[" * 100_000 + "]" * 100_000), "softprompt.json"),
    (put_tensor(torch.full((3, H), float("nan"))), "adapter_model.safetensors:prompt_embeddings"),
    (put_tensor(torch.full((3, H), float("inf"))), "adapter_model.safetensors:prompt_embeddings"),
    (put_tensor(torch.full((3, H), 3e38)), "adapter_model.safetensors:prompt_embeddings"),
    (put_tensor(torch.zeros(0, H)), "adapter_model.safetensors:prompt_embeddings"),
    (put_tensor(torch.ones(3, H, dtype=torch.bool)), "adapter_model.safetensors:prompt_embeddings"),
    (put_tensor(torch.ones(3, H, dtype=torch.int64)), "adapter_model.safetensors:prompt_embeddings"),
    (put_tensor(torch.ones(2, 3, H)), "adapter_model.safetensors:prompt_embeddings"),
    (put_tensor(torch.ones(65, H)), "adapter_model.safetensors:prompt_embeddings"),  # N above the limit (64)
]


@pytest.mark.parametrize("damage, field", MALFORMED, ids=[f"{i}-{f}" for i, (_, f) in enumerate(MALFORMED)])
def test_malformed_prompts_are_refused_naming_the_field_and_nothing_enters(sp_home, tmp_path, damage, field, sp_store):
    src = good_dir(tmp_path / "src").resolve()
    sp_store.import_prompt(src, "ok", max_tokens=64)  # the undamaged prompt enters
    damage(src)
    with pytest.raises(store.InvalidPrompt) as e:
        sp_store.import_prompt(src, "bad", fingerprint=FP, max_tokens=64)
    assert e.value.field == field and field in str(e.value) and "\n" not in str(e.value)
    assert sp_store.list_prompts() == ["ok"] and leftovers(sp_store.prompts_dir()) == []


def test_invalid_prompts_are_never_written(sp_home, sp_store):
    for emb in (torch.full((2, H), float("nan")), torch.zeros(0, H)):
        with pytest.raises(store.InvalidPrompt):
            sp_store.save_prompt(("p"), emb, {})
    with pytest.raises(store.InvalidPrompt, match="metrics"):
        sp_store.save_prompt(("p"), torch.ones(2, H), {"metrics": "x"})
    assert sp_store.list_prompts() == [] and leftovers(sp_store.prompts_dir()) == []
    # a diverged loss is no number: written as null (JSON has no NaN), the prompt itself is kept
    sp_store.save_prompt(("p"), torch.ones(2, H), {"metrics": {"final_train_loss": float("nan")}})
    assert sp_store.load_prompt("p").meta == {"metrics": {"final_train_loss": None}}


def test_a_name_with_a_trailing_newline_is_refused(sp_home):
    for bad in ("x\n", "x\r", "x\n\n", "\nx"):
        with pytest.raises(UserError, match="invalid prompt name"):
            store.check_name(bad)
    assert store.check_name("x") == "x"


def plant_invalid(st, name: str, tmp_path: Path) -> None:
    """Write an invalid prompt into the store behind the validator's back (as older versions did)."""
    d = good_dir(tmp_path / name)
    edit_json(store.META, meta_with(metrics="x"))(d.resolve())
    st.prompt_path(name).symlink_to(d.resolve())


def test_one_invalid_entry_never_breaks_the_registry(sp_home, tmp_path, capsys, cli_main, sp_store):
    good_dir(sp_store.prompt_path("good"))
    plant_invalid(sp_store, "bad", tmp_path)
    assert sp_store.list_prompts() == ["bad", "good"]
    s = sp_store.prompt_summary("bad")
    assert s["status"] == "invalid" and "softprompt.json:metrics" in s["reason"]
    assert sp_store.prompt_summary("good")["status"] == "ok"
    assert cli_main(["prompts", "list"]) == 0
    out = capsys.readouterr().out
    assert "good " in out and "INVALID" in out and "metrics" in out
    assert cli_main(["prompts", "rm", "bad"]) == 0 and sp_store.list_prompts() == ["good"]


def test_legacy_plain_directories_and_their_leftovers(sp_home, tmp_path, sp_store):
    root = sp_store.prompts_dir()
    root.mkdir(parents=True)
    os.replace(good_dir(tmp_path / "x").resolve(), root / "old")  # a plain directory, as stored before versions
    for junk in (".old.tmp-abcd1234", ".old.old-12345", ".gone.rm-77"):
        (root / junk).mkdir()
        os.utime(root / junk, (time.time() - 3600, time.time() - 3600))
    store._SWEPT.clear()
    assert sp_store.list_prompts() == ["old"]
    assert sp_store.load_prompt("old").meta["value"] == 0.5 and not (root / "old").is_symlink()
    assert not any(j in os.listdir(root) for j in (".old.tmp-abcd1234", ".old.old-12345", ".gone.rm-77"))
    good_dir(root / "old", value=0.25)  # replacing it moves it into the versioned layout
    assert (root / "old").is_symlink() and sp_store.load_prompt("old").meta["value"] == 0.25
    assert leftovers(root) == []


def test_checkpoint_writes_clean_what_a_killed_one_left(tmp_path):
    ckpt = tmp_path / "run" / "checkpoint"
    store.save_checkpoint(ckpt, {"w": torch.ones(2)}, {"epoch": 1})
    (ckpt.parent / ".checkpoint.tmp-abcd1234").mkdir()  # earlier versions' aside names
    os.utime(ckpt.parent / ".checkpoint.tmp-abcd1234", (0, 0))
    (ckpt.parent / ".checkpoint@v-999999-abcdef").mkdir()  # a version a killed writer never published
    store.save_checkpoint(ckpt, {"w": torch.zeros(2)}, {"epoch": 2})
    assert store.load_checkpoint(ckpt)[1] == {"epoch": 2}
    assert leftovers(ckpt.parent) == []


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    from softprompt import provenance

    path = provenance.atomic_write(tmp_path / "r.json", '{"a": 1}')
    monkeypatch.setattr(provenance.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        provenance.atomic_write(path, b"half")
    assert path.read_text() == '{"a": 1}' and os.listdir(tmp_path) == ["r.json"]


# ---------------------------------------------------------------- concurrency and crashes


def test_ten_parallel_writes_of_one_name_each_succeed_or_are_busy(sp_home, tmp_path, sp_store):
    srcs = [good_dir(tmp_path / f"s{i}", n=1 + i, value=float(i)).resolve() for i in range(10)]
    results: list = [None] * 10
    go = threading.Barrier(10)

    def write(i):
        go.wait()
        try:
            results[i] = sp_store.import_prompt(srcs[i], "same", overwrite=True).meta["value"]
        except durable.Busy as e:
            results[i] = e

    threads = [threading.Thread(target=write, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(r, (float, durable.Busy)) for r in results), results
    sp = sp_store.load_prompt("same")
    v = sp.meta["value"]
    assert v in [float(i) for i in range(10)] and sp.num_virtual_tokens == 1 + int(v)
    assert torch.equal(sp.embeddings, torch.full((1 + int(v), H), v))  # whole: tensor and metadata agree
    assert leftovers(sp_store.prompts_dir()) == []


def test_a_writer_that_cannot_get_the_lock_is_told_busy(sp_home, monkeypatch, sp_store):
    good_dir(sp_store.prompt_path("p"))
    monkeypatch.setattr(durable, "LOCK_WAIT_S", 0.05)
    with durable.locked(sp_store.prompt_path("p")):
        with pytest.raises(durable.Busy, match="try again"):
            good_dir(sp_store.prompt_path("p"), value=2.0)
    assert sp_store.load_prompt("p").meta["value"] == 0.5


WORKER = r"""
import sys, threading, random, json, io
import torch
from safetensors.torch import save
from softprompt import store
from softprompt.serve.uploads import install_prompt
from softprompt.store import Store
fp, ST = json.loads(sys.argv[1]), Store(sys.argv[2])
def files(n, v):
    meta = {"base_model": {"name": "stub", "fingerprint": fp}, "value": v, "n": n}
    cfg = store.adapter_config(n, fp["hidden_size"], "stub")
    return {"adapter_config.json": json.dumps(cfg).encode(), "softprompt.json": json.dumps(meta).encode(),
            "adapter_model.safetensors": save({"prompt_embeddings": torch.full((n, fp["hidden_size"]), v)})}
def uploads(k):
    rng = random.Random(k)
    while True:
        n, v = rng.randint(1, 8), rng.randint(1, 1000) / 8
        try:
            install_prompt(ST, f"p{rng.randint(0, 2)}", files(n, v), fp, "stub", False, 10**7, 64)
        except Exception as e:  # only "busy" is acceptable
            if getattr(e, "status", None) != 409:
                raise
def checkpoints():
    ckpt = ST.home / "runs" / "r" / "checkpoint"
    while True:
        store.save_checkpoint(ckpt, {"w": torch.randn(64, 64)}, {"epoch": 1})
threads = [threading.Thread(target=uploads, args=(k,), daemon=True) for k in range(4)]
threads.append(threading.Thread(target=checkpoints, daemon=True))
for t in threads:
    t.start()
print("ready", flush=True)
for t in threads:
    t.join()
"""

CHECK = r"""
import json, torch
import sys
from softprompt.store import Store
ST = Store(sys.argv[1])
out = {}
for name in ST.list_prompts():
    s = ST.prompt_summary(name)
    sp = ST.load_prompt(name)
    out[name] = [s["status"], sp.meta["value"], sp.meta["n"], bool(torch.equal(sp.embeddings, torch.full((sp.meta["n"], 16), sp.meta["value"])))]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_kill_9_during_parallel_writes_leaves_only_whole_prompts_and_no_leftovers(sp_home, tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    staged = 0
    for _ in range(3):
        procs = [subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(FP), str(sp_home)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        time.sleep(1.0)
        for p in procs:
            assert p.poll() is None, p.stderr.read()  # still writing: no worker failed
            p.send_signal(signal.SIGKILL)
            p.wait()
        staged += len(os.listdir(tmp_path / "tmp"))
    assert staged > 0  # the kills did land mid-upload (the sweep below has work to do)
    res = subprocess.run([sys.executable, "-c", CHECK, str(sp_home)], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    listed = json.loads(res.stdout)
    assert listed and set(listed) <= {"p0", "p1", "p2"}
    assert all(st == "ok" and whole for st, _, _, whole in listed.values()), listed
    assert leftovers(sp_home / "prompts") == [] and leftovers(sp_home / "runs" / "r") == []
    assert os.listdir(tmp_path / "tmp") == []
    assert store.load_checkpoint(sp_home / "runs" / "r" / "checkpoint")[1] == {"epoch": 1}


CONVERT = r"""
import sys, time
from pathlib import Path
from softprompt import models
from softprompt.store import Store
tiny, log, home = sys.argv[1], sys.argv[2], sys.argv[3]
def fake_dequantise(gguf):  # the real one reads a 100 MB GGUF; the lock and the publishing are what is tested
    with open(log, "a") as f:
        f.write("converted\n")
    time.sleep(1.0)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return AutoModelForCausalLM.from_pretrained(tiny), AutoTokenizer.from_pretrained(tiny)
models._dequantise = fake_dequantise
models._gguf_path = lambda name: Path(tiny) / "model.gguf"
print(models.load("smollm2-135m", store=Store(home)).fingerprint["embedding_sha256"])
"""


@pytest.mark.slow
def test_two_processes_converting_the_model_at_once_both_succeed(tiny_model_dir, sp_home, tmp_path):
    log = tmp_path / "conversions.log"
    procs = [subprocess.Popen([sys.executable, "-c", CONVERT, str(tiny_model_dir("llama")), str(log), str(sp_home)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert outs[0][0] == outs[1][0] and len(outs[0][0].strip()) == 16
    assert log.read_text() == "converted\n"  # converted once, the other process waited and reused it
    assert leftovers(sp_home / "models") == []


@pytest.mark.slow
def test_two_processes_converting_the_real_default_model_both_succeed(tmp_path):
    code = ("import sys; from softprompt import models; from softprompt.store import Store; "
            "print(models.resolve(None, Store(sys.argv[1]))[1])")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "home")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert outs[0][0] == outs[1][0] and (Path(outs[0][0].strip()) / "config.json").is_file()


def test_uploaded_bytes_are_refused_before_a_store_write(sp_home, sp_store):
    """A safetensors body with NaN, sent as files: no version directory is ever created."""
    from softprompt.serve.protocol import ApiError
    from softprompt.serve.uploads import install_prompt

    files = {store.CONFIG: json.dumps(store.adapter_config(2, H, "m")).encode(),
             store.TENSORS: save({store.PROMPT_KEY: torch.full((2, H), float("nan"))})}
    with pytest.raises(ApiError) as e:
        install_prompt(sp_store, "nan", files, FP, "m", False, 10**6, 64)
    assert e.value.status == 422 and e.value.param == "adapter_model.safetensors:prompt_embeddings"
    assert sp_store.list_prompts() == [] and leftovers(sp_store.prompts_dir()) == []
