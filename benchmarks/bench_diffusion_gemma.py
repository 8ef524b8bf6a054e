"""DiffusionGemma through the served engine on a DiffusionGemma-26B-A4B-shaped random model:
tok/s and peak memory at batch 1 and 8, 4096-token prompts, 512 new tokens (two 256-token
canvases), 16 denoising steps per canvas: the workload of vLLM's published figures (~1008 tok/s
on one H100, ~1288 on an H200, FP8, batch 1), here in bf16.

    PYTHONPATH=. python3 benchmarks/gpu_check.py --skip-tests --skip-kernels --skip-engine \
        --skip-context                                         # this section alone, on a GPU
    PYTHONPATH=. python3 -m benchmarks.bench_diffusion_gemma --tiny   # toy size on the CPU
    PYTHONPATH=. python3 -m benchmarks.bench_diffusion_gemma --cpu-compare   # engine vs sampler

gpu_check.py runs `gpu_section` as its DiffusionGemma section. Random weights: the router
spreads tokens over the experts about evenly (a trained router is more skewed), adaptive stopping
is off (confidence_threshold None) so every canvas takes its 16 steps, EOS is ignored: the work
is the published workload's whatever the weights say. The shape is Gemma-4-26B-A4B's as
DiffusionGemma reuses it (hidden 2816, 30 layers, 16 heads; sliding layers 8 K/V heads x 256,
window 1024; every 6th layer global, 2 K/V heads x 512, partial rotary 0.25; 128 experts top 8 of
width 704 beside a dense GeGLU of 2112; vocabulary 262144): about 25.2B parameters, 3.8B active
per token. Check it against the checkpoint's config.json before quoting a comparison.
"""

from __future__ import annotations

import asyncio
import logging
import time

from benchmarks import harness

PUBLISHED = {"vllm_fp8_h100_batch1_tok_s": 1008, "vllm_fp8_h200_batch1_tok_s": 1288,
             "vllm_fp8_decode_only_tok_s": 1756}


def model_config(tiny: bool):
    """The 26B-A4B shape (module docstring), or the test's toy shape for --tiny."""
    from model.loaders.diffusion_gemma import build_config

    if tiny:
        text = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    global_head_dim=32, num_global_key_value_heads=2, sliding_window=32,
                    layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                    num_experts=8, top_k_experts=2, moe_intermediate_size=32,
                    max_position_embeddings=2048)
        canvas = 32
    else:
        text = dict(vocab_size=262144, hidden_size=2816, intermediate_size=2112,
                    num_hidden_layers=30, num_attention_heads=16, num_key_value_heads=8,
                    head_dim=256, global_head_dim=512, num_global_key_value_heads=2,
                    sliding_window=1024,
                    layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                 for i in range(30)],
                    num_experts=128, top_k_experts=8, moe_intermediate_size=704,
                    max_position_embeddings=262144)
        canvas = 256
    cfg = build_config({"model_type": "diffusion_gemma", "canvas_length": canvas,
                        "text_config": text}, {}, None)
    cfg.name = "diffusion-gemma-tiny" if tiny else "diffusion-gemma-26b-a4b-shape"
    cfg.extra["uniform_defaults"].update(confidence_threshold=None)  # every step taken
    return cfg


def build_random(cfg, device, dtype, seed: int = 0):
    """Random weights made on the device in the target dtype (52 GB for 26B in bf16, never a
    104 GB fp32 copy first)."""
    from benchmarks import harness
    from model.diffusion_gemma import DiffusionGemma

    def make():
        net = DiffusionGemma(cfg)
        net.init_weights(std=0.02)
        return net

    net = harness.build_on_device(make, device, dtype, seed)
    net.reset_buffers(device)
    return net.eval()


def gpu_section(tiny: bool, quick: bool = False) -> dict:
    """The engine at batch 1 and 8 (module docstring) -> the section's report."""
    import torch

    from benchmarks.gpu_check import IdTokenizer, random_prompts
    from engine.types import GenerationRequest
    from model.sampling import SamplingParams

    device, dtype = ("cpu", torch.float32) if tiny else ("cuda", torch.bfloat16)
    cfg = model_config(tiny)
    t0 = time.perf_counter()
    net = build_random(cfg, device, dtype)
    build_s = time.perf_counter() - t0
    prompt_len, new_tokens, steps = (48, 64, 4) if tiny else (4096, 512, 16)
    batches = [1, 2] if tiny else ([1, 8] if not quick else [1])
    prompts = random_prompts(cfg, max(batches), prompt_len)
    page = 16
    pages = max(batches) * -(-(prompt_len + new_tokens) // page)
    params = SamplingParams(max_new_tokens=new_tokens, max_denoising_steps=steps,
                            stop_token_ids=[], seed=0)
    rows = []
    for b in batches:
        reqs = [GenerationRequest(f"dg-b{b}-{i}", prompts[i], params) for i in range(b)]
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            row = asyncio.run(harness.run_engine(net, IdTokenizer(), reqs, b, b,
                                                 {"kv_pages": pages, "page_size": page},
                                                 warm_pass=not tiny))
        except Exception as e:  # keep the other batch size
            logging.exception("diffusion_gemma batch %d failed", b)
            rows.append({"batch": b, "error": f"{type(e).__name__}: {e}"})
            continue
        row["batch"] = b
        if device == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rows.append(row)
    n_params = net.num_params()
    del net
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"model": cfg.name, "device": device, "dtype": str(dtype).replace("torch.", ""),
            "parameters": n_params, "layers": cfg.n_layers, "d_model": cfg.d_model,
            "vocab_size": cfg.vocab_size, "canvas_length": cfg.block_length,
            "max_denoising_steps": steps, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
            "build_seconds": build_s, "published": PUBLISHED, "rows": rows,
            "machine": harness.machine_record()}


def cpu_compare(n_requests: int = 8, concurrency: int = 8) -> dict:
    """The engine against the reference sampler on the CPU, side by side in one run: the same
    requests through model/uniform.generate_uniform one after another, then through the Engine
    with `concurrency` clients (a small DiffusionGemma-shaped model, float32, canvas 32, 8 steps,
    96 new tokens, 64-token prompts) -> tok/s of each, the ratio, token agreement (float32 with
    different batch shapes: near-ties may differ; the exact check is tests/engine)."""
    import torch

    from benchmarks.gpu_check import IdTokenizer, random_prompts
    from engine.types import GenerationRequest
    from model.loaders.diffusion_gemma import build_config
    from model.sampling import SamplingParams
    from model.uniform import generate_uniform, uniform_params

    text = dict(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, global_head_dim=64,
                num_global_key_value_heads=2, sliding_window=64,
                layer_types=["sliding_attention"] * 3 + ["full_attention"], num_experts=16,
                top_k_experts=4, moe_intermediate_size=64, max_position_embeddings=4096)
    cfg = build_config({"model_type": "diffusion_gemma", "canvas_length": 32,
                        "text_config": text}, {}, None)
    cfg.name = "diffusion-gemma-cpu-small"
    cfg.extra["uniform_defaults"].update(confidence_threshold=None)
    net = build_random(cfg, "cpu", torch.float32)
    params = SamplingParams(max_new_tokens=96, max_denoising_steps=8, stop_token_ids=[])
    reqs = [GenerationRequest(f"r{i}", p, SamplingParams(**{**params.__dict__, "seed": i}))
            for i, p in enumerate(random_prompts(cfg, n_requests, 64))]
    t0 = time.perf_counter()
    ref = {}
    for r in harness.progress(reqs, desc="reference"):
        ref[r.request_id] = generate_uniform(net, r.prompt_ids,
                                             uniform_params(cfg, r.params)).tokens
    ref_s = time.perf_counter() - t0
    row = asyncio.run(harness.run_engine(net, IdTokenizer(), reqs, concurrency, concurrency,
                                         {}, keep_tokens=True))
    tokens = sum(len(t) for t in ref.values())
    return {"model": cfg.name, "parameters": net.num_params(), "requests": n_requests,
            "concurrency": concurrency, "new_tokens": 96, "prompt_tokens": 64,
            "max_denoising_steps": 8, "canvas_length": 32,
            "reference_tokens_per_s": tokens / ref_s, "engine_tokens_per_s": row["tokens_per_s"],
            "engine_over_reference": row["tokens_per_s"] / (tokens / ref_s),
            "token_agreement": harness.agreement(ref, row["tokens"]),
            "engine_mean_iteration_ms": row["mean_iteration_ms"],
            "threads": torch.get_num_threads()}


def plot_cpu_compare(res: dict, path) -> None:
    fig, ax = harness.figure(figsize=(5, 3.2))
    ax.bar(["reference\n(one at a time)", f"engine\n({res['concurrency']} concurrent)"],
           [res["reference_tokens_per_s"], res["engine_tokens_per_s"]], color=["#999", "#3a7"])
    ax.set_ylabel("output tok/s")
    ax.set_title(f"DiffusionGemma-shaped {res['parameters'] / 1e6:.1f}M, CPU: "
                 f"x{res['engine_over_reference']:.2f}", fontsize=9)
    harness.save_figure(fig, path)


def format_table(section: dict) -> str:
    lines = [f"{'batch':>5}{'tok/s':>10}{'latency s':>11}{'iter ms':>9}{'peak GiB':>10}"]
    for r in section["rows"]:
        if "error" in r:
            lines.append(f"{r['batch']:>5}  ERROR {r['error']}")
            continue
        lines.append(f"{r['batch']:>5}{r['tokens_per_s']:>10.1f}{r['mean_latency_s']:>11.2f}"
                     f"{r['mean_iteration_ms']:>9.1f}{r.get('peak_memory_gib', float('nan')):>10.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="toy size on the CPU")
    p.add_argument("--cpu-compare", action="store_true",
                   help="engine vs reference sampler on the CPU (JSON + PNG)")
    args = p.parse_args(argv)
    if args.tiny or args.cpu_compare:
        torch.set_num_threads(1)
    if args.cpu_compare:
        res = cpu_compare()
        path = harness.write_results("diffusion_gemma_cpu_compare", res)
        plot_cpu_compare(res, path.with_suffix(".png"))
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()})
        print("->", path)
        return 0
    section = gpu_section(args.tiny)
    name = "diffusion_gemma_tiny" if args.tiny else "diffusion_gemma"
    path = harness.write_results(name, section)
    print(format_table(section))
    print("->", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
