"""`dllm`: the project's command line.

    dllm train ...             train a diffusion LM (model/train.py)
    dllm train --lora ...      fine-tune a LoRA adapter on a folder of code (model/train_lora.py)
    dllm generate ...          complete a prompt, optionally watching the canvas denoise
    dllm eval ...              quality against denoising steps -> benchmarks/results/quality.json
    dllm bench sampler|engine|serve|burst|tp|full-cache|context|kernels|train|moe|exact-samplers|lora ...  -> results/
    dllm dashboard ...         Grafana dashboard as code

Each subcommand lives in its own module and is imported only when used, so `dllm generate` does
not pay for Ray.
"""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    "train": "model.train",
    "generate": "model.cli_generate",
    "eval": "benchmarks.quality",
}
BENCHES = {
    "sampler": "benchmarks.bench_sampler",
    "engine": "benchmarks.bench_engine",
    "serve": "benchmarks.bench_serve",
    "burst": "benchmarks.bench_burst",
    "tp": "benchmarks.bench_tp",
    "full-cache": "benchmarks.bench_full_cache",
    "context": "benchmarks.bench_context",
    "kernels": "benchmarks.bench_kernels",
    "train": "benchmarks.bench_train",
    "moe": "benchmarks.bench_moe",
    "exact-samplers": "benchmarks.bench_exact_samplers",
    "lora": "benchmarks.bench_lora",
}
OTHER = {"dashboard": "monitoring.dashboard"}

USAGE = __doc__


def quiet_openmp_workers(cmd: str, rest: list[str]) -> None:
    """OMP_WAIT_POLICY=PASSIVE unless the caller chose a policy, for every command that runs
    the engine. The engine steps on a worker thread while the event loop thread wakes on each
    step's news; libgomp's idle workers spin by default, holding the other cores, so the loop
    preempts one inside a parallel region and the whole step waits for it. Measured on a 2-core
    AMD EPYC (`dllm bench engine`, 2 torch threads, 4 runs each): the engine's batch-1 tok/s was
    0.75-0.90x `generate`'s with spinning workers, 1.00-1.05x with passive ones
    (benchmarks/results/bench_engine*.json). Training, one Python thread with nothing else to
    run, keeps libgomp's default. Read when libgomp loads: before torch."""
    if cmd == "train" or (cmd == "bench" and rest[:1] == ["train"]):
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> int | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    cmd, rest = argv[0], argv[1:]
    quiet_openmp_workers(cmd, rest)
    if cmd == "bench":
        if not rest or rest[0] not in BENCHES:
            sys.exit(f"usage: dllm bench {{{','.join(BENCHES)}}} [options]")
        module, rest = BENCHES[rest[0]], rest[1:]
    elif cmd == "train" and "--lora" in rest:
        module = "model.train_lora"
    elif cmd in COMMANDS or cmd in OTHER:
        module = COMMANDS.get(cmd) or OTHER[cmd]
    else:
        sys.exit(f"unknown command {cmd!r}\n{USAGE}")
    return importlib.import_module(module).main(rest)


if __name__ == "__main__":
    sys.exit(main())
