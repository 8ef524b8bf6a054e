"""`dllm bench engine`: engine output tok/s at 1, 4, 16 concurrent sequences vs one after another.

    dllm bench engine                                  # tiny-coder, 16 requests x 64 new tokens
    python -m benchmarks.bench_engine --threads 1 --new-tokens 64 --concurrency 1 4 16
    python -m benchmarks.bench_engine --device cuda --dtype bfloat16 --cuda-graphs

The same set of requests (distinct code prompts, the same sampling settings, EOS not stopping
them so every setting does the same work) goes through a fresh Engine with c clients, each
submitting its next request when the previous one finishes (closed loop). Concurrency 1 is the
"one after another" baseline through the engine; `generate` one after another (no engine) is
shown beside it, so the engine's own overhead is visible. Output tok/s = completion tokens /
wall time. Writes benchmarks/results/bench_engine.json and .png; read the ratios, not the
absolute numbers (a shared 2-core CPU).

`--model random-full` runs a random full-attention model of LLaDA's layout (no time
conditioning, MHA; `--d-model`/`--layers` size it) on tiny-coder's tokenizer, where every step
runs prompt + canvas: the case where padding rows to length buckets used to cost the engine
1.2-1.6x the reference loop's wall time at batch 1 (engine/batch.py now pads only for graphs).
Each run also records `engine_c1_over_generate` (batch-1 tok/s of the engine over generate's,
the "within 5%" goal), `c16_over_c1`, and `tokens_equal_c1`: the fraction of batch-1 engine
tokens equal to generate's (1.0 at temperature 0 unless float rounding tips an argmax).

--cuda-graphs runs the engine with EngineConfig(cuda_graphs=True) (engine/cuda_graphs.py); each
engine then first serves the same requests once untimed (--warm-pass, on by default with graphs),
so the graphs of the shapes the run meets are captured before the clock starts, and the row
records the graph counters of the timed pass. benchmarks/gpu_check.py runs eager and graphs side
by side on CUDA through the same harness.run_engine.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path

import torch

from benchmarks import harness
from benchmarks.harness import run_engine, run_generate
from engine.types import GenerationRequest
from model.sampling import SamplingParams

SNIPPETS = [
    "import os\n\n\ndef read_config(path):\n",
    "class Stack:\n    def __init__(self):\n",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "import json\n\n\ndef load(path):\n    with open(path) as f:\n",
    "def is_prime(n):\n",
    "from collections import Counter\n\n\ndef most_common_words(text, k):\n",
    "def merge_sorted(a, b):\n    out = []\n",
    "class LRUCache:\n    def __init__(self, capacity):\n        self.capacity = capacity\n",
]


def make_requests(tok, n: int, params: SamplingParams) -> list[GenerationRequest]:
    out = []
    for i in range(n):
        prompt = f"# task {i}\n" + SNIPPETS[i % len(SNIPPETS)]
        out.append(GenerationRequest(f"bench-{i}", tok.encode(prompt), params))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="dllm bench engine", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-coder", help="preset name or checkpoint directory")
    p.add_argument("--requests", type=int, default=16, help="requests per setting")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=8, help="denoising steps per block")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per setting, interleaved (1, 4, 16, generate, 1, ...) so that a "
                        "busy machine slows every setting alike; the median run is reported")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--cuda-graphs", action="store_true",
                   help="EngineConfig(cuda_graphs=True): graphs on CUDA, static shapes elsewhere")
    p.add_argument("--warm-pass", action=argparse.BooleanOptionalAction, default=None,
                   help="serve the requests once untimed on each engine first "
                        "(default: on with --cuda-graphs)")
    p.add_argument("--no-generate", action="store_true", help="skip the generate() baseline")
    p.add_argument("--d-model", type=int, default=256, help="random-full: width")
    p.add_argument("--layers", type=int, default=4, help="random-full: layers")
    p.add_argument("--prompt-tokens", type=int, default=0,
                   help="random-full: prompt length (0: the code snippets' own, ~20 tokens)")
    p.add_argument("--out", default=None, help="default results/bench_engine.json "
                   "(bench_engine_cuda_graphs.json with --cuda-graphs)")
    args = harness.parse_args(p, argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    from model.loaders import load_pretrained

    params = SamplingParams(max_new_tokens=args.new_tokens, block_length=args.block_length,
                            steps=args.steps, stop_token_ids=[])
    if args.model == "random-full":
        from benchmarks.bench_full_cache import make_requests as random_requests
        from benchmarks.bench_full_cache import random_model

        _, tok, _ = load_pretrained("tiny-coder", progress=False)
        net = random_model(tok, args.d_model, args.layers, max(1, args.d_model // 64))
        net = net.to(device=args.device, dtype=getattr(torch, args.dtype))
        reqs = random_requests(net.cfg, args.requests, args.prompt_tokens, params) \
            if args.prompt_tokens else make_requests(tok, args.requests, params)
    else:
        net, tok, cfg = load_pretrained(args.model, device=args.device,
                                        dtype=getattr(torch, args.dtype), progress=False)
        reqs = make_requests(tok, args.requests, params)
    options = {"cuda_graphs": True} if args.cuda_graphs else {}
    warm = args.cuda_graphs if args.warm_pass is None else args.warm_pass
    load_before = os.getloadavg()[0]  # a busy machine lowers every number; recorded with them
    asyncio.run(run_engine(net, tok, reqs[:2], 2, 2, options))  # warm-up (allocator, threads)
    settings = list(args.concurrency) + ([] if args.no_generate else ["generate"])
    runs: dict = {c: [] for c in settings}
    plan = [c for _ in range(args.repeats) for c in settings]
    for c in harness.progress(plan, desc="runs"):
        # tokens kept at batch 1 and for generate: the agreement of the two
        runs[c].append(run_generate(net, reqs, keep_tokens=True) if c == "generate" else
                       asyncio.run(run_engine(net, tok, reqs, c, max(args.concurrency), options,
                                              warm_pass=warm, keep_tokens=c == 1)))

    def median(rs):
        med = sorted(rs, key=lambda r: r["tokens_per_s"])[len(rs) // 2]
        # tokens are the same in every run at temperature 0; the first run's are kept
        return {**med, "all_tokens_per_s": [r["tokens_per_s"] for r in rs],
                **({"tokens": rs[0]["tokens"]} if "tokens" in rs[0] else {})}

    rows = [median(runs[c]) for c in args.concurrency]
    ref = median(runs["generate"]) if "generate" in runs else None
    base = next((r for r in rows if r["concurrency"] == 1), rows[0])["tokens_per_s"]
    for r in rows:
        r["speedup_vs_sequential"] = r["tokens_per_s"] / base
    goals = {}
    one = next((r for r in rows if r["concurrency"] == 1), None)
    if ref and one:
        goals["engine_c1_over_generate"] = one["tokens_per_s"] / ref["tokens_per_s"]
        goals["engine_c1_within_5pct_of_generate"] = goals["engine_c1_over_generate"] >= 0.95
        # medians of the interleaved runs: the fairest single ratio on a shared machine
        goals["tokens_equal_c1"] = harness.agreement(one["tokens"], ref["tokens"])
    top = next((r for r in rows if r["concurrency"] == 16), None)
    if one and top:
        goals["c16_over_c1"] = top["tokens_per_s"] / one["tokens_per_s"]
        goals["c16_at_least_3x"] = goals["c16_over_c1"] >= 3.0
    for r in rows + ([ref] if ref else []):
        r.pop("tokens", None)
    result = {"model": args.model, "goals": goals, "settings": {"new_tokens": args.new_tokens,
                                                "block_length": args.block_length,
                                                "steps_per_block": args.steps,
                                                "requests": args.requests,
                                                "repeats": args.repeats,
                                                "device": args.device, "dtype": args.dtype,
                                                "engine_options": options,
                                                "warm_pass": warm},
              "threads": torch.get_num_threads(),
              "load_average_1m": [load_before, os.getloadavg()[0]],
              "rows": rows, "generate_sequential": ref}
    name = "bench_engine_cuda_graphs" if args.cuda_graphs else "bench_engine"
    if args.model == "random-full":
        name += "_full"
        result["settings"].update(d_model=args.d_model, layers=args.layers,
                                  prompt_tokens=args.prompt_tokens or "snippets")
    out = harness.write_results(name, result, args.out)
    _plot(rows, ref, out, result)
    print(f"{'concurrency':>12}{'tok/s':>10}{'x seq':>8}{'iter ms':>9}{'write %':>9}{'p50 s':>8}")
    for r in rows:
        print(f"{r['concurrency']:>12}{r['tokens_per_s']:>10.1f}{r['speedup_vs_sequential']:>8.2f}"
              f"{r['mean_iteration_ms']:>9.1f}{100 * r['cache_write_share']:>9.1f}"
              f"{r['p50_latency_s']:>8.2f}")
    if ref:
        print(f"{'generate()':>12}{ref['tokens_per_s']:>10.1f}  (one after another, no engine)")
    for k, v in goals.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")


def _plot(rows, ref, path: Path, result: dict) -> None:
    fig, ax = harness.figure(figsize=(7, 4.5))
    xs = [str(r["concurrency"]) for r in rows]
    bars = ax.bar(xs, [r["tokens_per_s"] for r in rows], color="tab:blue", label="engine")
    for b, r in zip(bars, rows, strict=True):
        ax.annotate(f"{r['speedup_vs_sequential']:.1f}x", (b.get_x() + b.get_width() / 2,
                    b.get_height()), ha="center", va="bottom")
    if ref:
        ax.axhline(ref["tokens_per_s"], color="k", ls=":", label="generate(), one after another")
    s = result["settings"]
    ax.set_xlabel("concurrent sequences")
    ax.set_ylabel("output tokens / s")
    mode = " (cuda_graphs)" if s.get("engine_options", {}).get("cuda_graphs") else ""
    ax.set_title(f"{result['model']} engine{mode}, {s.get('device', 'cpu')}: "
                 f"{s['requests']} requests x {s['new_tokens']} tokens, "
                 f"block {s['block_length']}, {s['steps_per_block']} steps/block "
                 f"({result['threads']} torch thread{'s' if result['threads'] > 1 else ''})", fontsize=9)
    ax.legend()
    harness.save_figure(fig, path)


if __name__ == "__main__":
    main()
