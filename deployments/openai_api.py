"""The OpenAI-compatible HTTP API: a FastAPI app over a generation backend, and its Serve ingress.

    service = OpenAIService(info, tokenizer, LocalBackend(engine), StepRouter(ladder), settings)
    app = build_openai_app(service)          # a plain FastAPI app: TestClient/httpx work on it
    # under Ray Serve: OpenAIIngress (below) builds the same app around a RayBackend

Endpoints: GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions, POST /v1/completions
(`suffix` = fill-in-the-middle), POST /v1/fim/completions (Mercury's FIM API), GET /health.

The request path (DESIGN.md): validate (protocol.py) -> check the model, the API key, the load
-> tokenize (chat template or FIM format) and check the length -> the step router picks steps
per block -> one GenerationRequest per choice goes to the backend -> events become an OpenAI
response or SSE chunks ending with `data: [DONE]`.

FIM: block-causal models (tiny-coder) take it in the prompt (Tokenizer.fim_prompt); full-attention
models get the suffix after the canvas (GenerationRequest.suffix_ids).

Errors are the OpenAI envelope {"error": {message, type, param, code}}: 400 bad parameters or
malformed JSON, 401 missing/wrong API key, 404 unknown model or route, 413 prompt too long for
the model, 429 overloaded (this ingress' in-flight cap, or the cluster's drain time above
`max_drain_s`) and 503 when the model servers reject work, both with Retry-After. Bad input never
gives a 500. A client that disconnects cancels its engine requests (the slot frees at the next
step).
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import hmac
import logging
import math
import os
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from autoscaling.load import ClusterLoad, LoadSnapshotCache, ReplicaLoad, cluster_load
from deployments.protocol import (
    SSE_DONE,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DiffusionState,
    ErrorInfo,
    ErrorResponse,
    FIMCompletionRequest,
    ModelCard,
    ModelList,
    Usage,
    sse,
)
from deployments.router import StepChoice, StepRouter, estimate_token_steps
from engine.types import CanvasUpdate, EngineBase, Event, Finished, GenerationRequest, TextDelta
from model.healing import heal_prompt
from model.sampling import FULL_CACHE_MODES, SamplingParams

log = logging.getLogger(__name__)


# --- configuration handed to the service ---------------------------------------------------
@dataclass
class ModelInfo:
    """What the API needs to know about the served model (the model server sends it)."""

    id: str
    max_seq_len: int
    block_length: int | None  # None: the whole answer is one block (Dream-style families)
    attention: str  # "block_causal" | "full"
    default_steps: int
    # sampler defaults of the model's family (model/families.py)
    family: str = "tiny-coder"
    remasking: str = "low_confidence"
    temperature: float = 0.0
    top_p: float = 1.0
    suppress_token_ids: tuple[int, ...] = ()
    defer_token_ids: tuple[int, ...] = ()  # committed after every other position of a block
    vocab_size: int = 0
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class ServiceSettings:
    default_max_tokens: int = 256  # when the request sets none (capped by the context left)
    default_temperature: float | None = None  # None: the model family's default
    max_inflight: int = 256  # requests this ingress replica serves at once; more get 429
    max_drain_s: float = math.inf  # cluster drain time above which new requests get 429
    retry_after_s: int = 2
    api_keys: frozenset[str] = frozenset()  # empty: no authentication
    load_refresh_s: float = 0.25
    # Text prompts ending in a whitespace token are healed (model/healing.py): the token is
    # backed off and the first generated token must start with it; the client sees only what
    # comes after. Off for requests with stop strings (the healed text could match them).
    token_healing: bool = True
    # Full-attention models: the approximate KV cache every request gets unless it sets its
    # own `full_cache` ("none" | "prefix" | "dual", model/sampling.py); "none" since it changes
    # tokens. Block-causal models ignore it (their cache is exact).
    full_attention_cache: str = "none"

    def __post_init__(self) -> None:
        if self.full_attention_cache not in FULL_CACHE_MODES:
            raise ValueError(f"full_attention_cache must be one of {FULL_CACHE_MODES}, "
                             f"got {self.full_attention_cache!r}")


def load_api_keys(env_var: str | None = "DLLM_API_KEYS", file: str | None = None) -> frozenset[str]:
    """Keys from a comma-separated environment variable and/or a file (one per line, # comments)."""
    keys: set[str] = set()
    if env_var and os.environ.get(env_var):
        keys |= {k.strip() for k in os.environ[env_var].split(",") if k.strip()}
    if file:
        for line in Path(file).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                keys.add(line)
    return frozenset(keys)


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def envelope(self) -> dict:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type,
                                             param=self.param, code=self.code)).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.envelope(), status_code=self.status, headers=self.headers)


def overloaded(status: int, message: str, retry_after_s: float) -> APIError:
    kind = ("rate_limit_error", "rate_limit_exceeded") if status == 429 else \
        ("service_unavailable_error", "service_unavailable")
    return APIError(status, message, type=kind[0], code=kind[1],
                    headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))})


# --- backends: where GenerationRequests go ---------------------------------------------------
class Backend(abc.ABC):
    @abc.abstractmethod
    def generate(self, request: GenerationRequest, routing: dict | None = None
                 ) -> AsyncIterator[Event]:
        """Events of one request. Overload must surface as APIError(503) on the first event.
        routing: {"below_best": bool | None}, what the router did (for autoscaling stats)."""

    @abc.abstractmethod
    async def load(self) -> ClusterLoad: ...

    def cancel_stream(self, stream: AsyncIterator[Event]) -> None:
        """Stop a stream from any context (even a cancelled task): cancels the engine request."""
        asyncio.ensure_future(stream.aclose())  # type: ignore[attr-defined]


class LocalBackend(Backend):
    """An engine in this process (tests, `dllm bench serve --engine-only` comparisons)."""

    def __init__(self, engine: EngineBase, replica_id: str = "local"):
        self.engine = engine
        self.replica_id = replica_id

    def generate(self, request: GenerationRequest, routing: dict | None = None
                 ) -> AsyncIterator[Event]:
        return self._stream(request)

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[Event]:
        try:
            stream = self.engine.submit(request)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        except RuntimeError as e:  # queue full / shutting down
            raise overloaded(503, str(e), 1) from None
        try:
            async for event in stream:
                yield event
        finally:
            await stream.aclose()

    async def load(self) -> ClusterLoad:
        return cluster_load([ReplicaLoad.from_stats(self.replica_id, self.engine.stats())])


async def _unheal(stream: AsyncIterator[Event], healed: str) -> AsyncIterator[Event]:
    """Drop the healed prompt text from the start of a completion: the client's prompt already
    has it (model/healing.py). TextDelta texts lose it across as many deltas as it spans."""
    left = healed
    try:
        async for event in stream:
            if isinstance(event, TextDelta) and left:
                n = len(os.path.commonprefix([left, event.text]))
                left = left[n:] if n == len(left) or n == len(event.text) else ""
                event = dataclasses.replace(event, text=event.text[n:])
            elif isinstance(event, Finished) and event.text.startswith(healed):
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
            self.streams = [_unheal(s, h) if h else s
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


class _SSEResponse(StreamingResponse):
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


# --- the service ------------------------------------------------------------------------------
@dataclass
class Prompt:
    """One prompt of a request, tokenized."""

    ids: list[int]
    suffix_ids: list[int] | None = None  # FIM for full-attention models
    echo: str = ""  # text to prepend to the completion (echo=true)
    healable: bool = False  # a plain text prompt: its last token may be healed


@dataclass
class Job:
    """One HTTP request turned into engine requests (prompts x n)."""

    id: str
    requests: list[GenerationRequest]
    choice: StepChoice
    steps_per_block: int
    prompt_tokens: int
    echo: list[str] = field(default_factory=list)  # per request: text to prepend (echo)
    healed: list[str] = field(default_factory=list)  # per request: prompt text regenerated
    quality: str = "auto"
    route: str = ""
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    def saw_text(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    @property
    def routing(self) -> dict:
        """For the replicas' below_best_fraction: only load-driven choices count."""
        if self.choice.reason != "load":
            return {"below_best": None}
        return {"below_best": bool(self.choice.rung)}


class OpenAIService:
    def __init__(self, info: ModelInfo, tokenizer, backend: Backend, router: StepRouter,
                 settings: ServiceSettings | None = None, metrics=None):
        self.info = info
        self.tokenizer = tokenizer
        self.backend = backend
        self.router = router
        self.settings = settings or ServiceSettings()
        self.metrics = metrics
        self.load_cache = LoadSnapshotCache(backend.load, self.settings.load_refresh_s,
                                            on_update=router.observe)
        self.inflight = 0

    async def start(self) -> None:
        await self.load_cache.refresh()
        self.load_cache.start()

    async def stop(self) -> None:
        await self.load_cache.stop()

    # --- checks ---------------------------------------------------------------------------
    def check_auth(self, authorization: str | None) -> None:
        keys = self.settings.api_keys
        if not keys:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.strip(), k)
                                                  for k in keys):
            raise APIError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                           type="authentication_error", code="invalid_api_key")

    def check_model(self, model: str) -> None:
        if model != self.info.id:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                           f"{self.info.id!r}", param="model", code="model_not_found")

    def admit(self) -> None:
        s = self.settings
        if self.inflight >= s.max_inflight:
            self._rejected(429)
            raise overloaded(429, f"too many requests in flight ({self.inflight}); retry later",
                             s.retry_after_s)
        load = self.load_cache.latest
        if load.drain_s > s.max_drain_s:
            self._rejected(429)
            raise overloaded(429, f"the cluster is overloaded ({load.drain_s:.1f}s of queued "
                             "work); retry later", min(load.drain_s - s.max_drain_s + 1, 60))

    def _rejected(self, status: int) -> None:
        if self.metrics is not None:
            self.metrics.rejected(status)

    # --- request -> engine requests ---------------------------------------------------------
    def _max_new_tokens(self, requested: int | None, used: int) -> int:
        ctx = self.info.max_seq_len
        if used >= ctx:
            raise APIError(413, f"the prompt is {used} tokens; this model's context is {ctx}",
                           param="prompt", code="context_length_exceeded")
        if requested is None:
            return min(self.settings.default_max_tokens, ctx - used)
        if requested > ctx:
            raise APIError(400, f"max_tokens ({requested}) exceeds the model's context ({ctx})",
                           param="max_tokens", code="invalid_value")
        if used + requested > ctx:
            raise APIError(413, f"the prompt ({used} tokens) plus max_tokens ({requested}) "
                           f"exceeds the model's context ({ctx})", param="prompt",
                           code="context_length_exceeded")
        return requested

    def _params(self, req, max_new: int, steps: int, seed: int) -> SamplingParams:
        info, default_t = self.info, self.settings.default_temperature
        temperature = req.temperature if req.temperature is not None \
            else default_t if default_t is not None else info.temperature
        params = SamplingParams(
            max_new_tokens=max_new, steps=steps,
            block_length=self.block_length(req, max_new),
            remasking=req.remasking or info.remasking,
            confidence_threshold=req.confidence_threshold, temperature=temperature,
            top_p=req.top_p if req.top_p is not None else info.top_p, seed=seed,
            stop=req.stop_list, suppress_token_ids=list(info.suppress_token_ids),
            defer_token_ids=list(info.defer_token_ids),
            stop_token_ids=[] if req.ignore_eos else None,
            full_cache=req.full_cache or self.settings.full_attention_cache)
        try:
            return params.validate()
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def block_length(self, req, max_new: int) -> int:
        return req.block_length or self.info.block_length or max_new

    def make_job(self, prefix: str, req, prompts: list[Prompt]) -> Job:
        """n choices of each prompt."""
        self.check_model(req.model)
        if req.ignored_fields() and self.metrics is not None:
            self.metrics.ignored_fields(len(req.ignored_fields()))
        choice = self.router.choose(req.denoising_steps, req.quality, record=False)
        base_seed = req.seed if req.seed is not None else random.getrandbits(31)
        job = Job(id=f"{prefix}-{uuid.uuid4().hex[:24]}", requests=[], choice=choice,
                  steps_per_block=choice.steps, prompt_tokens=0, quality=req.quality)
        for prompt in prompts:
            ids, suffix_ids = prompt.ids, prompt.suffix_ids
            max_new = self._max_new_tokens(req.max_new_tokens, len(ids) + len(suffix_ids or []))
            job.steps_per_block = min(choice.steps, self.block_length(req, max_new))
            job.prompt_tokens += len(ids) + len(suffix_ids or [])
            healed, first_ids = "", None
            if prompt.healable:
                ids, healed, first_ids = self._heal(req, ids)
            for _ in range(req.n):
                k = len(job.requests)
                params = self._params(req, max_new, choice.steps, (base_seed + k) % 2**31)
                params.first_token_ids = first_ids
                job.requests.append(GenerationRequest(
                    request_id=f"{job.id}-{k}", prompt_ids=list(ids), params=params,
                    suffix_ids=suffix_ids, diffusing=req.diffusing))
                job.echo.append(prompt.echo)
                job.healed.append(healed)
        return job

    def _heal(self, req, ids: list[int]) -> tuple[list[int], str, list[int] | None]:
        if not self.settings.token_healing or req.stop_list:
            return ids, "", None
        try:
            return heal_prompt(self.tokenizer, ids)
        except Exception as e:  # a tokenizer without what healing needs: serve unhealed
            log.debug("token healing skipped: %s", e)
            return ids, "", None

    def chat_job(self, req: ChatCompletionRequest) -> Job:
        messages = []
        for m in req.messages:
            if m.role == "tool":
                raise APIError(400, "tool messages are not supported", param="messages")
            try:
                text = m.text()
            except ValueError as e:
                raise APIError(400, str(e), param="messages") from None
            messages.append({"role": "system" if m.role == "developer" else m.role,
                             "content": text})
        try:
            ids = self.tokenizer.chat_prompt(messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        return self.make_job("chatcmpl", req, [Prompt(ids)])

    def fim_ids(self, prefix: str, suffix: str) -> tuple[list[int], list[int] | None]:
        """Block-causal models: FIM format in the prompt; full attention: suffix after canvas."""
        if self.info.attention == "block_causal":
            try:
                return self.tokenizer.fim_prompt(prefix, suffix), None
            except ValueError as e:  # a tokenizer without FIM tokens
                raise APIError(400, str(e), param="suffix") from None
        return self.tokenizer.encode(prefix), self.tokenizer.encode(suffix)

    def completion_job(self, req: CompletionRequest | FIMCompletionRequest) -> Job:
        prompt = req.prompt
        if isinstance(prompt, str):
            texts: list = [prompt]
        elif isinstance(prompt[0], int):
            texts = [list(prompt)]
        else:
            texts = list(prompt)
        prompts = []
        for p in texts:
            echo = p if isinstance(p, str) and getattr(req, "echo", False) else ""
            if req.suffix:  # fill-in-the-middle
                if not isinstance(p, str):
                    raise APIError(400, "suffix needs a text prompt", param="suffix")
                ids, suffix_ids = self.fim_ids(p, req.suffix)
            elif isinstance(p, str):
                prompts.append(Prompt(self.tokenizer.encode(p), None, echo, healable=True))
                continue
            else:
                if any(not isinstance(t, int) or not 0 <= t < self.tokenizer.vocab_size
                       for t in p):
                    raise APIError(400, "prompt token ids out of range", param="prompt")
                ids, suffix_ids = list(p), None
            prompts.append(Prompt(ids, suffix_ids, echo))
        return self.make_job("cmpl", req, prompts)

    # --- running a job ----------------------------------------------------------------------
    def _usage(self, job: Job, finished: dict[int, Finished]) -> Usage:
        completion = sum(f.completion_tokens for f in finished.values())
        return Usage(prompt_tokens=job.prompt_tokens, completion_tokens=completion,
                     total_tokens=job.prompt_tokens + completion,
                     denoising_steps=sum(f.steps for f in finished.values()),
                     denoising_steps_per_block=job.steps_per_block)

    def headers(self, job: Job) -> dict[str, str]:
        # (no x-request-id of ours: Serve's proxy sets one; the body carries the completion id)
        return {"x-denoising-steps": str(job.steps_per_block)}

    @staticmethod
    def _finish_reason(f: Finished) -> str:
        if f.finish_reason in ("stop", "length"):
            return f.finish_reason
        raise APIError(503, f"generation {f.finish_reason}: {f.error or 'server draining'}",
                       type="service_unavailable_error", code="service_unavailable",
                       headers={"Retry-After": "1"})

    async def collect(self, job: Job) -> tuple[list[str], dict[int, Finished]]:
        texts = [""] * len(job.requests)
        finished: dict[int, Finished] = {}
        streams = EventStreams(self.backend, job.requests, job.routing, job.healed)
        try:
            async for i, event in streams:
                if isinstance(event, TextDelta):
                    texts[i] += event.text
                    if event.text:
                        job.saw_text()
                elif isinstance(event, Finished):
                    finished[i] = event
                    self._finish_reason(event)
        finally:
            streams.close()
        if self.metrics is not None:
            self.metrics.finished(job, finished)
        return texts, finished

    async def start_stream(self, job: Job) -> tuple[EventStreams, tuple[int, Event] | None]:
        """Open the streams and wait for the first event, so overload is a status, not a chunk."""
        streams = EventStreams(self.backend, job.requests, job.routing, job.healed)
        try:
            first = await streams.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException:
            streams.close()
            raise
        return streams, first

    async def _events(self, streams: EventStreams, first) -> AsyncIterator[tuple[int, Event]]:
        if first is not None:
            yield first
        async for item in streams:
            yield item

    async def stream_chat(self, job: Job, req, streams: EventStreams, first
                          ) -> AsyncIterator[str]:
        def chunk(choices, usage=None):
            return sse(ChatCompletionChunk(id=job.id, model=self.info.id, choices=choices,
                                           usage=usage))

        finished: dict[int, Finished] = {}
        for i in range(len(job.requests)):
            yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
        try:
            async for i, event in self._events(streams, first):
                if isinstance(event, TextDelta) and event.text:
                    job.saw_text()
                    yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(content=event.text))])
                elif isinstance(event, CanvasUpdate):
                    yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(), diffusion=(
                        DiffusionState(canvas=event.text, step=event.step)))])
                elif isinstance(event, Finished):
                    finished[i] = event
                    yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(),
                                                 finish_reason=self._finish_reason(event))])
            if req.stream_options and req.stream_options.include_usage:
                yield chunk([], usage=self._usage(job, finished))
            if self.metrics is not None:
                self.metrics.finished(job, finished)
        except APIError as e:
            yield sse(e.envelope())
        except Exception as e:
            log.exception("stream %s failed", job.id)
            yield sse(APIError(500, f"internal error: {e}", type="server_error").envelope())
        yield SSE_DONE

    async def stream_completion(self, job: Job, req, streams: EventStreams, first
                                ) -> AsyncIterator[str]:
        def chunk(choices, usage=None):
            return sse(CompletionResponse(id=job.id, model=self.info.id, choices=choices,
                                          usage=usage))

        finished: dict[int, Finished] = {}
        try:
            async for i, event in self._events(streams, first):
                if isinstance(event, TextDelta) and event.text:
                    job.saw_text()
                    yield chunk([CompletionChoice(index=i, text=event.text)])
                elif isinstance(event, CanvasUpdate):
                    yield chunk([CompletionChoice(index=i, text="", diffusion=DiffusionState(
                        canvas=event.text, step=event.step))])
                elif isinstance(event, Finished):
                    finished[i] = event
                    yield chunk([CompletionChoice(index=i, text="",
                                                  finish_reason=self._finish_reason(event))])
            if req.stream_options and req.stream_options.include_usage:
                yield chunk([], usage=self._usage(job, finished))
            if self.metrics is not None:
                self.metrics.finished(job, finished)
        except APIError as e:
            yield sse(e.envelope())
        except Exception as e:
            log.exception("stream %s failed", job.id)
            yield sse(APIError(500, f"internal error: {e}", type="server_error").envelope())
        yield SSE_DONE

    # --- HTTP-level handlers ------------------------------------------------------------------
    async def respond(self, job: Job, req, kind: str, route: str = ""):
        """Run a job; JSON or SSE. `kind` is "chat" or "completion"."""
        job.route = route
        self.admit()
        self.router.record_choice(job.choice, job.quality)  # admitted: a 429 is not a choice
        self.inflight += 1
        block_causal = self.info.attention == "block_causal"
        ledger_key = self.router.admitted(sum(estimate_token_steps(
            len(r.prompt_ids) + len(r.suffix_ids or []), r.params.max_new_tokens,
            r.params.steps, r.params.block_length, block_causal, r.params.full_cache,
            len(r.suffix_ids or [])) for r in job.requests))
        released = False

        def release():
            nonlocal released
            if not released:
                released = True
                self.inflight -= 1
                self.router.done(ledger_key)

        try:
            if req.stream:
                streams, first = await self.start_stream(job)
                gen = (self.stream_chat if kind == "chat" else self.stream_completion)(
                    job, req, streams, first)
                return _SSEResponse(gen, streams, release, headers=self.headers(job))
            texts, finished = await self.collect(job)
        except BaseException:
            release()
            raise
        release()
        usage = self._usage(job, finished)
        if kind == "chat":
            body = ChatCompletionResponse(id=job.id, model=self.info.id, usage=usage, choices=[
                ChatChoice(index=i, message=ChatMessageOut(content=texts[i]),
                           finish_reason=self._finish_reason(finished[i]))
                for i in range(len(texts))])
        else:
            body = CompletionResponse(id=job.id, model=self.info.id, usage=usage, choices=[
                CompletionChoice(index=i, text=job.echo[i] + texts[i],
                                 finish_reason=self._finish_reason(finished[i]))
                for i in range(len(texts))])
        return JSONResponse(body.model_dump(exclude_none=True), headers=self.headers(job))

    def model_card(self) -> ModelCard:
        i = self.info
        return ModelCard(id=i.id, created=i.created, max_model_len=i.max_seq_len,
                         block_length=i.block_length, attention=i.attention,
                         default_denoising_steps=i.default_steps)

    def health(self) -> tuple[int, dict]:
        load = self.load_cache.latest
        body = {"status": "ok", "model": self.info.id, "load": load.to_dict(),
                "rung": self.router.rung, "steps": self.router.ladder.steps[self.router.rung],
                "inflight": self.inflight, "load_age_s": round(self.load_cache.age_s, 3)}
        # Unavailable: no model server reports load, or the board has been silent for 30 s
        # (a starved CPU can delay a refresh by seconds; that alone is not an outage).
        if load.replicas == 0 or self.load_cache.age_s > 30:
            body["status"] = "unavailable"
            return 503, body
        return 200, body


# --- the FastAPI app ---------------------------------------------------------------------------
def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON body: {first.get('ctx', {}).get('error', msg)}",
                        code="invalid_json")
    if first.get("type") == "missing" and not loc:
        return APIError(400, "the request body must be a JSON object", code="invalid_json")
    param = ".".join(loc) or None
    return APIError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")


def build_openai_app(service: OpenAIService) -> FastAPI:
    app = FastAPI(title="dllm-serve", docs_url=None, redoc_url=None)
    app.state.service = service

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            err = APIError(404, f"no route {request.method} {request.url.path}",
                           code="not_found")
        else:
            err = APIError(exc.status_code, str(exc.detail), code=None)
        return err.response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception):
        log.exception("internal error")
        return APIError(500, "internal server error", type="server_error").response()

    @app.get("/health")
    async def health():
        status, body = service.health()
        return JSONResponse(body, status_code=status)

    @app.get("/v1/models")
    async def list_models():
        return ModelList(data=[service.model_card()]).model_dump(exclude_none=True)

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        service.check_model(model_id)
        return service.model_card().model_dump(exclude_none=True)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        return await service.respond(service.chat_job(body), body, "chat",
                                     "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        return await service.respond(service.completion_job(body), body, "completion",
                                     "/v1/completions")

    @app.post("/v1/fim/completions")
    async def fim_completions(body: FIMCompletionRequest):
        return await service.respond(service.completion_job(body), body, "completion",
                                     "/v1/fim/completions")

    app.add_middleware(_AuthMiddleware, service=service)
    return app


class _AuthMiddleware:
    """Checks the API key on /v1/* before the body is read (so 401 wins over 400).

    Pure ASGI rather than BaseHTTPMiddleware, which would buffer streams and swallow the
    cancellation that tells us a client disconnected."""

    def __init__(self, app, service: OpenAIService):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            headers = dict(scope.get("headers") or [])
            auth = headers.get(b"authorization", b"").decode("latin-1") or None
            try:
                self.service.check_auth(auth)
            except APIError as e:
                await e.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


# --- the Serve ingress ----------------------------------------------------------------------------
class IngressMetrics:
    """Serve metrics of the API layer (the router's own are in deployments/router.py)."""

    def __init__(self):
        from ray.serve import metrics

        self._rejected = metrics.Counter("dllm_requests_rejected_total",
                                         description="Requests refused for load (429/503).",
                                         tag_keys=("status",))
        self._ignored = metrics.Counter("dllm_ignored_request_fields_total",
                                        description="Unknown request fields accepted and ignored.")
        self._steps = metrics.Histogram(
            "dllm_request_denoising_steps", description="Forward passes spent per request.",
            boundaries=[4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096])
        seconds = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120]
        self._ttft = metrics.Histogram(
            "dllm_time_to_first_token_seconds",
            description="Time from request to first streamed token.", boundaries=seconds,
            tag_keys=("route",))
        self._latency = metrics.Histogram(
            "dllm_request_latency_seconds", description="End-to-end request latency at the API.",
            boundaries=seconds, tag_keys=("route",))

    def rejected(self, status: int) -> None:
        self._rejected.inc(tags={"status": str(status)})

    def ignored_fields(self, n: int) -> None:
        self._ignored.inc(n)

    def finished(self, job: Job, finished: dict[int, Finished]) -> None:
        for f in finished.values():
            self._steps.observe(f.steps)
        tags = {"route": job.route}
        if job.first_token_at is not None:
            self._ttft.observe(job.first_token_at - job.started, tags=tags)
        self._latency.observe(time.perf_counter() - job.started, tags=tags)


@dataclass
class IngressConfig:
    ladder: dict  # deployments.router.Ladder fields
    settings: dict  # ServiceSettings fields (api_keys resolved in the replica, below)
    api_keys_env: str | None = "DLLM_API_KEYS"
    api_keys_file: str | None = None
    retry_after_s: float = 1.0


@serve.deployment(name="OpenAIIngress", max_ongoing_requests=1024,
                  ray_actor_options={"num_cpus": 0})
@serve.ingress()
class OpenAIIngress:
    """The FastAPI app of this module over a RayBackend (ModelServer + LoadBoard handles)."""

    async def __init__(self, server, board, config: IngressConfig | dict):
        from deployments.router import Ladder, RouterMetrics
        from deployments.server import RayBackend

        config = config if isinstance(config, IngressConfig) else IngressConfig(**config)
        info, tokenizer = await server.describe.remote()
        ladder = Ladder(**config.ladder)
        settings = ServiceSettings(**config.settings, api_keys=load_api_keys(
            config.api_keys_env, config.api_keys_file))
        if not settings.api_keys:
            log.warning("no API keys configured: the API is open")
        backend = RayBackend(server, board, config.retry_after_s)
        self.service = OpenAIService(info, tokenizer, backend,
                                     StepRouter(ladder, metrics=RouterMetrics(ladder)),
                                     settings, metrics=IngressMetrics())
        await self.service.start()

    def __serve_build_asgi_app__(self):
        return build_openai_app(self.service)

    async def __del__(self):
        await self.service.stop()
