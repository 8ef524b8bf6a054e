"""Full-attention KV cache (Fast-dLLM prefix / dual, SamplingParams.full_cache) side by side with
no cache, on a random LLaDA-layout model: tok/s, tokens processed per forward, token agreement.

    python -m benchmarks.bench_full_cache                      # ~256-token prompts, 128 new tokens
    python -m benchmarks.bench_full_cache --d-model 512 --requests 8 --concurrency 4

The model is random (full attention, no time conditioning, MHA as LLaDA; d_model/layers from the
flags), so the agreement of prefix/dual tokens with "none" is informational only: a trained
model's confidence is what makes the approximation cheap in quality (Fast-dLLM reports it on
LLaDA-8B). For each mode the same requests (random ~prompt-length prompts, EOS not stopping them)
go through model.sampling.generate one after another and through a fresh Engine with
`--concurrency` clients (closed loop). Tokens per forward are counted from the forwards
themselves: generate's calls (a wrapper around the net) and the engine's denoising steps (the
real, unpadded tokens engine/batch.py reports). Writes benchmarks/results/bench_full_cache_cpu.json
and .png (--out to change); read the ratios, not the absolute numbers (a shared 2-core CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
from pathlib import Path

import torch
from torch import nn

from benchmarks import harness
from benchmarks.harness import agreement
from engine.types import GenerationRequest
from model.config import ModelConfig
from model.sampling import FULL_CACHE_MODES, SamplingParams
from model.transformer import DiffusionTransformer


class CountingNet(nn.Module):
    """The net, counting forwards and the tokens they run (input_ids.numel())."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.cfg = net, net.cfg
        self.forwards = self.tokens = 0

    def forward(self, input_ids, **kw):
        self.forwards += 1
        self.tokens += input_ids.numel()
        return self.net(input_ids, **kw)


def random_model(tok, d_model: int, n_layers: int, n_heads: int, seed: int = 0):
    cfg = ModelConfig(name=f"random-full-d{d_model}-l{n_layers}", vocab_size=tok.vocab_size,
                      d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads,
                      mlp_hidden=(8 * d_model // 3 + 63) // 64 * 64, max_seq_len=1024,
                      mask_id=tok.mask_id, eos_id=tok.eos_id, pad_id=tok.pad_id,
                      eot_id=tok.eot_id, attention="full", time_conditioning=False,
                      tie_embeddings=False)
    torch.manual_seed(seed)
    return DiffusionTransformer(cfg).eval()


def make_requests(cfg: ModelConfig, n: int, prompt_len: int, params: SamplingParams, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = prompt_len + (i % 4) * 8 - 12  # a little spread around prompt_len
        ids = torch.randint(16, cfg.vocab_size, (length,), generator=g).tolist()
        out.append(GenerationRequest(f"bench-{i}", ids, params))
    return out


def run_generate(net, reqs) -> dict:
    """generate one request after another, counting its forwards and the tokens they ran."""
    counting = CountingNet(net)
    row = harness.run_generate(counting, reqs, keep_tokens=True)
    return {"seconds": row["seconds"], "output_tokens": row["output_tokens"],
            "tokens_per_s": row["tokens_per_s"], "forwards": counting.forwards,
            "tokens_per_forward": counting.tokens / counting.forwards, "outputs": row["tokens"]}


async def run_engine(net, tok, reqs, concurrency: int) -> dict:
    """A fresh Engine with `concurrency` clients, the tokens its denoising steps ran counted."""
    row = await harness.run_engine(net, tok, reqs, concurrency, max_num_seqs=concurrency,
                                   keep_tokens=True, count_steps=True)
    return {"concurrency": concurrency, "seconds": row["seconds"],
            "output_tokens": row["output_tokens"], "tokens_per_s": row["tokens_per_s"],
            "iterations": row["iterations"], "token_steps": row["token_steps"],
            "tokens_per_row_step": row["tokens_per_row_step"], "outputs": row["tokens"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="dllm bench full-cache", description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=8, help="denoising steps per block")
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default=None, help="default results/bench_full_cache_cpu.json")
    args = harness.parse_args(p, argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    from model.loaders import load_pretrained

    _, tok, _ = load_pretrained("tiny-coder", progress=False)  # its tokenizer: detokenising the engine's stream
    net = random_model(tok, args.d_model, args.layers, args.heads)
    load_before = os.getloadavg()[0]
    base = SamplingParams(max_new_tokens=args.new_tokens, block_length=args.block_length,
                          steps=args.steps, stop_token_ids=[])
    asyncio.run(run_engine(net, tok, make_requests(net.cfg, 2, 32, base), 2))  # warm-up
    rows = {}
    for mode in harness.progress(FULL_CACHE_MODES, "modes"):
        reqs = make_requests(net.cfg, args.requests, args.prompt_tokens,
                             dataclasses.replace(base, full_cache=mode))
        with torch.no_grad():
            rows[mode] = {"generate": run_generate(net, reqs),
                          "engine": asyncio.run(run_engine(net, tok, reqs, args.concurrency))}
    for row in rows.values():
        for kind in ("generate", "engine"):
            r = row[kind]
            r["agreement_with_none"] = agreement(r["outputs"], rows["none"][kind]["outputs"])
            r["speedup_vs_none"] = r["tokens_per_s"] / rows["none"][kind]["tokens_per_s"]
        # the engine gives generate's tokens in every mode (tests pin it; float32 here)
        row["engine_equals_generate"] = agreement(row["engine"]["outputs"],
                                                  row["generate"]["outputs"])
    for row in rows.values():
        for kind in ("generate", "engine"):
            del row[kind]["outputs"]
    result = {"benchmark": "bench_full_cache",
              "load_average_1m": [load_before, os.getloadavg()[0]],
              "model": {"name": net.cfg.name, "params": net.num_params(),
                        "d_model": args.d_model, "layers": args.layers, "heads": args.heads,
                        "dtype": "float32", "weights": "random"},
              "settings": {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                           "block_length": args.block_length, "steps_per_block": args.steps,
                           "requests": args.requests, "concurrency": args.concurrency},
              "rows": rows}
    out = harness.write_results("bench_full_cache_cpu", result, args.out)
    _plot(result, out)
    print(f"{'mode':>8}{'gen tok/s':>11}{'x':>6}{'tok/fwd':>9}{'agree':>7}"
          f"{'eng tok/s':>11}{'x':>6}{'tok/row-step':>14}{'agree':>7}")
    for mode, row in rows.items():
        g, e = row["generate"], row["engine"]
        print(f"{mode:>8}{g['tokens_per_s']:>11.1f}{g['speedup_vs_none']:>6.2f}"
              f"{g['tokens_per_forward']:>9.1f}{g['agreement_with_none']:>7.2f}"
              f"{e['tokens_per_s']:>11.1f}{e['speedup_vs_none']:>6.2f}"
              f"{e['tokens_per_row_step']:>14.1f}{e['agreement_with_none']:>7.2f}")


def _plot(result: dict, path: Path) -> None:
    rows = result["rows"]
    modes = list(rows)
    fig, (ax, ax2) = harness.figure(1, 2, figsize=(10, 4.2))
    w = 0.38
    for k, (kind, color) in enumerate((("generate", "tab:gray"), ("engine", "tab:blue"))):
        xs = [i + (k - 0.5) * w for i in range(len(modes))]
        bars = ax.bar(xs, [rows[m][kind]["tokens_per_s"] for m in modes], w, color=color,
                      label=kind if kind == "generate" else
                      f"engine, {result['settings']['concurrency']} clients")
        for b, m in zip(bars, modes, strict=True):
            ax.annotate(f"{rows[m][kind]['speedup_vs_none']:.2f}x",
                        (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                        va="bottom", fontsize=8)
    ax.set_xticks(range(len(modes)), modes)
    ax.set_ylabel("output tokens / s")
    ax.set_title("throughput (label: vs none)", fontsize=9)
    ax.legend(fontsize=8)
    ax2.bar(modes, [rows[m]["generate"]["tokens_per_forward"] for m in modes], color="tab:green")
    for i, m in enumerate(modes):
        ax2.annotate(f"agree {rows[m]['generate']['agreement_with_none']:.2f}",
                     (i, rows[m]["generate"]["tokens_per_forward"]), ha="center", va="bottom",
                     fontsize=8)
    ax2.set_ylabel("tokens per forward (generate)")
    ax2.set_title("work per forward; token agreement with none (random weights)", fontsize=9)
    s, mdl = result["settings"], result["model"]
    fig.suptitle(f"full-attention KV cache, {mdl['name']} ({mdl['params'] / 1e6:.1f}M, random), "
                 f"CPU {torch.get_num_threads()} thread(s): prompt ~{s['prompt_tokens']}, "
                 f"{s['new_tokens']} new, block {s['block_length']}, {s['steps_per_block']} steps",
                 fontsize=9)
    harness.save_figure(fig, path)


if __name__ == "__main__":
    main()
