#!/usr/bin/env bash
# The whole test suite on a fresh machine: lint (ruff), then pytest with the slow tests (real
# default model) and the layout checks (tests/test_layout.py: import layers, cycles, sizes).
# SOFTPROMPT_TRANSFORMERS=latest bash scripts/test.sh: the same suite against the newest
# transformers release, in a second environment (.venv-latest; see scripts/bootstrap.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
case "${SOFTPROMPT_TRANSFORMERS:-}" in
  "") VENV=${SOFTPROMPT_VENV:-.venv} ;;
  latest) VENV=${SOFTPROMPT_VENV:-.venv-latest} ;;
  *) VENV=${SOFTPROMPT_VENV:-.venv-transformers-$SOFTPROMPT_TRANSFORMERS} ;;
esac
"$VENV/bin/ruff" check src tests benchmarks
exec "$VENV/bin/python" -m pytest "$@"
