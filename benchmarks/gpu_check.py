"""The one GPU check: kernel correctness on CUDA, kernels against their torch references, and
the served engine on a LLaDA-8B-shaped model; JSON + PNG out, a short table printed last.

    bash benchmarks/gpu_check.sh                          # on a GPU machine, from the repo root
    PYTHONPATH=. python3 benchmarks/gpu_check.py --tiny   # the same code paths, small, on the CPU

Sections (each can be skipped: --skip-tests, --skip-kernels, --skip-engine, --skip-context):
1. correctness: pytest tests/kernels on the device (CUDA-marked tests included), summary kept;
2. kernels: benchmarks/bench_kernels.py rows (median times, speed-up, errors);
3. engine: the real Engine (engine/: scheduler, paged KV pool, batched commit; what a replica
   serves) on ModelConfig.from_name("llada-8b") made block-causal, random bf16 weights
   (--engine-model llama-1b for a launch-bound model): 1000-token prompts to 1000 new tokens
   (--quick: 256), block 32, 4 and 8 steps per block, 1 and 16 concurrent requests, eager vs
   EngineConfig(cuda_graphs=True) side by side: tok/s, peak memory, fraction of the weight-
   bandwidth bound, graph counters, token agreement (bf16: informational; the exact check is
   tests/engine). With --tiny the "graphs" rows are the same static path uncaptured, on the CPU.
4. context: benchmarks/bench_context.gpu_section on a Llama-3-8B shape (GQA 8 KV heads, bf16,
   Llama-3.1 rope scaling): prefill and step time and peak memory at 4k..128k tokens (--quick:
   to 64k), and a running stream's inter-token gaps while the longest prompt prefills, chunked
   (8192) vs one pass.
5. diffusion_gemma: benchmarks/bench_diffusion_gemma.gpu_section, the engine on a
   DiffusionGemma-26B-A4B-shaped random model (bf16, ~52 GB): batch 1 and 8, 4096-token prompts,
   512 new tokens, 16 steps per 256-token canvas: tok/s and peak memory, beside vLLM's
   published FP8 figures (--skip-diffusion-gemma skips it).
6. moe: benchmarks/bench_moe.gpu_section, a LLaDA2.0-mini-shaped random MoE model (16B, bf16,
   256 experts top-8, blocks of 32 aligned to position 0): one MoE layer at 16..8192 tokens
   with the grouped-GEMM fast path vs the per-expert loop, and the engine at batch 1 and 16
   (512-token prompts, 256 new tokens; --quick: 128), fast vs reference MoE: tok/s, peak
   memory, token agreement (--skip-moe skips it).
7. lora: benchmarks/bench_lora.gpu_section, the gathered LoRA matmul (kernels/lora_triton.py)
   against its torch reference and a loop over adapters at LLaDA-8B widths (8 slots of rank 16,
   16 and 64 rows of 32 tokens), then the engine on the 1B-shaped model: base, one adapter,
   4 adapters + base mixed in each batch, and the same served one adapter at a time (tok/s,
   mixed vs grouped) (--skip-lora skips it).
Every decode number here is the served engine's: there is no separate decode loop.
Needs torch + triton only (no ray, flash-attn, deepspeed, tokenizers, network). Output goes to
$OUT when set, else $DLLM_RESULTS_DIR or benchmarks/results/, as gpu_check_<card>_<date>.json:
commit that file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import harness

ROOT = Path(__file__).resolve().parent.parent

GOAL_COMMIT_SPEEDUP = 3.0  # >= 3x the torch reference at N=512, V=126464
GOAL_TOK_S_BATCH1 = 1109.0  # Mercury Coder Mini on one H100, batch 1


class IdTokenizer:
    """What the engine needs of a tokenizer (decode, for text deltas) without the tokenizers
    package: the ids as text. Random weights make no words anyway."""

    def decode(self, ids, skip_special: bool = True) -> str:
        return "".join(f"<{i}>" for i in ids)


# --- the model and what bounds it ----------------------------------------------------------------

def engine_model_config(name: str):
    """A block-causal model for the engine section: "llama-1b" (Llama-3.2-1B-like widths, 32k
    vocabulary: small enough that eager steps are launch-bound, which graphs remove), "tiny"
    (the CPU dry run: LLaDA's layout at toy size) or a ModelConfig preset, made block-causal
    (the KV-cache engine path)."""
    from model.config import ModelConfig

    if name == "tiny":
        return ModelConfig(name="llada-tiny", vocab_size=1000, d_model=128, n_layers=2,
                           n_heads=4, n_kv_heads=4, mlp_hidden=256, max_seq_len=512, mask_id=999,
                           eos_id=1, pad_id=1, attention="block_causal", time_conditioning=False,
                           tie_embeddings=False)
    if name == "llama-1b":
        return ModelConfig(name="llama-1b-shape", vocab_size=32000, d_model=2048, n_layers=16,
                           n_heads=32, n_kv_heads=8, mlp_hidden=8192, max_seq_len=2048,
                           mask_id=31999, eos_id=1, pad_id=1, attention="block_causal",
                           time_conditioning=False, tie_embeddings=False)
    cfg = ModelConfig.from_name(name)
    cfg.attention = "block_causal"
    return cfg


def build_random_model(cfg, device, dtype, seed: int = 0):
    """A DiffusionTransformer of `cfg` with random weights made on the device in `dtype`
    (harness.build_on_device)."""
    from model.transformer import DiffusionTransformer

    return harness.build_on_device(lambda: DiffusionTransformer(cfg), device, dtype,
                                   seed).to(dtype).eval()


def weight_bytes(net) -> tuple[int, int]:
    """(bytes every forward reads: all weights but the embedding table, of which only B*L rows
    are read; total weight bytes)."""
    seen, total, emb = set(), 0, 0
    for name, p in net.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
        if name == "tok_embeddings.weight" and p is not net.lm_head.weight:
            emb += p.numel() * p.element_size()
    return total - emb, total


def measure_hbm_bandwidth(n_bytes: int = 2 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (the achievable ceiling)."""
    import torch

    x = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        y.copy_(x)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del x, y
    torch.cuda.empty_cache()
    return 2 * n_bytes / statistics.median(times)


# --- 3. the engine --------------------------------------------------------------------------------

def random_prompts(cfg, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """n prompts of random ids, none of them a special token."""
    import random

    rng = random.Random(seed)
    special = {cfg.mask_id, cfg.eos_id, cfg.pad_id}
    out = []
    for _ in range(n):
        ids = [rng.randrange(3, cfg.vocab_size) for _ in range(length)]
        out.append([3 if t in special else t for t in ids])
    return out


def engine_rows(net, reqs: list, concurrency: int, engine_options: dict, read_bytes: int,
                bw: float | None, steps: int) -> list[dict]:
    """Eager and cuda_graphs runs of the same requests (one per client: a batch of c)."""
    import asyncio

    import torch

    cuda = next(net.parameters()).device.type == "cuda"
    rows, outs = [], {}
    for mode, opts in {"eager": {}, "cuda_graphs": {"cuda_graphs": True}}.items():
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            row = asyncio.run(harness.run_engine(
                net, IdTokenizer(), reqs, concurrency, engine_options["max_num_seqs"],
                {"kv_pages": engine_options["kv_pages"], **opts}, warm_pass=True,
                keep_tokens=True))
        except Exception as e:  # keep the other rows
            logging.exception("engine %s steps=%d c=%d failed", mode, steps, concurrency)
            rows.append({"mode": mode, "concurrency": concurrency, "steps_per_block": steps,
                         "error": f"{type(e).__name__}: {e}"})
            continue
        outs[mode] = row.pop("tokens")
        row.update(mode=mode, steps_per_block=steps)
        if cuda:
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if bw:  # every forward reads the weights once: committed tokens per read
            row["bound_tokens_per_s_weights"] = concurrency * (32 / steps) / (read_bytes / bw)
            row["fraction_of_weight_bound"] = \
                row["tokens_per_s"] / row["bound_tokens_per_s_weights"]
        rows.append(row)
    if len(outs) == 2:
        eager, graphs = rows
        graphs["speedup_vs_eager"] = graphs["tokens_per_s"] / eager["tokens_per_s"]
        graphs["token_agreement_with_eager"] = harness.agreement(outs["eager"],
                                                                 outs["cuda_graphs"])
    return rows


def run_engine_section(tiny: bool, model: str, quick: bool) -> dict:
    """The real Engine (engine/engine.py) on the workload in the module docstring, eager vs
    cuda_graphs side by side -> the section's report."""
    import torch

    from engine.types import GenerationRequest
    from model.sampling import SamplingParams

    device, dtype = ("cpu", torch.float32) if tiny else ("cuda", torch.bfloat16)
    cfg = engine_model_config("tiny" if tiny else model)
    t0 = time.perf_counter()
    net = build_random_model(cfg, device, dtype)
    build_s = time.perf_counter() - t0
    prompt_len, new_tokens = (48, 64) if tiny else (1000, 256 if quick else 1000)
    concurrency, steps_list = ([1, 4] if tiny else [1, 16]), [4, 8]
    read_bytes, total_bytes = weight_bytes(net)
    bw = measure_hbm_bandwidth() if device == "cuda" else None
    prompts = random_prompts(cfg, max(concurrency), prompt_len)
    options = {"max_num_seqs": max(concurrency),
               "kv_pages": max(concurrency) * -(-(prompt_len + new_tokens) // 16)}  # 16/page
    rows = []
    for steps in steps_list:
        params = SamplingParams(max_new_tokens=new_tokens, block_length=32, steps=steps,
                                stop_token_ids=[])
        for c in concurrency:
            reqs = [GenerationRequest(f"s{steps}c{c}r{i}", prompts[i], params) for i in range(c)]
            rows += engine_rows(net, reqs, c, options, read_bytes, bw, steps)
    del net
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"model": cfg.name, "device": device, "dtype": str(dtype).replace("torch.", ""),
            "layers": cfg.n_layers, "d_model": cfg.d_model, "vocab_size": cfg.vocab_size,
            "build_seconds": build_s, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
            "block_length": 32, "weight_bytes_read_per_forward": read_bytes,
            "weight_bytes": total_bytes, "hbm_bandwidth_measured": bw, "rows": rows}


def format_engine_table(engine: dict) -> str:
    lines = [f"{'mode':<13}{'spb':>4}{'conc':>5}{'tok/s':>10}{'iter ms':>9}{'peak GiB':>9}"
             f"{'x bound':>8}{'x eager':>9}{'graphs':>8}{'replays':>9}{'uncapt':>8}{'agree':>7}"]
    for r in engine["rows"]:
        if "error" in r:
            lines.append(f"{r['mode']:<13}{r['steps_per_block']:>4}{r['concurrency']:>5}  "
                         f"ERROR {r['error'][:60]}")
            continue
        g = r.get("cuda_graphs", {})
        ratio = r.get("speedup_vs_eager")
        agree = r.get("token_agreement_with_eager")
        mem, frac = r.get("peak_memory_gib"), r.get("fraction_of_weight_bound")
        lines.append(f"{r['mode']:<13}{r['steps_per_block']:>4}{r['concurrency']:>5}"
                     f"{r['tokens_per_s']:>10.1f}{r['mean_iteration_ms']:>9.2f}"
                     f"{(f'{mem:.1f}' if mem is not None else ''):>9}"
                     f"{(f'{frac:.2f}' if frac is not None else ''):>8}"
                     f"{(f'{ratio:.2f}x' if ratio else ''):>9}{g.get('graphs', ''):>8}"
                     f"{g.get('replays', ''):>9}{g.get('uncaptured', ''):>8}"
                     f"{(f'{agree:.2f}' if agree is not None else ''):>7}")
        if g.get("capture_error"):
            lines.append(f"  capture failed, ran uncaptured: {g['capture_error'][:90]}")
    return "\n".join(lines)


def environment() -> dict:
    """What the kernels' speed depends on beyond the machine record: the card's properties,
    flash-attn, and the kernel switches."""
    import torch

    env = {"cuda_available": torch.cuda.is_available(),
           "dllm_kernels": os.environ.get("DLLM_KERNELS", "auto"),
           "triton_interpret": os.environ.get("TRITON_INTERPRET", "")}
    try:
        import flash_attn  # noqa: F401

        env["flash_attn"] = True
    except ImportError:
        env["flash_attn"] = False
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(card=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   memory_gib=p.total_memory / 2**30, cuda=torch.version.cuda,
                   l2_mib=getattr(p, "L2_cache_size", 0) / 2**20)
    else:
        env["card"] = "cpu"
    return env


def run_tests(tiny: bool, quick: bool, out_dir: Path, timeout_s: int) -> dict:
    """pytest tests/kernels in a subprocess (its own TRITON_INTERPRET decision), log to out_dir."""
    cmd = [sys.executable, "-m", "pytest", "tests/kernels", "-q", "-s", "-p", "no:cacheprovider",
           "-W", "ignore::pytest.PytestConfigWarning"]
    if tiny:  # the interpreter is slow: skip the LLaDA-vocabulary cases
        cmd += ["-k", "not 126464 and not large_vocab"]
    elif quick:  # only the engine-shape CUDA tests: fewer Triton compiles (~20 s each variant)
        cmd += ["-m", "cuda"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=timeout_s)
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), -1
        out += f"\n[timed out after {timeout_s} s]"
    (out_dir / "gpu_check_pytest.log").write_text(out)
    summary = next((ln for ln in reversed(out.splitlines()) if re.search(r"\d+ (passed|failed)", ln)),
                   out.splitlines()[-1] if out else "")
    errs = [ln for ln in out.splitlines() if "max abs err" in ln]
    return {"returncode": rc, "summary": summary.strip("= "), "seconds": time.perf_counter() - t0,
            "error_lines": errs[:200]}


def goals(kernel_rows: list[dict], engine: dict | None = None) -> dict:
    g = {}
    head = next((r for r in kernel_rows if r["kernel"] == "commit_select"
                 and r["shape"] == "512x126464 bfloat16 T=0" and "speedup" in r), None)
    if head:
        g["commit_select_512x126464_speedup"] = head["speedup"]
        g["commit_select_goal_met"] = head["speedup"] >= GOAL_COMMIT_SPEEDUP and \
            not head.get("interpreted", False)
    if engine:
        for r in engine["rows"]:
            if "speedup_vs_eager" in r:
                g[f"engine_cuda_graphs_speedup_spb{r['steps_per_block']}_c{r['concurrency']}"] = \
                    r["speedup_vs_eager"]
        one = [r for r in engine["rows"] if "error" not in r and r["concurrency"] == 1
               and r["steps_per_block"] == 4]  # 8 tokens committed per forward, batch 1
        if one:
            best = max(one, key=lambda r: r["tokens_per_s"])
            g["engine_batch1_8_per_step_best_tok_s"] = best["tokens_per_s"]
            g["engine_batch1_goal_met"] = best["tokens_per_s"] > GOAL_TOK_S_BATCH1 and \
                engine["device"] == "cuda"
            if "fraction_of_weight_bound" in best:
                g["engine_batch1_fraction_of_weight_bound"] = best["fraction_of_weight_bound"]
    return g


def plot_engine(engine: dict, path: Path) -> None:
    rows = [r for r in engine["rows"] if "error" not in r]
    if not rows:
        return
    labels = [f"c{r['concurrency']} spb{r['steps_per_block']} {r['mode']}" for r in rows]
    fig, ax = harness.figure(figsize=(8, 0.42 * len(rows) + 1.6))
    ax.barh(labels, [r["tokens_per_s"] for r in rows], label="measured")
    bounds = [r.get("bound_tokens_per_s_weights") for r in rows]
    if any(bounds):
        ax.scatter([b or 0 for b in bounds], labels, color="k", marker="|", s=200,
                   label="weight-bandwidth bound", zorder=3)
    ax.axvline(GOAL_TOK_S_BATCH1, color="r", ls=":", label="Mercury Coder Mini (batch 1)")
    ax.set_xscale("log")
    ax.set_xlabel("output tokens / s")
    ax.set_title(f"{engine['model']}: the engine, {engine['device']}")
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    harness.save_figure(fig, path, dpi=110)


def run_sections(args, out_dir: Path, tag: str) -> dict:
    """Sections 1-3 as the flags ask -> the report (a failing section keeps the others)."""
    from benchmarks import bench_kernels

    report: dict = {"tiny": args.tiny, "environment": environment()}
    device = "cpu" if args.tiny else "cuda"
    if not args.skip_tests:
        print("== 1. kernel correctness (pytest tests/kernels)", flush=True)
        report["tests"] = run_tests(args.tiny, args.quick, out_dir, args.test_timeout)
        print("  ", report["tests"]["summary"], flush=True)
    if not args.skip_kernels:
        print("== 2. kernels against their torch references", flush=True)
        report["kernels"] = bench_kernels.run(device, quick=args.quick, tiny=args.tiny)
        if device == "cuda":
            bench_kernels.plot(report["kernels"], out_dir / f"gpu_check_kernels_{tag}.png")
    if not args.skip_engine:
        def engine_section():
            rows = run_engine_section(args.tiny, args.engine_model, args.quick)
            plot_engine(rows, out_dir / f"gpu_check_engine_{tag}.png")
            return rows

        report.update(run_section("engine", "3. the engine: eager vs cuda_graphs", engine_section))
    if not args.skip_context:
        from benchmarks import bench_context

        def context_section():
            rows = bench_context.gpu_section(args.tiny, args.quick)
            bench_context.plot(rows, out_dir / f"gpu_check_context_{tag}.png")
            return rows

        report.update(run_section("context", "4. long context: prefill, step time, memory to "
                                  "128k; the stall, chunked vs not", context_section))
    if not getattr(args, "skip_diffusion_gemma", False):
        report.update(run_diffusion_gemma_section(args.tiny, args.quick))
    if not getattr(args, "skip_moe", False):
        report.update(run_moe_section(args.tiny, args.quick, out_dir, tag))
    if not getattr(args, "skip_lora", False):
        report.update(run_lora_section(args.tiny, args.quick))
    report["goals"] = goals(report.get("kernels", []), report.get("engine"))
    return report


def run_section(key: str, title: str, measure) -> dict:
    """One optional section: {key: measure()}, or {key + "_error": ...} when it fails (e.g. out
    of memory building a large shape on a smaller card), so the rest of the report survives."""
    print(f"== {title}", flush=True)
    try:
        return {key: measure()}
    except Exception as e:
        logging.exception("%s section failed", key)
        return {f"{key}_error": f"{type(e).__name__}: {e}"}


def _moe(tiny: bool, quick: bool, out_dir: Path, tag: str) -> dict:
    from benchmarks import bench_moe

    report = bench_moe.gpu_section(tiny, quick)
    bench_moe.plot(report, out_dir / f"gpu_check_moe_{tag}.png")
    return report


def run_diffusion_gemma_section(tiny: bool, quick: bool) -> dict:
    from benchmarks import bench_diffusion_gemma

    return run_section("diffusion_gemma", "5. DiffusionGemma (uniform diffusion, MoE): batch 1 "
                       "and 8, 4096 in / 512 out",
                       lambda: bench_diffusion_gemma.gpu_section(tiny, quick))


def run_moe_section(tiny: bool, quick: bool, out_dir: Path, tag: str) -> dict:
    return run_section("moe", "6. MoE (LLaDA2.0-mini shape): grouped-GEMM fast path vs "
                       "per-expert loop; engine batch 1 and 16",
                       lambda: _moe(tiny, quick, out_dir, tag))


def run_lora_section(tiny: bool, quick: bool) -> dict:
    from benchmarks import bench_lora

    return run_section("lora", "7. LoRA: gathered matmul vs reference and per-adapter loop; "
                       "engine mixed vs grouped", lambda: bench_lora.gpu_section(tiny, quick))


def _engine_lines(engine: dict) -> str:
    bw = engine.get("hbm_bandwidth_measured")
    return (f"engine {engine['model']} ({engine['layers']} layers, d {engine['d_model']}, "
            f"{engine['dtype']} on {engine['device']}; {engine['prompt_tokens']}-token prompts, "
            f"{engine['new_tokens']} new tokens, block {engine['block_length']}, "
            f"{engine['weight_bytes_read_per_forward'] / 1e9:.2f} GB read per forward"
            + (f", HBM {bw / 1e12:.2f} TB/s measured" if bw else "")
            + (", graphs = static shapes uncaptured" if engine["device"] == "cpu" else "")
            + ")\n" + format_engine_table(engine))


def _context_lines(c: dict) -> str:
    from benchmarks import bench_context

    return (f"context {c['model']} ({c['layers']} layers, {c['kv_heads']} KV heads, "
            f"{c.get('dtype', 'float32')} on {c['device']}, chunks of "
            f"{c['prefill_chunk_tokens']})\n" + bench_context.format_table(c))


def _diffusion_gemma_lines(g: dict) -> str:
    from benchmarks import bench_diffusion_gemma

    pub = g["published"]
    return (f"diffusion_gemma {g['model']} ({g['parameters'] / 1e9:.1f}B parameters, "
            f"{g['dtype']} on {g['device']}; {g['prompt_tokens']} in / {g['new_tokens']} out, "
            f"{g['max_denoising_steps']} steps per {g['canvas_length']}-token canvas; vLLM FP8 "
            f"batch 1: {pub['vllm_fp8_h100_batch1_tok_s']} tok/s H100, "
            f"{pub['vllm_fp8_h200_batch1_tok_s']} H200)\n" + bench_diffusion_gemma.format_table(g))


def _moe_lines(m: dict) -> str:
    from benchmarks import bench_moe

    return (f"moe {m['model']} ({m['parameters'] / 1e9:.1f}B parameters, {m['n_experts']} "
            f"experts top-{m['experts_per_token']}, {m['dtype']} on {m['device']})\n"
            + bench_moe.format_table(m))


# the report's sections in print order: key -> its lines (None: only a failure is printed;
# LoRA's rows are in the JSON)
SUMMARIES = {"engine": _engine_lines, "context": _context_lines,
             "diffusion_gemma": _diffusion_gemma_lines, "moe": _moe_lines, "lora": None}


def print_summary(report: dict, path: Path) -> None:
    """The short table, last."""
    from benchmarks import bench_kernels

    m = harness.machine_record()
    print(f"\n== gpu_check on {report['environment']['card']} (torch {m['torch']}, triton "
          f"{m['triton']}), {report['seconds']:.0f} s -> {path}")
    if "tests" in report:
        print(f"tests: {report['tests']['summary']}")
    if report.get("kernels"):
        print(bench_kernels.format_table(report["kernels"]))
    for key, lines in SUMMARIES.items():
        if report.get(key) and lines is not None:
            print(lines(report[key]))
        if f"{key}_error" in report:
            print(f"{key} ERROR:", report[f"{key}_error"])
    print("goals:", json.dumps(report["goals"]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bash benchmarks/gpu_check.sh",
                                description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true",
                   help="small shapes on the CPU (Triton under its interpreter): a dry run")
    p.add_argument("--quick", action="store_true", help="fewer kernel cases, shorter answers")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-kernels", action="store_true")
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--skip-context", action="store_true")
    p.add_argument("--skip-diffusion-gemma", action="store_true")
    p.add_argument("--skip-moe", action="store_true")
    p.add_argument("--skip-lora", action="store_true")
    p.add_argument("--engine-model", default="llada-8b",
                   help="engine section model: a preset (llada-8b, default; made block-causal) "
                        "or llama-1b (launch-bound steps, where graphs matter most)")
    p.add_argument("--test-timeout", type=int, default=420)
    p.add_argument("--out", default=None,
                   help="output folder (default $OUT, else $DLLM_RESULTS_DIR or results/)")
    args = harness.parse_args(p, argv)
    if args.tiny:  # before anything defines a Triton kernel
        os.environ.setdefault("TRITON_INTERPRET", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import torch

    if args.tiny:  # a dry run: one thread avoids OpenMP barrier stalls on a busy shared CPU
        torch.set_num_threads(1)
    if not args.tiny and not torch.cuda.is_available():
        print("no CUDA device: run with --tiny for the CPU dry run", file=sys.stderr)
        return 2
    out_dir = Path(args.out or os.environ.get("OUT") or harness.results_dir())
    out_dir.mkdir(parents=True, exist_ok=True)
    card = "cpu" if args.tiny else torch.cuda.get_device_name(0)
    tag = (re.sub(r"[^A-Za-z0-9]+", "-", card).strip("-").lower() + "_"
           + dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"))
    t_start = time.perf_counter()
    report = run_sections(args, out_dir, tag)
    report["seconds"] = time.perf_counter() - t_start
    name = f"gpu_check_{tag}{'_tiny' if args.tiny else ''}"
    path = harness.write_results(name, report, out_dir / f"{name}.json")
    print_summary(report, path)
    failed = "tests" in report and report["tests"]["returncode"] not in (0, 5)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
