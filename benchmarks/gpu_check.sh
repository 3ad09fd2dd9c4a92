#!/usr/bin/env bash
# The GPU check of issue 15 in one command, for a bare CUDA machine (torch with CUDA, torchvision,
# onnx, onnxruntime; no TensorRT, no network).  Run from anywhere:
#
#   benchmarks/gpu_check.sh [WHEELS_DIR] [gpu_check.py options...]
#
# WHEELS_DIR (or $WHEELS): wheels of what the machine lacks -- smcp's pure-Python dependencies
# (pydantic and its own: pydantic-core, annotated-types, typing-inspection) and, optionally, smcp
# itself.  Fill it on a machine with network access (the target's Python version and platform):
#
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
#   pip wheel --no-deps --no-build-isolation -w .whl .      # smcp itself (optional)
#
# They are installed with `pip install --no-index --find-links WHEELS_DIR` (never torch: --no-deps
# for smcp).  Without an smcp wheel the checkout itself is used (gpu_check.py puts it on sys.path).
# Then gpu_check.py runs (at most 8 minutes); it prints one table and writes gpu_check.md and
# gpu_check.json to $OUT (or --out DIR, default benchmarks/results/gpu_check).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WHEELS="${WHEELS:-}"
if [ $# -gt 0 ] && [ -d "$1" ]; then
  WHEELS="$1"
  shift
fi
if [ -n "$WHEELS" ]; then
  shopt -s nullglob
  deps=("$WHEELS"/*.whl)
  smcp=("$WHEELS"/smcp-*.whl)
  shopt -u nullglob
  others=()
  for w in "${deps[@]}"; do [[ "$(basename "$w")" == smcp-* ]] || others+=("$w"); done
  if [ ${#others[@]} -gt 0 ]; then
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-cache-dir "${others[@]}"
  fi
  if [ ${#smcp[@]} -gt 0 ]; then
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps --no-cache-dir "${smcp[0]}"
  fi
fi
need_cuda=1
for a in "$@"; do [ "$a" = "--dry-run" ] && need_cuda=0; done
"$PY" -c "import pydantic, torch; assert $need_cuda == 0 or torch.cuda.is_available(), 'no CUDA GPU'" || {
  echo "gpu_check.sh: pydantic or a CUDA torch is missing (give a wheels folder; see the top of this file)" >&2
  exit 2
}
export PYTHONUNBUFFERED=1
exec timeout --signal=INT --kill-after=20 480 "$PY" benchmarks/gpu_check.py "$@"
