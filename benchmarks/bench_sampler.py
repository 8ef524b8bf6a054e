"""`dllm bench sampler`: tiny-coder output tok/s on this machine against denoising steps.

    dllm bench sampler                    # 256 new tokens, block 32, steps/block 1..32, +/- KV cache
    dllm bench sampler --new-tokens 64    # quicker

Every setting generates exactly --new-tokens tokens (EOS does not stop the run, so settings do the
same work) from the same prompt, side by side in one run, against the autoregressive setting on
the same weights (block length 1, one step per block, KV cache). Writes
benchmarks/results/bench_sampler.json and .png; ratios are what to read, not absolute times.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

from benchmarks import harness
from model.sampling import SamplingParams, generate

PROMPT = '''import os


def read_config(path):
    """Read a key=value config file into a dict, skipping comments."""
'''


def timed(net, prompt_ids, params, repeats: int) -> tuple[float, int]:
    times, steps = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = generate(net, prompt_ids, params)
        times.append(time.perf_counter() - t0)
        steps = r.steps
        assert len(r.tokens) == params.max_new_tokens
    return statistics.median(times), steps


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="dllm bench sampler", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-coder")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="JSON path (default results/bench_sampler.json)")
    args = harness.parse_args(p, argv)
    logging.basicConfig(level=logging.WARNING)
    from model.loaders import load_pretrained

    net, tok, cfg = load_pretrained(args.model, progress=False)
    prompt_ids = tok.encode(PROMPT)
    n = args.new_tokens
    common = dict(max_new_tokens=n, stop_token_ids=[])
    # Cached settings write each finished block's K/V in the next block's first forward
    # (fused_commit), so the autoregressive baseline costs one forward per token, as a real AR
    # decoder does; without it AR would pay two and look twice as slow as it is.
    settings = [("autoregressive", dict(block_length=1, steps=1, use_cache=True, fused_commit=True))]
    for s in args.steps:
        for cache in (True, False):
            settings.append((f"spb{s}{'' if cache else '-nocache'}",
                             dict(block_length=args.block_length, steps=s, use_cache=cache,
                                  fused_commit=cache)))
    generate(net, prompt_ids, SamplingParams(**common, **settings[1][1]))  # warm-up
    rows = []
    for name, kw in harness.progress(settings, desc="settings"):
        params = SamplingParams(**common, **kw)
        sec, steps = timed(net, prompt_ids, params, args.repeats)
        rows.append({"setting": name, **kw, "new_tokens": n, "seconds": sec,
                     "tokens_per_s": n / sec, "denoising_steps": steps})
    ar = rows[0]["tokens_per_s"]
    for r in rows:
        r["speedup_vs_autoregressive"] = r["tokens_per_s"] / ar
    result = {"model": args.model, "prompt_tokens": len(prompt_ids), "rows": rows}
    out = harness.write_results("bench_sampler", result, args.out)
    _plot(rows, out, n)
    print(f"{'setting':<22}{'tok/s':>10}{'x AR':>8}{'steps':>7}")
    for r in rows:
        print(f"{r['setting']:<22}{r['tokens_per_s']:>10.1f}{r['speedup_vs_autoregressive']:>8.2f}"
              f"{r['denoising_steps']:>7}")


def _plot(rows, path: Path, n: int) -> None:
    fig, ax = harness.figure(figsize=(7, 4.5))
    for cache, style in ((True, "-o"), (False, "--s")):
        pts = [(r["steps"], r["tokens_per_s"]) for r in rows[1:] if r["use_cache"] == cache]
        ax.plot([x for x, _ in pts], [y for _, y in pts], style,
                label=f"block 32, {'KV cache' if cache else 'no cache'}")
    ax.axhline(rows[0]["tokens_per_s"], color="k", ls=":", label="autoregressive (block 1)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("denoising steps per block")
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"tiny-coder sampler throughput, {n} new tokens (CPU)")
    ax.legend()
    harness.save_figure(fig, path)


if __name__ == "__main__":
    main()
