#!/usr/bin/env bash
# The one script to run on a GPU machine (issue 4), from anywhere:
#   bash benchmarks/gpu_check.sh [--quick] [--compile] [--skip-tests] ...
#   bash benchmarks/gpu_check.sh --tiny        # CPU dry run of the same code paths
# Needs python3 with torch + triton (no ray / flash-attn / deepspeed / network). Writes
# gpu_check_<card>_<date>.json (+ PNGs, pytest log) to $OUT, else benchmarks/results/; prints a
# short table last. Budget: ~5 min on one H100 (tests ~2, kernels ~1, 8B decode ~2, engine
# eager vs cuda_graphs on a ~1B model ~0.5; --skip-engine to leave it out).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader 2>/dev/null || true
exec "$PY" benchmarks/gpu_check.py "$@"
