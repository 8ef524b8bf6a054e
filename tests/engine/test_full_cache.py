"""The engine's Fast-dLLM prefix / dual cache for full-attention models gives the tokens of
model.sampling.generate with the same `full_cache` (float64 nets: exact), alone and in staggered
batches that mix refreshing, cached and uncached rows; on the masked SDPA and the flash-attn
varlen paths (dual rows read non-contiguous cached keys); through the static (CUDA-graph) path
uncaptured; and it counts the tokens its forwards really run.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

import kernels.attention as ka
from engine.kv_pool import PagedKVPool
from model.sampling import SamplingParams, generate

from .conftest import (
    assert_like_reference,
    collect,
    collect_staggered,
    make_engine,
    request,
    run_like_reference,
    tiny_config,
    tiny_net,
)
from .test_engine_reference import mixed_requests

PROMPT = list(range(20, 44))
SUFFIX = list(range(140, 147))

SETTINGS = [
    dict(),
    dict(remasking="margin", suffix=SUFFIX),
    dict(temperature=0.8, seed=5, suffix=SUFFIX),
    dict(confidence_threshold=0.02),
    dict(block_length=1, steps=1),  # every step a refresh
    dict(block_length=16, steps=16, max_new_tokens=21, suffix=SUFFIX),  # a short last block
]


@pytest.fixture(scope="module")
def dream_net(tok):
    """Full attention with shifted logits (Dream's layout): cached spans start one earlier."""
    return tiny_net(tiny_config(tok, attention="full", time_conditioning=False,
                                logit_shift=True), seed=4)


def cache_requests(prefix: str, modes=("prefix", "dual", "none")):
    """The engine tests' staggered mixed batch (prompts, canvases, blocks, steps, rules, FIM
    suffixes) with the cache modes assigned in turn."""
    reqs = mixed_requests(prefix, with_suffix=True)
    for i, r in enumerate(reqs):
        r.params.full_cache = modes[i % len(modes)]
    return reqs


@pytest.mark.parametrize("kw", SETTINGS)
@pytest.mark.parametrize("mode", ["prefix", "dual"])
async def test_single_request_equals_reference(full_net, tok, mode, kw):
    kw = dict(kw)
    suffix = kw.pop("suffix", None)
    engine = make_engine(full_net, tok)
    req = request("r", PROMPT, suffix=suffix,
                  **{"max_new_tokens": 24, "steps": 4, "block_length": 8, "full_cache": mode, **kw})
    events = await collect(engine, req)
    stats = engine.stats()
    await engine.shutdown()
    assert_like_reference(full_net, tok, req, events)
    assert stats.kv_pages_total > 0 and stats.kv_pages_used == 0


async def test_cache_changes_tokens_of_the_uncached_sampler(full_net, tok):
    """The cache is an approximation: on a random net its tokens differ from "none" (while
    equal to the reference's with the same mode, tested above)."""
    kw = dict(max_new_tokens=32, steps=8, block_length=16, stop_token_ids=[])
    plain = generate(full_net, PROMPT, SamplingParams(**kw), suffix_ids=SUFFIX).tokens
    for mode in ("prefix", "dual"):
        r = generate(full_net, PROMPT, SamplingParams(full_cache=mode, **kw), suffix_ids=SUFFIX)
        assert r.tokens != plain, mode


@pytest.mark.parametrize("net_name", ["full_net", "dream_net"])
async def test_staggered_mixed_batch_equals_reference(request, tok, net_name):
    """8 requests, at most 4 running, arriving at different iterations: rows at a refresh,
    rows mid-block with prefix or dual cache and rows without one share steps."""
    net = request.getfixturevalue(net_name)
    engine = make_engine(net, tok, max_num_seqs=4)
    reqs = cache_requests("m")
    stats = await run_like_reference(engine, net, tok, reqs, 2)
    assert stats.kv_pages_used == 0


async def test_time_conditioned_full_model_equals_reference(tok):
    net = tiny_net(tiny_config(tok, attention="full", time_conditioning=True), seed=2)
    engine = make_engine(net, tok, max_num_seqs=4)
    reqs = cache_requests("t")[:4]
    await run_like_reference(engine, net, tok, reqs)


async def test_static_path_equals_reference(full_net, tok):
    """cuda_graphs=True on the CPU: cached steps go through the padded static path (read-only,
    uncaptured here), refreshes stay eager; the tokens are the reference's."""
    engine = make_engine(full_net, tok, max_num_seqs=4, cuda_graphs=True, graph_window=16)
    reqs = cache_requests("g")
    results = await collect_staggered(engine, reqs, 2)
    static = engine.runner.static.stats()
    shapes = list(engine.runner.static.shapes)
    await engine.shutdown()
    for req, events in zip(reqs, results, strict=True):
        assert_like_reference(full_net, tok, req, events)
    assert static["captures"] == 0 and static["uncaptured"] > 0
    # some static forwards were cached steps: they pass positions (uncached ones do not)
    assert any(dict((p[0], p[1:]) for p in k).get("positions") not in (None, (None,))
               for k in shapes)


@pytest.fixture(params=["sdpa", "flash"])
def attention_path(request, monkeypatch):
    """Masked SDPA, or flash-attn varlen with kernels.attention's torch stand-in."""
    calls = []

    def stand_in(*args, **kwargs):
        calls.append(1)
        return ka.flash_attn_varlen_reference(*args, **kwargs)

    monkeypatch.setattr(ka, "flash_attn_varlen_func", stand_in)
    monkeypatch.setattr(ka, "VARLEN_PATH", request.param)
    yield request.param
    assert bool(calls) == (request.param == "flash")


async def test_both_attention_paths_equal_reference(full_net, tok, attention_path):
    engine = make_engine(full_net, tok, max_num_seqs=4)
    reqs = cache_requests("p", modes=("dual", "prefix"))[:4]
    await run_like_reference(engine, full_net, tok, reqs)


def test_hidden_slots_are_not_attended_on_either_path(tok, monkeypatch):
    """PagedAttention(hidden=...): the varlen packing of non-contiguous cached keys gives the
    masked SDPA result, which equals attention over the visible keys only."""
    cfg = tiny_config(tok)
    pool = PagedKVPool(cfg, num_pages=8, page_size=4, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    pool.k.copy_(torch.randn(pool.k.shape, generator=g, dtype=torch.float64))
    pool.v.copy_(torch.randn(pool.v.shape, generator=g, dtype=torch.float64))
    tables, lens, hidden = [[3, 1, 4], [0, 2]], [11, 7], [(2, 9), (0, 0)]
    Lq, H, Hkv, hd = 3, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q = torch.randn(2, H, Lq, hd, generator=g, dtype=torch.float64)
    k = torch.randn(2, Hkv, Lq, hd, generator=g, dtype=torch.float64)
    v = torch.randn(2, Hkv, Lq, hd, generator=g, dtype=torch.float64)
    valid = torch.tensor([[True, True, True], [True, True, False]])
    monkeypatch.setattr(ka, "flash_attn_varlen_func", ka.flash_attn_varlen_reference)
    outs = {}
    for path in ("sdpa", "flash"):
        monkeypatch.setattr(ka, "VARLEN_PATH", path)
        ctx = pool.context(tables, lens, valid, append=False, hidden=hidden)
        outs[path] = ctx.attend(0, q, k, v)
    for b in range(2):
        slots = [tables[b][j // 4] * 4 + j % 4 for j in range(lens[b])
                 if not hidden[b][0] <= j < hidden[b][1]]
        n = int(valid[b].sum())
        kb = torch.cat([pool.k[0, slots].transpose(0, 1), k[b, :, :n]], 1)[None]
        vb = torch.cat([pool.v[0, slots].transpose(0, 1), v[b, :, :n]], 1)[None]
        rep = H // Hkv  # plain float64 softmax attention over the visible keys
        kb, vb = kb[0].repeat_interleave(rep, 0), vb[0].repeat_interleave(rep, 0)
        want = (q[b, :, :n] @ kb.transpose(1, 2) * hd ** -0.5).softmax(-1) @ vb
        for path, out in outs.items():
            torch.testing.assert_close(out[b, :, :n], want, atol=1e-12, rtol=1e-12, msg=path)
    with pytest.raises(ValueError, match="read-only"):
        pool.context(tables, lens, valid, append=True, hidden=hidden)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
async def test_token_steps_count_what_the_forwards_run(full_net, tok, mode):
    """The backlog of a request before it runs is the tokens its forwards then process (no
    early stops here): a refresh runs the whole row, a cached step its span."""
    engine = make_engine(full_net, tok)
    n_run = []
    denoise = engine.runner.denoise

    def counting(seqs):
        n, outcome, apply = denoise(seqs)
        n_run.append(n)
        return n, outcome, apply

    engine.runner.denoise = counting
    req = request("c", PROMPT, suffix=SUFFIX, max_new_tokens=20, steps=4, block_length=8,
                  full_cache=mode)
    stream = engine.submit(req)
    backlog = engine.stats().token_backlog
    events = [e async for e in stream]
    await engine.shutdown()
    assert_like_reference(full_net, tok, req, events)
    P, L = len(PROMPT), len(PROMPT) + 20 + len(SUFFIX)
    spans = {"prefix": [L - (P + lo) for lo in (0, 8, 16)], "dual": [8, 8, 4]}[mode]
    want = [x for span in spans for x in [L] + [span] * 3]
    assert n_run == want
    assert backlog == sum(want)


async def test_pool_only_for_cache_requests_and_sized_by_the_config(full_net, tok):
    engine = make_engine(full_net, tok, kv_pages=4, page_size=8)
    events = await collect(engine, request("plain", PROMPT, max_new_tokens=8, block_length=8))
    assert engine.pool is None and events[-1].error is None  # "none" needs no pool
    with pytest.raises(ValueError, match="KV pages"):  # 24 + 16 tokens > 4 pages of 8
        engine.submit(request("big", PROMPT, max_new_tokens=16, full_cache="prefix"))
    events = await collect(engine, request("fits", PROMPT[:8], max_new_tokens=16,
                                           block_length=8, full_cache="dual"))
    await engine.shutdown()
    assert events[-1].error is None
    assert engine.pool is not None and engine.pool.num_pages == 4


class PoisonedCachedSteps(torch.nn.Module):
    """Raises in a cached step (a forward with positions) whose batch holds the poison token."""

    def __init__(self, net, poison: int):
        super().__init__()
        self.inner, self.cfg, self.poison = net, net.cfg, poison

    def forward(self, ids, **kw):
        if kw.get("positions") is not None and bool((ids == self.poison).any()):
            raise RuntimeError("poisoned cached step")
        return self.inner(ids, **kw)


async def test_a_failing_cached_row_does_not_stop_the_others(full_net, tok):
    """The bad row's refresh succeeds (its K/V are written, its commit applied), then its first
    cached step fails: the batch (refreshing, cached and uncached rows) is retried row by row,
    re-running refreshes over the same slots; only the bad row ends with an error."""
    poison = 399
    engine = make_engine(PoisonedCachedSteps(full_net, poison), tok)
    kw = dict(max_new_tokens=16, steps=4, block_length=8)
    bad = request("bad", PROMPT[:7], suffix=SUFFIX[:3] + [poison], full_cache="prefix", **kw)
    good = [request("p", PROMPT[:9], suffix=SUFFIX, full_cache="prefix", **kw),
            request("d", PROMPT[:5], suffix=SUFFIX, full_cache="dual", **kw),
            request("n", PROMPT[:11], suffix=SUFFIX, **kw)]
    results = await asyncio.gather(*[collect(engine, r) for r in [bad, *good]])
    stats = engine.stats()
    await engine.shutdown()
    fin = results[0][-1]
    assert fin.finish_reason == "error" and "poisoned" in fin.error
    assert fin.steps == 1  # the refresh
    for r, events in zip(good, results[1:], strict=True):
        assert_like_reference(full_net, tok, r, events)
    assert stats.kv_pages_used == 0
