"""`dllm bench lora`: many LoRA adapters in one engine, mixed batches against one-adapter batches.

    dllm bench lora                       # tiny-coder on the CPU -> results/bench_lora.{json,png}
    dllm bench lora --adapters 4 --requests 32 --rank 16

One set of requests (the same prompts, 64 new tokens, blocks of 32 at 8 steps, temperature 0),
served by the real Engine (closed loop, every request submitted at once, max_num_seqs 16):
- base: no adapters, no hooks (EngineConfig.max_loras = 0);
- base_hooked: the LoRA slots and hooks installed, no request naming an adapter (the hooks'
  cost when unused: one Python check per Linear);
- one_adapter: every request through the same adapter;
- mixed: requests cycling over --adapters adapters and the base model, all in the same step
  batches (each row its own slot: one gathered low-rank matmul per Linear, kernels/lora.py);
- grouped: the same mixed workload served one adapter at a time (each adapter's requests as
  their own batches, one after another), what an engine without per-row adapters must do.
Reported: output tokens/s and the ratio of each mode to base; mixed / grouped is the point.
Random adapters of --rank on every Linear but the LM head (the work does not depend on the
values). The gathered matmul runs its torch reference on the CPU (Triton only on CUDA);
`gpu_section` (benchmarks/gpu_check.py) adds the Triton kernel against the reference and
against a loop over adapters at LLaDA-8B widths, and the engine on a 1B-shaped model.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import time

import torch

from benchmarks import harness


def random_adapters(net, n: int, rank: int, seed: int = 0, lm_head: bool = False) -> list:
    from model.loaders.lora import AdapterWeights, LoRAModule

    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        lora = {}
        for name, mod in net.named_modules():
            if isinstance(mod, torch.nn.Linear) and (name.startswith("layers.")
                                                     or (lm_head and name == "lm_head")):
                o, i = mod.weight.shape
                lora[name] = LoRAModule(torch.randn(rank, i, generator=g) * 0.02,
                                        torch.randn(o, rank, generator=g) * 0.02, 2.0)
        out.append(AdapterWeights(f"bench-{k}", None, lora))
    return out


def make_requests(cfg, n: int, prompt_len: int, new_tokens: int, names: list, seed: int = 0):
    from engine.types import GenerationRequest
    from model.sampling import SamplingParams

    g = torch.Generator().manual_seed(seed)
    reqs = []
    for i in range(n):
        ids = torch.randint(3, cfg.vocab_size, (prompt_len,), generator=g).tolist()
        params = SamplingParams(max_new_tokens=new_tokens, block_length=32, steps=8,
                                stop_token_ids=[])  # a fixed schedule: same work every mode
        reqs.append(GenerationRequest(f"r{i}", ids, params, adapter=names[i % len(names)]))
    return reqs


async def _serve(engine, reqs) -> tuple[float, int]:
    from engine.types import Finished

    async def one(r):
        async for ev in engine.submit(r):
            if isinstance(ev, Finished):
                assert ev.error is None, ev.error
                return ev.completion_tokens
        return 0

    t0 = time.perf_counter()
    tokens = await asyncio.gather(*[one(r) for r in reqs])
    return time.perf_counter() - t0, sum(tokens)


async def run_mode(net, tok, reqs, adapters, max_loras: int, max_num_seqs: int,
                   grouped: bool = False, warm: bool = True) -> dict:
    """One fresh engine serving reqs (grouped: adapter by adapter) -> tokens/s etc."""
    from engine import Engine, EngineConfig

    net = copy.deepcopy(net)  # hooks must not outlive the mode
    engine = Engine(net, tok, net.cfg, EngineConfig(max_num_seqs=max_num_seqs,
                                                    max_loras=max_loras, max_lora_rank=64))
    for a in adapters:
        engine.add_adapter(a)
    await engine.start()
    if warm:  # one request per adapter and the base: slots loaded, allocator warm
        names = sorted({r.adapter or "" for r in reqs})
        warm_reqs = [dataclasses.replace(reqs[0], request_id=f"w{i}", adapter=n or None)
                     for i, n in enumerate(names)]
        await _serve(engine, warm_reqs)
    groups = [reqs]
    if grouped:
        by: dict = {}
        for r in reqs:
            by.setdefault(r.adapter, []).append(r)
        groups = list(by.values())
    seconds = tokens = 0
    for g in groups:
        s, t = await _serve(engine, g)
        seconds += s
        tokens += t
    stats = engine.stats()
    await engine.shutdown()
    return {"seconds": seconds, "output_tokens": tokens, "tokens_per_s": tokens / seconds,
            "iterations": stats.iterations, "lora": stats.extra.get("lora")}


async def engine_rows(net, tok, n_adapters: int, rank: int, n_requests: int, prompt_len: int,
                      new_tokens: int, max_num_seqs: int, repeats: int = 1) -> list[dict]:
    """Each mode `repeats` times, the modes interleaved (a shared machine's noise spreads
    over all of them); the median run of each mode is reported."""
    adapters = random_adapters(net, n_adapters, rank)
    names_mixed = [a.name for a in adapters] + [None]
    cfg = net.cfg
    modes = [
        ("base", [None], [], 0, False),
        ("base_hooked", [None], adapters, n_adapters, False),
        ("one_adapter", [adapters[0].name], adapters, n_adapters, False),
        ("mixed", names_mixed, adapters, n_adapters, False),
        ("grouped", names_mixed, adapters, n_adapters, True),
    ]
    runs: dict[str, list[dict]] = {m[0]: [] for m in modes}
    bar = harness.progress(total=repeats * len(modes), desc="lora modes")
    for _ in range(repeats):
        for mode, names, ads, slots, grouped in modes:
            reqs = make_requests(cfg, n_requests, prompt_len, new_tokens, names)
            runs[mode].append(await run_mode(net, tok, reqs, ads, slots, max_num_seqs, grouped))
            bar.update(1)
    bar.close()
    rows = []
    for mode, names, *_ in modes:
        rs = sorted(runs[mode], key=lambda r: r["tokens_per_s"])
        rows.append({"mode": mode, "adapters": len({n for n in names if n}), "rank": rank,
                     "requests": n_requests, **rs[len(rs) // 2],
                     "tokens_per_s_runs": [r["tokens_per_s"] for r in runs[mode]]})
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["vs_base"] = r["tokens_per_s"] / base
    mixed = next(r for r in rows if r["mode"] == "mixed")
    grouped_row = next(r for r in rows if r["mode"] == "grouped")
    mixed["vs_grouped"] = mixed["tokens_per_s"] / grouped_row["tokens_per_s"]
    return rows


# --- the gathered matmul itself (GPU section) -------------------------------------------------

def _time(fn, reps: int) -> float:
    """Median seconds of fn() over reps (CUDA-synchronised)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def kernel_rows(device: str, dtype, shapes: list[tuple], reps: int = 20) -> list[dict]:
    """add_lora: Triton vs the torch reference (gather + bmm) vs a loop over the adapters
    present (one masked matmul pair each, what a per-adapter engine would launch)."""
    return [_kernel_row(device, dtype, shape, reps) for shape in shapes]


def _kernel_row(device: str, dtype, shape: tuple, reps: int) -> dict:
    from kernels import lora_triton
    from kernels.lora import lora_delta_reference

    B, L, K, N, R, S = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, L, K, generator=g).to(device, dtype)
    a = (torch.randn(S, R, K, generator=g) * 0.05).to(device, dtype)
    b = (torch.randn(S, N, R, generator=g) * 0.05).to(device, dtype)
    base = torch.randn(B, L, N, generator=g).to(device, dtype)
    slots = (torch.arange(B) % (S + 1) - 1).to(device)  # every slot and the base

    def loop():
        out = base.clone()
        for s in range(S):
            rows_s = slots == s
            out[rows_s] += (x[rows_s] @ a[s].T) @ b[s].T
        return out

    want = base + lora_delta_reference(x, a, b, slots)
    got = lora_triton.add_lora(base.clone(), x, a, b, slots)
    err = float((got.float() - want.float()).abs().max())
    t_tri = _time(lambda: lora_triton.add_lora(base.clone(), x, a, b, slots), reps)
    t_ref = _time(lambda: base + lora_delta_reference(x, a, b, slots), reps)
    t_loop = _time(loop, reps)
    print(f"  add_lora {B}x{L} K{K} N{N} r{R} S{S}: triton {1e3 * t_tri:.3f} ms, "
          f"reference {1e3 * t_ref:.3f} ms, loop {1e3 * t_loop:.3f} ms, err {err:.2e}",
          flush=True)
    return {"shape": {"B": B, "L": L, "K": K, "N": N, "R": R, "S": S},
            "dtype": str(dtype).removeprefix("torch."), "max_abs_err": err,
            "triton_ms": 1e3 * t_tri, "reference_ms": 1e3 * t_ref, "loop_ms": 1e3 * t_loop,
            "speedup_vs_reference": t_ref / t_tri, "speedup_vs_loop": t_loop / t_tri}


def gpu_section(tiny: bool, quick: bool) -> dict:
    """The GPU check's LoRA section: kernel rows at LLaDA-8B widths (K = N = 4096, 8 slots of
    rank 16; 32 x 32 rows: a 16-row step batch) and the engine modes on a 1B-shaped model."""
    from benchmarks.gpu_check import IdTokenizer, build_random_model, engine_model_config

    device = "cpu" if tiny else "cuda"
    dtype = torch.float32 if tiny else torch.bfloat16
    shapes = [(4, 8, 64, 48, 8, 3)] if tiny else \
        [(16, 32, 4096, 4096, 16, 8), (64, 32, 4096, 4096, 16, 8), (16, 32, 4096, 14336, 16, 8)]
    report = {"kernels": kernel_rows(device, dtype, shapes, reps=3 if tiny else 20)}
    cfg = engine_model_config("tiny" if tiny else "llama-1b")
    net = build_random_model(cfg, device, dtype)
    tok = IdTokenizer()
    n = 8 if tiny else (32 if quick else 64)
    report["engine"] = asyncio.run(engine_rows(net, tok, 4, 16, n, 64 if tiny else 256,
                                               32 if tiny else 128, 16 if tiny else 32))
    return report


def plot(rows: list[dict], path) -> None:
    fig, ax = harness.figure(figsize=(7, 4))
    names = [r["mode"] for r in rows]
    vals = [r["tokens_per_s"] for r in rows]
    bars = ax.bar(names, vals, color=["#888", "#aaa", "#4c72b0", "#dd8452", "#c44e52"][:len(rows)])
    for bar, r in zip(bars, rows, strict=True):
        ax.annotate(f"{r['vs_base']:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"LoRA in the engine: {rows[0]['requests']} requests, rank {rows[0]['rank']}, "
                 f"{rows[-1]['adapters']} adapters (x base)")
    harness.save_figure(fig, path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="dllm bench lora", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-coder")
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = harness.parse_args(p, argv)
    torch.set_num_threads(args.threads)
    from model.loaders import load_pretrained

    net, tok, _ = load_pretrained(args.model, progress=False)
    rows = asyncio.run(engine_rows(net, tok, args.adapters, args.rank, args.requests,
                                   args.prompt_len, args.new_tokens, args.max_num_seqs,
                                   args.repeats))
    for r in rows:
        print(f"{r['mode']:>12}: {r['tokens_per_s']:8.1f} tok/s  ({r['vs_base']:.2f}x base)")
    mixed = next(r for r in rows if r["mode"] == "mixed")
    print(f"mixed batches vs one-adapter batches: {mixed['vs_grouped']:.2f}x")
    path = harness.write_results("bench_lora", {"model": args.model, "rows": rows},
                                 out=args.out)
    plot(rows, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
