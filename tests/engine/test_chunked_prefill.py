"""Chunked prefill (engine/prefill.py): the same K/V, logits and tokens as a one-pass prefill, and
a long prompt no longer holds up the streams already running.

The nets are float64 (tests/engine/conftest.tiny_net) so that the one-pass write (padded batch,
other shapes) and the chunked one agree to ~1e-15 and tokens must be equal exactly; one check
repeats the K/V comparison in float32 at a float32 tolerance.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from engine import Engine, EngineConfig
from engine.config import kv_bytes_per_token
from engine.prefill import layers_per_chunk
from engine.sequence import Sequence
from engine.types import Finished, GenerationRequest, TextDelta
from model.sampling import SamplingParams
from tests.engine.conftest import request, run_like_reference, tiny_config, tiny_net

N_LAYERS = 4


@pytest.fixture(scope="module")
def deep_net(tok):
    """Block-causal, time-conditioned, four layers (so a prefill has several chunks)."""
    return tiny_net(tiny_config(tok, n_layers=N_LAYERS, max_seq_len=1024), seed=3)


def _prompt(n: int, seed: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def _admitted(net, tok, engine: Engine, prompt: list[int]) -> Sequence:
    req = GenerationRequest("r", prompt, SamplingParams(max_new_tokens=32, block_length=32,
                                                        steps=4, stop_token_ids=[]))
    seq = Sequence.create(req, net.cfg, tok, engine.device)
    seq.admit(engine.pool.allocate(engine.pool.pages_for(seq.cache_tokens_needed())))
    return seq


def _cached_kv(engine: Engine, seq: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    ps = engine.pool.page_size
    slots = torch.tensor([p * ps + j for p in seq.pages for j in range(ps)])[:seq.cached_len]
    return engine.pool.k[:, slots], engine.pool.v[:, slots]  # [layers, n, Hkv, hd]


def _block_logits(net, engine: Engine, seq: Sequence) -> torch.Tensor:
    """The first denoising step's logits of seq's block over its cache."""
    lo, hi = seq.block_span()
    P = len(seq.prompt)
    ids = seq.canvas[lo:hi][None]
    pos = torch.arange(P + lo, P + hi)[None]
    valid = torch.ones(1, hi - lo, dtype=torch.bool)
    ctx = engine.pool.context([seq.pages], [seq.cached_len], valid, append=False)
    with torch.no_grad():
        return net(ids, positions=pos, t=torch.ones(1), attn=ctx)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_chunked_write_equals_one_pass_kv_and_logits(deep_net, tok, dtype, tol):
    net = deep_net.to(dtype)
    try:
        prompt = _prompt(150, 0, tok.vocab_size)
        one = Engine(net, tok, net.cfg, EngineConfig(kv_pages=64))
        chunked = Engine(net, tok, net.cfg, EngineConfig(kv_pages=64, prefill_chunk_tokens=32))
        a, b = _admitted(net, tok, one, prompt), _admitted(net, tok, chunked, prompt)
        with torch.no_grad():
            _, apply = one.runner.cache_write([a])
            apply()
            assert chunked.prefill.applies(b)
            chunks = 0
            while b.pending_append is not None:
                _, apply = chunked.prefill.chunk(b, chunked.pool)
                apply()
                chunks += 1
        # 32-token chunks of a 150-token prompt over 4 layers: 32 * 4 // 150 = 0 -> one layer each
        assert chunks == N_LAYERS == N_LAYERS // layers_per_chunk(150, N_LAYERS, 32)
        assert a.cached_len == b.cached_len == 150 and b.prefill_hidden is None
        for x, y in zip(_cached_kv(one, a), _cached_kv(chunked, b), strict=True):
            assert x.abs().max() > 0.1  # the slots really hold K/V
            torch.testing.assert_close(y, x, rtol=tol, atol=tol)
        la, lb = _block_logits(net, one, a), _block_logits(net, chunked, b)
        torch.testing.assert_close(lb, la, rtol=tol, atol=tol)
        one._executor.shutdown()
        chunked._executor.shutdown()
    finally:
        deep_net.to(torch.float64)


def test_chunked_write_keeps_the_block_causal_prompt_of_aligned_families(tok):
    """cfg.block_align "zero" (LLaDA2.x, SDAR): the prompt's whole blocks attend block-causally;
    chunked writes (token chunks of whole blocks, or layer groups) keep that mask exactly."""
    net = tiny_net(tiny_config(tok, n_layers=N_LAYERS, max_seq_len=1024, block_align="zero"),
                   seed=4)
    prompt = _prompt(150, 7, tok.vocab_size)
    one = Engine(net, tok, net.cfg, EngineConfig(kv_pages=64))
    chunked = Engine(net, tok, net.cfg, EngineConfig(kv_pages=64, prefill_chunk_tokens=70))
    a, b = _admitted(net, tok, one, prompt), _admitted(net, tok, chunked, prompt)
    assert a.pending_append == b.pending_append == (0, 128)  # whole 32-token blocks only
    # block-causal prompt: token chunks of whole blocks (70 -> two 32-token blocks) are exact
    assert chunked.prefill.token_chunk(b) == 64
    cached = []
    with torch.no_grad():
        _, apply = one.runner.cache_write([a])
        apply()
        while b.pending_append is not None:
            _, apply = chunked.prefill.chunk(b, chunked.pool)
            apply()
            cached.append(b.cached_len)
    assert cached == [64, 128] and b.prefill_layer == 0  # two chunks of two blocks each
    for x, y in zip(_cached_kv(one, a), _cached_kv(chunked, b), strict=True):
        torch.testing.assert_close(y, x, rtol=1e-12, atol=1e-12)
    # the same write by layer groups (a write off a block boundary takes them) agrees too
    c = _admitted(net, tok, chunked, prompt)
    c.pending_append = (0, 128)
    with torch.no_grad():
        c.prefill_layer = 0
        chunked.prefill.token_chunk = lambda seq: None  # force layer groups
        while c.pending_append is not None:
            _, apply = chunked.prefill.chunk(c, chunked.pool)
            apply()
    for x, y in zip(_cached_kv(one, a), _cached_kv(chunked, c), strict=True):
        torch.testing.assert_close(y, x, rtol=1e-12, atol=1e-12)
    one._executor.shutdown()
    chunked._executor.shutdown()


def test_layers_per_chunk_sizes_chunks_in_token_layers():
    assert layers_per_chunk(100, 32, 2048) == 32  # short: everything at once
    assert layers_per_chunk(32768, 32, 8192) == 8  # 8k tokens x 32 layers of work per chunk
    assert layers_per_chunk(131072, 32, 2048) == 1  # the floor: one layer
    assert layers_per_chunk(5000, 5, 2048) == 2


def test_engine_tokens_equal_reference_with_chunked_prefill(deep_net, tok):
    """Long prompts (and 64-token finished blocks, longer than the 24-token chunk) written in
    chunks, beside short requests arriving meanwhile: every answer equals generate()'s."""
    net = deep_net
    V = tok.vocab_size
    reqs = [request("long", _prompt(200, 1, V), max_new_tokens=128, block_length=64, steps=4),
            request("short", _prompt(9, 2, V), max_new_tokens=64, block_length=16, steps=4),
            request("mid", _prompt(60, 3, V), max_new_tokens=32, block_length=32, steps=8,
                    temperature=0.7, seed=11),
            request("tiny", _prompt(3, 4, V), max_new_tokens=16, block_length=8, steps=2)]
    engine = Engine(net, tok, net.cfg, EngineConfig(prefill_chunk_tokens=24))
    asyncio.run(run_like_reference(engine, net, tok, reqs, every=1))


def test_engine_tokens_equal_reference_for_a_block_aligned_family(tok):
    """block_align "zero": token chunks of whole blocks, the rest by the ordinary write."""
    net = tiny_net(tiny_config(tok, n_layers=N_LAYERS, max_seq_len=1024, block_align="zero"),
                   seed=5)
    V = tok.vocab_size
    reqs = [request("long", _prompt(230, 8, V), max_new_tokens=64, block_length=32, steps=4),
            request("short", _prompt(20, 9, V), max_new_tokens=64, block_length=32, steps=8)]
    engine = Engine(net, tok, net.cfg, EngineConfig(prefill_chunk_tokens=64))
    asyncio.run(run_like_reference(engine, net, tok, reqs, every=1))


async def _trace(engine: Engine, first: GenerationRequest, long: GenerationRequest):
    """Run `first`, submit `long` once `first` is streaming; per iteration: (first's steps so
    far, whether long's prefill is still pending after it, seconds)."""
    trace = []
    iterate = engine._iterate

    def traced(batch):
        t0 = time.perf_counter()
        it = iterate(batch)
        by_id = {s.request_id: s for s in batch}
        a, b = by_id.get(first.request_id), by_id.get(long.request_id)
        trace.append((a.total_steps if a else None,
                      b is not None and b.pending_append is not None,
                      time.perf_counter() - t0))
        return it

    engine._iterate = traced

    async def run(req, after=0):
        while engine.stats().iterations < after:
            await asyncio.sleep(0.001)
        return [e async for e in engine.submit(req)]

    try:
        results = await asyncio.gather(run(first), run(long, after=2))
    finally:
        await engine.shutdown()
    for events in results:
        assert isinstance(events[-1], Finished) and events[-1].error is None, events[-1]
    return trace, results


def test_long_prefill_runs_beside_the_running_stream(deep_net, tok):
    """With chunks, the running stream takes a step in every iteration of the long prompt's
    prefill (n_layers of them); without, the prefill is one iteration."""
    V = tok.vocab_size
    first = request("first", _prompt(8, 5, V), max_new_tokens=96, block_length=8, steps=4)
    long = request("long", _prompt(600, 6, V), max_new_tokens=16, block_length=16, steps=2)
    for chunk, pending_iterations in ((64, N_LAYERS - 1), (None, 0)):
        engine = Engine(deep_net, tok, deep_net.cfg,
                        EngineConfig(prefill_chunk_tokens=chunk))
        trace, results = asyncio.run(_trace(engine, first, long))
        pending = [i for i, (_, p, _) in enumerate(trace) if p]
        # the prefill left pending after n_layers - 1 iterations; the last chunk steps too
        assert len(pending) == pending_iterations, trace
        for i in pending:  # the running stream stepped in each of them
            assert trace[i][0] is not None and trace[i][0] > trace[i - 1][0], trace
        # same tokens either way
        tokens = [t for e in results[1] if isinstance(e, TextDelta) for t in e.token_ids]
        if chunk is not None:
            chunked_tokens = tokens
        else:
            assert tokens == chunked_tokens


def test_32k_prompt_through_the_engine_within_its_budget_while_another_streams(tok):
    """A 32,768-token prompt on a tiny-width model on the CPU: prefilled in chunks inside a KV
    budget sized for the two requests, while a short request keeps streaming blocks."""
    P = 32768
    cfg = tiny_config(tok, d_model=16, n_heads=1, n_kv_heads=1, mlp_hidden=32, n_layers=2,
                      max_seq_len=P + 64, time_embed_dim=16)
    net = tiny_net(cfg, seed=7, dtype=torch.float32)
    per_token = kv_bytes_per_token(cfg, 4)
    budget = per_token * (P + 32 + 16 * 8 + 64)  # the long request, the short one, a margin
    engine = Engine(net, tok, cfg, EngineConfig(kv_cache_bytes=budget, page_size=16,
                                                prefill_chunk_tokens=8192))
    assert engine.pool.k.numel() * 4 * 2 <= budget
    first = request("first", _prompt(16, 8, tok.vocab_size), max_new_tokens=128,
                    block_length=16, steps=2)
    long = request("long", _prompt(P, 9, tok.vocab_size), max_new_tokens=32, block_length=32,
                   steps=4)
    trace, results = asyncio.run(_trace(engine, first, long))
    pending = [i for i, (_, p, _) in enumerate(trace) if p]
    assert len(pending) == 1, trace  # 2 layers: one chunk pending, the second completes it
    assert all(trace[i][0] > trace[i - 1][0] for i in pending), trace
    fin = results[1][-1]
    assert (fin.finish_reason, fin.prompt_tokens, fin.completion_tokens) == ("length", P, 32)
    assert results[0][-1].completion_tokens == 128
    assert sum(isinstance(e, TextDelta) for e in results[0]) >= 2  # it streamed, block by block


def test_the_step_cost_features_count_a_chunk_not_a_whole_prefill_and_step(deep_net, tok):
    """The iteration-time model (engine/cost_model.py) is fed what each iteration really ran:
    while a 600-token prompt is prefilled in 64-token chunks beside a running stream, each
    iteration counts one row and the chunk's share of the write's attended pairs (~64/600),
    not the whole write plus a denoising step of the prompt's row."""
    V = tok.vocab_size
    first = request("first", _prompt(8, 5, V), max_new_tokens=96, block_length=8, steps=4)
    long = request("long", _prompt(600, 6, V), max_new_tokens=16, block_length=16, steps=2)
    engine = Engine(deep_net, tok, deep_net.cfg, EngineConfig(prefill_chunk_tokens=64))
    fed: list[tuple[int, float]] = []
    add = engine._cost.add
    engine._cost.add = lambda rows, tokens, kpairs, s: (fed.append((rows, kpairs)),
                                                        add(rows, tokens, kpairs, s))
    trace, _ = asyncio.run(_trace(engine, first, long))
    pending = [i for i, (_, p, _) in enumerate(trace) if p]
    assert len(pending) == N_LAYERS - 1
    write_kpairs = 600 * 600 / 1000
    # the first stream's own step attends at most its 104 tokens x 8 queries
    for rows, kpairs in (fed[i] for i in pending):
        assert rows == 1
        assert write_kpairs * 64 / 600 <= kpairs <= write_kpairs * 64 / 600 + 104 * 8 / 1000
