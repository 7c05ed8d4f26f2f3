"""vLLM's in-process engine (``AsyncLLM``) for the served model, configured with vLLM's own flags.

``engine_args(path, dtype, cfg, extra)`` parses ``--model PATH --dtype D --enable-prompt-embeds``
and the server's sizes with vLLM's own argument parser, then ``extra`` (the ``--vllm-arg``
values, passed through untouched: ``--tensor-parallel-size 2``, ``--pipeline-parallel-size``,
``--distributed-executor-backend ray``, ``--kv-cache-memory-bytes``, ...); later flags win, so
anything here can be overridden. On CPU the KV cache gets ``CPU_KV_CACHE_BYTES`` unless
``--kv-cache-memory-bytes`` is given (vLLM's GPU-style default reserves most of the RAM).

Invariant: ``--enable-prompt-embeds`` is always on (the prompts travel as embeddings).
"""

from __future__ import annotations

import logging
import shlex

log = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 1 << 30  # 1 GiB: ~46k tokens of SmolLM2-135M in bf16


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
        flags += ["--kv-cache-memory-bytes", str(CPU_KV_CACHE_BYTES)]
    words = [w for x in extra for w in shlex.split(x)]
    args = AsyncEngineArgs.from_cli_args(parser.parse_args(flags + words))
    log.info("vllm engine arguments", extra={"fields": {"flags": " ".join(flags + words)}})
    return args


def scheduler_factory(engine, cfg, extra: list[str] = ()):
    """Start vLLM on ``engine``'s model folder in ``engine``'s dtype (so both engines agree), and
    return what ``create_app`` calls to build the ``VllmScheduler`` over both. Start-up compiles
    unless ``--enforce-eager`` is among ``extra`` (about a minute on CPU either way)."""
    from transformers import AutoTokenizer
    from vllm.v1.engine.async_llm import AsyncLLM

    from softprompt.serve.vllm.runner import VllmScheduler

    dtype = str(engine.model.get_input_embeddings().weight.dtype).removeprefix("torch.")
    path = str(engine.lm.path)
    llm = AsyncLLM.from_engine_args(engine_args(path, dtype, cfg, extra))
    loop_tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return lambda eng, metrics, config: VllmScheduler(eng, metrics, config, llm, loop_tok)
