#!/usr/bin/env bash
# The one script to run on a GPU machine (issue 4), from anywhere:
#   bash benchmarks/gpu_check.sh [--quick] [--compile] [--skip-tests] ...
#   bash benchmarks/gpu_check.sh --tiny        # CPU dry run of the same code paths
# Needs python3 with torch + triton (no ray / flash-attn / deepspeed / network). Writes
# gpu_check_<card>_<date>.json (+ PNGs, pytest log) to $OUT, else benchmarks/results/; prints a
# short table last. Budget (estimated, never run on a GPU yet): ~7 min on one H100 (tests ~2,
# kernels ~1, 8B decode ~2, 8B engine eager vs cuda_graphs ~2; --quick shortens the last two,
# --skip-engine leaves the engine out).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader 2>/dev/null || true
exec "$PY" benchmarks/gpu_check.py "$@"
