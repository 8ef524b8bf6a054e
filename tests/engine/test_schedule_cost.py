"""The engine and the mock engine count work with model/schedule.py: the cost the step router
charges a new request (request_token_steps) is the backlog the engine reports for it, and the
tokens its forwards then really process; the mock reports the same numbers."""

from __future__ import annotations

import pytest

from benchmarks.mock_engine import MockEngine, mock_steps_used
from engine.sequence import Sequence
from engine.types import Finished, GenerationRequest
from model.sampling import SamplingParams
from model.schedule import BlockSchedule, request_token_steps

from .conftest import make_engine, request, tiny_config, tiny_net

PROMPT = list(range(20, 57))

LAYOUTS = [("block_causal", "none", 0), ("full", "none", 0), ("full", "prefix", 0),
           ("full", "dual", 0), ("full", "prefix", 9), ("full", "dual", 9)]


def router_cost(prompt, suffix, params: SamplingParams, cfg) -> int:
    """What the step router charges: request_token_steps from the request's plain numbers."""
    return request_token_steps(len(prompt) + len(suffix), params.max_new_tokens, params.steps,
                               params.block_length, cfg.attention == "block_causal",
                               params.full_cache, len(suffix), cfg.logit_shift)


@pytest.mark.parametrize("attention, full_cache, suffix", LAYOUTS)
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("max_new, steps", [(64, 8), (50, 4), (20, 32)])
def test_a_new_requests_cost_is_its_backlog(tok, attention, full_cache, suffix, shift, max_new,
                                            steps):
    cfg = tiny_config(tok, attention=attention, logit_shift=shift)
    params = SamplingParams(max_new_tokens=max_new, steps=steps, block_length=32,
                            full_cache=full_cache)
    suffix_ids = list(range(60, 60 + suffix))
    seq = Sequence.create(GenerationRequest("r", PROMPT, params, suffix_ids=suffix_ids or None),
                          cfg, tok, "cpu")
    assert seq.backlog() == router_cost(PROMPT, suffix_ids, params, cfg)


@pytest.mark.parametrize("attention, full_cache, suffix", LAYOUTS[:4] + [("full", "dual", 7)])
async def test_the_forwards_process_what_the_request_costs(tok, attention, full_cache, suffix):
    """Every token through a cache write or a denoising forward, summed over the run, is the
    request's cost (no early stop: no stop tokens, no threshold, the even split leaves each
    block at its last step), and the backlog falls to 0."""
    net = tiny_net(tiny_config(tok, attention=attention, time_conditioning=False), seed=2)
    engine = make_engine(net, tok)
    processed = []
    for name in ("cache_write", "denoise"):
        forward = getattr(engine.runner, name)

        def counting(seqs, forward=forward):
            out = forward(seqs)
            processed.append(out[0])
            return out

        setattr(engine.runner, name, counting)
    suffix_ids = list(range(60, 60 + suffix)) or None
    req = request("r", PROMPT, suffix=suffix_ids, max_new_tokens=40, steps=4, block_length=16,
                  full_cache=full_cache)
    cost = router_cost(PROMPT, suffix_ids or [], req.params, net.cfg)
    stream = engine.submit(req)
    assert engine.stats().token_backlog == cost
    events = [e async for e in stream]
    after = engine.stats()
    await engine.shutdown()
    assert isinstance(events[-1], Finished) and events[-1].finish_reason == "length"
    assert events[-1].steps == BlockSchedule(40, 16, 4).total_steps == 12
    assert sum(processed) == cost
    assert after.token_backlog == 0


async def test_the_mock_counts_steps_and_backlog_like_the_engine():
    mock = MockEngine()
    await mock.start()
    params = SamplingParams(max_new_tokens=40, steps=16, block_length=32, stop_token_ids=[])
    stream = mock.submit(GenerationRequest("m", PROMPT, params))
    # queued, before its first step: the real engine's backlog of a new block-causal request
    assert mock.stats().token_backlog == request_token_steps(len(PROMPT), 40, 16, 32) \
        == 16 * 32 + 8 * 8 + len(PROMPT) + 32
    events = [e async for e in stream]
    assert events[-1].steps == mock_steps_used(40, 16, 32) == 24
    assert mock.stats().token_backlog == 0
    await mock.shutdown()
