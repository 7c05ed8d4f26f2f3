"""The Ray Serve entry point for a cluster: ``serve run softprompt.cli.ray_app:app_builder
model=... replicas=2 [home=... data_root=...]``.

An edge like the CLI: Ray's ``serve run`` calls ``app_builder`` with the ``key=value`` arguments,
and the store comes from them, then the environment, then the default (``environ.py``).
"""

from __future__ import annotations

from softprompt.cli import environ


def app_builder(args: dict):
    """The Serve application for ``serve run``; every replica receives the Store built here."""
    from softprompt.config import ServerConfig
    from softprompt.serve.ray_serve import build_app

    env = environ.read()
    return build_app(ServerConfig(), args.get("model"), int(args.get("replicas", 1)),
                     device=args.get("device"), dtype=args.get("dtype"),
                     replica_cpus=float(args.get("replica_cpus", 1)), env=env.forwarded,
                     store=environ.store(args.get("home"), args.get("data_root"), env=env))
