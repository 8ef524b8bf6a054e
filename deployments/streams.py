"""Engine event streams for one HTTP request: several choices fanned in, healed text removed.

    streams = EventStreams(backend, job.requests, job.quality_note, job.healed)
    async for choice_index, event in streams: ...
    streams.close()                  # idempotent; cancels every engine request still running
    SSEResponse(chunks, streams, on_close)   # always closes the streams, even if never iterated

A client that disconnects cancels the response task; closing the streams then cancels their
engine requests, so the slots free at the next denoising step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator

from starlette.responses import StreamingResponse

from deployments.backends import Backend
from engine.types import CanvasUpdate, Event, Finished, GenerationRequest, TextDelta


async def unheal(stream: AsyncIterator[Event], healed: str) -> AsyncIterator[Event]:
    """Drop the healed prompt text from the start of a completion: the client's prompt already
    has it (model/healing.py). TextDelta texts lose it across as many deltas as it spans."""
    left = healed
    try:
        async for event in stream:
            if isinstance(event, TextDelta) and left:
                n = len(os.path.commonprefix([left, event.text]))
                left = left[n:] if n == len(left) or n == len(event.text) else ""
                event = dataclasses.replace(event, text=event.text[n:])
            elif isinstance(event, (Finished, CanvasUpdate)) and event.text.startswith(healed):
                # a canvas holds the whole generated region: always the healed text first
                event = dataclasses.replace(event, text=event.text[len(healed):])
            yield event
    finally:  # closing this closes the backend stream (a disconnect cancels the engine request)
        await stream.aclose()


class EventStreams:
    """Several backend streams run together; iterate (choice index, event)."""

    def __init__(self, backend: Backend, requests: list[GenerationRequest],
                 routing: dict | None = None, healed: list[str] | None = None):
        self.backend = backend
        self.streams = [backend.generate(r, routing) for r in requests]
        if healed:
            self.streams = [unheal(s, h) if h else s
                            for s, h in zip(self.streams, healed, strict=True)]
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tasks = [asyncio.ensure_future(self._pump(i, s)) for i, s in enumerate(self.streams)]
        self.open = len(self.streams)
        self.closed = False

    async def _pump(self, i: int, stream: AsyncIterator[Event]) -> None:
        try:
            async for event in stream:
                await self.queue.put((i, event))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # surfaced to the consumer
            await self.queue.put((i, e))
        finally:
            await self.queue.put((i, None))

    def __aiter__(self):
        return self

    async def __anext__(self) -> tuple[int, Event]:
        while self.open:
            i, item = await self.queue.get()
            if item is None:
                self.open -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            return i, item
        raise StopAsyncIteration

    def close(self) -> None:
        """Idempotent; safe in `finally` of a cancelled task (schedules, never awaits)."""
        if self.closed:
            return
        self.closed = True
        for t in self.tasks:
            t.cancel()
        for s in self.streams:
            self.backend.cancel_stream(s)


class SSEResponse(StreamingResponse):
    """A StreamingResponse that always closes its engine streams, even if never iterated."""

    def __init__(self, content, streams: EventStreams, on_close, **kw):
        super().__init__(content, media_type="text/event-stream", **kw)
        self._streams, self._on_close = streams, on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._streams.close()
            self._on_close()
