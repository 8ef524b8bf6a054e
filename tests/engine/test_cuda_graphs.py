"""EngineConfig(cuda_graphs=True): the static-shape denoising path gives the eager engine's tokens.

On a CPU the option runs the same padded path as on CUDA (rows, query length, cache window and
logits rows rounded up to buckets; inputs copied into per-shape static buffers) without capture,
so these tests pin that path to model.sampling.generate and to the eager engine. The tests marked
`cuda` capture real graphs and replay them (skipped without CUDA).
"""

from __future__ import annotations

import copy

import pytest
import torch

from engine.config import EngineConfig
from engine.cuda_graphs import StaticForward
from engine.kv_pool import PagedKVPool

from .conftest import (
    assert_like_reference,
    collect_staggered,
    make_engine,
    streamed_tokens,
    tiny_config,
    tiny_net,
)
from .test_engine_reference import mixed_requests

HAS_CUDA = torch.cuda.is_available()

# small windows so the cache window changes bucket while these short requests run
GRAPHS = dict(cuda_graphs=True, graph_window=16)


async def run_staggered(engine, reqs, every: int):
    results = await collect_staggered(engine, reqs, every)
    stats = engine.runner.static.stats() if engine.runner.static else None
    await engine.shutdown()
    return results, stats


async def test_static_path_equals_reference_staggered_mixed_batch(bc_net, tok):
    """Block-causal (tiny-coder's layout), float64: 8 requests with different prompt lengths,
    block lengths, steps and rules arriving at different iterations, at most 4 running: every
    request gives its lone reference tokens through the padded static path."""
    engine = make_engine(bc_net, tok, max_num_seqs=4, **GRAPHS)
    reqs = mixed_requests("g")
    results, stats = await run_staggered(engine, reqs, every=3)
    for req, events in zip(reqs, results, strict=True):
        assert_like_reference(bc_net, tok, req, events)
    # every step went through the static buffers, which several steps reused per shape
    assert stats["graphs"] == 0 and stats["captures"] == 0
    assert stats["uncaptured"] == engine.stats().iterations
    assert 1 < stats["shapes"] < stats["uncaptured"]
    rows = {k[0][1][0] for k in engine.runner.static.shapes}  # ids [Bp, L]
    assert rows <= {1, 2, 4}, rows  # graph_batch_buckets() for max_num_seqs=4


async def test_static_path_equals_eager_engine_float32(tok):
    """At serving precision the static path (padded rows, masked window, extra logits rows)
    rounds differently from the eager one; tokens stay equal (no near-ties with these weights),
    as test_engine_reference.test_float32_mixed_batch_equals_reference pins for eager."""
    net = tiny_net(tiny_config(tok), seed=4, dtype=torch.float32)
    reqs = mixed_requests("p")
    eager, _ = await run_staggered(make_engine(net, tok, max_num_seqs=8), reqs, every=1)
    static, stats = await run_staggered(make_engine(net, tok, max_num_seqs=8, **GRAPHS), reqs,
                                        every=1)
    for req, a, b in zip(reqs, eager, static, strict=True):
        assert streamed_tokens(b) == streamed_tokens(a), req.request_id
        assert b[-1].text == a[-1].text and b[-1].steps == a[-1].steps
        assert_like_reference(net, tok, req, b)
    assert stats["uncaptured"] > 0


async def test_full_attention_static_path_with_fim_equals_reference(full_net, tok):
    """Full attention (LLaDA's layout): the dense key mask is a static buffer too."""
    engine = make_engine(full_net, tok, max_num_seqs=8, **GRAPHS)
    reqs = mixed_requests("f", with_suffix=True)
    results, stats = await run_staggered(engine, reqs, every=1)
    for req, events in zip(reqs, results, strict=True):
        assert_like_reference(full_net, tok, req, events)
    assert stats["uncaptured"] == engine.stats().iterations


async def test_batches_past_the_largest_bucket_run_eager(bc_net, tok):
    """Rows past the largest batch bucket, or blocks past the largest length bucket, take the
    eager path; the tokens are the reference's either way."""
    engine = make_engine(bc_net, tok, max_num_seqs=4, batch_buckets=(1, 2),
                         length_buckets=(1, 4, 8), **GRAPHS)
    reqs = mixed_requests("e")
    results, stats = await run_staggered(engine, reqs, every=1)
    for req, events in zip(reqs, results, strict=True):
        assert_like_reference(bc_net, tok, req, events)
    shapes = [k[0][1] for k in engine.runner.static.shapes]  # ids [Bp, L]
    assert shapes and all(bp <= 2 and L <= 8 for bp, L in shapes), shapes
    assert 0 < stats["uncaptured"] < engine.stats().iterations


def test_config_buckets_and_validation():
    assert EngineConfig(max_num_seqs=4, priority_slots=0).graph_batch_buckets() == (1, 2, 4)
    assert EngineConfig(max_num_seqs=100, priority_slots=0).graph_batch_buckets() == \
        (1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 100)
    # a full batch plus the budgeted requests' priority slots is a shape of its own
    assert EngineConfig(max_num_seqs=16).graph_batch_buckets() == (1, 2, 4, 8, 16, 18)
    assert EngineConfig(max_num_seqs=64, batch_buckets=(8, 64)).graph_batch_buckets() == (8, 64)
    for bad in (dict(graph_window=0), dict(max_graphs=-1), dict(batch_buckets=(0, 4))):
        with pytest.raises(ValueError):
            EngineConfig(cuda_graphs=True, **bad).validate()


def test_paged_window_masks_the_extra_keys(tok):
    """A context read over a larger window gives the exact-window attention (float64), and
    records the window in its args for a tensor-parallel follower."""
    cfg = tiny_config(tok)
    pool = PagedKVPool(cfg, num_pages=12, page_size=4, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    pool.k.copy_(torch.randn(pool.k.shape, generator=g, dtype=torch.float64))
    pool.v.copy_(torch.randn(pool.v.shape, generator=g, dtype=torch.float64))
    tables, cached = [[3, 7, 1], [0, 5], [2]], [11, 6, 0]
    valid = torch.tensor([[True] * 4, [True, True, False, False], [True, False, False, False]])
    B, H, Hkv, hd = 3, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q = torch.randn(B, H, 4, hd, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, 4, hd, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, 4, hd, generator=g, dtype=torch.float64)
    exact = pool.context(tables, cached, valid, append=False)
    wide = pool.context(tables, cached, valid, append=False, window=32)
    assert wide.S == 32 and exact.S == 11 and wide.args["window"] == 32
    for layer in range(cfg.n_layers):
        torch.testing.assert_close(wide.attend(layer, q, k, v), exact.attend(layer, q, k, v),
                                   rtol=0, atol=1e-12)
    with pytest.raises(ValueError):
        pool.context(tables, cached, valid, append=False, window=8)


def test_static_forward_reuses_buffers_and_refuses_side_effects(tok):
    """Each call's values go into its shape's buffers (the result equals the net's on the same
    inputs); a cache write (append) is refused: a graph must not write the pool."""
    net = tiny_net(tiny_config(tok, attention="full", time_conditioning=False), seed=1)
    static = StaticForward(net)
    assert not static.capture  # on the CPU
    from model.transformer import DenseAttention

    g = torch.Generator().manual_seed(0)
    for n_valid in (5, 8, 3):
        ids = torch.randint(10, 300, (2, 8), generator=g)
        mask = (torch.arange(8) < n_valid)[None, None, None, :].expand(2, 1, 1, 8)
        order = torch.argsort(torch.rand(2, 8, generator=g), 1)[:, :4]
        want = net(ids, attn=DenseAttention(mask), logits_slice=order)
        got = static(ids, attn=DenseAttention(mask), logits_slice=order)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert static.stats()["shapes"] == 1 and static.stats()["uncaptured"] == 3
    bc = tiny_net(tiny_config(tok))
    pool = PagedKVPool(bc.cfg, num_pages=4, page_size=4, dtype=torch.float64)
    ctx = pool.context([[0]], [0], torch.ones(1, 2, dtype=torch.bool), append=True)
    with pytest.raises(ValueError):
        StaticForward(bc)(torch.ones(1, 2, dtype=torch.long), positions=None, t=torch.zeros(1),
                          attn=ctx, logits_slice=None)


def test_a_failed_capture_falls_back_to_the_uncaptured_path(tok, monkeypatch):
    """If a capture raises (an op CUDA graphs cannot record), the forward still answers, through
    the same static buffers, and later shapes are not captured again."""
    net = tiny_net(tiny_config(tok, attention="full", time_conditioning=False), seed=1)
    static = StaticForward(net)
    tries = []

    def broken(shape):
        tries.append(shape)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(static, "_capture", broken)
    static.capture = True  # as on CUDA
    ids = torch.randint(10, 300, (2, 8), generator=torch.Generator().manual_seed(0))
    for n in (8, 6):
        got = static(ids[:, :n])
        torch.testing.assert_close(got, net(ids[:, :n]), rtol=0, atol=0)
    assert len(tries) == 1 and not static.capture
    assert static.stats()["capture_error"].startswith("RuntimeError")
    assert static.stats()["uncaptured"] == 2


async def test_tensor_parallel_leader_dispatches_the_static_contexts(bc_net, tok):
    """Under a TPLeader (engine/tensor_parallel.py) the static path runs uncaptured and hands
    every forward's own context arguments, window included, to the followers: a follower runs
    the dispatched specs in order over its own pool (a stale or missing window would fail
    there: the window must cover the follower's cache too)."""
    from engine.tensor_parallel import TPFollower, TPLeader

    specs = []
    # a copy at dispatch, as a real transport serialises it: the spec's CPU tensors are the
    # static buffers themselves, which the next step overwrites
    engine = make_engine(TPLeader(bc_net, lambda spec: specs.append(copy.deepcopy(spec))), tok,
                         max_num_seqs=4, **GRAPHS)
    reqs = mixed_requests("t")[:4]
    results, stats = await run_staggered(engine, reqs, every=2)
    for req, events in zip(reqs, results, strict=True):
        assert_like_reference(bc_net, tok, req, events)
    assert stats["uncaptured"] > 0 and not engine.runner.static.capture
    steps = [s for s in specs if not s["attn"][2]["append"]]
    for s in steps:  # this step's context: a row's active block starts where its cache ends
        a = s["attn"][2]
        assert s["positions"][:, 0].tolist() == a["cached_lens"]
        assert a["window"] % 16 == 0 and a["window"] >= max(a["cached_lens"])
    assert len({tuple(s["attn"][2]["cached_lens"]) for s in steps}) > 1
    follower = TPFollower(bc_net)
    for spec in specs:
        follower.step(spec)
    assert follower.forwards == len(specs)


# --- on CUDA: real graphs ------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["block_causal", "full"])
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
async def test_cuda_graphs_give_the_eager_tokens(tok, attention):
    """float32 nets on CUDA: staggered mixed requests through captured graphs give the eager
    engine's tokens, and the graphs were replayed (not just captured)."""
    tc = attention == "block_causal"
    net = tiny_net(tiny_config(tok, attention=attention, time_conditioning=tc), seed=4,
                   dtype=torch.float32).cuda()
    reqs = mixed_requests("c", with_suffix=not tc)
    eager, _ = await run_staggered(make_engine(net, tok, max_num_seqs=4), reqs, every=2)
    engine = make_engine(net, tok, max_num_seqs=4, **GRAPHS)
    graphs, stats = await run_staggered(engine, reqs, every=2)
    for req, a, b in zip(reqs, eager, graphs, strict=True):
        assert b[-1].error is None, b[-1].error
        assert streamed_tokens(b) == streamed_tokens(a), req.request_id
    assert stats["captures"] > 0 and stats["replays"] > stats["captures"], stats
    assert stats["uncaptured"] == 0, stats


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_graph_replay_reads_new_inputs(tok):
    """A replayed graph reads each call's values from the static buffers (ids, positions, t, the
    paged window and key mask, the logits index): its logits equal an uncaptured forward's."""
    net = tiny_net(tiny_config(tok), seed=2, dtype=torch.float32).cuda()
    cfg = net.cfg
    pool = PagedKVPool(cfg, num_pages=16, page_size=4, device="cuda", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    pool.k.copy_(torch.randn(pool.k.shape, generator=g))
    pool.v.copy_(torch.randn(pool.v.shape, generator=g))
    graphs, plain = StaticForward(net), StaticForward(net, capture=False)
    assert graphs.capture
    for cached in ([5, 9], [13, 2], [0, 16]):
        tables = [[1, 4, 6, 9, 11], [0, 3, 8, 10, 12]]
        valid = torch.ones(2, 8, dtype=torch.bool, device="cuda")
        valid[1, 6:] = False
        ids = torch.randint(10, 300, (2, 8), generator=g).cuda()
        pos = torch.tensor(cached, device="cuda")[:, None] + torch.arange(8, device="cuda")
        t = torch.rand(2, generator=g).cuda()
        order = torch.argsort(torch.rand(2, 8, generator=g), 1)[:, :4].cuda()
        kw = dict(positions=pos, t=t, logits_slice=order)
        want = plain(ids, attn=pool.context(tables, cached, valid, False, window=16), **kw).clone()
        got = graphs(ids, attn=pool.context(tables, cached, valid, False, window=16), **kw)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert graphs.stats()["captures"] == 1 and graphs.stats()["replays"] == 3
