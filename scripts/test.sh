#!/usr/bin/env bash
# The whole test suite on a fresh machine, slow tests (real default model) included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest "$@"
