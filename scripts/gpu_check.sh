#!/usr/bin/env bash
# The prepared device check for the GPU kernels: one call, about 3-5 minutes warm.
#
# The GPU machines have jax 0.11.2 but no pytest and no network, so first, here:
#   python3.12 -m pip download -d .gpu_wheels pytest      # .gpu_wheels is git-ignored
# then through the device tool (carry the wheels):
#   run(command="bash scripts/gpu_check.sh", carry=[".gpu_wheels"], timeout_s=540)
# Results land in $OUT: nvidia-smi, the kernel tests compiled for the GPU (the same
# tests the CPU runs in interpret mode), and the Psumbook and FP8 benchmark JSON + markdown
# (8 files at most come back: keep what is written there few).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export JAX_PLATFORMS=cuda
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  python -m pip install -q --no-index --find-links .gpu_wheels pytest
  python -c "import jax; print(jax.__version__, jax.devices())"; } >"$OUT/env.txt" 2>&1
timeout 240 python -m pytest -q -p no:cacheprovider tests/test_psumbook_gemm.py \
  tests/test_psumbook_ffi.py tests/test_fp8_matmul.py \
  >"$OUT/kernel_tests.txt" 2>&1
echo "kernel tests exit $?" >>"$OUT/kernel_tests.txt"
timeout 280 python -m experiments.benchmarks.psumbook --formats m1v4g128,m2v8g128 \
  --out "$OUT" >"$OUT/benchmark_log.txt" 2>&1
echo "benchmark exit $?" >>"$OUT/benchmark_log.txt"
timeout 200 python -m experiments.benchmarks.fp8_matmul --out "$OUT" \
  >"$OUT/fp8_benchmark_log.txt" 2>&1
echo "fp8 benchmark exit $?" >>"$OUT/fp8_benchmark_log.txt"
tail -n 3 "$OUT/kernel_tests.txt" "$OUT/benchmark_log.txt" "$OUT/fp8_benchmark_log.txt"
