#!/usr/bin/env bash
# The whole test suite on a fresh machine: lint (ruff), then pytest with the slow tests (real
# default model) and the layout checks (tests/test_layout.py: import layers, cycles, sizes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check src tests benchmarks
exec .venv/bin/python -m pytest "$@"
