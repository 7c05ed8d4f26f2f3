#!/usr/bin/env bash
# The GPU check in one command, without network: install, the CUDA-marked relational tests,
# the speed benchmark, a summary; within 8 minutes (the tests have 3, the benchmark 4; both
# limits can be set: GPU_CHECK_TEST_TIMEOUT, GPU_CHECK_BENCH_TIMEOUT, in seconds).
#
#   scripts/gpu_check.sh [--device cuda|cpu] [--out DIR] [--tiny] [--wheels DIR | --no-wheels] [--python PY]
#
# 1. install: the wheels in --wheels (default .whl/, filled by scripts/gpu_wheels.sh) and this
#    project, --no-deps --no-index, into a fresh folder put first on PYTHONPATH (the machine's own
#    torch and the rest stay as they are);
# 2. correctness: pytest -m cuda tests/test_cuda.py --check-device DEVICE (bf16 and fp32);
# 3. speed: benchmarks/gpu_bench.py --device DEVICE (Llama-3.2-1B's shape; --tiny: a tiny config);
# 4. summary: benchmarks/gpu_report.py summarise.
# Into --out (default gpu-check-out/): check.log, pytest.log, pytest.xml, gpu_bench.{json,md},
# gpu_check.{json,md}. Exit status 0 when every test passed and the benchmark finished (a missed
# speed target is reported, not a failure), 1 otherwise, 2 for a bad command line. Then
# `python benchmarks/gpu_report.py publish DIR` copies gpu_*.{json,md} into benchmarks/results/.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
DEVICE=cuda OUT=gpu-check-out TINY="" WHEELS="$REPO/.whl" PY=${PYTHON:-python3}
usage() { echo "usage: scripts/gpu_check.sh [--device cuda|cpu] [--out DIR] [--tiny] [--wheels DIR | --no-wheels] [--python PY]" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=${2:?--device needs cuda or cpu}; shift 2 ;;
    --out) OUT=${2:?--out needs a folder}; shift 2 ;;
    --tiny) TINY=1; shift ;;
    --wheels) WHEELS=${2:?--wheels needs a folder}; shift 2 ;;
    --no-wheels) WHEELS=""; shift ;;
    --python) PY=${2:?--python needs an interpreter}; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; usage ;;
  esac
done
case "$DEVICE" in cuda|cuda:[0-9]*|cpu) ;; *) echo "gpu_check.sh: --device $DEVICE: expected cuda or cpu" >&2; exit 2 ;; esac
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || { echo "gpu_check.sh: --out $OUT: cannot create it" >&2; exit 2; }
rm -f "$OUT"/check.log "$OUT"/pytest.log "$OUT"/pytest.xml "$OUT"/gpu_bench.* "$OUT"/gpu_check.*
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sp-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 SOFTPROMPT_HOME="$WORK/home"
exec > >(tee -a "$OUT/check.log") 2>&1
cd "$REPO"
stage() { echo "== $(date -u +%H:%M:%S) $*"; }

stage "install (no network) into $WORK/site"
# a failed step is recorded and the check goes on (the machine's packages, the source tree):
# one run on a GPU should report as much as it can
INSTALL="wheels:none"
if [ -n "$WHEELS" ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
  pip_target() { "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" "$@"; }
  if pip_target "$WHEELS"/*.whl; then
    INSTALL="wheels:$(cd "$WHEELS" && ls -- *.whl | sed 's/-py3.*//; s/-cp3.*//' | paste -sd, -)"
  else  # one at a time, so that one bad wheel does not keep the others out
    echo "gpu_check.sh: installing the wheels in $WHEELS together failed; one at a time"
    ok="" bad=""
    for w in "$WHEELS"/*.whl; do
      n=$(basename "$w" | sed 's/-py3.*//; s/-cp3.*//')
      if pip_target "$w"; then ok="$ok,$n"; else bad="$bad,$n"; fi
    done
    INSTALL="wheels:${ok#,} wheels-FAILED:${bad#,}"
  fi
fi
if "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade --target "$WORK/site" "$REPO"; then
  INSTALL="$INSTALL softprompt:installed"
  export PYTHONPATH="$WORK/site"
else
  INSTALL="$INSTALL softprompt:FAILED,source-tree"
  echo "gpu_check.sh: installing softprompt from $REPO failed; going on with $REPO/src"
  export PYTHONPATH="$WORK/site:$REPO/src"
fi
echo "install: $INSTALL"
"$PY" - <<'EOF' || { echo "gpu_check.sh: the installed packages do not import"; exit 1; }
import importlib, torch
for name in ("softprompt", "transformers", "peft", "fastapi", "uvicorn"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '')} from {mod.__file__}")
    except ImportError as e:
        print(f"{name}: not importable ({e})")
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
EOF

stage "correctness: tests marked cuda, on $DEVICE"
timeout -k 10 "${GPU_CHECK_TEST_TIMEOUT:-180}" "$PY" -m pytest -p no:cacheprovider -q -m cuda tests/test_cuda.py \
  --check-device "$DEVICE" --junitxml "$OUT/pytest.xml" -rA >"$OUT/pytest.log" 2>&1
PYTEST_RC=$?
tail -n 15 "$OUT/pytest.log"

stage "speed: benchmarks/gpu_bench.py on $DEVICE${TINY:+ (tiny config)}"
timeout -k 10 "${GPU_CHECK_BENCH_TIMEOUT:-240}" "$PY" benchmarks/gpu_bench.py --device "$DEVICE" --out "$OUT" ${TINY:+--tiny}
BENCH_RC=$?

stage "summary"
"$PY" benchmarks/gpu_report.py summarise "$OUT" --device "$DEVICE" ${TINY:+--tiny} --install "$INSTALL" \
  --pytest-rc "$PYTEST_RC" --bench-rc "$BENCH_RC" || exit 1
[ -f "$OUT/gpu_bench.md" ] && sed -n '/^## Targets/,/^## Training/p' "$OUT/gpu_bench.md" | head -n 9
"$PY" -c "import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))['passed'] else 1)" "$OUT/gpu_check.json"
