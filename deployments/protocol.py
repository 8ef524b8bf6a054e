"""Pydantic models of the OpenAI HTTP protocol, plus the diffusion extensions.

    req = ChatCompletionRequest.model_validate(json_body)      # ValidationError -> HTTP 400
    ChatCompletionResponse(id=..., model=..., choices=[...], usage=Usage(...)).model_dump()

Requests list their fields in the order of the OpenAI API reference (messages/model first, then
alphabetical, as the reference does). Every field that changes an answer is honoured or refused
with a 400 that says so (the README's table lists which): penalties other than 0, logit_bias,
logprobs, tools/functions, a JSON response_format, best_of != n, diffusing without stream.
Fields that change no answer (metadata, store, user) are accepted and ignored.

Unknown fields are accepted and ignored with a log line: popular clients send extras (IDE
plug-ins add their own keys), and failing them would break them for nothing.

The fields every generation request shares, the diffusion extensions among them, are declared
once in GenerationRequestBase, which also turns a request into engine SamplingParams
(`to_sampling_params`); chat, completion and FIM requests add their own fields.

Diffusion extensions:
  denoising_steps       pin the steps per block (1..block_length); bypasses the step router
  quality               auto | max | balanced | fast: the rungs the step router may use
                        (deployments/step_router.py says exactly which)
  block_length          tokens per block (default: the model's)
  remasking             low_confidence | margin | entropy | random: which predictions to commit
  confidence_threshold  commit every prediction above it (Fast-dLLM); steps become a cap
  diffusing             stream whole intermediate canvases (a `diffusion` object per chunk)
  ignore_eos            keep denoising past end-of-text, for benchmarks (vLLM's ignore_eos)
  full_cache            none | prefix | dual: Fast-dLLM's approximate KV cache on full-attention
                        models (LLaDA, Dream; model/sampling.py); default: the server's
                        (app arg engine.full_attention_cache); block-causal models ignore it
  step_schedule         even | dream: commits per step (model/schedule.transfer_schedule);
                        default: the family's (Dream's own schedule for Dream)
  scoring               raw | nucleus | drawn: the distribution positions are scored on
                        (model/sampling.ScoringMode); default: the family's
  latency_budget_ms     this request's own latency target: the best setting predicted to meet
                        it (deployments/slo.py), admitted ahead of the replicas' queues;
                        denoising_steps still pins, quality bounds
  max_denoising_steps   uniform-diffusion models (DiffusionGemma): the cap on denoising steps per
                        canvas (adaptive stopping may take fewer); pins like denoising_steps
  entropy_bound         the EB-sampler bound: DiffusionGemma's acceptance, or the masked models'
                        remasking "entropy_bound" (default 0.1 there)
  cfg_scale             classifier-free guidance (LLaDA's cfg_scale, >= 0): each step also runs
                        the prompt-masked row and commits from un + (cfg_scale + 1)(cond - un);
                        400 for families without it (ModelCard.classifier_free_guidance)
Usage gains `denoising_steps` (forward passes spent over all choices),
`denoising_steps_per_block` (the router's choice, also sent as header `x-denoising-steps`),
`denoising_setting` / `denoising_confidence_threshold` (the rung: header
`x-denoising-setting`), `predicted_latency_ms` and `latency_target_ms` (the controller's
prediction and the target it met: header `x-predicted-latency-ms`).
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.step_router import QualityLevel
from engine.types import ModelInfo
from model.sampling import FullCacheMode, RemaskingRule, SamplingParams, ScoringMode, StepSchedule

log = logging.getLogger(__name__)

MAX_STOP_SEQUENCES = 4
MAX_N = 16
MAX_PROMPTS = 64


# A UTF-16 surrogate code point on its own: JSON can carry it ("\ud800"), Python's str holds it,
# but it is not Unicode text, and no tokenizer or UTF-8 encoder takes it.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_text(value: Any) -> Any:
    """Reject lone surrogates anywhere in a field's value (strings, lists, dicts of them)."""
    if isinstance(value, str):
        if _LONE_SURROGATE.search(value):
            raise ValueError("text holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is "
                             "not valid Unicode")
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_text(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k)
            _check_text(v)
    return value


class OpenAIRequestModel(BaseModel):
    """The trust boundary of every request body. Unknown fields are accepted (logged once per
    request, then ignored); `null` for a field with a default means the default, as the OpenAI
    reference has most fields nullable (its Python client sends null for a None argument); every
    text field, nested ones included, is refused with a 400 naming it when it holds a lone
    surrogate."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items()
                    if v is not None or k not in cls.model_fields
                    or cls.model_fields[k].is_required()}
        return data

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, v: Any) -> Any:
        return _check_text(v)

    @model_validator(mode="after")
    def _log_unknown_fields(self):
        extra = self.model_extra or {}
        if extra:
            log.info("%s: ignoring unknown fields %s", type(self).__name__, sorted(extra))
        return self

    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class ResponseModel(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


class StreamOptions(OpenAIRequestModel):
    include_usage: bool = False


def _stop_list(v: str | list[str] | None) -> list[str]:
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else list(v)
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
    if any(not s for s in stops):
        raise ValueError("stop sequences must be non-empty")
    return stops


class GenerationRequestBase(OpenAIRequestModel):
    """What chat, completion and FIM requests share: the OpenAI sampling fields (alphabetical,
    as the reference lists them) and then the diffusion extensions (module docstring)."""

    model: str
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)  # only 0
    max_tokens: int | None = Field(default=None, ge=1)  # default: the server's default
    n: int = Field(default=1, ge=1, le=MAX_N)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)  # only 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)  # default: the family's
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    user: str | None = None  # ignored
    # --- diffusion extensions ---
    denoising_steps: int | None = Field(default=None, ge=1, le=1024)
    quality: QualityLevel = "auto"
    block_length: int | None = Field(default=None, ge=1, le=1024)
    remasking: RemaskingRule | None = None
    confidence_threshold: float | None = Field(default=None, gt=0.0, le=1.0)
    diffusing: bool = False
    ignore_eos: bool = False
    full_cache: FullCacheMode | None = None
    # the latency this request may take, in ms (an IDE's inline completion: 300; a chat may
    # wait): the step controller picks the best setting predicted to meet it, for this request
    # alone (deployments/slo.py); denoising_steps still pins, quality still bounds
    latency_budget_ms: float | None = Field(default=None, gt=0.0, le=3_600_000.0)
    # classifier-free guidance strength (LLaDA's generate cfg_scale); 0 or absent: off
    cfg_scale: float | None = Field(default=None, ge=0.0, le=100.0)
    step_schedule: StepSchedule | None = None  # default: the family's (Dream: "dream")
    scoring: ScoringMode | None = None  # default: the family's (Dream: "nucleus")
    # uniform diffusion (DiffusionGemma): steps cap per canvas and the acceptance's entropy
    # bound; entropy_bound is also the masked models' remasking "entropy_bound" bound
    max_denoising_steps: int | None = Field(default=None, ge=1, le=1024)
    entropy_bound: float | None = Field(default=None, gt=0.0, le=1000.0)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        _stop_list(v)
        return v

    @model_validator(mode="after")
    def _refused_combinations(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.diffusing and not self.stream:
            raise ValueError("diffusing streams intermediate canvases: it needs stream true")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):  # a penalty needs an order of generation; a diffusion
                # model commits tokens anywhere in the block, several at a time
                raise ValueError(f"{name} is not supported by diffusion models: send 0 or omit it")
        logit_bias = getattr(self, "logit_bias", None)
        if logit_bias:
            raise ValueError("logit_bias is not supported by this server: omit it")
        if self.max_denoising_steps is not None:
            if self.denoising_steps not in (None, self.max_denoising_steps):
                raise ValueError("max_denoising_steps and denoising_steps disagree")
            self.denoising_steps = self.max_denoising_steps  # a pin, as denoising_steps is
        return self

    @property
    def stop_list(self) -> list[str]:
        return _stop_list(self.stop)

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def block_length_for(self, info: ModelInfo, max_new_tokens: int) -> int:
        """The request's block length, else the model's; one block when the family has none."""
        return self.block_length or info.block_length or max_new_tokens

    def to_sampling_params(self, info: ModelInfo, *, max_new_tokens: int, steps: int,
                           seed: int, default_temperature: float | None = None,
                           default_full_cache: str = "none") -> SamplingParams:
        """Engine parameters: the request's settings over the server's defaults over the
        model family's (validated: ValueError on a combination the engine cannot run)."""
        temperature = self.temperature if self.temperature is not None \
            else default_temperature if default_temperature is not None else info.temperature
        if self.cfg_scale and not info.classifier_free_guidance:
            raise ValueError(f"cfg_scale: the {info.family} family has no classifier-free "
                             "guidance (LLaDA's full-attention models do)")
        if self.cfg_scale and (self.full_cache or default_full_cache) != "none":
            raise ValueError("cfg_scale needs full_cache 'none' (the unconditional row has no "
                             "cache of its own)")
        if info.process == "uniform":
            self._check_uniform(info, max_new_tokens)
        elif self.max_denoising_steps is not None:
            raise ValueError("max_denoising_steps applies to uniform-diffusion models "
                             "(DiffusionGemma); this model takes denoising_steps per block")
        elif self.entropy_bound is not None and \
                (self.remasking or info.remasking) != "entropy_bound":
            raise ValueError("entropy_bound applies with remasking 'entropy_bound'")
        exact = dict(info.family_params)  # the family's exact sampler, request fields over it
        exact.update({k: v for k, v in (("step_schedule", self.step_schedule),
                                        ("scoring", self.scoring),
                                        ("confidence_threshold", self.confidence_threshold))
                      if v is not None})
        return SamplingParams(
            **exact, max_new_tokens=max_new_tokens, steps=steps,
            block_length=self.block_length_for(info, max_new_tokens),
            remasking=self.remasking or info.remasking, temperature=temperature,
            top_p=self.top_p if self.top_p is not None else info.top_p, seed=seed,
            stop=self.stop_list, suppress_token_ids=list(info.suppress_token_ids),
            defer_token_ids=list(info.defer_token_ids),
            stop_token_ids=[] if self.ignore_eos else None,
            full_cache=self.full_cache or default_full_cache,
            cfg_scale=self.cfg_scale or 0.0, entropy_bound=self.entropy_bound,
            max_denoising_steps=self.max_denoising_steps).validate()

    def _check_uniform(self, info: ModelInfo, max_new_tokens: int) -> None:
        """What a uniform-diffusion model (DiffusionGemma) cannot take: another canvas length,
        a masked model's commit rule or threshold (its acceptance is the entropy bound; its
        temperature follows the checkpoint's schedule, so temperature / top_p do not apply)."""
        if self.block_length is not None and self.block_length != info.block_length:
            raise ValueError(f"block_length: this model denoises canvases of "
                             f"{info.block_length} tokens (its canvas_length)")
        if self.remasking not in (None, "entropy_bound"):
            raise ValueError("remasking: this uniform-diffusion model accepts by entropy bound "
                             "only (set entropy_bound)")
        for name in ("confidence_threshold", "full_cache", "step_schedule", "scoring"):
            if getattr(self, name) not in (None, "none"):
                raise ValueError(f"{name} does not apply to uniform-diffusion models")


# --- chat completions ------------------------------------------------------------------------
class ContentPart(OpenAIRequestModel):
    type: str
    text: str | None = None


class ChatMessage(OpenAIRequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.type in ("image_url", "image", "input_image"):
                raise ValueError(f"content parts of type {p.type!r}: image input is not served "
                                 "(this deployment runs the text model only; DiffusionGemma's "
                                 "vision tower is not loaded)")
            if p.type != "text":
                raise ValueError(f"content parts of type {p.type!r} are not supported "
                                 "(text only)")
            if p.text is None:
                raise ValueError("a content part of type 'text' needs a text")
            parts.append(p.text)
        return "".join(parts)


class ChatCompletionRequest(GenerationRequestBase):
    messages: list[ChatMessage] = Field(min_length=1)
    logit_bias: dict[str, float] | None = None  # refused when non-empty
    logprobs: bool | None = None  # refused when true
    max_completion_tokens: int | None = Field(default=None, ge=1)  # max_tokens' new name
    metadata: dict[str, str] | None = None  # ignored
    response_format: dict[str, Any] | None = None  # only {"type": "text"}
    store: bool | None = None  # ignored
    tool_choice: Any | None = None  # refused unless "none"
    tools: list[Any] | None = None  # refused when non-empty
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    functions: list[Any] | None = None  # the legacy tools: refused when non-empty
    function_call: Any | None = None  # refused unless "none"

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.logprobs or self.top_logprobs:
            raise ValueError("logprobs are not supported by diffusion models")
        if self.tools or self.functions:
            raise ValueError("tools and functions are not supported")
        if self.tool_choice not in (None, "none") or self.function_call not in (None, "none"):
            raise ValueError("tool_choice and function_call are not supported")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError("only response_format {'type': 'text'} is supported")
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise ValueError("max_tokens and max_completion_tokens disagree")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# --- completions (with FIM through `suffix`) ------------------------------------------------
Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(GenerationRequestBase):
    prompt: Prompt
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)  # only best_of == n
    echo: bool = False
    logit_bias: dict[str, float] | None = None  # refused when non-empty
    logprobs: int | None = Field(default=None, ge=0, le=5)  # refused when set
    suffix: str | None = None  # fill-in-the-middle: the text after the completion

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        if isinstance(v, list) and len(v) > MAX_PROMPTS and isinstance(v[0], (str, list)):
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        return v

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.logprobs:
            raise ValueError("logprobs are not supported by diffusion models")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of must equal n (no server-side ranking)")
        if self.echo and self.stream:
            raise ValueError("echo is not supported with stream")
        return self


class FIMCompletionRequest(GenerationRequestBase):
    """POST /v1/fim/completions, as Mercury's API has it: prompt = prefix, suffix = after."""

    prompt: str
    suffix: str = ""


# --- responses -------------------------------------------------------------------------------
class Usage(ResponseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # extensions
    denoising_steps: int = 0  # forward passes spent, all choices together
    denoising_steps_per_block: int = 0  # the steps chosen for this request
    # the setting chosen ("16", or "16@0.9" with a confidence threshold), its threshold, and
    # the latency the step controller predicted for it and held it to (absent when pinned)
    denoising_setting: str | None = None
    denoising_confidence_threshold: float | None = None
    predicted_latency_ms: float | None = None
    latency_target_ms: float | None = None


class DiffusionState(ResponseModel):
    """Extension in streamed choices of `diffusing` requests: the whole canvas after a step."""

    canvas: str  # the generated region, engine.types.MASK_GLYPH where still masked
    step: int  # denoising steps spent so far


class ChatMessageOut(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(ResponseModel):
    index: int
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: str | None


class ChatCompletionResponse(ResponseModel):
    id: str
    choices: list[ChatChoice]
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    object: Literal["chat.completion"] = "chat.completion"
    system_fingerprint: str | None = None
    usage: Usage


class ChatDelta(ResponseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(ResponseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: str | None = None
    diffusion: DiffusionState | None = None  # extension (diffusing mode)


class ChatCompletionChunk(ResponseModel):
    id: str
    choices: list[ChatChunkChoice]
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    system_fingerprint: str | None = None
    usage: Usage | None = None


class CompletionChoice(ResponseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: str | None = None
    diffusion: DiffusionState | None = None  # extension (diffusing mode, streamed only)


class CompletionResponse(ResponseModel):
    id: str
    choices: list[CompletionChoice]
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    object: Literal["text_completion"] = "text_completion"
    system_fingerprint: str | None = None
    usage: Usage | None = None


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dllm-serve"
    # extensions: what a client needs to pick parameters
    max_model_len: int | None = None
    block_length: int | None = None
    attention: str | None = None
    default_denoising_steps: int | None = None
    classifier_free_guidance: bool | None = None  # whether requests may set cfg_scale
    # "masked" or "uniform" (DiffusionGemma: max_denoising_steps / entropy_bound apply)
    diffusion_process: str | None = None
    # a LoRA adapter's card (as vLLM lists them): the base model it applies to
    parent: str | None = None
    root: str | None = None


class LoadLoRAAdapterRequest(OpenAIRequestModel):
    """POST /v1/load_lora_adapter (vLLM's body): a PEFT adapter directory under lora.root."""

    lora_name: str = Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoRAAdapterRequest(OpenAIRequestModel):
    """POST /v1/unload_lora_adapter (vLLM's body)."""

    lora_name: str = Field(min_length=1, max_length=256)
    lora_int_id: int | None = None  # vLLM's field; accepted, unused


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def sse(payload: BaseModel | dict | str) -> str:
    """One server-sent event: `data: <json>\\n\\n`."""
    if isinstance(payload, BaseModel):
        payload = payload.model_dump_json(exclude_none=True)
    elif isinstance(payload, dict):
        payload = json.dumps(payload)
    return f"data: {payload}\n\n"


SSE_DONE = "data: [DONE]\n\n"
