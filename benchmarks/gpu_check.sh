#!/usr/bin/env bash
# One command for a GPU machine that already has a CUDA build of torch (and triton):
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default benchmarks/results/<device>/gpu-check)
# It builds the CUDA extension in place with all cores (sm_90 unless PCLR_CUDA_ARCHS says otherwise), runs the GPU
# tests (`pytest -m gpu`), runs the `gpu-check` benchmark preset (target point, decode sweep, gate, decoder layer)
# for every provider, and writes gpu_check.log, build.log, pytest.log, junit.xml, bench.json/.csv and summary.md
# (ratios against the targets) to OUT_DIR. Installs nothing from the network.
# `GPU_CHECK_DRY_RUN=1` checks the plumbing on a CPU machine: no build, the smoke preset, a few GPU-marked tests
# collected but not run.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY_RUN:-0}
if [ "$DRY" = 1 ]; then dev=cpu-dry-run; else
  dev=$($PY -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))" 2>/dev/null || echo unknown)
fi
OUT_DIR=${1:-benchmarks/results/$dev/gpu-check}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
say() { echo "[gpu_check $(date +%T)] $*" | tee -a "$LOG"; }
t0=$(date +%s)
export PYTHONUNBUFFERED=1

$PY - <<'PY' 2>&1 | tee -a "$LOG"
import platform, torch
try:
    import triton; tv = triton.__version__
except Exception as exc:  # noqa: BLE001
    tv = f"absent ({exc})"
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda, "| triton", tv)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "| sm", f"{p.major}{p.minor}", "| SMs", p.multi_processor_count,
          "| memory GiB", round(p.total_memory / 2**30, 1))
PY

# pclr.kernels is the top-level kernels/ folder (setup.py's package_dir); without an install, a link stands in.
if [ ! -e pclr/kernels ]; then ln -s ../kernels pclr/kernels; LINKED=1; else LINKED=0; fi
cleanup() { if [ "$LINKED" = 1 ]; then rm -f pclr/kernels; fi; }
trap cleanup EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$DRY" != 1 ]; then
  say "building the CUDA extension in place (archs ${PCLR_CUDA_ARCHS:-90}, MAX_JOBS ${MAX_JOBS:-$(nproc)})"
  PCLR_CUDA_ARCHS=${PCLR_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    timeout "${GPU_CHECK_BUILD_S:-150}" $PY benchmarks/build_cuda_inplace.py > "$OUT_DIR/build.log" 2>&1
  say "build exit $? ($(( $(date +%s) - t0 )) s); tail of build.log:"; tail -3 "$OUT_DIR/build.log" | tee -a "$LOG"
fi
$PY -m pclr info 2>&1 | tee -a "$LOG"

say "pytest -m gpu"
targs=()
if $PY -c "import pytest_timeout" 2>/dev/null; then targs+=(--timeout "${GPU_CHECK_TEST_TIMEOUT:-120}"); fi
# Triton JIT compilation is CPU-bound: spread the tests over workers when pytest-xdist is there (one GPU is enough).
if $PY -c "import xdist" 2>/dev/null; then targs+=(-n "${GPU_CHECK_WORKERS:-8}"); fi
if [ "$DRY" = 1 ]; then
  $PY -m pytest -q -p no:cacheprovider -m gpu --collect-only tests > "$OUT_DIR/pytest.log" 2>&1
else
  timeout "${GPU_CHECK_PYTEST_S:-210}" $PY -m pytest -q -p no:cacheprovider -m gpu -rfE "${targs[@]}" \
    --junitxml "$OUT_DIR/junit.xml" tests > "$OUT_DIR/pytest.log" 2>&1
fi
say "pytest exit $? ($(( $(date +%s) - t0 )) s): $(tail -1 "$OUT_DIR/pytest.log")"

bench_args=(--preset gpu-check --modes gate,fwd,fwdbwd,decode,layer)
[ "$DRY" = 1 ] && bench_args=(--preset smoke --modes fwd,decode --providers base,pclr-reference,paper)
say "pclr bench ${bench_args[*]}"
timeout "${GPU_CHECK_BENCH_S:-210}" $PY -m benchmarks.run "${bench_args[@]}" --out "$OUT_DIR" --no-plots \
  > "$OUT_DIR/bench.log" 2>&1
say "bench exit $? ($(( $(date +%s) - t0 )) s): $(tail -2 "$OUT_DIR/bench.log" | head -1)"
$PY benchmarks/gpu_summary.py "$OUT_DIR/bench.json" "$OUT_DIR/summary.md" 2>&1 | tee -a "$LOG"
say "done in $(( $(date +%s) - t0 )) s -> $OUT_DIR"
