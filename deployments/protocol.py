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
Usage gains `denoising_steps` (forward passes spent over all choices) and
`denoising_steps_per_block` (the router's choice, also sent as header `x-denoising-steps`).
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
from model.sampling import FullCacheMode, RemaskingRule, SamplingParams

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
        return SamplingParams(
            max_new_tokens=max_new_tokens, steps=steps,
            block_length=self.block_length_for(info, max_new_tokens),
            remasking=self.remasking or info.remasking,
            confidence_threshold=self.confidence_threshold, temperature=temperature,
            top_p=self.top_p if self.top_p is not None else info.top_p, seed=seed,
            stop=self.stop_list, suppress_token_ids=list(info.suppress_token_ids),
            defer_token_ids=list(info.defer_token_ids),
            stop_token_ids=[] if self.ignore_eos else None,
            full_cache=self.full_cache or default_full_cache).validate()


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
