"""README.md's six-task suite table, regenerated from the suite's result files.

``benchmarks/suite.sh report`` runs this after ``docs/comparison.md``: the text between
``<!-- suite-table:start -->`` and ``<!-- suite-table:end -->`` in README.md becomes the table
``softprompt.experiments.suite_table.render`` makes from ``compare_suite_<task>.json`` (a
finished task), else ``compare_suite_<task>.partial.json`` (its runs so far). The file is
replaced whole or not at all; without the markers it is left as it was (one line, exit 2).

    python benchmarks/suite_readme.py [--readme README.md] [--results benchmarks/results]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import common

from softprompt.config import UserError
from softprompt.experiments import suite_table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--readme", type=Path, default=common.REPO / "README.md", help="the file to rewrite (default %(default)s)")
    p.add_argument("--results", type=Path, default=common.RESULTS,
                   help="folder of compare_suite_<task>[.partial].json (default %(default)s)")
    a = p.parse_args(argv)
    try:
        print(f"wrote {suite_table.write_readme(a.readme, a.results)}")
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
