"""Scheduling behaviour a client notices: joining mid-flight, cancellation and disconnects,
admission control, stats, diffusing events, failures isolated to their request, shutdown."""

from __future__ import annotations

import asyncio

import pytest
import torch

from engine import EngineClosedError
from engine.detok import render_canvas
from engine.types import MASK_GLYPH, CanvasUpdate, Finished
from model.sampling import generate

from .conftest import assert_like_reference, collect, make_engine, request

PROMPT = list(range(20, 44))


def iterations(engine) -> int:
    return engine.stats().iterations


async def wait_until(cond, timeout_s: float = 60.0) -> None:
    """Poll cond() on the event loop (a safety net against hangs, not a timing assertion)."""
    for _ in range(int(timeout_s / 0.002)):
        if cond():
            return
        await asyncio.sleep(0.002)
    raise AssertionError("condition never became true")


async def test_new_request_joins_while_a_long_one_runs(bc_net, tok):
    engine = make_engine(bc_net, tok)
    long = request("long", PROMPT, max_new_tokens=64, steps=8, block_length=8, diffusing=True)
    short = request("short", PROMPT[:7], max_new_tokens=8, steps=2, block_length=8)
    order: list[str] = []
    long_events, short_events = [], []

    async def run_long():
        async for e in engine.submit(long):
            long_events.append(e)
            order.append(f"long:{type(e).__name__}")

    async def run_short():
        await wait_until(lambda: sum(isinstance(e, CanvasUpdate) for e in long_events) >= 3)
        at_submit = iterations(engine)
        async for e in engine.submit(short):
            short_events.append(e)
            order.append(f"short:{type(e).__name__}")
        return iterations(engine) - at_submit

    _, short_iterations = await asyncio.gather(run_long(), run_short())
    await engine.shutdown()
    # prefilled and stepped at once: its 2 steps took 2 iterations (3 if it arrived mid-step)
    assert short_iterations <= 3
    assert order.index("short:Finished") < order.index("long:Finished")
    assert_like_reference(bc_net, tok, long, long_events)
    assert_like_reference(bc_net, tok, short, short_events)


async def test_cancel_frees_the_slot_and_pages_for_the_queue(bc_net, tok):
    engine = make_engine(bc_net, tok, max_num_seqs=1)
    long = request("long", PROMPT, max_new_tokens=64, steps=8, block_length=8, diffusing=True)
    nxt = request("next", PROMPT[:9], max_new_tokens=16, steps=4, block_length=8)
    long_events = []

    async def run_long():
        async for e in engine.submit(long):
            long_events.append(e)
            if isinstance(e, CanvasUpdate) and e.step == 2:
                await wait_until(lambda: engine.stats().queued == 1)  # "next" waits for a slot
                await engine.cancel("long")

    async def run_next():
        await wait_until(lambda: long_events)
        return await collect(engine, nxt)

    _, next_events = await asyncio.gather(run_long(), run_next())
    stats = engine.stats()
    await engine.shutdown()
    fin = long_events[-1]
    assert isinstance(fin, Finished) and fin.finish_reason == "cancelled"
    assert fin.steps < 8 and fin.completion_tokens == 0  # within the first block
    assert_like_reference(bc_net, tok, nxt, next_events)
    assert (stats.running, stats.queued, stats.kv_pages_used) == (0, 0, 0)


@pytest.mark.parametrize("how", ["aclose", "task_cancelled", "dropped"])
async def test_disconnected_consumer_frees_its_slot(bc_net, tok, how):
    engine = make_engine(bc_net, tok, max_num_seqs=2)
    req = request("gone", PROMPT, max_new_tokens=64, steps=8, block_length=8, diffusing=True)
    if how == "dropped":
        async def read_one():
            async for _ in engine.submit(req):
                break  # the stream is dropped: asyncio's async-generator finalizer closes it
        await read_one()
    elif how == "aclose":
        stream = engine.submit(req)
        async for _ in stream:
            break  # the client stops reading ...
        await stream.aclose()  # ... and its response generator is closed
    else:
        stream = engine.submit(req)

        async def consume():
            async for _ in stream:
                pass
        task = asyncio.create_task(consume())
        await wait_until(lambda: iterations(engine) >= 2)
        task.cancel()  # what Ray Serve / Starlette do to a disconnected client's task
        with pytest.raises(asyncio.CancelledError):
            await task
    at_close = iterations(engine)
    await wait_until(lambda: engine.stats().running == 0)
    stats = engine.stats()
    await engine.shutdown()
    assert stats.kv_pages_used == 0
    assert stats.iterations - at_close <= 1  # freed at the next step


async def test_admission_queues_when_the_kv_pool_is_full(bc_net, tok):
    # each request caches prompt 24 + 3 blocks of 8 = 48 tokens = 3 pages of 16; the pool has 4
    engine = make_engine(bc_net, tok, kv_pages=4, page_size=16)
    reqs = [request(f"k{i}", PROMPT, max_new_tokens=32, steps=4, block_length=8, seed=i,
                    temperature=0.5) for i in range(2)]
    tasks = [asyncio.create_task(collect(engine, r)) for r in reqs]
    await wait_until(lambda: iterations(engine) >= 1)
    during = engine.stats()
    results = await asyncio.gather(*tasks)
    after = engine.stats()
    await engine.shutdown()
    assert (during.running, during.queued, during.kv_pages_used, during.kv_pages_total) == (1, 1, 3, 4)
    for r, events in zip(reqs, results, strict=True):
        assert_like_reference(bc_net, tok, r, events)
    assert (after.running, after.queued, after.kv_pages_used) == (0, 0, 0)


async def test_admission_queues_beyond_max_num_seqs(bc_net, tok):
    engine = make_engine(bc_net, tok, max_num_seqs=2)
    reqs = [request(f"q{i}", PROMPT[: 5 + i], max_new_tokens=16, steps=4, block_length=8)
            for i in range(4)]
    tasks = [asyncio.create_task(collect(engine, r)) for r in reqs]
    await wait_until(lambda: iterations(engine) >= 1)
    during = engine.stats()
    results = await asyncio.gather(*tasks)
    await engine.shutdown()
    assert (during.running, during.queued) == (2, 2)
    for r, events in zip(reqs, results, strict=True):
        assert_like_reference(bc_net, tok, r, events)


async def test_requests_that_can_never_be_served_are_rejected(bc_net, tok):
    engine = make_engine(bc_net, tok, kv_pages=2, page_size=16)
    with pytest.raises(ValueError, match="KV pages"):
        engine.submit(request("big", PROMPT, max_new_tokens=64, block_length=8))
    with pytest.raises(ValueError, match="context"):
        engine.submit(request("long", PROMPT, max_new_tokens=1000))
    with pytest.raises(ValueError, match="steps"):
        engine.submit(request("bad", PROMPT, steps=0))
    await engine.shutdown()


async def test_stats_backlog_latency_throughput_pages(bc_net, tok):
    engine = make_engine(bc_net, tok, kv_pages=64)
    empty = engine.stats()
    assert (empty.queued, empty.running, empty.token_backlog, empty.kv_pages_used) == (0, 0, 0, 0)
    req = request("s", PROMPT, max_new_tokens=20, steps=4, block_length=8, diffusing=True)
    stream = engine.submit(req)
    queued = engine.stats()
    # blocks of 8, 8, 4 tokens x 4 steps each + cache writes of the first two + the 24-token prompt
    assert (queued.queued, queued.running) == (1, 0)
    assert queued.token_backlog == 4 * 8 + 4 * 8 + 4 * 4 + 8 + 8 + 24
    seen = [engine.stats() async for e in stream if isinstance(e, CanvasUpdate)]
    done = engine.stats()
    await engine.shutdown()
    # while running (the last canvas arrives with the request already finished): 24 + 8 + 8
    # cacheable tokens reserve 3 pages of 16
    assert all(s.running == 1 and s.kv_pages_used == 3 for s in seen[:-1])
    backlogs = [s.token_backlog for s in seen]
    assert backlogs == sorted(backlogs, reverse=True) and backlogs[-1] == 0
    assert (done.queued, done.running, done.token_backlog, done.kv_pages_used) == (0, 0, 0, 0)
    assert done.kv_pages_total == 64
    assert done.step_latency_ms > 0 and done.capacity_token_steps_per_s > 0
    assert done.output_tokens_per_s > 0


async def test_diffusing_streams_every_intermediate_canvas(bc_net, tok):
    engine = make_engine(bc_net, tok)
    req = request("d", PROMPT, max_new_tokens=16, steps=4, block_length=8, diffusing=True)
    events = await collect(engine, req)
    await engine.shutdown()
    ref_canvases = []
    generate(bc_net, PROMPT, req.params, tokenizer=tok,
             on_step=lambda canvas, info: ref_canvases.append(canvas))
    canvases = [e for e in events if isinstance(e, CanvasUpdate)]
    assert [c.step for c in canvases] == list(range(1, events[-1].steps + 1))
    assert [c.text for c in canvases] == [render_canvas(tok, c, tok.mask_id) for c in ref_canvases]
    masks = [c.text.count(MASK_GLYPH) for c in canvases]
    assert masks == sorted(masks, reverse=True) and masks[0] == 14 and masks[-1] == 0


class PoisonedNet(torch.nn.Module):
    """Raises inside the forward whenever a batch holds the poison token."""

    def __init__(self, net, poison: int):
        super().__init__()
        self.inner, self.cfg, self.poison = net, net.cfg, poison

    def forward(self, ids, **kw):
        if bool((ids == self.poison).any()):
            raise RuntimeError("poisoned batch")
        return self.inner(ids, **kw)


@pytest.mark.parametrize("layout", ["block_causal", "full"])
async def test_a_failing_request_does_not_stop_the_others(bc_net, full_net, tok, layout):
    """The poison sits in one prompt: block-causal fails in the prefill, full attention in every
    step. That request ends with an error; the batch-mates finish with their reference tokens."""
    net = bc_net if layout == "block_causal" else full_net
    poison = 399
    engine = make_engine(PoisonedNet(net, poison), tok)
    good = [request(f"g{i}", PROMPT[: 6 + 4 * i], max_new_tokens=16, steps=4, block_length=8)
            for i in range(3)]
    bad = request("bad", PROMPT[:5] + [poison], max_new_tokens=16, steps=4, block_length=8)
    results = await asyncio.gather(*[collect(engine, r) for r in [good[0], bad, *good[1:]]])
    await engine.shutdown()
    fin = results[1][-1]
    assert fin.finish_reason == "error" and "poisoned" in fin.error
    for r, events in zip(good, [results[0], *results[2:]], strict=True):
        assert_like_reference(net, tok, r, events)


async def test_shutdown_drains_then_cancels(bc_net, tok):
    engine = make_engine(bc_net, tok)
    reqs = [request(f"d{i}", PROMPT, max_new_tokens=16, steps=2, block_length=8) for i in range(2)]
    tasks = [asyncio.create_task(collect(engine, r)) for r in reqs]
    await wait_until(lambda: iterations(engine) >= 1)
    await engine.shutdown(drain_timeout_s=600)
    for t in tasks:
        assert (await t)[-1].finish_reason == "length"
    with pytest.raises(EngineClosedError):
        engine.submit(request("late", PROMPT))

    engine = make_engine(bc_net, tok)
    task = asyncio.create_task(collect(engine, request("c", PROMPT, max_new_tokens=64, steps=8,
                                                       block_length=8)))
    await wait_until(lambda: iterations(engine) >= 1)
    await engine.shutdown(drain_timeout_s=0)
    assert (await task)[-1].finish_reason == "cancelled"


async def test_an_idle_engine_takes_max_num_seqs_plus_max_queued_at_once(bc_net, tok):
    """Requests submitted together (a request's n choices) that will take the free slots are
    not 'waiting': an idle engine admits max_num_seqs + max_queued of them, then refuses."""
    from engine import QueueFullError

    engine = make_engine(bc_net, tok, max_num_seqs=2, max_queued=1)
    streams = [engine.submit(request(f"r{i}", PROMPT, max_new_tokens=8, steps=2,
                                     block_length=8)) for i in range(3)]
    with pytest.raises(QueueFullError):
        engine.submit(request("r3", PROMPT, max_new_tokens=8, steps=2, block_length=8))
    await engine.start()

    async def drain(stream):
        return [e async for e in stream]

    results = await asyncio.gather(*(drain(s) for s in streams))
    assert [r[-1].finish_reason for r in results] == ["length"] * 3
    await engine.shutdown()


def budgeted(rid: str, prompt: list[int], budget_s: float, **params):
    r = request(rid, prompt, **params)
    r.latency_budget_s = budget_s
    return r


async def test_a_budgeted_request_skips_the_queue_into_a_priority_slot(bc_net, tok):
    """Every slot held and two requests queued: a request with a latency budget is admitted at
    the next iteration into the priority slot (3 rows with max_num_seqs 2), finishes before
    everything that was there first, and its tokens are the reference's."""
    engine = make_engine(bc_net, tok, max_num_seqs=2, priority_slots=1)
    plain = [request(f"p{i}", PROMPT[: 5 + i], max_new_tokens=32, steps=8, block_length=8)
             for i in range(4)]
    done: list[str] = []

    async def run(r):
        events = [e async for e in engine.submit(r)]
        done.append(r.request_id)
        return events

    tasks = [asyncio.create_task(run(r)) for r in plain]
    await wait_until(lambda: iterations(engine) >= 2)
    assert (engine.stats().running, engine.stats().queued) == (2, 2)
    urgent = budgeted("u", PROMPT[:9], 0.3, max_new_tokens=8, steps=2, block_length=8)
    at = iterations(engine)
    task = asyncio.create_task(run(urgent))
    await wait_until(lambda: engine.stats().running == 3)
    assert iterations(engine) - at <= 2 and engine.stats().queued == 2
    results = await asyncio.gather(*tasks, task)
    await engine.shutdown()
    assert done[0] == "u"
    for r, events in zip([*plain, urgent], results, strict=True):
        assert_like_reference(bc_net, tok, r, events)


async def test_budgeted_requests_are_admitted_earliest_deadline_first(bc_net, tok):
    """One slot, no priority slots: the queue serves budgeted requests by deadline, then the
    unbudgeted ones in arrival order, whatever order they came in."""
    engine = make_engine(bc_net, tok, max_num_seqs=1, priority_slots=0)
    kw = dict(max_new_tokens=8, steps=2, block_length=8)
    first = request("first", PROMPT, max_new_tokens=32, steps=8, block_length=8)
    queued = [request("plain-a", PROMPT, **kw), budgeted("late", PROMPT, 60.0, **kw),
              request("plain-b", PROMPT, **kw), budgeted("soon", PROMPT, 1.0, **kw)]
    done: list[str] = []

    async def run(r):
        _ = [e async for e in engine.submit(r)]
        done.append(r.request_id)

    head = asyncio.create_task(run(first))
    await wait_until(lambda: iterations(engine) >= 1)
    rest = []
    for r in queued:
        rest.append(asyncio.create_task(run(r)))
        await asyncio.sleep(0)  # submitted in this order
    await asyncio.gather(head, *rest)
    await engine.shutdown()
    assert done == ["first", "soon", "late", "plain-a", "plain-b"]


@pytest.mark.parametrize("urgent_run", [4, 0])
async def test_a_row_that_would_miss_its_deadline_steps_alone(bc_net, tok, urgent_run):
    """A budgeted row that the full step's pace would make late runs iterations of its own
    (the other rows wait, at most urgent_run iterations in a row); urgent_run 0: it shares every
    step. The tokens of everyone are the reference's either way."""
    engine = make_engine(bc_net, tok, max_num_seqs=4, urgent_run=urgent_run)
    plain = [request(f"p{i}", PROMPT[: 6 + i], max_new_tokens=32, steps=8, block_length=8)
             for i in range(3)]
    tasks = [asyncio.create_task(collect(engine, r)) for r in plain]
    await wait_until(lambda: iterations(engine) >= 3)
    urgent = budgeted("u", PROMPT[:9], 1e-3, max_new_tokens=8, steps=4, block_length=8)
    before = {r.request_id: engine._by_id[r.request_id].total_steps for r in plain}
    at = iterations(engine)
    urgent_events = await collect(engine, urgent)
    ran = iterations(engine) - at
    stepped = [engine._by_id[r.request_id].total_steps - before[r.request_id] for r in plain]
    results = await asyncio.gather(*tasks)
    await engine.shutdown()
    assert ran >= 4  # its 4 steps
    if urgent_run:
        assert max(stepped) <= 1  # at most the iteration already under way when it came
    else:
        assert min(stepped) >= 4
    for r, events in zip([*plain, urgent], [*results, urgent_events], strict=True):
        assert_like_reference(bc_net, tok, r, events)
