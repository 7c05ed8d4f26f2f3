"""The type check of ``src/`` (mypy, configured in pyproject.toml) against a committed baseline.

``scripts/mypy-baseline.txt`` lists the errors the code had when the check was turned on, one a
line as ``path: [code] message`` (no line numbers, so unrelated edits do not move them). The check
fails on an error that is not in the baseline (new code must type-check) and on a baseline entry
that no longer occurs (the baseline only shrinks: rerun with ``--update`` and commit the file).

    python scripts/typecheck.py            # check (scripts/test.sh runs this)
    python scripts/typecheck.py --update   # rewrite the baseline from the current errors
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE = REPO / "scripts" / "mypy-baseline.txt"
LINE = re.compile(r"^(?P<path>[^:]+):\d+(?::\d+)?: error: (?P<message>.*?)(?:  \[(?P<code>[\w-]+)\])?$")


def current_errors() -> list[str]:
    """mypy's errors over src/, normalised to ``path: [code] message``."""
    run = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary", "--no-pretty", "--hide-error-context"],
                         cwd=REPO, capture_output=True, text=True)
    if run.returncode not in (0, 1):  # 2: mypy itself failed (a config or syntax problem)
        sys.exit(f"mypy failed:\n{run.stdout}{run.stderr}")
    out = []
    for line in run.stdout.splitlines():
        m = LINE.match(line)
        if m:
            out.append(f"{m['path']}: [{m['code'] or 'misc'}] {m['message']}")
    return sorted(out)


def main(argv: list[str]) -> int:
    errors = current_errors()
    if "--update" in argv:
        BASELINE.write_text("".join(f"{e}\n" for e in errors))
        print(f"typecheck: baseline rewritten, {len(errors)} errors")
        return 0
    known = Counter(BASELINE.read_text().splitlines()) if BASELINE.is_file() else Counter()
    now = Counter(errors)
    new, gone = now - known, known - now
    for e in sorted(new.elements()):
        print(f"new type error: {e}")
    if gone:
        print(f"{sum(gone.values())} baseline errors are fixed: run python scripts/typecheck.py --update "
              "and commit scripts/mypy-baseline.txt")
    print(f"typecheck: {len(errors)} errors, baseline {sum(known.values())}")
    return 1 if new or gone else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
