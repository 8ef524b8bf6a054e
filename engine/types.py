"""The engine's contract with the server: requests in, events out, stats for routing.

    engine: EngineBase
    async for event in engine.submit(GenerationRequest(...)):
        TextDelta   -> committed text, as blocks are finalised (the default stream)
        CanvasUpdate-> the whole generated region after a step, masks shown (`diffusing` mode)
        Finished    -> finish reason, token usage, steps actually used
    (servers put Admitted first: the request is queued, deployments/backends.py)
    await engine.cancel(request_id)   # frees the slot at the next step
    engine.stats()                    # queued/running, token backlog, step latency, tok/s
    ModelInfo.from_config(cfg, "my-model")   # what the API layer needs to know of the model

Nothing here knows of Ray or HTTP.
"""

from __future__ import annotations

import abc
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from model.config import ModelConfig
from model.families import family_defaults
from model.sampling import SamplingParams

# Shown for a still-masked position in `diffusing` canvases.
MASK_GLYPH = "\u2591"


@dataclass
class ModelInfo:
    """The served model as the API layer sees it: limits, layout and the family's sampler
    defaults. A replica builds it from its config and sends it to the ingress once."""

    id: str
    max_seq_len: int
    block_length: int | None  # None: the whole answer is one block (Dream-style families)
    attention: str  # "block_causal" | "full"
    default_steps: int
    family: str = "tiny-coder"
    remasking: str = "low_confidence"
    temperature: float = 0.0
    top_p: float = 1.0
    suppress_token_ids: tuple[int, ...] = ()
    defer_token_ids: tuple[int, ...] = ()  # committed after every other position of a block
    vocab_size: int = 0
    logit_shift: bool = False  # hidden state i predicts token i + 1 (Dream)
    # "zero": blocks aligned to position 0 (LLaDA2.x, SDAR; ModelConfig.block_align), which
    # changes a request's blocks and so its cost (model/schedule.canvas_schedule)
    block_align: str = "prompt"
    # The family's exact-sampler SamplingParams fields (FamilyDefaults.exact_sampler_kwargs:
    # Dream's step schedule and nucleus scores, Fast-dLLM v2's sub-blocks, ...); requests
    # override them field by field.
    family_params: dict = field(default_factory=dict)
    classifier_free_guidance: bool = False  # the family takes cfg_scale (LLaDA)
    # "masked" or "uniform" (DiffusionGemma: max_denoising_steps / entropy_bound apply, no FIM)
    process: str = "masked"
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def from_config(cls, cfg: ModelConfig, model_id: str | None = None,
                    family_options: dict[str, bool] | None = None) -> ModelInfo:
        """family_options: the family's published switches by name (model/families.py), e.g.
        {"logits_eos_inf": True} for LLaDA."""
        fam = family_defaults(cfg).with_options(**(family_options or {}))
        return cls(id=model_id or cfg.name, max_seq_len=cfg.max_seq_len,
                   block_length=fam.block_length, attention=cfg.attention,
                   default_steps=fam.steps_per_block or cfg.block_length, family=fam.family,
                   remasking=fam.remasking, temperature=fam.temperature, top_p=fam.top_p,
                   suppress_token_ids=tuple(fam.suppress_token_ids),
                   defer_token_ids=tuple(fam.defer_token_ids), vocab_size=cfg.vocab_size,
                   logit_shift=bool(cfg.logit_shift), block_align=cfg.block_align,
                   family_params=fam.exact_sampler_kwargs(),
                   classifier_free_guidance=fam.classifier_free_guidance
                   and cfg.attention == "full", process=fam.process)


class ContextTooLongError(ValueError):
    """A request that can never fit: longer than the model's context, or needing more KV than
    the whole pool holds (Engine.submit raises it; the server answers 413 naming the limit)."""


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    suffix_ids: list[int] | None = None  # FIM for full-attention models (after the canvas)
    diffusing: bool = False  # also stream whole intermediate canvases
    adapter: str | None = None  # a LoRA adapter the engine holds (Engine.add_adapter); None: base
    # This request's own latency target (the API's latency_budget_ms), seconds from submit: the
    # engine admits it ahead of requests without one (earliest deadline first), into one of
    # EngineConfig.priority_slots beyond max_num_seqs when every slot is held.
    latency_budget_s: float | None = None


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


@dataclass
class Admitted:
    """The request is in an engine's queue: sent by a server right after submit succeeded, so
    a caller with several requests can tell all of them were taken before it answers."""

    request_id: str


Event = Admitted | TextDelta | CanvasUpdate | Finished


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
    iterations: int = 0  # scheduler iterations run so far (busy fraction = iterations x latency)
    # the fitted iteration-time model (engine/cost_model.StepCost.to_dict(); {} before any step):
    # the step controller predicts each setting's latency from it
    step_cost: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


class EngineBase(abc.ABC):
    @abc.abstractmethod
    def submit(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Queue a request; iterate its events. Ends after a Finished event."""

    @abc.abstractmethod
    async def cancel(self, request_id: str) -> None: ...

    @abc.abstractmethod
    def stats(self) -> EngineStats: ...

    @property
    def alive(self) -> bool:
        """False once the engine can no longer run steps (its loop died): the replica's health
        check fails and Serve replaces it."""
        return True

    async def start(self) -> None:  # noqa: B027 - optional hook
        pass

    def forget_measurements(self) -> None:  # noqa: B027 - optional hook
        """Drop what the engine measured of its own speed (step times, capacity, the fitted step
        cost). Called after a replica's warm-up: its cold first passes would tell the step
        controller the replica is slower than it is, and the first real requests would be
        served below best quality for it."""

    # LoRA adapters (engine/engine.py holds them; an engine without adapter support has none)
    def adapter_names(self) -> list[str]:
        return []

    def resident_adapters(self) -> list[str]:
        """Adapters in a slot now (a request naming one starts without a load)."""
        return []

    def load_adapter(self, name: str, path: str):
        raise ValueError("this engine serves no LoRA adapters")

    async def load_adapter_async(self, name: str, path: str):
        return self.load_adapter(name, path)

    def remove_adapter(self, name: str) -> bool:
        return False

    async def shutdown(self, drain_timeout_s: float = 0.0) -> None:  # noqa: B027
        pass
