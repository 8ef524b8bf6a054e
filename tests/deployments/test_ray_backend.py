"""RayBackend (the ingress' view of the ModelServer replicas) when a replica dies: a request
whose replica died before its first event is resent and the client sees a normal answer; one
that dies mid-stream, or keeps finding dead replicas, ends with a 503 and Retry-After. Fake
handles stand in for Serve's, so the exact moment of death is under the test's control."""

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
    """Replicas that die after `plan[k]` events on the k-th call (None: a healthy replica)."""

    def __init__(self, plan):
        self.plan, self.calls = list(plan), 0
        self.generate = self

    def options(self, **_):
        return self

    def remote(self, request, routing):
        die = self.plan[min(self.calls, len(self.plan) - 1)]
        self.calls += 1
        return FakeGen(EVENTS, die)


def req() -> GenerationRequest:
    return GenerationRequest("r1", [3, 4], SamplingParams(max_new_tokens=2))


async def run(plan, retries=2):
    handle = FakeHandle(plan)
    backend = RayBackend(handle, None, retry_after_s=3, replica_retries=retries,
                         retry_backoff_s=0)
    got = [e async for e in backend.generate(req(), None)]
    return got, handle.calls


async def test_replica_dead_before_first_event_is_resent_transparently():
    got, calls = await run([0, 0, None])
    assert got == EVENTS and calls == 3


async def test_replica_dying_mid_stream_ends_with_503_retry_after():
    with pytest.raises(APIError) as e:
        await run([1])
    assert e.value.status == 503
    assert e.value.headers["Retry-After"] == "3"


async def test_every_replica_dead_gives_503_after_the_retries():
    with pytest.raises(APIError) as e:
        await run([0], retries=2)
    assert e.value.status == 503
