"""The process's edge: the ONE module that reads (and, for third-party libraries, writes) the
environment. Everything else under ``src/`` takes values as arguments (tests/test_environ.py
checks it).

Read once per command, in this order: the flag, then the environment variable, then the default.

    --home         $SOFTPROMPT_HOME                   ~/.cache/softprompt   the store (``store.Store``)
    --data-root    $SOFTPROMPT_DATA                   <home>/data           task recipes' files
    --api-key      $SOFTPROMPT_API_KEY                none                  ``serve``
    --offline      $HF_HUB_OFFLINE, $TRANSFORMERS_OFFLINE  off              the Hugging Face hub
                   $HF_HUB_CACHE, else $HF_HOME/hub   the library's default the hub cache for models
                   $RANK, $WORLD_SIZE, $LOCAL_RANK    one process           torchrun / accelerate launch

It lives in ``cli/`` because the command line is where a process starts: the library below it
is used by programs that build their own ``Store`` (tests, benchmarks, a Ray replica that
receives one), and must not depend on how a shell was set up. The Ray Serve ``serve run``
entry point (``cli/ray_app.py``) is an edge too and reads its defaults through here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from softprompt.config import Launch
from softprompt.store import Store

TRUE = ("1", "true", "yes", "on")
# what a Ray replica's process needs of ours beyond the Store it receives (threading settings)
FORWARDED = ("OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM")
VLLM_BIND = "VLLM_CPU_OMP_THREADS_BIND"  # the CPUs of vLLM's model worker; vLLM reads it only from the environment


@dataclass(frozen=True)
class Environ:
    """The variables this project honours, read once."""

    home: Path
    data: Path | None  # None: the store's default, <home>/data
    api_key: str | None
    offline: bool
    hub_cache: Path | None
    launch: Launch
    forwarded: dict[str, str]  # what a Ray replica's process inherits
    vllm_cpu_bind: str | None = None  # $VLLM_CPU_OMP_THREADS_BIND as the user set it (``--engine vllm`` on a CPU)


def read(env: Mapping[str, str] | None = None) -> Environ:
    """The environment's values (``os.environ`` unless ``env`` is given)."""
    env = os.environ if env is None else env
    hub = env.get("HF_HUB_CACHE") or (str(Path(env["HF_HOME"]) / "hub") if env.get("HF_HOME") else None)
    launched = "WORLD_SIZE" in env and "RANK" in env
    launch = Launch(rank=int(env.get("RANK", "0")), world_size=int(env.get("WORLD_SIZE", "1")),
                    local_rank=int(env.get("LOCAL_RANK", "0")), launched=launched)
    return Environ(
        home=Path(env.get("SOFTPROMPT_HOME") or Path.home() / ".cache" / "softprompt"),
        data=Path(env["SOFTPROMPT_DATA"]) if env.get("SOFTPROMPT_DATA") else None,
        api_key=env.get("SOFTPROMPT_API_KEY"),
        offline=any(env.get(k, "").lower() in TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")),
        hub_cache=Path(hub) if hub else None,
        launch=launch,
        forwarded={k: env[k] for k in FORWARDED if k in env},
        vllm_cpu_bind=env.get(VLLM_BIND) or None,
    )


def store(home: str | None = None, data_root: str | None = None, offline: bool = False,
          env: Environ | None = None) -> Store:
    """The Store of one command: each flag given wins over its variable, which wins over the default."""
    env = env or read()
    return Store(Path(home).expanduser() if home else env.home,
                 Path(data_root).expanduser() if data_root else env.data,
                 hub_cache=env.hub_cache, offline=offline or env.offline)


def store_of(args, env: Environ | None = None) -> Store:
    """The Store for parsed CLI arguments (``--home``, ``--data-root``, ``--offline`` where the command has them)."""
    return store(getattr(args, "home", None), getattr(args, "data_root", None), bool(getattr(args, "offline", False)),
                 env)


def configure_libraries() -> None:
    """The one setting a third-party library takes only from the environment, set before it loads.

    ``TOKENIZERS_PARALLELISM=false`` (unless the user set it): the Rust tokenizers library reads
    only this variable to decide whether to use its thread pool, and warns (then disables it)
    when a process forks after using it, which a server or a data loader does. (``--offline``
    needs no variable: models take it as an argument (``Store.offline``), and ``offline_datasets``
    sets the ``datasets`` library's own switch for one command.)
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def bind_vllm_cpus(cpus: str) -> None:
    """Set the CPUs vLLM's model worker binds to (``serve/vllm/launch.split_cpus``) before vLLM
    starts its engine process, which reads them only from this variable."""
    os.environ[VLLM_BIND] = cpus


@contextmanager
def offline_datasets(offline: bool):
    """``datasets`` never reaches the hub for the length of one command (``--offline``); restored
    after. The library reads ``HF_HUB_OFFLINE`` once, at import, into ``datasets.config``, and
    ``load_dataset`` has no argument for it, so its module setting is the one switch there is."""
    if not offline:
        yield
        return
    try:
        import datasets
    except ImportError:  # the extra is not installed: nothing can reach the hub through it
        yield
        return
    old = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = old
