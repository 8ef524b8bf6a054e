"""The engine gives the tokens of model.sampling.generate, alone and in mixed batches.

Nets are float64 (see conftest.tiny_net): equality is exact. The float32 test at the end runs the
same comparison at serving precision, where rounding differs between a batched and a lone
forward by ~1e-6 (pinned by test_kv_pool.test_batched_step_logits_match_reference_float32).
"""

from __future__ import annotations

import asyncio

import pytest

from model.sampling import SamplingParams, generate

from .conftest import (
    assert_like_reference,
    collect,
    make_engine,
    request,
    run_like_reference,
    streamed_text,
    streamed_tokens,
    tiny_config,
    tiny_net,
)

PROMPT = list(range(20, 44))

SETTINGS = [
    dict(),
    dict(remasking="margin"),
    dict(remasking="entropy"),
    dict(remasking="random", seed=3),
    dict(temperature=0.8, seed=5),
    dict(temperature=1.0, top_p=0.9, seed=1),
    dict(confidence_threshold=0.02),
    dict(block_length=1, steps=1),  # autoregressive decoding on the same weights
    dict(block_length=8, steps=3),
    dict(block_length=16, steps=16, max_new_tokens=21),  # a short last block
]


@pytest.mark.parametrize("kw", SETTINGS)
async def test_single_request_equals_reference(bc_net, tok, kw):
    engine = make_engine(bc_net, tok)
    req = request("r", PROMPT, **{"max_new_tokens": 24, "steps": 4, "block_length": 8, **kw})
    events = await collect(engine, req)
    await engine.shutdown()
    assert_like_reference(bc_net, tok, req, events)


def mixed_requests(prefix: str, with_suffix: bool = False):
    """Different prompt lengths, canvases, block lengths, steps, rules, temperatures, seeds."""
    out = []
    for i in range(8):
        kw = dict(max_new_tokens=[16, 28, 7, 33, 20, 40, 12, 24][i],
                  block_length=[4, 8, 16, 32, 1, 8, 4, 16][i], steps=[2, 8, 3, 4, 1, 5, 4, 6][i],
                  remasking=["low_confidence", "margin", "entropy", "random"][i % 4],
                  temperature=[0.0, 0.7, 0.0, 1.2][i % 4], top_p=[1.0, 1.0, 0.8, 0.95][i % 4],
                  seed=100 + i, confidence_threshold=0.05 if i == 5 else None)
        prompt = list(range(10 + i, 10 + i + [3, 17, 40, 1, 25, 9, 60, 12][i]))
        suffix = list(range(50, 50 + i)) if with_suffix and i % 2 else None
        out.append(request(f"{prefix}{i}", prompt, suffix=suffix, **kw))
    return out


async def test_mixed_batch_with_staggered_arrivals_equals_reference(bc_net, tok):
    """8 requests, at most 4 running: they arrive at different iterations, wait in the queue,
    join and leave between steps; each gives its lone reference tokens."""
    engine = make_engine(bc_net, tok, max_num_seqs=4)
    reqs = mixed_requests("m")
    stats = await run_like_reference(engine, bc_net, tok, reqs, 3)
    assert stats.kv_pages_used == 0


async def test_full_attention_mixed_batch_with_fim_equals_reference(full_net, tok):
    """Full-attention (LLaDA-style) rows of different lengths, some with a FIM suffix."""
    engine = make_engine(full_net, tok, max_num_seqs=8)
    reqs = mixed_requests("f", with_suffix=True)
    await run_like_reference(engine, full_net, tok, reqs)


async def test_time_conditioned_full_attention_equals_reference(tok):
    net = tiny_net(tiny_config(tok, attention="full", time_conditioning=True), seed=2)
    engine = make_engine(net, tok)
    reqs = mixed_requests("tf")[:4]
    await run_like_reference(engine, net, tok, reqs)


async def test_deferred_and_first_token_constraints_equal_reference(bc_net, tok):
    """defer_token_ids (LLaDA's EOS-last rule) and first_token_ids (token healing) in a batch
    with unconstrained rows."""
    free = generate(bc_net, PROMPT, request("x", PROMPT, max_new_tokens=16, steps=4,
                                            block_length=8).params)
    extra = {}
    if "first_token_ids" in SamplingParams.__dataclass_fields__:
        extra["first_token_ids"] = [free.tokens[3], free.tokens[5]]
    reqs = [request("defer", PROMPT, max_new_tokens=16, steps=4, block_length=8,
                    defer_token_ids=free.tokens[:4]),
            request("plain", PROMPT[:9], max_new_tokens=16, steps=4, block_length=8),
            request("first", PROMPT[2:], max_new_tokens=16, steps=2, block_length=8, **extra)]
    engine = make_engine(bc_net, tok)
    results = await asyncio.gather(*[collect(engine, r) for r in reqs])
    await engine.shutdown()
    for req, events in zip(reqs, results, strict=True):
        assert_like_reference(bc_net, tok, req, events)
    if extra:
        assert streamed_tokens(results[2])[0] in extra["first_token_ids"]


async def test_stop_token_ends_early_like_reference(bc_net, tok):
    """A stop token committed in block b ends the request after block b, as in generate."""
    free = generate(bc_net, PROMPT, request("x", PROMPT, max_new_tokens=48, steps=4,
                                            block_length=8).params)
    stop_id = free.tokens[13]  # a token the net really commits, in the second block
    engine = make_engine(bc_net, tok, max_num_seqs=2)
    req = request("s", PROMPT, max_new_tokens=48, steps=4, block_length=8,
                  stop_token_ids=[stop_id])
    other = request("o", PROMPT[:5], max_new_tokens=40, steps=2, block_length=8)
    events, other_events = await asyncio.gather(collect(engine, req), collect(engine, other))
    await engine.shutdown()
    assert_like_reference(bc_net, tok, req, events)
    assert_like_reference(bc_net, tok, other, other_events)
    fin = events[-1]
    assert fin.finish_reason == "stop" and fin.completion_tokens <= 16
    assert fin.steps < 12  # 3 blocks would have cost 12 steps


async def test_stop_string_ends_early_and_is_never_streamed(bc_net, tok):
    params = dict(max_new_tokens=48, steps=4, block_length=8)
    text = generate(bc_net, PROMPT, request("x", PROMPT, **params).params, tokenizer=tok).text
    stop = text[len(text) // 3: len(text) // 3 + 3]  # a piece of what the net writes
    engine = make_engine(bc_net, tok)
    req = request("s", PROMPT, stop=[stop], **params)
    events = await collect(engine, req)
    await engine.shutdown()
    assert_like_reference(bc_net, tok, req, events)
    fin = events[-1]
    assert fin.finish_reason == "stop" and stop not in fin.text
    assert streamed_text(events) == fin.text  # nothing from the stop string on was streamed


async def test_stop_string_inside_one_block_streams_nothing_past_it(bc_net, tok):
    # One 16-token block holds the stop string and text after it, all committed together.
    params = dict(max_new_tokens=16, steps=4, block_length=16)
    text = generate(bc_net, PROMPT, request("x", PROMPT, **params).params, tokenizer=tok).text
    stop = text[4:7]
    assert len(text) > 10 and text.find(stop) == 4
    engine = make_engine(bc_net, tok)
    events = await collect(engine, request("s", PROMPT, stop=[stop], **params))
    await engine.shutdown()
    fin = events[-1]
    assert fin.finish_reason == "stop" and fin.text == text[:4]
    assert streamed_text(events) == text[:4]


async def test_float32_mixed_batch_equals_reference(tok):
    """At serving precision. A token could only differ at a near-tie (two candidates within
    ~1e-6 in probability); with these weights there is none, so tokens are equal."""
    net = tiny_net(tiny_config(tok), seed=4, dtype=__import__("torch").float32)
    engine = make_engine(net, tok, max_num_seqs=8)
    reqs = mixed_requests("p")
    await run_like_reference(engine, net, tok, reqs)
