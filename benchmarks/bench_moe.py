"""The mixture-of-experts fast path (model/moe.expert_ffn: tokens sorted by expert, two grouped
GEMMs) against the per-expert loop (expert_ffn_reference), side by side in one run.

    dllm bench moe                 # CPU: one MoE layer at 16..1024 tokens + a small random model
    dllm bench moe --quick         # fewer token counts, fewer repeats

Rows: the layer alone (a LLaDA2-like layer scaled down: d 256, 64 experts of width 128, top-8
in 8 groups of which 4 kept, a shared expert; router included) at several token counts, and a
small random LLaDA2-shaped model (4 layers, first dense, blocks of 32) through the real Engine,
batch 1 and 4, fast vs reference MoE. Each row: median seconds over repeats, the ratio
(reference / fast) and the max difference between the two outputs. Writes
benchmarks/results/bench_moe_<device>.json + .png. benchmarks/gpu_check.py runs `gpu_section`
(a LLaDA2.0-mini-shaped random model in bf16: batch 1 and 16 tok/s, peak memory, fast vs
reference) on a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time

import torch

from benchmarks import harness

log = logging.getLogger(__name__)


def llada2_config(shape: str):
    """LLaDA2.0-mini's published shape ("mini": 16B, 20 layers, hidden 2048, 256 experts of
    width 512, top-8, groups 8 / 4, 1 shared expert, first layer dense 5120, vocab 157184), a
    CPU-sized one ("small") or a toy ("tiny"); block-causal with blocks aligned to position 0."""
    from model.config import ModelConfig

    common = dict(attention="block_causal", block_align="zero", block_length=32,
                  time_conditioning=False, tie_embeddings=False, qk_norm=True,
                  partial_rotary_factor=0.5, rope_theta=600000.0, moe_router="sigmoid_group",
                  moe_norm_topk=True, moe_expert_bias=True, moe_routed_scaling=2.5,
                  first_k_dense=1, max_seq_len=4096)
    if shape == "mini":
        return ModelConfig(name="llada2-mini-shape", vocab_size=157184, d_model=2048,
                           n_layers=20, n_heads=16, n_kv_heads=4, mlp_hidden=5120,
                           n_experts=256, experts_per_token=8, moe_hidden=512,
                           shared_expert_hidden=512, moe_n_group=8, moe_topk_group=4,
                           mask_id=156895, eos_id=156892, pad_id=156892, **common)
    if shape == "small":
        return ModelConfig(name="llada2-small-shape", vocab_size=4096, d_model=256, n_layers=4,
                           n_heads=4, n_kv_heads=2, mlp_hidden=512, n_experts=64,
                           experts_per_token=8, moe_hidden=128, shared_expert_hidden=128,
                           moe_n_group=8, moe_topk_group=4, mask_id=4095, eos_id=1, pad_id=1,
                           **common)
    return ModelConfig(name="llada2-tiny-shape", vocab_size=512, d_model=64, n_layers=2,
                       n_heads=4, n_kv_heads=2, mlp_hidden=128, n_experts=16,
                       experts_per_token=4, moe_hidden=32, shared_expert_hidden=32,
                       moe_n_group=4, moe_topk_group=2, mask_id=511, eos_id=1, pad_id=1,
                       **common)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_time(fn, repeats: int, device: str) -> float:
    fn()  # warm: allocator, kernels
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def layer_rows(cfg, device: str, dtype, token_counts: list[int], repeats: int) -> list[dict]:
    """One MoE layer of `cfg` (router + experts + shared expert), fast vs reference."""
    from model.moe import MoE, grouped_mm_supported

    torch.manual_seed(0)
    moe = MoE(cfg.d_model, cfg.n_experts, cfg.experts_per_token, cfg.moe_hidden,
              router=cfg.moe_router, norm_topk_prob=cfg.moe_norm_topk,
              expert_bias=cfg.moe_expert_bias, n_group=cfg.moe_n_group,
              topk_group=cfg.moe_topk_group, routed_scaling_factor=cfg.moe_routed_scaling,
              shared_hidden=cfg.shared_expert_hidden).to(device=device, dtype=dtype).eval()
    rows = []
    for T in harness.progress(token_counts, desc="moe layer"):
        x = torch.randn(T, cfg.d_model, device=device, dtype=dtype)
        out, samples = {}, {"auto": [], "reference": []}
        with torch.no_grad():
            for impl in samples:  # warm both
                moe.impl = impl
                out[impl] = moe(x)
            # alternate the two paths repeat by repeat: on a shared machine, load that comes
            # and goes then hits both alike instead of whichever ran second
            for _ in range(repeats):
                for impl in samples:
                    moe.impl = impl
                    samples[impl].append(_median_time(lambda x=x: moe(x), 1, device))
        times = {impl: statistics.median(v) for impl, v in samples.items()}
        err = (out["auto"].float() - out["reference"].float()).abs().max().item()
        rows.append({"what": "layer", "tokens": T, "fast_s": times["auto"],
                     "reference_s": times["reference"],
                     "speedup": times["reference"] / times["auto"], "max_abs_diff": err,
                     "fast_path": "grouped" if grouped_mm_supported(x, moe.w_gate_up) else "padded"})
        log.info("layer T=%d: fast %.2f ms, reference %.2f ms (%.1fx)", T,
                 1e3 * times["auto"], 1e3 * times["reference"], rows[-1]["speedup"])
    return rows


def set_moe_impl(net, impl: str) -> None:
    from model.moe import MoE

    for m in net.modules():
        if isinstance(m, MoE):
            m.impl = impl


class IdTokenizer:
    """The engine's tokenizer needs (decode) without a vocabulary: ids as text."""

    def decode(self, ids, skip_special: bool = True) -> str:
        return "".join(f"<{i}>" for i in ids)


def engine_rows(net, prompt_len: int, new_tokens: int, steps: int, batches: list[int],
                variants: list[tuple[str, dict]], kv_pages: int) -> list[dict]:
    """The real Engine on `net`, each batch with every (MoE impl, engine options) variant;
    tokens and speed compared with the first variant's (speedup_of_fast: first / this)."""
    from engine.types import GenerationRequest
    from model.sampling import SamplingParams

    cfg = net.cfg
    dev = next(net.parameters()).device
    rows = []
    g = torch.Generator().manual_seed(0)
    for c in batches:
        prompts = [torch.randint(3, cfg.vocab_size - 8, (prompt_len,), generator=g).tolist()
                   for _ in range(c)]
        params = SamplingParams(max_new_tokens=new_tokens, block_length=cfg.block_length,
                                steps=steps, stop_token_ids=[])
        reqs = [GenerationRequest(f"c{c}r{i}", prompts[i], params) for i in range(c)]
        first = None
        for impl, options in variants:
            set_moe_impl(net, impl)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                row = asyncio.run(harness.run_engine(net, IdTokenizer(), reqs, c, c,
                                                     {"kv_pages": kv_pages, **options},
                                                     warm_pass=True, keep_tokens=True))
            except Exception as e:  # keep the other rows
                log.exception("engine impl=%s batch=%d failed", impl, c)
                rows.append({"what": "engine", "moe_impl": impl, "concurrency": c,
                             "cuda_graphs": bool(options.get("cuda_graphs")),
                             "error": f"{type(e).__name__}: {e}"})
                continue
            tokens = row.pop("tokens")
            row.update(what="engine", moe_impl=impl, steps_per_block=steps,
                       prompt_tokens=prompt_len, new_tokens=new_tokens,
                       cuda_graphs=bool(options.get("cuda_graphs")))
            if dev.type == "cuda":
                row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            if first is None:
                first = (row, tokens)
            else:
                row["speedup_of_fast"] = first[0]["tokens_per_s"] / row["tokens_per_s"]
                row["token_agreement_with_fast"] = harness.agreement(first[1], tokens)
            rows.append(row)
    set_moe_impl(net, "auto")
    return rows


def build_random(cfg, device: str, dtype):
    """Random weights made on the device in the target dtype (no fp32 copy of 16B first)."""
    from benchmarks.gpu_check import build_random_model

    net = build_random_model(cfg, device, dtype)
    with torch.no_grad():  # a spread of expert biases, as trained routers carry
        for m in net.modules():
            if getattr(m, "expert_bias", None) is not None:
                m.expert_bias.normal_(0, 0.01)
    return net.to(dtype).eval()


def run(device: str, shape: str, quick: bool) -> dict:
    """Layer rows and engine rows for `shape` on `device` -> the report."""
    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = llada2_config(shape)
    tokens = ([16, 256] if quick else [16, 64, 256, 1024]) if not cuda else \
        ([16, 512, 4096] if quick else [16, 128, 512, 2048, 8192])
    report = {"model": cfg.name, "device": device, "dtype": str(dtype).replace("torch.", ""),
              "d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_experts": cfg.n_experts,
              "experts_per_token": cfg.experts_per_token, "moe_hidden": cfg.moe_hidden,
              "rows": layer_rows(cfg, device, dtype, tokens, 3 if quick else 7)}
    t0 = time.perf_counter()
    net = build_random(cfg, device, dtype)
    report["build_seconds"] = time.perf_counter() - t0
    report["parameters"] = sum(p.numel() for p in net.parameters())
    if cuda:
        prompt_len, new_tokens, batches = 512, (128 if quick else 256), [1, 16]
    else:
        prompt_len, new_tokens, batches = (40, 32, [1]) if shape == "tiny" else \
            (64, 32 if quick else 64, [1, 4])
    pages = max(batches) * -(-(prompt_len + new_tokens + 2 * cfg.block_length) // 16)
    variants = [("auto", {}), ("reference", {})]
    if cuda:  # the fast path has no host sync: it may run in CUDA graphs (engine/cuda_graphs.py)
        variants.insert(1, ("auto", {"cuda_graphs": True}))
    report["rows"] += engine_rows(net, prompt_len, new_tokens, 8, batches, variants, pages)
    del net
    if cuda:
        torch.cuda.empty_cache()
    return report


def gpu_section(tiny: bool, quick: bool) -> dict:
    """benchmarks/gpu_check.py's MoE section: LLaDA2.0-mini-shaped (16B, bf16) on CUDA, the toy
    shape on the CPU for its dry run."""
    return run("cpu" if tiny else "cuda", "tiny" if tiny else "mini", quick)


def format_table(report: dict) -> str:
    lines = [f"{'what':<8}{'tokens/batch':>13}{'impl':>10}{'fast ms':>10}{'ref ms':>10}"
             f"{'tok/s':>9}{'x':>7}{'peak GiB':>9}"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"{r['what']:<8}{r.get('concurrency', ''):>13}  ERROR {r['error']}")
        elif r["what"] == "layer":
            lines.append(f"{'layer':<8}{r['tokens']:>13}{r['fast_path']:>10}"
                         f"{1e3 * r['fast_s']:>10.2f}{1e3 * r['reference_s']:>10.2f}{'':>9}"
                         f"{r['speedup']:>7.1f}")
        else:
            x = r.get("speedup_of_fast")
            peak = r.get("peak_memory_gib")
            impl = r["moe_impl"] + ("+g" if r.get("cuda_graphs") else "")
            lines.append(f"{'engine':<8}{r['concurrency']:>13}{impl:>10}{'':>20}"
                         f"{r['tokens_per_s']:>9.1f}{(f'{x:.1f}' if x else ''):>7}"
                         f"{(f'{peak:.1f}' if peak else ''):>9}")
    return "\n".join(lines)


def plot(report: dict, path) -> None:
    layer = [r for r in report["rows"] if r["what"] == "layer" and "error" not in r]
    eng = [r for r in report["rows"] if r["what"] == "engine" and "error" not in r]
    fig, (a, b) = harness.figure(1, 2, figsize=(10, 4))
    t = [r["tokens"] for r in layer]
    a.plot(t, [1e3 * r["fast_s"] for r in layer], "o-", label="fast (grouped GEMM)")
    a.plot(t, [1e3 * r["reference_s"] for r in layer], "s-", label="per-expert loop")
    a.set(xscale="log", yscale="log", xlabel="tokens", ylabel="ms per MoE layer",
          title=f"{report['model']}: one MoE layer ({report['device']})")
    a.legend()
    for impl in ("auto", "reference"):
        rows = [r for r in eng if r["moe_impl"] == impl]
        b.bar([f"{r['concurrency']}\n{impl}{'+graphs' if r.get('cuda_graphs') else ''}"
               for r in rows], [r["tokens_per_s"] for r in rows], label=impl)
    b.set(ylabel="output tok/s", title="engine, batch x MoE path")
    harness.save_figure(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="dllm bench moe", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default=None, choices=["tiny", "small", "mini"],
                   help="model shape (default: mini on CUDA, small on the CPU)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    args = harness.parse_args(p, argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    shape = args.shape or ("mini" if args.device == "cuda" else "small")
    report = run(args.device, shape, args.quick)
    name = f"bench_moe_{args.device}"
    path = harness.write_results(name, report, args.out)
    plot(report, path)
    print(format_table(report))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
