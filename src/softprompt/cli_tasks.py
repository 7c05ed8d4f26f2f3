"""Command line for many tasks over time: ``train-multitask``, ``continual``, ``inspect``.

Same rules as ``cli.py``: each command parses, builds configs, calls ONE library function and
prints. Kept apart from ``cli.py`` so that each file stays readable top to bottom.
"""

from __future__ import annotations


def add_parsers(sub) -> None:
    """Register this module's subcommands on ``sub`` (argparse sub-parsers)."""
