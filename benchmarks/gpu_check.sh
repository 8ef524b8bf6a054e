#!/usr/bin/env bash
# The one script to run on a GPU machine, from anywhere:
#   bash benchmarks/gpu_check.sh [--quick] [--skip-tests] [--engine-model llama-1b] ...
#   bash benchmarks/gpu_check.sh --tiny        # CPU dry run of the same code paths
# Needs python3 with torch + triton (no ray / flash-attn / deepspeed / network). Writes
# gpu_check_<card>_<date>.json (+ PNGs, pytest log) to $OUT, else $DLLM_RESULTS_DIR, else
# benchmarks/results/; prints a short table last. Budget (estimated, never run on a GPU yet):
# ~5 min on one H100 (tests ~2, kernels ~1, the engine on 8B shapes eager vs cuda_graphs ~2;
# --quick shortens the last, --skip-engine leaves it out; section 6, the LLaDA2.0-mini-shaped
# MoE model (16B bf16, ~35 GB), adds ~2 min: --skip-moe leaves it out; section 4, long context
# to 128k on a Llama-3-8B shape (16 GB weights + 16 GiB KV at 128k), ~3 min, --quick to 64k,
# --skip-context leaves it out).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader 2>/dev/null || true
exec "$PY" benchmarks/gpu_check.py "$@"
