"""Command line: ``softprompt <command>`` (entry point ``softprompt.cli:main``).

Each command parses, builds configs from flags derived from ``config.py`` (``flags.py``), calls
ONE library function and prints: the core commands are in ``commands.py``, the experiments in
``experiments.py``. User mistakes (``UserError``) print one line and exit 2; Ctrl-C exits 130
and leaves the last checkpoint usable by ``--resume``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn

from softprompt.cli import commands, environ, experiments
from softprompt.cli.flags import add_store_flags, as_typed
from softprompt.config import UserError


class _OneLineParser(argparse.ArgumentParser):
    """argparse's mistakes (an unknown flag, a value outside the choices) as one ``UserError``
    line naming the flag, like every other mistake, instead of usage text and an exit."""

    def error(self, message: str) -> NoReturn:
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="softprompt", description="Prompt tuning for frozen language models.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    commands.add_train_parser(sub)
    commands.add_generate_parser(sub)
    commands.add_quickstart_parser(sub)
    commands.add_eval_parser(sub)
    commands.add_prompts_parser(sub)
    commands.add_serve_parser(sub)
    experiments.add_parsers(sub)
    for leaf in _leaves(p):
        add_store_flags(leaf)
        leaf.set_defaults(parser=leaf)  # messages name this command's flags (flags.as_typed)
    return p


def _leaves(p: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers that run a command (``prompts list`` rather than ``prompts``)."""
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [p]
    return [leaf for s in subs for q in dict.fromkeys(s.choices.values()) for leaf in _leaves(q)]


def main(argv: list[str] | None = None) -> int:
    """Parse, read the environment once (``environ.py``), build the Store once, run the command:
    the command finds them as ``a.env`` and ``a.store``."""
    try:
        a = build_parser().parse_args(argv)
    except UserError as e:
        print(f"softprompt: error: {e} (--help lists the flags)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    try:
        a.env = environ.read()
        a.store = environ.store_of(a, a.env)
        with environ.offline_datasets(a.store.offline):
            return a.func(a)
    except UserError as e:
        print(f"softprompt: error: {as_typed(str(e), a.parser)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nsoftprompt: interrupted; the last epoch checkpoint is kept (continue with --resume)", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    environ.configure_libraries()
    for name in ("transformers", "accelerate", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - logging tweaks must never break the CLI
        pass


if __name__ == "__main__":
    raise SystemExit(main())
