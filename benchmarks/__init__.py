"""Benchmarks: each writes JSON + PNG under benchmarks/results/ ($DLLM_RESULTS_DIR to send them
elsewhere) and compares settings side by side; harness.py holds what they share (results paths,
the machine record, figures, progress, load generators, Serve start-up, the engine's closed loop).

    dllm eval                  quality.py        quality vs denoising steps (held-out stdlib files)
    dllm bench sampler         bench_sampler.py  reference sampler tok/s vs steps, vs autoregressive
    dllm bench engine          bench_engine.py   continuous batching at 1/4/16 sequences vs serial
    dllm bench serve           bench_serve.py    HTTP load: adaptive router vs fixed steps
    dllm bench burst           bench_burst.py    quiet / 4x burst / quiet against autoscaling
    dllm bench tp              bench_tp.py       the engine on 2 tensor-parallel ranks vs 1
    dllm bench full-cache      bench_full_cache.py  full-attention KV cache modes vs none
    dllm bench kernels         bench_kernels.py  each fused kernel vs its torch reference
    bash benchmarks/gpu_check.sh                 kernel tests + timings + the engine on 8B shapes

mock_engine.py is the model-free engine double the tests and the load benchmarks deploy.
"""
