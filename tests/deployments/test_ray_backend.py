"""RayBackend (the ingress' view of the ModelServer replicas) when a replica dies: the request is
resent and the client sees a normal answer, mid-stream too (the text it already has is skipped);
one whose replacement answers differently, or that keeps finding dead replicas, ends with a 503
and Retry-After. Fake handles stand in for Serve's, so the moment of death is the test's."""

from __future__ import annotations

import pytest
from ray.exceptions import ActorDiedError

from deployments.backends import RayBackend
from deployments.errors import APIError
from engine.types import Finished, GenerationRequest, TextDelta
from model.sampling import SamplingParams

EVENTS = [TextDelta("r1", "a", [5]), TextDelta("r1", "b", [6]),
          Finished("r1", "length", prompt_tokens=2, completion_tokens=2, steps=2, text="ab")]


class FakeGen:
    """What handle.generate.remote() returns: an async iterator with cancel()."""

    def __init__(self, events, die_after: int | None):
        self.events, self.die_after, self.i = events, die_after, 0

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.die_after is not None and self.i == self.die_after:
            raise ActorDiedError()
        if self.i == len(self.events):
            raise StopAsyncIteration
        self.i += 1
        return self.events[self.i - 1]

    def cancel(self):
        pass


class FakeHandle:
    """Replicas that die after `plan[k]` events on the k-th call (None: a healthy replica);
    `answers[k]` the events the k-th replica would send (default EVENTS)."""

    def __init__(self, plan, answers=None):
        self.plan, self.calls, self.answers = list(plan), 0, answers
        self.generate = self

    def options(self, **_):
        return self

    def remote(self, request, routing):
        die = self.plan[min(self.calls, len(self.plan) - 1)]
        events = self.answers[self.calls] if self.answers else EVENTS
        self.calls += 1
        return FakeGen(events, die)


def req() -> GenerationRequest:
    return GenerationRequest("r1", [3, 4], SamplingParams(max_new_tokens=2))


async def run(plan, retries=2, answers=None):
    handle = FakeHandle(plan, answers)
    backend = RayBackend(handle, None, retry_after_s=3, replica_retries=retries,
                         retry_backoff_s=0)
    got = [e async for e in backend.generate(req(), None)]
    return got, handle.calls


async def test_replica_dead_before_first_event_is_resent_transparently():
    got, calls = await run([0, 0, None])
    assert got == EVENTS and calls == 3


async def test_replica_dying_mid_stream_is_resumed_on_another():
    got, calls = await run([1, None])
    assert calls == 2
    assert [e.text for e in got if isinstance(e, TextDelta)] == ["a", "b"]  # "a" once
    assert got[-1] == EVENTS[-1]


async def test_a_replacement_that_answers_differently_ends_with_503_retry_after():
    other = [TextDelta("r1", "x", [9]), TextDelta("r1", "b", [6]), EVENTS[-1]]
    with pytest.raises(APIError) as e:
        await run([1, None], answers=[EVENTS, other])
    assert e.value.status == 503
    assert e.value.headers["Retry-After"] == "3"


async def test_replicas_dying_mid_stream_every_time_give_503():
    with pytest.raises(APIError) as e:
        await run([1])
    assert e.value.status == 503


async def test_every_replica_dead_gives_503_after_the_retries():
    with pytest.raises(APIError) as e:
        await run([0], retries=2)
    assert e.value.status == 503
