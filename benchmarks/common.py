"""Shared helpers for the benchmark scripts: paths, data, models, machine info, result files.

Nothing here measures anything; the scripts do. Two kinds of model:

* the real default model (``softprompt.models.load``), for the numbers we report;
* ``--quick``: a tiny random Llama (H=64, 2 layers) with an in-process byte-level tokenizer,
  built without touching the disk or the network, so that a smoke test runs in seconds.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
if str(REPO / "src") not in sys.path:  # the package may not be pip-installed yet
    sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from softprompt import data as D  # noqa: E402
from softprompt.cli import environ  # noqa: E402 (a benchmark is an edge, like the CLI: it reads the environment)
from softprompt.data import IGNORE  # noqa: E402
from softprompt.provenance import atomic_write, write_json  # noqa: E402

ENV = environ.read()
DATA = ENV.data or REPO.parent / "shared" / "data"  # $SOFTPROMPT_DATA, else ../shared/data beside the repository


def data_root() -> Path:
    """Where the benchmarks' data sets are (their files, read through common)."""
    return DATA


def store(home: str | Path | None = None):
    """A Store at ``home`` (default: $SOFTPROMPT_HOME or ~/.cache/softprompt) over the benchmarks' data."""
    from softprompt.store import Store

    return Store(Path(home) if home else ENV.home, DATA, hub_cache=ENV.hub_cache, offline=ENV.offline)


def temp_store(prefix: str):
    """A temporary store, removed at exit: the benchmark's prompts go there, never into the user's."""
    import atexit
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, tmp, True)
    return store(tmp)


def cli_env() -> dict[str, str]:
    """The environment of a ``softprompt`` child process: this checkout's sources, the benchmarks' data."""
    path = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false", "SOFTPROMPT_DATA": str(DATA)}


def cli(args: list[str], env: dict) -> str:
    """Run ``softprompt ARGS`` as a user does; its standard output (its stderr on failure, then exit)."""
    import subprocess

    done = subprocess.run([sys.executable, "-m", "softprompt", *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"softprompt {' '.join(args[:3])} ... failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


THREADS = 2
SEED = 0
Example = tuple[list[int], list[int]]  # (input_ids, labels with IGNORE where no target)


# ---------------------------------------------------------------- data


def read_label_lines(path: Path, limit: int | None = None) -> list[tuple[str, str]]:
    """``<label> <sentence>`` lines -> [(label, sentence)]."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            label, text = line.split(" ", 1)
            rows.append((label, text.strip()))
    return rows[:limit] if limit else rows


def read_csv_column(path: Path, column: str, limit: int | None = None) -> list[str]:
    with path.open(newline="", encoding="utf-8") as f:
        values = [row[column] for row in csv.DictReader(f)]
    return values[:limit] if limit else values


def synthetic_sentences(n: int, seed: int = SEED) -> list[str]:
    """Stand-in text for ``--quick`` runs on machines without the shared data folder."""
    rng = random.Random(seed)
    words = "a the film movie good bad great dull plot actor story slow fun moving".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) for _ in range(n)]


def target_example(tokenizer, source: str, target: str, max_length: int) -> Example:
    """Input -> target row: labels only on the target tokens; the source is cut from the left."""
    src, tgt = D.encode(tokenizer, source), D.encode(tokenizer, target)
    src = src[-(max_length - len(tgt)) :]
    return src + tgt, [IGNORE] * len(src) + tgt


def _examples(examples: list[Example]) -> list[D.Example]:
    return [D.Example(input_ids=list(x), labels=list(y), source_len=0) for x, y in examples]


def bucketed_batches(examples: list[Example], batch_size: int, seed: int = SEED) -> list[list[int]]:
    """The package's length-bucketed batch order (``data.bucketed_batches``, epoch 0)."""
    return D.bucketed_batches(_examples(examples), batch_size, seed, 0)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """The package's right-padding collate (``data.collate``): input_ids, attention_mask, labels."""
    return D.collate(_examples(examples), pad_id)


# ---------------------------------------------------------------- models


def byte_tokenizer():
    """A byte-level tokenizer built in memory (256 byte tokens + <eos>, pad = eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<eos>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def tiny_llama(vocab_size: int, seed: int = SEED) -> torch.nn.Module:
    """A random 2-layer Llama, H=64, frozen and in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    model.requires_grad_(False)
    return model


def load_lm(quick: bool):
    """A ``softprompt.models.LoadedModel``: the default model, or the tiny one for ``--quick``."""
    from softprompt import models

    if not quick:
        return models.load(models.DEFAULT_MODEL, store=store())  # converted into the user's store once
    tok = byte_tokenizer()
    model = tiny_llama(len(tok))
    return models.LoadedModel(model=model, tokenizer=tok, name="tiny-llama", path=Path("tiny-llama-in-memory"),
                              fingerprint=models.fingerprint(model))


def tiny_folder(folder: Path) -> Path:
    """The --quick model saved as a transformers folder (``--model`` of a CLI run, other processes)."""
    lm = load_lm(True)
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def separate_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An independent copy (PEFT wraps the model it is given; keep that away from ours)."""
    return copy.deepcopy(model)


# ---------------------------------------------------------------- reporting


def machine_info() -> dict[str, Any]:
    import peft
    import transformers

    from softprompt import precision

    cpu = precision.cpu_model()
    bf16, why = precision.native_bf16(torch.device("cpu"))
    return {
        "cpu": cpu or platform.processor(),
        "cpu_bf16_native": bf16,
        "cpu_bf16_detail": why,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "loadavg_at_start": os.getloadavg(),
    }


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "mean": statistics.fmean(values),
            "min": min(values), "max": max(values), "n": len(values)}


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[_fmt(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells]) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 and value != 0 else f"{value:,.2f}"
    return str(value)


def load_note(info: dict, what: str = "methods") -> str:
    """One sentence on the machine's load during the run (1-minute load average at start and
    end, against this run's own threads)."""
    start, end = info["loadavg_at_start"][0], os.getloadavg()[0]
    busy = max(start, end) > info["torch_threads"] + 1
    return (f"Load average (1 min) at start {start:.1f}, at end {end:.1f}: "
            + ("other jobs shared the cores, so absolute times are inflated; " if busy
               else "the machine was otherwise idle; ")
            + f"{what} ran interleaved.\n")


def output_flags(ap) -> None:
    """``--out`` (results folder) and ``--render`` (the Markdown again from the committed JSON)."""
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results; temp with --quick)")
    ap.add_argument("--render", action="store_true", help="rebuild the Markdown from the JSON of the last run")


def render(name: str, markdown) -> None:
    """``--render``: rebuild ``<name>.md`` from the committed ``<name>.json`` with ``markdown(payload)``."""
    payload = json.loads((RESULTS / f"{name}.json").read_text())
    print("wrote", *write_results(name, payload, markdown(payload)))


def write_results(name: str, payload: dict, markdown: str, out_dir: Path = RESULTS) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"{name}.json", out_dir / f"{name}.md"
    return write_json(payload, js, indent=2), atomic_write(md, markdown)


# ---------------------------------------------------------------- roofline


def matmul_peak_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 3, rounds: int = 3,
                       device: str | torch.device = "cpu") -> float:
    """The machine's matmul peak with the current torch threads (or on ``device``'s GPU): best
    GFLOPS of an (n, n) @ (n, n) GEMM on random data in ``dtype`` (best of ``rounds``, so another
    process's burst does not lower it)."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b  # warm-up (oneDNN / cuBLAS pick their kernel on the first call)
    best = float("inf")
    for _ in range(rounds):
        with DeviceTimer(device) as t:
            for _ in range(reps):
                a @ b
        best = min(best, t.seconds / reps)
    return 2 * n**3 / best / 1e9


class DeviceTimer:
    """Seconds of the work inside the block, queued work included: on a GPU, CUDA events around
    it, read after synchronising (the queue is drained before it starts); on the CPU, the wall
    clock."""

    def __init__(self, device: str | torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.seconds = float("nan")

    def __enter__(self) -> DeviceTimer:
        if self.cuda:
            torch.cuda.synchronize()
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self._end.record()
            self._end.synchronize()
            self.seconds = self._start.elapsed_time(self._end) / 1e3
        else:
            self.seconds = time.perf_counter() - self._t


def matmul_peaks() -> dict[str, float]:
    """fp32 and bf16 matmul peaks (GFLOPS) with the threads the benchmark uses."""
    return {"fp32": matmul_peak_gflops(torch.float32), "bf16": matmul_peak_gflops(torch.bfloat16),
            "threads": torch.get_num_threads()}


def decoder_dims(config) -> dict[str, int]:
    """Shapes that decide a decoder's FLOPs (Llama-style gated MLP, or GPT-2's 4H MLP)."""
    H = config.hidden_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    d = getattr(config, "head_dim", None) or H // heads
    inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * H
    gated = hasattr(config, "intermediate_size")
    per_layer = H * heads * d * 2 + H * kv * d * 2 + (3 if gated else 2) * H * inter  # q, o, k, v, MLP weights
    return {"H": H, "layers": config.num_hidden_layers, "V": config.vocab_size, "heads": heads, "head_dim": d,
            "layer_weights": per_layer}


def train_flops(config, tokens: int, attn_pairs: int, logit_rows: int) -> float:
    """FLOPs of one forward + backward through a frozen decoder (no weight gradients): ``tokens``
    through every layer, ``attn_pairs`` (query, key) pairs per layer and head, ``logit_rows``
    vocabulary projections. Backward of a frozen matmul = its input gradient = the forward's
    FLOPs again; attention backward = two forward's worth (dQ, dK, dV, dP)."""
    d = decoder_dims(config)
    linear = 2 * tokens * d["layer_weights"] * d["layers"]
    attention = 4 * attn_pairs * d["heads"] * d["head_dim"] * d["layers"]
    head = 2 * logit_rows * d["H"] * d["V"]
    return 2 * linear + 3 * attention + 2 * head


def forward_flops(config, prompt_lengths: list[int], generated: list[int], prefix: int = 0) -> float:
    """Useful FLOPs of generation requests through a decoder: each row's prefill of its prompt
    tokens and each generated token's forward (weights, attention over ``prefix`` cached keys and
    the row's context, one vocabulary projection per generated token); no padding, no prefix
    computation (a cached prompt's keys/values are free at serving time)."""
    d = decoder_dims(config)
    fed = [p + max(g - 1, 0) for p, g in zip(prompt_lengths, generated)]  # the last new token is never fed back
    tokens = sum(fed)
    pairs = sum(causal_pairs([n], prefix) for n in fed)
    return (2 * tokens * d["layer_weights"] * d["layers"] + 4 * pairs * d["heads"] * d["head_dim"] * d["layers"]
            + 2 * sum(generated) * d["H"] * d["V"])


def causal_pairs(lengths: list[int], prefix: int = 0) -> int:
    """(query, key) pairs of causal attention: each of a row's tokens sees ``prefix`` keys and
    the row's earlier tokens and itself."""
    return sum(n * prefix + n * (n + 1) // 2 for n in lengths)


def roofline(flops: float, seconds: float, peak_gflops: float) -> dict[str, float]:
    achieved = flops / seconds / 1e9
    return {"gflop": flops / 1e9, "achieved_gflops": achieved, "peak_gflops": peak_gflops,
            "fraction_of_peak": achieved / peak_gflops}


# ---------------------------------------------------------------- memory


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class PeakRss:
    """Samples RSS in a thread (torch ops release the GIL) and keeps the maximum."""

    def __init__(self, interval_s: float = 0.0005):
        self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRss:
        self.base = rss_bytes()
        self.peak = self.base
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


# ---------------------------------------------------------------- a shared machine


def _busy_s() -> float:
    """CPU seconds all processes spent busy (not idle/iowait), from /proc/stat."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except OSError:
        return 0.0
    return (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")


class Meter:
    """Wall time, our CPU time and the CPU other processes used during a block.

    ``foreign_cores`` (CPU seconds of other processes / wall seconds) is ~0 when we had the
    machine to ourselves; timings taken while it is high are not worth keeping: two torch
    threads on two cores slow down many times over when another process holds a core."""

    def __enter__(self) -> Meter:
        self._t, self._cpu, self._busy = time.perf_counter(), time.process_time(), _busy_s()
        return self

    def __exit__(self, *exc) -> None:
        self.wall_s = time.perf_counter() - self._t
        self.cpu_s = time.process_time() - self._cpu
        foreign = _busy_s() - self._busy - self.cpu_s
        self.foreign_cores = max(0.0, foreign) / max(1e-9, self.wall_s)

    @property
    def utilisation(self) -> float:
        return self.cpu_s / max(1e-9, self.wall_s * torch.get_num_threads())


QUIET_CORES = 0.1  # other processes' average load (in cores) we still call quiet


def wait_for_quiet(max_wait_s: float, window_s: float = 2.0) -> float:
    """Sleep until other processes use < QUIET_CORES over a window; returns seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait_s:
        with Meter() as m:
            time.sleep(window_s)
        if m.foreign_cores < QUIET_CORES:
            break
    return time.perf_counter() - t0


class QuietGate:
    """Before each measurement wait for a quiet machine, within a total waiting budget; a
    measurement taken under load is redone (at most ``retries`` times) while budget is left."""

    def __init__(self, budget_s: float, retries: int = 3):
        self.budget_s, self.retries = budget_s, retries
        self.waited_s, self.discarded = 0.0, 0

    def wait(self) -> None:
        if self.budget_s > self.waited_s:
            self.waited_s += wait_for_quiet(self.budget_s - self.waited_s)

    def accept(self, foreign_cores: float, attempt: int) -> bool:
        ok = foreign_cores < QUIET_CORES or attempt >= self.retries or self.waited_s >= self.budget_s
        self.discarded += not ok
        return ok

    def report(self) -> dict:
        return {"budget_s": self.budget_s, "waited_s": self.waited_s, "discarded": self.discarded,
                "quiet_threshold_cores": QUIET_CORES}


def out_dir(requested: Path | None, quick: bool) -> Path:
    """Where results go: as asked, else the results folder, or a temp folder for ``--quick``."""
    if requested is not None:
        requested.mkdir(parents=True, exist_ok=True)  # journals are appended to before the first result
        return requested
    return Path(tempfile.mkdtemp(prefix="sp-bench-quick-")) if quick else RESULTS


def setup_torch(quick: bool = False, seed: int = SEED, threads: int | None = None) -> None:
    """2 threads for real runs; 1 for ``--quick``: tiny ops on 2 threads crawl (~25x slower)
    when another process holds one of the 2 cores, as OpenMP barriers wait for a time slice."""
    torch.set_num_threads(threads or (1 if quick else THREADS))
    torch.manual_seed(seed)
