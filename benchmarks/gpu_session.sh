#!/usr/bin/env bash
# Every GPU check of this project in one call of about 9 minutes, for a session lent a CUDA machine
# (torch with CUDA, torchvision, onnx, onnxruntime; no TensorRT, no network):
#
#   benchmarks/gpu_session.sh WHEELS_DIR OUT_DIR [--dry-run]
#
# WHEELS_DIR: the wheels gpu_check.sh describes (pydantic and its three dependencies), installed
# into /tmp/site with --no-deps (the machine's torch stays).  In order, each under its own timeout,
# each writing into OUT_DIR (7 files at most):
#   1. env.txt          nvidia-smi, CPU count, torch / CUDA / torchvision / onnxruntime versions;
#   2. pytest_gpu.log   the @pytest.mark.gpu tests (60 s);
#   3. gpu_check.{log,md,json}  benchmarks/gpu_check.py with a 100 s table (330 s);
#   4. run_gpu.log, run_report.json   `smcp run` (the quickstart) with profile, prune and export on torch CUDA
#                       (140 s; its exit code is the log's last line; the tiny model is launch-bound
#                       on a GPU, so a missed 1.5x is a finding, not a failure of this script).
# --dry-run: the same on a CPU (gpu_check.py --dry-run, no pytest, the quickstart on the CPU).
# With the device tool: carry .whl and run `benchmarks/gpu_session.sh .whl "$OUT"` with timeout_s 590.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS="${1:?usage: gpu_session.sh WHEELS_DIR OUT_DIR [--dry-run]}"
OUTDIR="${2:?usage: gpu_session.sh WHEELS_DIR OUT_DIR [--dry-run]}"
DRY="${3:-}"
PY="${PYTHON:-python3}"
mkdir -p "$OUTDIR"
if [ -z "$DRY" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl || { echo "gpu_session.sh: installing the wheels of $WHEELS failed" >&2; exit 3; }
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
{ nvidia-smi || true; nproc
  "$PY" -c "import torch, onnxruntime as o; from smcp_core.utils.tv import import_torchvision as tv
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', tv().__version__, 'onnxruntime', o.__version__)"
} > "$OUTDIR/env.txt" 2>&1
if [ -z "$DRY" ]; then
  timeout 60 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/profile/test_timing_and_table.py \
    tests/profile/test_gpu_defects.py tests/export/test_tensorrt.py tests/prune/test_knapsack.py \
    tests/prune/test_trainer_resume.py 2>&1 | tee "$OUTDIR/pytest_gpu.log"
  check=(--table-seconds 100)
  chain=(--set profile.device=cuda --set profile.backend=torch --set prune.device=cuda)
else
  check=(--dry-run)
  chain=()
fi
timeout -s INT -k 15 330 "$PY" benchmarks/gpu_check.py "${check[@]}" --out "$OUTDIR" 2>&1 | tee "$OUTDIR/gpu_check.log"
run_dir="$(mktemp -d)"
trap 'rm -rf "$run_dir"' EXIT
timeout -s INT -k 10 140 "$PY" -m smcp_cli run "${chain[@]}" --out "$run_dir/qs" 2>&1 | tee "$OUTDIR/run_gpu.log"
echo "smcp run exit code: $?" >> "$OUTDIR/run_gpu.log"
cp "$run_dir/qs/export/report.json" "$OUTDIR/run_report.json" 2>/dev/null || true
