#!/usr/bin/env bash
# The whole test suite on a fresh machine: lint (ruff), then pytest with the slow tests (real
# default model) and the layout checks (tests/test_layout.py: import layers, cycles, sizes).
# Then the type check (scripts/typecheck.py: mypy over src/ against scripts/mypy-baseline.txt).
# bash scripts/test.sh --fast: the same without the tests marked slow (pytest -m "not slow").
# SOFTPROMPT_TRANSFORMERS=latest bash scripts/test.sh: the same suite against the newest
# transformers release, in a second environment (.venv-latest; see scripts/bootstrap.sh); the
# type check's baseline belongs to the pinned environment, so it runs there only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
case "${SOFTPROMPT_TRANSFORMERS:-}" in
  "") VENV=${SOFTPROMPT_VENV:-.venv} ;;
  latest) VENV=${SOFTPROMPT_VENV:-.venv-latest} ;;
  *) VENV=${SOFTPROMPT_VENV:-.venv-transformers-$SOFTPROMPT_TRANSFORMERS} ;;
esac
"$VENV/bin/ruff" check src tests benchmarks
[[ -n "${SOFTPROMPT_TRANSFORMERS:-}" ]] || "$VENV/bin/python" scripts/typecheck.py
ARGS=()
for arg in "$@"; do
  if [[ "$arg" == --fast ]]; then ARGS+=(-m "not slow"); else ARGS+=("$arg"); fi
done
exec "$VENV/bin/python" -m pytest ${ARGS[@]+"${ARGS[@]}"}
