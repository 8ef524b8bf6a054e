"""A replica's warm-up (deployments.replica.warm_up): requests served before the replica reports
ready leave the engine as they found it, and a warm-up that fails does not stop the replica."""

from __future__ import annotations

import asyncio
import logging

import pytest

from deployments.replica import warm_up
from engine.types import Finished
from tests.engine.conftest import make_engine, request, small_tokenizer, tiny_config, tiny_net


@pytest.fixture(scope="module")
def tok():
    return small_tokenizer()


def tokens(events) -> list[int]:
    return [t for e in events for t in (getattr(e, "token_ids", None) or [])]


async def serve_one(engine, prompt):
    return [e async for e in engine.submit(request("after", prompt, max_new_tokens=32,
                                                   block_length=16, steps=4))]


def test_warm_up_runs_passes_and_leaves_the_engine_as_it_was(tok):
    net = tiny_net(tiny_config(tok, block_length=16, default_steps_per_block=4))
    prompt = tok.encode("def f(x):\n")

    async def scenario(n):
        engine = make_engine(net, tok, max_num_seqs=4)
        await engine.start()
        await warm_up(engine, net.cfg, n)
        warmed = engine.stats()
        out = await serve_one(engine, prompt)
        after = engine.stats()
        await engine.shutdown()
        return warmed, out, after

    cold_stats, cold, _ = asyncio.run(scenario(0))
    warm_stats, warm, after = asyncio.run(scenario(3))
    assert cold_stats.iterations == 0
    # three one-block requests side by side: at least the block's 4 denoising steps
    assert warm_stats.iterations >= 4
    assert warm_stats.running == warm_stats.queued == 0 and warm_stats.kv_pages_used == 0
    # the cold passes' timings are dropped: the step controller starts from no measurement
    assert warm_stats.step_cost == cold_stats.step_cost
    assert warm_stats.capacity_token_steps_per_s == 0 and warm_stats.step_latency_ms == 0
    assert after.step_cost != cold_stats.step_cost and after.capacity_token_steps_per_s > 0
    assert isinstance(warm[-1], Finished) and warm[-1].error is None
    assert tokens(warm) == tokens(cold) and len(tokens(warm)) == 32
    assert after.kv_pages_used == 0


class BrokenEngine:
    forgotten = False

    def submit(self, req):
        raise RuntimeError("no model")

    def forget_measurements(self):
        self.forgotten = True


def test_a_failed_warm_up_is_logged_not_raised(tok, caplog):
    cfg = tiny_config(tok)
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        asyncio.run(warm_up(engine := BrokenEngine(), cfg, 2))
    assert "warm-up failed" in caplog.text and "no model" in caplog.text
    assert engine.forgotten
