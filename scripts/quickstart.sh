#!/usr/bin/env bash
# The main job on a fresh machine: set up, then run the prompt-tuning walk-through on the
# embedded default model (base vs tuned generation).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/softprompt quickstart "$@"
