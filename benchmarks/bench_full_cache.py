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
import datetime
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

from engine import Engine, EngineConfig
from engine.types import Finished, GenerationRequest
from model.config import ModelConfig
from model.sampling import FULL_CACHE_MODES, SamplingParams, generate
from model.transformer import DiffusionTransformer

RESULTS = Path(__file__).parent / "results"


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
    counting = CountingNet(net)
    t0 = time.perf_counter()
    outputs = {r.request_id: generate(counting, r.prompt_ids, r.params).tokens for r in reqs}
    seconds = time.perf_counter() - t0
    tokens = sum(len(t) for t in outputs.values())
    return {"seconds": seconds, "output_tokens": tokens, "tokens_per_s": tokens / seconds,
            "forwards": counting.forwards,
            "tokens_per_forward": counting.tokens / counting.forwards, "outputs": outputs}


async def run_engine(net, tok, reqs, concurrency: int) -> dict:
    engine = Engine(net, tok, net.cfg, EngineConfig(max_num_seqs=concurrency))
    steps: list[tuple[int, int]] = []  # (rows, real tokens) of each denoising step
    denoise = engine.runner.denoise

    def counting(seqs):
        n, outcome, apply = denoise(seqs)
        steps.append((len(seqs), n))
        return n, outcome, apply

    engine.runner.denoise = counting
    todo = list(reqs)
    outputs: dict[str, list[int]] = {}

    async def client():
        while todo:
            req = todo.pop(0)
            ids: list[int] = []
            async for ev in engine.submit(req):
                ids += getattr(ev, "token_ids", None) or []
                if isinstance(ev, Finished):
                    outputs[req.request_id] = ids

    t0 = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(concurrency)])
    seconds = time.perf_counter() - t0
    await engine.shutdown()
    tokens = sum(len(t) for t in outputs.values())
    rows = sum(r for r, _ in steps)
    return {"concurrency": concurrency, "seconds": seconds, "output_tokens": tokens,
            "tokens_per_s": tokens / seconds, "iterations": len(steps),
            "token_steps": sum(n for _, n in steps),
            "tokens_per_row_step": sum(n for _, n in steps) / max(rows, 1),
            "outputs": outputs}


def agreement(a: dict[str, list[int]], b: dict[str, list[int]]) -> float:
    same = total = 0
    for rid, ta in a.items():
        tb = b[rid]
        same += sum(x == y for x, y in zip(ta, tb, strict=False))
        total += max(len(ta), len(tb))
    return same / max(total, 1)


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
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    from model.cli_generate import load_model

    _, tok, _ = load_model("tiny-coder")  # its tokenizer: detokenising the engine's stream
    net = random_model(tok, args.d_model, args.layers, args.heads)
    load_before = os.getloadavg()[0]
    base = SamplingParams(max_new_tokens=args.new_tokens, block_length=args.block_length,
                          steps=args.steps, stop_token_ids=[])
    asyncio.run(run_engine(net, tok, make_requests(net.cfg, 2, 32, base), 2))  # warm-up
    rows = {}
    for mode in _progress(FULL_CACHE_MODES, "modes"):
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
    flags = " ".join(sys.argv[1:] if argv is None else argv)
    result = {"benchmark": "bench_full_cache",
              "command": f"python -m benchmarks.bench_full_cache {flags}".strip(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"processor": platform.processor() or platform.machine(),
                          "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "torch": torch.__version__},
              "load_average_1m": [load_before, os.getloadavg()[0]],
              "model": {"name": net.cfg.name, "params": net.num_params(),
                        "d_model": args.d_model, "layers": args.layers, "heads": args.heads,
                        "dtype": "float32", "weights": "random"},
              "settings": {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                           "block_length": args.block_length, "steps_per_block": args.steps,
                           "requests": args.requests, "concurrency": args.concurrency},
              "rows": rows}
    out = Path(args.out or RESULTS / "bench_full_cache_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    _plot(result, out.with_suffix(".png"))
    print(f"{'mode':>8}{'gen tok/s':>11}{'x':>6}{'tok/fwd':>9}{'agree':>7}"
          f"{'eng tok/s':>11}{'x':>6}{'tok/row-step':>14}{'agree':>7}")
    for mode, row in rows.items():
        g, e = row["generate"], row["engine"]
        print(f"{mode:>8}{g['tokens_per_s']:>11.1f}{g['speedup_vs_none']:>6.2f}"
              f"{g['tokens_per_forward']:>9.1f}{g['agreement_with_none']:>7.2f}"
              f"{e['tokens_per_s']:>11.1f}{e['speedup_vs_none']:>6.2f}"
              f"{e['tokens_per_row_step']:>14.1f}{e['agreement_with_none']:>7.2f}")


def _progress(items, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return items
    return tqdm(items, desc=desc)


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    modes = list(rows)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
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
                 f"CPU {result['machine']['torch_threads']} thread(s): prompt ~{s['prompt_tokens']}, "
                 f"{s['new_tokens']} new, block {s['block_length']}, {s['steps_per_block']} steps",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
