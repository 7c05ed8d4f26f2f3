"""vLLM's in-process engine (``AsyncLLM``) for the served model, configured with vLLM's own flags.

``engine_args(path, dtype, cfg, extra)`` parses ``--model PATH --dtype D --enable-prompt-embeds``
and the server's sizes with vLLM's own argument parser, then ``extra`` (the ``--vllm-arg``
values, passed through untouched: ``--tensor-parallel-size 2``, ``--pipeline-parallel-size``,
``--distributed-executor-backend ray``, ``--kv-cache-memory-bytes``, ...); later flags win, so
anything here can be overridden. On a CPU, vLLM's step budget follows the server's flags
(``step_tokens``: chunked prefill of at most ``--prefill-chunk`` prompt tokens beside the
decoding rows). On CPU the KV cache gets ``CPU_KV_CACHE_BYTES`` unless
``--kv-cache-memory-bytes`` is given (vLLM's GPU-style default reserves most of the RAM).

On a CPU-only machine the cores are split (``split_cpus``): vLLM's model worker on all but one,
this process's worker thread (which scores classify requests on the built-in engine) on the
last, so scoring never competes with vLLM's steps.

Invariant: ``--enable-prompt-embeds`` is always on (the prompts travel as embeddings).
"""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from softprompt.inference.engine import Engine

log = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 1 << 30  # 1 GiB: ~46k tokens of SmolLM2-135M in bf16


def step_tokens(cfg) -> int:
    """vLLM's token budget per step on a CPU (``--max-num-batched-tokens``): one token for each
    of the ``--max-batch-rows`` decoding rows plus ``--prefill-chunk`` prompt tokens, the
    built-in scheduler's chunk. vLLM's CPU default (2,048 to 4,096) lets one long prompt be read
    in a single step, which stalls every decoding stream for that step (about a second here).
    On a GPU such a step is short, and vLLM's own default stays."""
    return cfg.max_batch_rows + cfg.prefill_chunk


def engine_args(path: str, dtype: str, cfg, extra: list[str] = ()):
    """``AsyncEngineArgs`` for the model folder ``path`` in ``dtype`` sized by ``cfg``
    (``ServerConfig``), then vLLM's own ``extra`` flags."""
    import torch
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(prog="softprompt serve --vllm-arg"))
    flags = ["--model", path, "--dtype", dtype, "--enable-prompt-embeds",
             "--max-num-seqs", str(cfg.max_batch_rows), "--disable-log-stats"]
    if not torch.cuda.is_available():
        flags += ["--kv-cache-memory-bytes", str(CPU_KV_CACHE_BYTES), "--max-num-batched-tokens", str(step_tokens(cfg))]
    words = [w for x in extra for w in shlex.split(x)]
    args = AsyncEngineArgs.from_cli_args(parser.parse_args(flags + words))
    log.info("vllm engine arguments", extra={"fields": {"flags": " ".join(flags + words)}})
    return args


def split_cpus(given: str | None) -> tuple[str | None, set[int] | None]:
    """On a CPU-only machine: (the ``VLLM_CPU_OMP_THREADS_BIND`` to set, the CPUs left for this
    process's own work). vLLM binds its model worker to the machine's cores but one, the one it
    reserves for its scheduler and the API process; the built-in engine's work here (classify,
    echoed log-probabilities) must stay on that reserved core, or it slows every vLLM step.
    So the split is made explicit: vLLM's worker gets every allowed CPU but the last, this
    process's worker the last. A bind the user set is kept (ours then goes where it leaves
    room, if it is a plain list); with one CPU there is nothing to split: (None, None)."""
    cpus = sorted(os.sched_getaffinity(0))
    if given:
        try:
            used = {int(x) for part in given.split(",") for x in _span(part)}
        except ValueError:
            return None, None
        rest = set(cpus) - used
        return None, rest or None
    if len(cpus) < 2:
        return None, None
    return ",".join(map(str, cpus[:-1])), {cpus[-1]}


def _span(part: str) -> range:
    a, _, b = part.partition("-")
    return range(int(a), int(b or a) + 1)


def scheduler_factory(engine: Engine, cfg, extra: list[str] = (), cpu_bind: str | None = None,
                      set_bind: Callable[[str], None] | None = None):
    """Start vLLM on ``engine``'s model folder in ``engine``'s dtype (so both engines agree), and
    return what ``create_app`` calls to build the ``VllmScheduler`` over both. Start-up compiles
    unless ``--enforce-eager`` is among ``extra`` (about a minute on CPU either way). On a CPU,
    ``cpu_bind`` (the user's ``VLLM_CPU_OMP_THREADS_BIND``) and ``set_bind`` (the process's edge
    that sets it) split the cores (``split_cpus``); without ``set_bind`` nothing is split."""
    import torch
    from transformers import AutoTokenizer
    from vllm.v1.engine.async_llm import AsyncLLM

    from softprompt.serve.vllm.runner import VllmScheduler

    dtype = str(engine.model.get_input_embeddings().weight.dtype).removeprefix("torch.")
    path = str(engine.lm.path)
    bind, own = split_cpus(cpu_bind) if not torch.cuda.is_available() and set_bind else (None, None)
    if bind is not None and set_bind is not None:
        set_bind(bind)  # read by vLLM's engine process when it starts
    log.info("cpu split", extra={"fields": {"vllm_worker": bind or cpu_bind, "this_process_worker": sorted(own) if own else None}})
    llm = AsyncLLM.from_engine_args(engine_args(path, dtype, cfg, extra))
    loop_tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return lambda eng, metrics, config: VllmScheduler(eng, metrics, config, llm, loop_tok, own)
