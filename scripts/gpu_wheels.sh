#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels scripts/gpu_check.sh installs on a GPU machine that
# has no network: the packages that machine lacks, or has in a version outside our range.
# Run it here, with network, before carrying the repository there.
#
# The GPU machine's image (Python 3.12, x86-64) has torch 2.11, transformers 5.17, tokenizers
# 0.23.2, huggingface_hub 1.33, safetensors, accelerate, anyio, httpx, h11 and click. Carried:
# transformers 5.24 (our range is >=5.23; its tokenizers and huggingface_hub ranges accept the
# machine's), peft (a known version), gguf, and the server's packages (fastapi and what it
# imports). 17 MB; the folder is git-ignored: copy it along with the checkout.
#   bash scripts/gpu_wheels.sh [DIR]      # default .whl
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PY=${PYTHON:-python3}
mkdir -p "$DEST"
platforms=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$DEST" \
  transformers==5.24.0 peft==0.21.2 gguf==0.19.0 \
  fastapi==0.163.2 starlette==1.10.0 uvicorn==0.54.0 python-multipart==0.0.34 \
  pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing_extensions==4.16.0 opentelemetry-api==1.45.2
du -sh "$DEST"
