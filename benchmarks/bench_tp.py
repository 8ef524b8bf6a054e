"""`dllm bench tp`: the engine on a tensor-parallel model (2 gloo processes) vs one process.

    dllm bench tp                                    # tiny-coder and a wider random model
    python -m benchmarks.bench_tp --models tiny-coder --concurrency 1 4

The same requests (bench_engine's prompts, EOS not stopping them) go through a fresh Engine:
- tp1 x1: one process, one torch thread;
- tp1 x2: one process, two torch threads (the same cores as tp2);
- tp2: rank 0 runs the Engine over a TPLeader, rank 1 follows every forward
  (engine/tensor_parallel.py, the broadcast transport), one torch thread per rank;
- tp2_ray (--ray): the same, but rank 1 is deployments/tensor_parallel.RankWorker, a Ray actor,
  and each forward's spec goes to it as an actor call (what a Serve TP replica does): the
  difference from tp2 is the cost of that transport per step.
Random weights are the same full weights in every setting (seeded, then sliced per rank), so
the tokens can be compared: float32 all-reduces re-associate sums, so a near-tie may flip.
On a CPU this measures what TP costs and gains per step (two all-reduces per layer over gloo
against half the matmuls per rank); on GPUs (NCCL, NVLink) the balance is different.
Writes benchmarks/results/bench_tp_cpu.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from pathlib import Path

import torch

from benchmarks import harness
from benchmarks.bench_engine import make_requests
from benchmarks.harness import agreement, run_engine
from model.config import ModelConfig
from model.parallel import build_rank_model, run_tp
from model.sampling import SamplingParams

log = logging.getLogger(__name__)


def wide_config(vocab_size: int) -> ModelConfig:
    """A random block-causal model ~25x tiny-coder's per-token work (d 1024, 6 layers)."""
    return ModelConfig(name="wide-random", vocab_size=vocab_size, d_model=1024, n_layers=6,
                       n_heads=16, n_kv_heads=8, mlp_hidden=2816, max_seq_len=2048,
                       attention="block_causal", block_length=32, time_conditioning=True)


def _source(name: str, vocab_size: int):
    return "tiny-coder" if name == "tiny-coder" else wide_config(vocab_size)


def _rows(net, tok, reqs, concurrency: list[int]) -> list[dict]:
    rows = []
    for c in concurrency:
        row = asyncio.run(run_engine(net, tok, reqs, c, max_num_seqs=max(concurrency),
                                     keep_tokens=True))
        rows.append(row)
    return rows


def _tp_worker(rank, world_size, device, name, tok, reqs, concurrency):
    from engine.tensor_parallel import BroadcastDispatch, TPFollower, TPLeader, follow_broadcasts

    net = build_rank_model(_source(name, tok.vocab_size), rank, world_size, device)
    if rank:
        return follow_broadcasts(TPFollower(net))
    leader = TPLeader(net, BroadcastDispatch())
    try:
        rows = _rows(leader, tok, reqs, concurrency)
    finally:
        leader.close()
    return rows


def _ray_rows(name: str, tok, reqs, concurrency: list[int]) -> list[dict]:
    """tp2 with rank 0 here and rank 1 a RankWorker actor, specs sent as actor calls."""
    import os
    import tempfile

    import ray
    import torch.distributed as dist

    from deployments.tensor_parallel import RankWorker, RayDispatch
    from engine.tensor_parallel import TPLeader
    from model.checkpoint import save_checkpoint
    from model.parallel import init_distributed, load_sharded

    with tempfile.TemporaryDirectory(prefix="dllm-bench-tp-") as tmp:
        source = "tiny-coder"
        if name != "tiny-coder":  # the same seeded weights as the other settings, on disk
            source = tmp
            save_checkpoint(tmp, build_rank_model(_source(name, tok.vocab_size), 0, 1, "cpu"),
                            tok)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            worker = RankWorker.options(num_cpus=1).remote(1, 2, 1)
            init = f"tcp://127.0.0.1:{harness.free_port()}"
            env = {"GLOO_SOCKET_IFNAME": "lo"}
            setup = worker.setup.remote(init, source, "cpu", "float32", 120.0, env)
            os.environ.update(env)
            torch.set_num_threads(1)
            dev = init_distributed(0, 2, init, "cpu", timeout_s=120.0)
            net, _, _ = load_sharded(source, 0, 2, device=dev)
            ray.get(setup)
            rows = _rows(TPLeader(net, RayDispatch([worker])), tok, reqs, concurrency)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            ray.shutdown()
    return rows


def bench_model(name: str, tok, args) -> dict:
    params = SamplingParams(max_new_tokens=args.new_tokens, steps=args.steps,
                            block_length=32, stop_token_ids=[])
    reqs = make_requests(tok, args.requests, params)
    out = {"model": name, "settings": {}}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        net = build_rank_model(_source(name, tok.vocab_size), 0, 1, "cpu")
        out["settings"][f"tp1_x{threads}"] = _rows(net, tok, reqs, args.concurrency)
        log.info("%s tp1 x%d: %s", name, threads,
                 [round(r["tokens_per_s"], 1) for r in out["settings"][f"tp1_x{threads}"]])
    t0 = time.perf_counter()
    out["settings"]["tp2"] = run_tp(_tp_worker, 2, name, tok, reqs, args.concurrency,
                                    threads_per_rank=1)
    log.info("%s tp2: %s (%.0f s with process start)", name,
             [round(r["tokens_per_s"], 1) for r in out["settings"]["tp2"]],
             time.perf_counter() - t0)
    if args.ray:
        out["settings"]["tp2_ray"] = _ray_rows(name, tok, reqs, args.concurrency)
        log.info("%s tp2 over Ray: %s", name,
                 [round(r["tokens_per_s"], 1) for r in out["settings"]["tp2_ray"]])
    out["params"] = sum(p.numel() for p in build_rank_model(
        _source(name, tok.vocab_size), 0, 1, "cpu").parameters())
    summary = []
    for i, c in enumerate(args.concurrency):
        s = {k: v[i] for k, v in out["settings"].items()}
        summary.append({
            "concurrency": c,
            **{f"{k}_tok_s": round(r["tokens_per_s"], 2) for k, r in s.items()},
            **{f"{k}_iteration_ms": round(r["mean_iteration_ms"], 2) for k, r in s.items()},
            "tp2_over_tp1_x1": round(s["tp2"]["tokens_per_s"] / s["tp1_x1"]["tokens_per_s"], 3),
            "tp2_over_tp1_x2": round(s["tp2"]["tokens_per_s"] / s["tp1_x2"]["tokens_per_s"], 3),
            "token_agreement_tp2_vs_tp1": round(agreement(s["tp2"]["tokens"],
                                                          s["tp1_x1"]["tokens"]), 4)})
        if "tp2_ray" in s:
            ray_row, bc = s["tp2_ray"], s["tp2"]
            summary[-1].update(
                tp2_ray_over_tp2=round(ray_row["tokens_per_s"] / bc["tokens_per_s"], 3),
                # per forward: an iteration runs a cache write (sometimes) and a step
                ray_dispatch_ms_per_iteration=round(ray_row["mean_iteration_ms"]
                                                    - bc["mean_iteration_ms"], 2),
                token_agreement_tp2_ray_vs_tp1=round(agreement(ray_row["tokens"],
                                                               s["tp1_x1"]["tokens"]), 4))
    for rows in out["settings"].values():
        for r in rows:
            r.pop("tokens", None)
    out["summary"] = summary
    return out


def plot(results: list[dict], path: Path) -> None:
    fig, axes = harness.figure(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        conc = [s["concurrency"] for s in res["summary"]]
        keys = [k for k in ("tp1_x1", "tp1_x2", "tp2", "tp2_ray") if f"{k}_tok_s" in
                res["summary"][0]]
        width = 0.8 / len(keys)
        for j, key in enumerate(keys):
            ax.bar([i + (j - (len(keys) - 1) / 2) * width for i in range(len(conc))],
                   [s[f"{key}_tok_s"] for s in res["summary"]], width, label=key)
        ax.set_xticks(range(len(conc)), [f"c={c}" for c in conc])
        ax.set_title(f"{res['model']} ({res['params'] / 1e6:.0f}M params)")
        ax.set_ylabel("output tok/s (CPU)")
        ax.legend()
    harness.save_figure(fig, path, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="dllm bench tp", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny-coder", "wide-random"])
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    p.add_argument("--ray", action="store_true",
                   help="also tp2 with rank 1 as a Ray actor (the Serve replica's transport)")
    p.add_argument("--out", default=None, help="JSON path (default results/bench_tp_cpu.json)")
    args = harness.parse_args(p, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from model.loaders import load_pretrained

    _, tok, _ = load_pretrained("tiny-coder", progress=False)
    t0 = time.time()
    results = [bench_model(m, tok, args) for m in args.models]
    doc = {"wall_s": round(time.time() - t0, 1), "results": results}
    out = harness.write_results("bench_tp_cpu", doc, args.out)
    plot(results, out)
    for r in results:
        for s in r["summary"]:
            print(r["model"], json.dumps(s))


if __name__ == "__main__":
    main()
