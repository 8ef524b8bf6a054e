"""Benchmarks: each writes JSON + PNG under benchmarks/results/ and compares settings side by side.

    dllm eval                  quality.py       quality vs denoising steps (held-out stdlib files)
    dllm bench sampler         bench_sampler.py reference sampler tok/s vs steps, vs autoregressive
    dllm bench engine          bench_engine.py  continuous batching at 1/4/16 sequences vs serial
    dllm bench serve           bench_serve.py   HTTP load: adaptive router vs fixed steps
    dllm bench burst           bench_burst.py   quiet / 4x burst / quiet against autoscaling
    bash benchmarks/gpu_check.sh                kernels + 8B-shaped decode on a GPU machine
"""
