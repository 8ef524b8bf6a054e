"""The engine on a tensor-parallel model: rank 0 runs the unchanged Engine over a TPLeader, rank 1
follows every forward (engine/tensor_parallel.py), two gloo processes on the CPU. The tokens
must be the ones the engine produces on the whole model: float64 nets, staggered mixed batches,
block-causal (paged KV cache on both ranks) and full-attention layouts.

One spawn runs every scenario (process start-up dominates).
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from engine import Engine, EngineConfig
from engine.tensor_parallel import (
    BroadcastDispatch,
    TPFollower,
    TPLeader,
    describe_attention,
    follow_broadcasts,
)
from engine.types import Finished
from model.parallel import load_sharded_state, run_tp

from .conftest import collect, request, streamed_tokens, tiny_config, tiny_net

PROMPTS = [list(range(20, 44)), list(range(50, 57)), list(range(90, 131))]


def scenario_requests(prefix: str, with_suffix: bool,
                      full_cache: tuple[str, ...] = ("none",)) -> list[tuple[int, object]]:
    """(arrival iteration, request): different prompts, blocks, steps, rules and seeds;
    full_cache modes assigned in turn (full-attention models)."""
    out = []
    for i in range(5):
        kw = dict(max_new_tokens=[24, 13, 32, 9, 20][i], block_length=[8, 4, 16, 1, 8][i],
                  steps=[4, 2, 5, 1, 8][i],
                  remasking=["low_confidence", "margin", "entropy", "random", "low_confidence"][i],
                  temperature=[0.0, 0.7, 0.0, 1.0, 0.0][i], seed=7 + i,
                  full_cache=full_cache[i % len(full_cache)])
        suffix = list(range(140, 146)) if with_suffix and i % 2 else None
        out.append((2 * i, request(f"{prefix}{i}", PROMPTS[i % 3], suffix=suffix, **kw)))
    return out


async def run_requests(engine: Engine, reqs) -> dict[str, list]:
    results = await asyncio.gather(*(collect(engine, r, after=a) for a, r in reqs))
    await engine.shutdown()
    return {r.request_id: ev for (_, r), ev in zip(reqs, results, strict=True)}


def _tp_engine_worker(rank, world_size, device, models, tok, econf):
    """Every scenario on this rank: rank 0 drives engines, rank 1 follows their forwards."""
    nets = [load_sharded_state(cfg, state, rank, world_size, dtype=torch.float64)
            for cfg, state, _ in models]
    if rank:
        # one follower per model: its KV storage belongs to that model's engine
        return [follow_broadcasts(TPFollower(net)) for net in nets]
    out = []
    for net, (_, _, reqs) in zip(nets, models, strict=True):
        leader = TPLeader(net, BroadcastDispatch())
        try:
            events = asyncio.run(run_requests(Engine(leader, tok, leader.cfg, econf), reqs))
        finally:
            leader.close()
        out.append((events, leader.forwards, leader.cfg.n_kv_heads))
    return out


@pytest.fixture(scope="module")
def tp_results(tok):
    bc = tiny_net(tiny_config(tok))
    full = tiny_net(tiny_config(tok, attention="full", time_conditioning=False), seed=1)
    # the third: full attention with Fast-dLLM's prefix/dual cache (paged pool on both ranks)
    scenarios = [(bc, scenario_requests("bc", False)), (full, scenario_requests("full", True)),
                 (full, scenario_requests("fc", True, ("prefix", "dual", "none")))]
    econf = EngineConfig(max_num_seqs=4, kv_pages=64)  # fewer slots than requests: queueing
    models = [(net.cfg, {k: v.clone() for k, v in net.state_dict().items()}, reqs)
              for net, reqs in scenarios]
    tp = run_tp(_tp_engine_worker, 2, models, tok, econf, threads_per_rank=1)
    return scenarios, econf, tp


@pytest.mark.parametrize("which", [0, 1, 2],
                         ids=["block_causal", "full_attention", "full_attention_cache"])
def test_tp2_engine_gives_the_tokens_of_the_whole_model(tok, tp_results, which):
    scenarios, econf, tp = tp_results
    net, reqs = scenarios[which]
    tp_events, forwards, kv_heads = tp[which]
    assert kv_heads == net.cfg.n_kv_heads // 2  # rank 0 really holds half the heads
    ref = asyncio.run(run_requests(Engine(net, tok, net.cfg, econf), reqs))
    for _, r in reqs:
        got, want = tp_events[r.request_id], ref[r.request_id]
        assert isinstance(got[-1], Finished) and got[-1].error is None, got[-1]
        assert streamed_tokens(got) == streamed_tokens(want), r.request_id
        assert (got[-1].finish_reason, got[-1].steps, got[-1].text) == \
            (want[-1].finish_reason, want[-1].steps, want[-1].text)
    assert forwards > 0


def test_describe_attention_refuses_unknown_contexts():
    class Odd:
        def attend(self, layer, q, k, v):
            return q

    with pytest.raises(TypeError, match="Odd"):
        describe_attention(Odd())


def test_heartbeat_sends_a_noop_only_when_idle(tok):
    net = tiny_net(tiny_config(tok))
    sent = []
    leader = TPLeader(net, sent.append)
    leader.last_dispatch -= 10  # idle for 10 s
    assert leader.heartbeat(5.0) and sent == [{"noop": True}]
    assert not leader.heartbeat(5.0) and len(sent) == 1  # just sent: not idle any more
    leader.last_dispatch -= 10
    with leader._lock:  # a forward in progress: its own dispatch keeps the followers busy
        assert not leader.heartbeat(5.0)
    assert len(sent) == 1
    follower = TPFollower(tiny_net(tiny_config(tok)))
    assert follower.step({"noop": True}) == 0 and follower.forwards == 0


def test_a_failed_collective_breaks_the_group(tok):
    def dead_peer(spec):
        raise RuntimeError("[gloo/transport/tcp/pair.cc] Connection reset by peer")

    leader = TPLeader(tiny_net(tiny_config(tok)), dead_peer)
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(RuntimeError, match="Connection reset"):
        leader(ids)
    assert leader.broken and "Connection reset" in leader.broken
    with pytest.raises(RuntimeError, match="broken"):
        leader(ids)  # no further steps, no further dispatches


def test_a_bad_input_does_not_break_the_group(tok):
    leader = TPLeader(tiny_net(tiny_config(tok)), lambda spec: None)
    with pytest.raises((IndexError, RuntimeError)):
        leader(torch.tensor([[10_000_000]]))  # out of the vocabulary: every rank fails alike
    assert leader.broken is None
