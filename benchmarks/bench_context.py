"""Long context on the engine: prefill and per-step time and peak memory against context length,
and the stall a long prefill causes to a running stream, chunked (EngineConfig.
prefill_chunk_tokens) vs one pass.

    dllm bench context                                  # CPU: 1k..32k on a small random model
    dllm bench context --lengths 1024 4096 --stall-length 8192 --layers 4
    python benchmarks/gpu_check.py --skip-tests --skip-kernels --skip-engine   # GPU: to 128k

1. Context sweep: for each length L, one request (an L-token prompt, one 32-token block at 4
   steps) through a fresh Engine in a child process (so the process's peak RSS is this length's:
   ru_maxrss never goes down), chunked prefill on: prefill seconds (the engine's cache-write
   time), mean denoising-step ms at that context, peak RSS and its growth over the loaded model,
   the KV pool's bytes. On CUDA (gpu_section) in-process, peak = torch.cuda.max_memory_allocated.
2. Stall: stream A (a short prompt, 4-token blocks at one step each: a text delta per engine
   iteration) is running when prompt B (--stall-length tokens) arrives. A's inter-token gaps
   while B prefills, B's time to its first token, with and without chunks, side by side in one
   run. The model is random (block-causal, time-conditioned, tiny-coder's layout at the flags'
   width): the costs do not depend on the weights.
Writes benchmarks/results/context.json and .png (--out to change). Read ratios, not absolute
times: the CPU is a shared 2-core AMD EPYC (recorded in "machine").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import harness

log = logging.getLogger("dllm.bench.context")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
A_TOKENS = 4000  # the running stream's answer: long enough to outlast the long prefill


class IdTokenizer:
    """What the engine needs of a tokenizer (decode, for text deltas), the ids as text: random
    weights make no words, and gpu_check runs without the tokenizers package."""

    def decode(self, ids, skip_special: bool = True) -> str:
        return "".join(f"<{i}>" for i in ids)


def model_config(d_model: int, n_layers: int, n_heads: int, n_kv_heads: int, max_len: int,
                 vocab: int = 4096, rope_scaling: dict | None = None):
    """tiny-coder's layout (block-causal, adaLN time conditioning) at these widths."""
    from model.config import ModelConfig

    return ModelConfig(name=f"random-bc-d{d_model}-l{n_layers}", vocab_size=vocab,
                       d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                       n_kv_heads=n_kv_heads, mlp_hidden=(8 * d_model // 3 + 31) // 32 * 32,
                       max_seq_len=max_len, time_embed_dim=min(64, d_model),
                       rope_scaling=rope_scaling)


def build(cfg, device: str = "cpu", dtype=None, seed: int = 0):
    """Random weights made on the device in the target dtype (no fp32 copy of an 8B model)."""
    import torch

    from benchmarks.gpu_check import build_random_model

    return build_random_model(cfg, device, dtype or torch.float32, seed)


def prompt_ids(cfg, n: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(3, cfg.vocab_size) for _ in range(n)]


def _engine(net, chunk: int | None, kv_tokens: int):
    from engine import Engine, EngineConfig

    return Engine(net, IdTokenizer(), net.cfg, EngineConfig(
        max_num_seqs=4, page_size=16, kv_pages=-(-kv_tokens // 16), prefill_chunk_tokens=chunk))


async def _one_request(engine, prompt: list[int]) -> dict:
    """One request at this context -> prefill s, step ms (EngineStats counters)."""
    from engine.types import Finished, GenerationRequest
    from model.sampling import SamplingParams

    req = GenerationRequest("ctx", prompt, SamplingParams(max_new_tokens=32, block_length=32,
                                                          steps=4, stop_token_ids=[]))
    t0 = time.perf_counter()
    async for ev in engine.submit(req):
        if isinstance(ev, Finished):
            assert ev.error is None, ev.error
    total = time.perf_counter() - t0
    st = engine.stats()
    await engine.shutdown()
    prefill = st.extra["cache_write_s"]
    steps = 4  # one block, 4 steps, EOS ignored
    return {"prefill_s": prefill, "step_ms": 1000 * (st.extra["busy_s"] - prefill) / steps,
            "iterations": st.iterations, "request_s": total}


def measure_length(net, length: int, chunk: int | None) -> dict:
    """Section 1 for one length, in this process (the caller reads the memory)."""
    from engine.config import kv_bytes_per_token

    p = next(net.parameters())
    engine = _engine(net, chunk, length + 64)
    row = asyncio.run(_one_request(engine, prompt_ids(net.cfg, length, seed=length)))
    row.update(context=length, kv_pool_bytes=2 * engine.pool.k.numel() * p.element_size(),
               kv_bytes_per_token=kv_bytes_per_token(net.cfg, p.element_size()))
    return row


def _child(args) -> None:
    """`--child L`: build the model, measure one length, print one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    cfg = model_config(args.d_model, args.layers, args.heads, args.kv_heads,
                       max(args.lengths + [args.child]) + 64)
    net = build(cfg)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    with torch.no_grad():
        row = measure_length(net, args.child, args.chunk)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row.update(peak_rss_mib=peak, rss_growth_mib=peak - base)
    print("RESULT " + json.dumps(row), flush=True)


async def _stall_run(net, long_len: int, chunk: int | None, seed: int = 1) -> dict:
    """Section 2, one mode: A streaming, B arrives; A's gaps while B prefills."""
    from engine.types import Finished, GenerationRequest, TextDelta
    from model.sampling import SamplingParams

    cfg = net.cfg
    engine = _engine(net, chunk, long_len + 64 + A_TOKENS + 64)
    a = GenerationRequest("A", prompt_ids(cfg, 16, seed), SamplingParams(
        max_new_tokens=A_TOKENS, block_length=4, steps=1, stop_token_ids=[]))
    b = GenerationRequest("B", prompt_ids(cfg, long_len, seed + 1), SamplingParams(
        max_new_tokens=32, block_length=32, steps=4, stop_token_ids=[]))
    a_times: list[float] = []
    b_done = asyncio.Event()
    marks: dict[str, float] = {}

    async def run_a():
        async for ev in engine.submit(a):
            if isinstance(ev, TextDelta):
                a_times.append(time.perf_counter())
            if b_done.is_set() or isinstance(ev, Finished):
                break  # leaving the stream cancels A

    async def run_b():
        while len(a_times) < 8:  # A is streaming steadily first
            await asyncio.sleep(0.001)
        marks["b_submit"] = time.perf_counter()
        async for ev in engine.submit(b):
            if isinstance(ev, TextDelta) and "b_first" not in marks:
                marks["b_first"] = time.perf_counter()
            if isinstance(ev, Finished):
                assert ev.error is None, ev.error
        marks["b_end"] = time.perf_counter()
        b_done.set()

    await asyncio.gather(run_a(), run_b())
    await engine.shutdown()
    t0, t1 = marks["b_submit"], marks["b_first"]
    # A's gaps from B's arrival to B's first token (the prefill and B's first steps)
    during = [y - x for x, y in zip(a_times, a_times[1:], strict=False) if y >= t0 and x <= t1]
    before = [y - x for x, y in zip(a_times, a_times[1:], strict=False) if y < t0]
    return {"mode": "chunked" if chunk else "one_pass", "prefill_chunk_tokens": chunk,
            "long_prompt_tokens": long_len,
            "a_gap_max_ms": 1000 * max(during), "a_gap_median_ms": 1000 * statistics.median(during),
            "a_gap_median_before_ms": 1000 * statistics.median(before),
            "a_deltas_during_prefill": len(during), "b_ttft_s": t1 - t0,
            "a_gaps_ms": [1000 * g for g in during]}


def stall_rows(net, long_len: int, chunk: int, aligned_net=None) -> list[dict]:
    """One pass vs chunked on `net` (layer-group chunks: the prompt is bidirectional), and,
    with aligned_net (the same weights with cfg.block_align "zero", as LLaDA2.x / SDAR: a
    block-causal prompt, written through the masked path), its own one pass vs its token chunks
    of whole blocks. Ratios are against the same model's one pass."""
    import torch

    rows = []
    with torch.no_grad():
        # warm-up: the first engine run of a process pays allocator growth and lazy inits
        # (measured here: it doubled the first mode's B TTFT at 2k tokens)
        asyncio.run(_stall_run(net, min(long_len, 1024), chunk))
        runs = [("one_pass", net, None), ("chunked", net, chunk)]
        if aligned_net is not None:
            runs += [("one_pass_aligned", aligned_net, None),
                     ("token_chunks_aligned", aligned_net, chunk)]
        for mode, model, c in harness.progress(runs, desc=f"stall at {long_len}"):
            rows.append({**asyncio.run(_stall_run(model, long_len, c)), "mode": mode})
    for one, r in zip(rows[::2], rows[1::2], strict=True):
        r["a_gap_max_vs_one_pass"] = r["a_gap_max_ms"] / one["a_gap_max_ms"]
        r["b_ttft_vs_one_pass"] = r["b_ttft_s"] / one["b_ttft_s"]
    return rows


def plot(result: dict, path: Path) -> Path:
    fig, axes = harness.figure(1, 3, figsize=(14, 4))
    rows = [r for r in result["sweep"] if "error" not in r]
    x = [r["context"] for r in rows]
    ax = axes[0]
    ax.plot(x, [r["prefill_s"] for r in rows], "o-", label="prefill (s)")
    ax.plot(x, [r["step_ms"] / 1000 for r in rows], "s-", label="one denoising step (s)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_title("time against context")
    ax.legend()
    ax = axes[1]
    key = "peak_mib" if "peak_mib" in rows[0] else "peak_rss_mib"
    ax.plot(x, [r[key] for r in rows], "o-", label=key)
    ax.plot(x, [r["kv_pool_bytes"] / 2**20 for r in rows], "s--", label="KV pool (MiB)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_title("memory against context")
    ax.legend()
    ax = axes[2]
    for r in result["stall"]:
        ax.plot(r["a_gaps_ms"], "o-", label=f"{r['mode']} (max {r['a_gap_max_ms']:.0f} ms)")
    ax.set_xlabel("stream A's text deltas after B arrives")
    ax.set_ylabel("gap (ms)")
    ax.set_title(f"A's gaps while a {result['stall'][0]['long_prompt_tokens']}-token prompt "
                 "prefills")
    ax.legend()
    return harness.save_figure(fig, path)


def run_cpu(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    sweep = []
    for length in harness.progress(args.lengths, desc="context sweep"):
        cmd = [sys.executable, "-m", "benchmarks.bench_context", "--child", str(length),
               "--d-model", str(args.d_model), "--layers", str(args.layers), "--heads",
               str(args.heads), "--kv-heads", str(args.kv_heads), "--chunk", str(args.chunk),
               "--threads", str(args.threads), "--lengths", *map(str, args.lengths)]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            log.error("context %d failed: %s", length, out.stderr[-2000:])
            sweep.append({"context": length, "error": out.stderr[-500:]})
            continue
        sweep.append(json.loads(line.removeprefix("RESULT ")))
    cfg = model_config(args.d_model, args.layers, args.heads, args.kv_heads,
                       max(args.lengths + [args.stall_length]) + A_TOKENS + 64)
    net = build(cfg)
    aligned = None
    if args.aligned:  # same weights, blocks aligned to position 0: token chunks apply
        import copy

        aligned = copy.deepcopy(net)
        aligned.cfg = copy.copy(cfg)
        aligned.cfg.block_align = "zero"
    stall = stall_rows(net, args.stall_length, args.chunk, aligned)
    return {"model": cfg.name, "device": "cpu", "layers": cfg.n_layers, "d_model": cfg.d_model,
            "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads,
            "params": net.num_params(), "prefill_chunk_tokens": args.chunk,
            "sweep": sweep, "stall": stall}


def gpu_section(tiny: bool = False, quick: bool = False) -> dict:
    """benchmarks/gpu_check.py's context section: an 8B shape (Llama-3-8B widths: 32 layers,
    d 4096, 32 heads, 8 KV heads; block-causal, bf16, Llama-3.1's rope scaling to 128k) from
    4k to 128k tokens (--quick: to 64k): prefill, step time and peak memory in-process, and
    the stall at the longest length, chunked (8192) vs one pass. --tiny: a toy model on the CPU
    at 256 and 1024 tokens (the same code paths)."""
    import torch

    if tiny:
        device, dtype, lengths, chunk = "cpu", torch.float32, [256, 1024], 128
        cfg = model_config(64, 4, 2, 1, 1024 + A_TOKENS + 64)
    else:
        device, dtype, chunk = "cuda", torch.bfloat16, 8192
        lengths = [4096, 16384, 32768, 65536] + ([] if quick else [131072])
        cfg = model_config(4096, 32, 32, 8, max(lengths) + A_TOKENS + 64, vocab=128256,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 8192})
        cfg.mlp_hidden = 14336
    net = build(cfg, device, dtype)
    sweep = []
    for length in harness.progress(lengths, desc="context sweep"):
        try:
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                row = measure_length(net, length, chunk)
            if device == "cuda":
                row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
            else:
                row["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            sweep.append(row)
        except Exception as e:  # out of memory at the longest: keep the rest
            logging.exception("context %d failed", length)
            sweep.append({"context": length, "error": f"{type(e).__name__}: {e}"})
    ok = [r["context"] for r in sweep if "error" not in r]
    stall = stall_rows(net, ok[-1], chunk) if ok else []
    return {"model": cfg.name, "device": device, "dtype": str(dtype).replace("torch.", ""),
            "layers": cfg.n_layers, "d_model": cfg.d_model, "kv_heads": cfg.n_kv_heads,
            "rope_scaling": cfg.rope_scaling, "prefill_chunk_tokens": chunk,
            "sweep": sweep, "stall": stall}


def format_table(result: dict) -> str:
    lines = [f"{'context':>8}{'prefill s':>11}{'step ms':>9}{'peak MiB':>10}{'KV MiB':>9}"]
    for r in result["sweep"]:
        if "error" in r:
            lines.append(f"{r['context']:>8}  ERROR {r['error'][:60]}")
            continue
        peak = r.get("peak_mib", r.get("peak_rss_mib"))
        lines.append(f"{r['context']:>8}{r['prefill_s']:>11.2f}{r['step_ms']:>9.1f}"
                     f"{peak:>10.0f}{r['kv_pool_bytes'] / 2**20:>9.1f}")
    for r in result["stall"]:
        lines.append(f"stall {r['mode']:<21} A gap max {r['a_gap_max_ms']:8.0f} ms, median "
                     f"{r['a_gap_median_ms']:6.0f} ms (before {r['a_gap_median_before_ms']:.0f})"
                     f", B TTFT {r['b_ttft_s']:.2f} s")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="dllm bench context", description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS))
    p.add_argument("--stall-length", type=int, default=16384)
    p.add_argument("--chunk", type=int, default=1024, help="prefill_chunk_tokens")
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--aligned", action="store_true",
                   help="also the stall with a block-aligned family's token chunks")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    args = harness.parse_args(p, argv)
    if args.child is not None:
        return _child(args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = run_cpu(args)
    path = harness.write_results("context", result, out=args.out)
    plot(result, path)
    print(format_table(result))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
