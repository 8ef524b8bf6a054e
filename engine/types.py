"""The engine's contract with the server: requests in, events out, stats for routing.

    engine: EngineBase
    async for event in engine.submit(GenerationRequest(...)):
        TextDelta   -> committed text, as blocks are finalised (the default stream)
        CanvasUpdate-> the whole generated region after a step, masks shown (`diffusing` mode)
        Finished    -> finish reason, token usage, steps actually used
    await engine.cancel(request_id)   # frees the slot at the next step
    engine.stats()                    # queued/running, token backlog, step latency, tok/s

Nothing here knows of Ray or HTTP.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from model.sampling import SamplingParams

# Shown for a still-masked position in `diffusing` canvases.
MASK_GLYPH = "\u2591"


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    suffix_ids: list[int] | None = None  # FIM for full-attention models (after the canvas)
    diffusing: bool = False  # also stream whole intermediate canvases


@dataclass
class TextDelta:
    request_id: str
    text: str
    token_ids: list[int]


@dataclass
class CanvasUpdate:
    request_id: str
    text: str  # the generated region decoded, MASK_GLYPH where still masked
    step: int  # denoising steps spent so far on this request


@dataclass
class Finished:
    request_id: str
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    steps: int  # denoising forward passes actually used
    text: str = ""  # the whole completion
    error: str | None = None


Event = TextDelta | CanvasUpdate | Finished


@dataclass
class EngineStats:
    queued: int = 0  # admitted, waiting for a slot or KV pages
    running: int = 0  # sequences in the step batch
    token_backlog: float = 0.0  # work left, in token-steps (tokens processed by forward passes)
    step_latency_ms: float = 0.0  # recent mean wall time of one batched step
    output_tokens_per_s: float = 0.0  # recent committed tokens per second
    capacity_token_steps_per_s: float = 0.0  # measured processing rate (for load = backlog/cap)
    kv_pages_used: int = 0
    kv_pages_total: int = 0
    extra: dict = field(default_factory=dict)


class EngineBase(abc.ABC):
    @abc.abstractmethod
    def submit(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Queue a request; iterate its events. Ends after a Finished event."""

    @abc.abstractmethod
    async def cancel(self, request_id: str) -> None: ...

    @abc.abstractmethod
    def stats(self) -> EngineStats: ...

    async def start(self) -> None:  # noqa: B027 - optional hook
        pass

    async def shutdown(self, drain_timeout_s: float = 0.0) -> None:  # noqa: B027
        pass
