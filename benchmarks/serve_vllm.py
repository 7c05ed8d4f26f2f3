"""Serving on vLLM: stored prompts through ``softprompt serve --engine vllm`` vs vLLM's own server
with the plain model, and vs the built-in engine.

Servers (subprocesses on free loopback ports, all started first, then measured in interleaved
rounds: every set-up once per round, so ratios compare runs minutes apart on the same machine):

* ``vllm plain``: vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``),
  the plain model; the anchor;
* ``softprompt vllm``: ``softprompt serve --engine vllm``, the same vLLM flags, measured with the
  plain model, with 1 stored prompt, and with 8 prompts mixed (request k of client w uses prompt
  (w + k) mod 8);
* ``built-in bf16`` / ``built-in fp32`` / ``built-in auto``: ``softprompt serve --engine native
  --dtype ...`` (``auto``, the default, resolves to bfloat16 where the CPU has native bf16, else
  float32; the resolved dtype is read from its log and recorded).

Load: 96 completion requests (one SST-2 sentence each, or synthetic sentences without the data),
64 new tokens, greedy, ``ignore``-free (a request may end early on EOS; tokens are counted from
``usage``), from 32 concurrent clients in a closed loop; each request is streamed so the time to
first token (TTFT) is measured. Reported: generated tokens/s, p50/p99 latency, p50 TTFT, and the
ratios the targets name: prompts on vLLM / vLLM plain (>= 0.9), ``--engine vllm`` / built-in
bf16 (>= 1.8), built-in ``--dtype auto`` / built-in fp32 (>= 1.3 where bf16 is native). Both vLLM servers run with ``--enforce-eager`` by default (``--compile`` to let
vLLM compile; the same flags for both either way). The prompts are random rows of the
embedding matrix (N = 20), in a temporary store that links the converted default model.

    .venv-vllm/bin/python benchmarks/serve_vllm.py --native-python .venv/bin/python
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from serve_load import closed_loop, pct, sentences  # noqa: E402

PROMPTS, N, NEW_TOKENS, CLIENTS, REQUESTS = 8, 20, 64, 32, 96
TARGET_PROMPTS, TARGET_ENGINE, TARGET_AUTO = 0.9, 1.8, 1.3


class Proc:
    """A server subprocess on a free loopback port."""

    def __init__(self, name: str, cmd: list[str], env: dict, log_dir: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.name, self.url = name, f"http://127.0.0.1:{self.port}"
        self.log = (log_dir / f"{name.replace(' ', '_')}.log").open("w")
        self.proc = subprocess.Popen([*cmd, "--port", str(self.port)], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 900) -> None:
        import httpx

        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {self.log.name}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1)
        raise RuntimeError(f"{self.name} did not start")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def make_home() -> tuple[Path, Path]:
    """A temp store linking the converted default model, with 8 prompts; (home, model folder)."""
    import torch

    from softprompt import models

    real = common.store()  # the user's store: its converted default model is linked, never written
    _, path = models.resolve(None, real)
    home = Path(tempfile.mkdtemp(prefix="sp-serve-vllm-"))
    (home / "models").symlink_to(real.models, target_is_directory=True)
    st = common.store(home)
    lm = models.load(None, store=st)
    emb, g = lm.model.get_input_embeddings().weight, torch.Generator().manual_seed(common.SEED)
    for k in range(PROMPTS):
        rows = emb[torch.randint(0, emb.shape[0], (N,), generator=g)].detach().clone()
        st.save_prompt(f"task{k}", rows, {"base_model": {"name": lm.name, "fingerprint": lm.fingerprint}})
    return home, home / "models" / path.name


async def run_load(url: str, model_of, texts: list[str], requests: int = REQUESTS) -> dict:
    """``requests`` streamed completions from ``CLIENTS`` clients; tokens/s, latency, TTFT."""
    records = []

    async def one(client, w: int, k: int) -> None:
        body = {"model": model_of(w, k), "prompt": texts[(w * 7919 + k) % len(texts)], "max_tokens": NEW_TOKENS,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        t, first, tokens, status = time.perf_counter(), None, 0, 0
        async with client.stream("POST", "/v1/completions", json=body) as r:
            status = r.status_code
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first is None and any(c.get("text") for c in chunk.get("choices", [])):
                    first = time.perf_counter() - t
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        records.append((time.perf_counter() - t, first, tokens, status))

    wall = await closed_loop(url, CLIENTS, 1e9, requests, one)
    ok = [r for r in records if r[3] == 200]
    return {"requests": len(records), "errors": len(records) - len(ok), "seconds": wall,
            "tokens": sum(r[2] for r in ok), "tokens_per_s": sum(r[2] for r in ok) / wall,
            "p50_s": pct([r[0] for r in ok], 0.5), "p99_s": pct([r[0] for r in ok], 0.99),
            "ttft_p50_s": pct([r[1] for r in ok if r[1] is not None], 0.5)}


def servers(a, model_dir: Path, home: Path) -> dict[str, Proc]:
    """The measured servers; softprompt's serve the store at ``home`` (their logs go there too)."""
    log_dir = home
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    eager = [] if a.compile else ["--enforce-eager"]
    kv = ["--kv-cache-memory-bytes", str(1 << 30)]
    sp = ["-m", "softprompt", "serve", "--home", str(home), "--max-queue", "4096"]
    native_env = {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(common.REPO / "src")}
    return {
        "vllm plain": Proc("vllm plain", [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                                          str(model_dir), "--dtype", "bfloat16", "--max-num-seqs", "32",
                                          "--disable-log-stats", *kv, *eager], env, log_dir),
        "softprompt vllm": Proc("softprompt vllm", [sys.executable, *sp, "--engine", "vllm", "--dtype", "bfloat16",
                                                    *[f"--vllm-arg={x}" for x in eager]], env, log_dir),
        "built-in bf16": Proc("built-in bf16", [a.native_python, *sp, "--engine", "native", "--dtype", "bfloat16"],
                              native_env, log_dir),
        "built-in fp32": Proc("built-in fp32", [a.native_python, *sp, "--engine", "native", "--dtype", "float32"],
                              native_env, log_dir),
        "built-in auto": Proc("built-in auto", [a.native_python, *sp, "--engine", "native", "--dtype", "auto"],
                              native_env, log_dir),
    }


def resolved_dtype(proc: Proc) -> str:
    """The dtype a ``--dtype auto`` server logged that it chose (its JSON log's ``dtype`` field)."""
    for line in Path(proc.log.name).read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "dtype" in rec:
            return f"{rec['dtype']} ({rec.get('why', '')})"
    return "unknown (not logged)"


def setups(procs: dict[str, Proc], model_dir: Path) -> list[tuple[str, str, object]]:
    """(label, url, model_of(w, k)) of each measured set-up."""
    base = "smollm2-135m"
    return [("vllm plain", procs["vllm plain"].url, lambda w, k: str(model_dir)),
            ("softprompt vllm, plain model", procs["softprompt vllm"].url, lambda w, k: base),
            ("softprompt vllm, 1 prompt", procs["softprompt vllm"].url, lambda w, k: "task0"),
            ("softprompt vllm, 8 prompts mixed", procs["softprompt vllm"].url, lambda w, k: f"task{(w + k) % PROMPTS}"),
            ("built-in bf16, 8 prompts mixed", procs["built-in bf16"].url, lambda w, k: f"task{(w + k) % PROMPTS}"),
            ("built-in fp32, 8 prompts mixed", procs["built-in fp32"].url, lambda w, k: f"task{(w + k) % PROMPTS}"),
            ("built-in auto, 8 prompts mixed", procs["built-in auto"].url, lambda w, k: f"task{(w + k) % PROMPTS}")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="let vLLM compile (default: --enforce-eager on both)")
    p.add_argument("--native-python", default=sys.executable, help="python that runs the built-in servers")
    p.add_argument("--requests", type=int, default=REQUESTS, help="completions per set-up and round (default %(default)s)")
    p.add_argument("--out", type=Path, default=common.RESULTS)
    a = p.parse_args()
    info = common.machine_info()
    home, model_dir = make_home()
    procs = servers(a, model_dir, home)
    try:
        for s in procs.values():
            s.wait_ready()
        a.auto_dtype = resolved_dtype(procs["built-in auto"])
        print(f"built-in --dtype auto: {a.auto_dtype}", flush=True)
        texts = sentences(200)
        runs: dict[str, list[dict]] = {}
        for r in range(a.rounds):
            for label, url, model_of in setups(procs, model_dir):
                res = asyncio.run(run_load(url, model_of, texts, a.requests))
                res["loadavg_1m"] = os.getloadavg()[0]
                runs.setdefault(label, []).append(res)
                print(f"round {r}: {label}: {res['tokens_per_s']:.1f} tok/s, p50 {res['p50_s']:.2f}s, "
                      f"errors {res['errors']}", flush=True)
    finally:
        for s in procs.values():
            s.stop()
    report(a, info, runs)


def report(a, info: dict, runs: dict[str, list[dict]]) -> None:
    def mean(label: str, key: str) -> float:
        return sum(x[key] for x in runs[label]) / len(runs[label])

    def ratio(num: str, den: str) -> list[float]:  # per round, then their mean
        return [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(runs[num], runs[den])]

    anchor, loads = "vllm plain", [x["loadavg_1m"] for v in runs.values() for x in v]
    ratios = {"1 prompt / vllm plain": ratio("softprompt vllm, 1 prompt", anchor),
              "8 prompts mixed / vllm plain": ratio("softprompt vllm, 8 prompts mixed", anchor),
              "--engine vllm / built-in bf16 (8 prompts mixed)": ratio("softprompt vllm, 8 prompts mixed",
                                                                       "built-in bf16, 8 prompts mixed"),
              "built-in bf16 / built-in fp32": ratio("built-in bf16, 8 prompts mixed", "built-in fp32, 8 prompts mixed"),
              "built-in auto / built-in fp32": ratio("built-in auto, 8 prompts mixed", "built-in fp32, 8 prompts mixed")}
    payload = {"machine": info, "rounds": a.rounds, "clients": CLIENTS, "requests": a.requests, "new_tokens": NEW_TOKENS,
               "builtin_auto_dtype": a.auto_dtype,
               "prompt_tokens": N, "eager": not a.compile, "runs": runs, "ratios": ratios,
               "targets": {"prompts_vs_vllm_plain": TARGET_PROMPTS, "engine_vllm_vs_builtin_bf16": TARGET_ENGINE,
                           "builtin_auto_vs_fp32": TARGET_AUTO}}
    rows = [[label, f"{mean(label, 'tokens_per_s'):.1f}", f"{mean(label, 'tokens_per_s') / mean(anchor, 'tokens_per_s'):.2f}",
             f"{mean(label, 'p50_s'):.2f}", f"{mean(label, 'p99_s'):.2f}", f"{mean(label, 'ttft_p50_s'):.2f}",
             sum(x["errors"] for x in runs[label])] for label in runs]
    md = [f"# serve_vllm: stored prompts on vLLM ({a.requests} completions x {NEW_TOKENS} tokens, {CLIENTS} clients, "
          f"{a.rounds} interleaved rounds{', vLLM --enforce-eager' if not a.compile else ''})", "",
          common.load_note(info, "servers"), "", f"Built-in `--dtype auto` resolved to: {a.auto_dtype}. 1-minute load average after each "
          f"measurement: {min(loads):.1f} to {max(loads):.1f} on {info['cores']} cores.", "",
          common.md_table(["set-up", "tokens/s", "vs vLLM plain", "p50 s", "p99 s", "TTFT p50 s", "errors"], rows), "",
          common.md_table(["ratio (per round)", "rounds", "mean"],
                          [[k, ", ".join(f"{x:.2f}" for x in v), f"{sum(v) / len(v):.2f}"] for k, v in ratios.items()])]
    common.write_results("serve_vllm", payload, "\n".join(md) + "\n", a.out)
    print("\n".join(md))


if __name__ == "__main__":
    main()
