#!/usr/bin/env bash
# The prepared device check (thin wrapper over experiments/benchmarks/gpu_check.py).
#
# Through the device tool, from the repository root:
#   run(command="bash scripts/gpu_check.sh", timeout_s=600)
# It fits a 9-minute window: correctness first, then the headline cases in priority
# order; no case starts after 480 s (--deadline), a watchdog ends it at 540 s, and the
# outer timeout below is a last resort at 570 s. Each case's result is appended to
# $OUT/gpu_check.json (rewritten atomically) as soon as it is measured, and the log goes
# to $OUT/gpu_check.log: two files back. The jax compile cache and the CUDA build live in
# .gpu_check_cache/ (git-ignored; it stays on a warm machine), so a rerun skips compiles.
# Extra arguments pass through, e.g. `--only psumbook_b1,psumbook_b16` or `--deadline 300`.
# Needs jax (0.11.2 there) and numpy only: no pytest, no wheels to carry.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1 JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
PYTHON=${PYTHON:-python3}
timeout -k 10 570 "$PYTHON" -m experiments.benchmarks.gpu_check --out "$OUT" "$@" 2>&1 \
  | tee "$OUT/gpu_check.log"
status=$?
echo "gpu_check exit $status"
exit $status
