"""Soak: healthy requests' latency on one server, with and without hostile requests mixed in.

``softprompt serve`` runs as a subprocess on 127.0.0.1 (serve_load's ``Server``), with 8
random-init prompts (N = 20) in a temporary store. A bounded closed-loop load (``--concurrency``
workers, each sending its next request when the last returns) runs in phases of ``--seconds``
(and at most ``--max-requests``), interleaved in rounds: ``clean`` (only healthy requests) and
``hostile`` (every ``--every``-th request of a worker is hostile), the order alternating per
round, so both see the same drift of a shared machine. Healthy requests alternate between a
one-sentence classification and an 8-token greedy completion, on a rotating prompt.

The hostile requests are the reproducers of the store and server probing: malformed uploads
(metadata of the wrong type, NaN / 3e38 / N=0 / integer tensors, a CRC-damaged or "encrypted"
zip), parallel uploads of one name, requests to prompts that an older version let into the store
(NaN values, a verbalizer that is a string), sampling edge cases (temperature 1e-300), a lone
surrogate, JSON nested 100,000 deep, ``stream_options`` that is not an object, and the costly
ones (a 1,000-token label word, a 20,000,000-wide template field). Each hostile answer should be
a 4xx (a 2xx for the well-formed upload, and for temperature 1e-300, which the server answers as
greedy); a 5xx, a timeout or a dropped connection is a failure.

Reported per phase: requests, errors by class (healthy and hostile apart), hostile answers by
kind, healthy p50/p99 latency; and the ratio hostile/clean of healthy p99 (pooled over rounds).
Target: <= 2x.

    SOFTPROMPT_DATA=/path/to/data python benchmarks/serve_soak.py   # default model, ~4 min
    python benchmarks/serve_soak.py --quick                        # tiny random model; not written
    python benchmarks/serve_soak.py --mix   # streams' TTFT/ITL beside a hostile mix, the long-prompt
                                            # reproducer, peak RSS (soak_mix.py): serve_soak_mix.*
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import json
import shutil
import sys
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import serve_load as SL  # noqa: E402

TARGET_P99_RATIO = 2.0
NEW_TOKENS = 8


def healthy(w: int, k: int, texts: list[str]) -> tuple[str, str, dict]:
    prompt, text = f"task{(w + k) % SL.PROMPTS}", texts[(w * 7919 + k) % len(texts)]
    if (w + k) % 2:
        return "classify", "/v1/classify", {"json": {"prompt": prompt, "inputs": [text]}}
    return "generate", "/v1/completions", {"json": {"model": prompt, "prompt": text, "max_tokens": NEW_TOKENS,
                                                    "temperature": 0}}


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def upload_bodies(src: Path) -> dict[str, bytes]:
    """Zips of one exported prompt: intact, and damaged the ways the probing found."""
    import torch
    from safetensors.torch import load, save

    files = {f.name: f.read_bytes() for f in src.iterdir()}
    meta, emb = json.loads(files["softprompt.json"]), load(files["adapter_model.safetensors"])["prompt_embeddings"]

    def with_meta(**kv) -> bytes:
        return _zip({**files, "softprompt.json": json.dumps({**meta, **kv}).encode()})

    def with_tensor(t) -> bytes:
        return _zip({**files, "adapter_model.safetensors": save({"prompt_embeddings": t})})

    ok = _zip(files)
    crc = bytearray(ok)
    crc[-200] ^= 0xFF  # inside the last member's data (stored): a CRC mismatch
    enc = bytearray(ok)
    for sig, off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # the "encrypted" flag on every member
        i = enc.find(sig)
        while i >= 0:
            enc[i + off] |= 1
            i = enc.find(sig, i + 4)
    return {
        "upload_ok": ok, "upload_metrics_str": with_meta(metrics="x"), "upload_verbalizer_str": with_meta(verbalizer="ab"),
        "upload_template_int": with_meta(template=5), "upload_fingerprint_str": with_meta(base_model={"fingerprint": "abc"}),
        "upload_nan": with_tensor(torch.full_like(emb, float("nan"))), "upload_3e38": with_tensor(torch.full_like(emb, 3e38)),
        "upload_n0": with_tensor(emb[:0]), "upload_int": with_tensor(emb.long()), "upload_crc": bytes(crc),
        "upload_encrypted": bytes(enc), "upload_config_list": _zip({**files, "adapter_config.json": b"[1]"}),
    }


def plant_invalid(model: str, st) -> None:
    """Prompts that an older version let into the store (plain folders): NaN values; a string verbalizer."""
    import torch
    from safetensors.torch import save_file

    from softprompt import models, store

    lm = models.load(model, store=st)
    base = {"base_model": {"name": lm.name, "fingerprint": lm.fingerprint}, "template": "{text}"}
    for name, value, extra in (("planted-nan", float("nan"), {}), ("planted-verbalizer", 0.01, {"verbalizer": "ab"})):
        d = st.prompts_dir() / name  # the server's store (--home)
        d.mkdir(parents=True)
        (d / store.CONFIG).write_text(json.dumps(store.adapter_config(4, lm.hidden_size, str(lm.path))))
        save_file({store.PROMPT_KEY: torch.full((4, lm.hidden_size), value)}, str(d / store.TENSORS))
        (d / store.META).write_text(json.dumps({**base, **extra}))


def hostile_requests(bodies: dict[str, bytes]) -> list[tuple[str, str, str, dict]]:
    """(kind, method, path, httpx kwargs) for every hostile reproducer."""
    zip_hdr = {"content-type": "application/zip"}
    out = [(k, "PUT", "/v1/prompts/soak-up" if k == "upload_ok" else f"/v1/prompts/{k.replace('_', '-')}",
            {"content": b, "headers": zip_hdr}) for k, b in bodies.items()]
    post = [
        ("temperature_1e-300", "/v1/completions", {"json": {"model": "task0", "prompt": "hi", "max_tokens": 2,
                                                             "temperature": 1e-300}}),
        ("lone_surrogate", "/v1/classify", {"content": b'{"prompt": "task1", "inputs": ["a \\ud800"]}',
                                            "headers": {"content-type": "application/json"}}),
        ("planted_nan_prompt", "/v1/completions", {"json": {"model": "planted-nan", "prompt": "hi", "max_tokens": 2,
                                                            "temperature": 1.0}}),
        ("planted_verbalizer_str", "/v1/classify", {"json": {"prompt": "planted-verbalizer", "inputs": ["good"]}}),
        ("json_nested_100k", "/v1/completions", {"content": b"[" * 100_000 + b"]" * 100_000,
                                                 "headers": {"content-type": "application/json"}}),
        ("stream_options_str", "/v1/completions", {"json": {"model": "task0", "prompt": "hi", "max_tokens": 48,
                                                            "stream": True, "stream_options": "x"}}),
        ("label_word_1000_tokens", "/v1/classify", {"json": {"prompt": "task2", "inputs": ["fine"],
                                                             "verbalizer": {"0": "no", "1": "ok " * 1000}}}),
        ("template_20M_wide", "/v1/classify", {"json": {"prompt": "task3", "inputs": ["fine"],
                                                        "template": "{text:>20000000}"}}),
    ]
    out += [(k, "POST", p, kw) for k, p, kw in post]
    out += [("name_with_newline", "PUT", "/v1/prompts/x%0A", {"content": bodies["upload_ok"], "headers": zip_hdr})]
    return out


def classify_status(status: int | None) -> str:
    if status is None:
        return "timeout_or_disconnect"
    return f"{status // 100}xx"


async def phase(url: str, concurrency: int, seconds: float, max_requests: int, texts, hostile, every: int,
                timeout: float, turn) -> dict:
    """One closed-loop phase; ``every`` = 0 means healthy only; ``turn`` (a shared counter) picks
    the next hostile kind, so every kind comes up in turn over the run."""
    import httpx

    records: list[tuple[str, str, float, int | None]] = []  # (class, kind, latency s, status)

    async def one(client, w: int, k: int) -> None:
        if every and k % every == every - 1:
            (kind, method, path, kw), cls = hostile[next(turn) % len(hostile)], "hostile"
        else:
            (kind, path, kw), method, cls = healthy(w, k, texts), "POST", "healthy"
        t = time.perf_counter()
        try:
            status = (await client.request(method, path, **kw)).status_code
        except httpx.HTTPError:
            status = None
        records.append((cls, kind, time.perf_counter() - t, status))

    wall = await SL.closed_loop(url, concurrency, seconds, max_requests, one, timeout)
    return {"wall_s": wall, "records": records}


def summarize(records: list, wall: float) -> dict:
    h = [r for r in records if r[0] == "healthy"]
    x = [r for r in records if r[0] == "hostile"]
    ok = [r[2] for r in h if r[3] == 200]
    errors = {c: {} for c in ("healthy", "hostile")}
    for cls, _, _, st in records:
        if st != 200 or cls == "hostile":
            key = classify_status(st)
            errors[cls][key] = errors[cls].get(key, 0) + 1
    by_kind: dict[str, dict[str, int]] = {}
    for _, kind, _, st in x:
        by_kind.setdefault(kind, {})
        by_kind[kind][str(st)] = by_kind[kind].get(str(st), 0) + 1
    return {"requests": len(records), "healthy": len(h), "hostile": len(x), "seconds": wall,
            "healthy_ok": len(ok), "healthy_p50_s": SL.pct(ok, 0.5), "healthy_p99_s": SL.pct(ok, 0.99),
            "answers_by_class": errors, "hostile_by_kind": by_kind,
            "hostile_failures": sum(v for k, v in errors["hostile"].items() if k in ("5xx", "timeout_or_disconnect")),
            "_latencies": ok}


def run(a, url: str, texts, hostile) -> list[dict]:
    out, turn = [], itertools.count()
    for rnd in range(a.rounds):
        order = ("clean", "hostile") if rnd % 2 == 0 else ("hostile", "clean")
        for name in order:
            res = asyncio.run(phase(url, a.concurrency, a.seconds, a.max_requests, texts, hostile,
                                    a.every if name == "hostile" else 0, a.timeout, turn))
            s = summarize(res["records"], res["wall_s"])
            s.update(round=rnd, phase=name)
            out.append(s)
            print(f"round {rnd} {name:7s} {s['requests']:4d} req ({s['hostile']} hostile)  healthy p50 "
                  f"{s['healthy_p50_s']:.3f}s p99 {s['healthy_p99_s']:.3f}s  answers {s['answers_by_class']}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model, short phases; results not written")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=None, help="per phase (default 25, quick 4)")
    ap.add_argument("--max-requests", type=int, default=600, help="cap per phase")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--every", type=int, default=5, help="every N-th request of a worker is hostile (default 5: 20%%)")
    ap.add_argument("--timeout", type=float, default=120.0, help="client timeout per request, s")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--mix", action="store_true", help="healthy streams beside the hostile mix (soak_mix.py)")
    ap.add_argument("--stream-tokens", type=int, default=24, help="--mix: tokens per healthy stream")
    ap.add_argument("--long-chars", type=int, default=8500, help="--mix: characters of the long prompt (quick: 300)")
    ap.add_argument("--engine", default="native", help="--mix: the server's --engine (vllm: run with --server-python)")
    ap.add_argument("--server-python", default=sys.executable, help="--mix: the Python that runs the server "
                    "(--engine vllm: .venv-vllm/bin/python)")
    ap.add_argument("--dtype", default="float32", help="--mix: the server's --dtype")
    a = ap.parse_args()
    if a.mix:
        return main_mix(a)
    import httpx


    a.seconds = a.seconds or (4.0 if a.quick else 25.0)
    t_start = time.perf_counter()
    info, home, model, texts, srv = start(a)
    try:
        SL.make_prompts(model, home)
        plant_invalid(model, common.store(home))
        bodies = upload_bodies(common.store(home).export_prompt("task0", home / "export"))
        hostile = hostile_requests(bodies)
        warm_up(srv, texts)
        phases = run(a, srv.url, texts, hostile)
        registry = httpx.get(srv.url + "/v1/prompts", timeout=60)
        listing = {"status": registry.status_code,
                   "entries": {e["id"]: e["status"] for e in registry.json().get("data", [])}
                   if registry.status_code == 200 else None}
    finally:
        srv.stop()
    leftovers = sorted(p.name for p in (home / "prompts").iterdir()
                       if p.name.startswith(".") and "@v-" not in p.name and not p.name.endswith("@lock"))
    report(a, info, model, phases, listing, leftovers, time.perf_counter() - t_start)
    shutil.rmtree(home, ignore_errors=True)


def start(a):
    """(machine info, temporary home, model, texts, the server starting)."""
    info = common.machine_info()
    home, model = SL.temp_home(a.quick)
    extra = ("--engine", a.engine) if getattr(a, "engine", "native") != "native" else ()
    srv = SL.Server(model, 32, a.threads, home / "server.log", home=home, extra=extra,
                    python=getattr(a, "server_python", sys.executable), dtype=getattr(a, "dtype", "float32"))
    return info, home, model, SL.sentences(200), srv


def warm_up(srv, texts: list[str]) -> None:
    """Wait for the server, then load every prompt and cache its prefix."""
    import httpx

    srv.wait_ready()
    for k in range(SL.PROMPTS):
        _, path, kw = healthy(k, 1 - k % 2, texts)
        httpx.post(srv.url + path, timeout=300, **kw).raise_for_status()


def main_mix(a) -> None:
    import soak_mix

    from softprompt.config import ServerConfig

    if a.quick:
        a.long_chars = min(a.long_chars, 300)
    info, home, model, texts, srv = start(a)
    try:
        SL.make_prompts(model, home)
        warm_up(srv, texts)
        res = soak_mix.run_mix(a, srv, texts)
    finally:
        srv.stop()
    payload, md = soak_mix.mix_report(a, info, model, res, ServerConfig().max_request_mb)
    payload["server_code"] = server_code()
    print(md)
    if not a.quick or a.out:
        name = "serve_soak_mix" if a.engine == "native" else f"serve_soak_mix_{a.engine}"
        print("wrote", *common.write_results(name, payload, md, a.out or common.RESULTS))
    shutil.rmtree(home, ignore_errors=True)


def server_code() -> dict:
    from softprompt.provenance import git_revision

    rev = git_revision()
    import subprocess

    try:
        subject = subprocess.run(["git", "log", "-1", "--format=%h %s"], cwd=common.REPO, capture_output=True,
                                 text=True, timeout=10).stdout.strip()[:200]
    except (OSError, subprocess.SubprocessError):
        subject = None
    return {**rev, "head": subject}


def report(a, info, model, phases, listing, leftovers, total) -> None:
    pooled = {n: sorted(x for p in phases if p["phase"] == n for x in p["_latencies"]) for n in ("clean", "hostile")}
    p99 = {n: SL.pct(v, 0.99) for n, v in pooled.items()}
    p50 = {n: SL.pct(v, 0.5) for n, v in pooled.items()}
    ratio = p99["hostile"] / p99["clean"]
    per_round = [next(p for p in phases if p["round"] == r and p["phase"] == "hostile")["healthy_p99_s"]
                 / next(p for p in phases if p["round"] == r and p["phase"] == "clean")["healthy_p99_s"]
                 for r in range(a.rounds)]
    healthy_errors = sum(sum(p["answers_by_class"]["healthy"].values()) for p in phases)
    hostile_failures = sum(p["hostile_failures"] for p in phases)
    for p in phases:
        p.pop("_latencies")
    payload = {"benchmark": "serve_soak", "model": model, "seed": common.SEED, "machine": info, "server_code": server_code(),
               "setup": {k: getattr(a, k) for k in ("rounds", "seconds", "max_requests", "concurrency", "every",
                                                    "timeout", "threads")} | {"new_tokens": NEW_TOKENS},
               "phases": phases, "pooled": {"healthy_p50_s": p50, "healthy_p99_s": p99},
               "p99_ratio_hostile_over_clean": ratio, "p99_ratio_per_round": per_round,
               "healthy_errors": healthy_errors, "hostile_5xx_or_timeouts": hostile_failures,
               "registry_after": listing, "store_leftovers_after": leftovers, "total_seconds": total,
               "target": {"p99_ratio": TARGET_P99_RATIO}, "target_met": ratio <= TARGET_P99_RATIO and healthy_errors == 0}
    rows = [[p["round"], p["phase"], p["requests"], p["hostile"], p["healthy_ok"], p["healthy_p50_s"], p["healthy_p99_s"],
             json.dumps(p["answers_by_class"]["healthy"]), json.dumps(p["answers_by_class"]["hostile"])] for p in phases]
    kinds: dict[str, dict[str, int]] = {}
    for p in phases:
        for kind, st in p["hostile_by_kind"].items():
            for s, n in st.items():
                kinds.setdefault(kind, {})[s] = kinds.setdefault(kind, {}).get(s, 0) + n
    code = payload["server_code"]
    md = (f"# serve_soak\n\n`softprompt serve` ({model}, {a.threads} torch thread) on 127.0.0.1 under a closed loop of "
          f"{a.concurrency} workers, {a.rounds} rounds of a clean and a hostile phase ({a.seconds:g} s or "
          f"{a.max_requests} requests each, order alternating); in hostile phases every {a.every}th request is one of "
          f"{len(kinds)} hostile reproducers. Server code: `{code.get('head')}` (dirty: {code.get('dirty')}). "
          f"{info['cpu']} ({info['cores']} cores, shared: load average {info['loadavg_at_start'][0]:.1f} at start).\n\n"
          + common.md_table(["round", "phase", "requests", "hostile", "healthy ok", "healthy p50 s", "healthy p99 s",
                             "healthy non-200", "hostile answers"], rows)
          + f"\nPooled healthy latency: clean p50 {p50['clean']:.3f}s p99 {p99['clean']:.3f}s; with hostile requests "
          f"p50 {p50['hostile']:.3f}s p99 {p99['hostile']:.3f}s: **p99 ratio {ratio:.2f}x** (per round: "
          f"{', '.join(f'{r:.2f}' for r in per_round)}; target <= {TARGET_P99_RATIO:g}x): "
          f"{'met' if payload['target_met'] else 'missed'}. Healthy requests that did not get 200: {healthy_errors}. "
          f"Hostile requests answered 5xx or not at all: {hostile_failures}.\n\n"
          "Hostile answers by kind (status: count):\n\n"
          + common.md_table(["kind", "answers"], [[k, json.dumps(v, sort_keys=True)] for k, v in sorted(kinds.items())])
          + f"\nAfter the run: `GET /v1/prompts` answered {listing['status']} with entries {listing['entries']}; "
          f"store leftovers: {leftovers or 'none'}. Whole run: {total:.0f}s.\n")
    print(md)
    if not a.quick or a.out:
        print("wrote", *common.write_results("serve_soak", payload, md, a.out or common.RESULTS))


if __name__ == "__main__":
    main()
