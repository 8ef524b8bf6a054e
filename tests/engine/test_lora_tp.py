"""LoRA adapters on a tensor-parallel engine: two gloo ranks give the tokens of one.

Rank 0 runs the Engine over a TPLeader, rank 1 follows (engine/tensor_parallel.py); the leader
repeats every adapter slot load on the follower, which keeps its slice of A/B (column-parallel
Linears their rows of B, row-parallel ones their columns of A), and sends each forward's row
slots with it. One slot for two adapters, so the run also evicts and reloads under TP. The
reference is the single-process engine on the whole float64 model.
"""

from __future__ import annotations

import asyncio
import copy

import torch

from engine import Engine, EngineConfig
from engine.tensor_parallel import BroadcastDispatch, TPFollower, TPLeader, follow_broadcasts
from model.parallel import load_sharded_state, run_tp

from .conftest import collect, request, streamed_tokens, tiny_config, tiny_net
from .test_lora_engine import PROMPTS, random_adapter

ECONF = dict(max_num_seqs=4, kv_pages=64, max_loras=1, max_lora_rank=4)
NAMES = ["a", None, "b", "a"]


def _requests():
    out = []
    for i, n in enumerate(NAMES):
        r = request(f"t{i}", PROMPTS[i], max_new_tokens=16, block_length=8, steps=4)
        r.adapter = n
        out.append(r)
    return out


async def _serve(engine, adapters) -> dict[str, list[int]]:
    for a in adapters:
        engine.add_adapter(a)
    reqs = _requests()
    if not adapters:  # the base model for every request
        for r in reqs:
            r.adapter = None
    results = await asyncio.gather(*[collect(engine, r) for r in reqs])
    stats = engine.stats()
    await engine.shutdown()
    return {r.request_id: streamed_tokens(ev) for r, ev in zip(reqs, results, strict=True)}, \
        stats.extra.get("lora")


def _worker(rank, world, device, cfg, state, tok, adapters):
    net = load_sharded_state(cfg, state, rank, world, dtype=torch.float64)
    if rank:
        return follow_broadcasts(TPFollower(net))
    leader = TPLeader(net, BroadcastDispatch())
    try:
        return asyncio.run(_serve(Engine(leader, tok, leader.cfg, EngineConfig(**ECONF)),
                                  adapters))
    finally:
        leader.close()


def test_tp2_engine_with_adapters_equals_tp1(tok):
    net = tiny_net(tiny_config(tok), seed=5)
    adapters = [random_adapter(net, "a", 4, 31), random_adapter(net, "b", 3, 32)]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    want, _ = asyncio.run(_serve(Engine(copy.deepcopy(net), tok, net.cfg, EngineConfig(**ECONF)),
                                 adapters))
    got, lora = run_tp(_worker, 2, net.cfg, state, tok, adapters)
    assert got == want
    assert lora["evictions"] >= 1  # two adapters through one slot
    base = tiny_net(tiny_config(tok), seed=5)
    plain, _ = asyncio.run(_serve(Engine(base, tok, base.cfg,
                                         EngineConfig(max_num_seqs=4, kv_pages=64)), []))
    assert plain["t1"] == want["t1"] and plain["t0"] != want["t0"]
