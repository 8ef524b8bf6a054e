"""The OpenAI API's logic, without HTTP: checks, admission, step choice, engine events -> bodies.

    service = OpenAIService(info, tokenizer, LocalBackend(engine), args)   # args: AppArgs
    await service.start()                     # first load snapshot, then refreshed in background
    response = await service.respond(req, "chat", "/v1/chat/completions")

The request path: the model and the load are checked (429 past this ingress' in-flight cap or
the cluster's `max_drain_s`), the step router picks the steps per block from the cached cluster
load (deployments/step_router.py), the request becomes one GenerationRequest per choice
(deployments/jobs.py), and their events become one OpenAI response or SSE chunks ending with
`data: [DONE]`. Chat and completion streams are one generator with two chunk builders.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from starlette.responses import JSONResponse

from autoscaling.load import LoadSnapshotCache
from deployments.backends import Backend
from deployments.config import AppArgs
from deployments.errors import APIError, internal_error, overloaded, retry_after
from deployments.jobs import Job, JobBuilder
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
    CompletionResponse,
    DiffusionState,
    GenerationRequestBase,
    ModelCard,
    Usage,
    sse,
)
from deployments.slo import SloRouter, make_router
from deployments.step_router import StepChoice, StepRouter
from deployments.streams import EventStreams, SSEResponse
from engine.types import Admitted, CanvasUpdate, Event, Finished, ModelInfo, TextDelta

log = logging.getLogger(__name__)

class OpenAIService:
    def __init__(self, info: ModelInfo, tokenizer, backend: Backend, args: AppArgs,
                 api_keys: frozenset[str] = frozenset(), router: StepRouter | None = None,
                 metrics=None):
        self.info = info
        self.tokenizer = tokenizer
        self.backend = backend
        self.args = args
        self.limits = args.limits
        self.api_keys = api_keys
        self._key_bytes = [k.encode("utf-8") for k in sorted(api_keys)]
        self.router = router or make_router(args, info)
        self.metrics = metrics
        self.jobs = JobBuilder(info, tokenizer, args)
        # Tokenizing (the Rust tokenizers release the GIL) and text checks run here, off the
        # event loop: a 6 MB prompt used to hold every other request for 8-13 s.
        self.workers = ThreadPoolExecutor(args.limits.tokenizer_threads,
                                          thread_name_prefix="dllm-tokenize")
        self.load_cache = LoadSnapshotCache(backend.load, args.ladder.refresh_s,
                                            on_update=self.router.observe)
        self.inflight = 0
        # LoRA adapters by name -> directory: serve_config's model.lora_modules, plus those
        # loaded at run time (per ingress replica; each model server reads one on first use)
        self.adapters: dict[str, str] = dict(args.model.lora_modules)
        self.lora_root = Path(args.lora.root).resolve() if args.lora.root else None

    async def start(self) -> None:
        await self.load_cache.refresh()
        self.load_cache.start()

    async def stop(self) -> None:
        await self.load_cache.stop()
        self.workers.shutdown(wait=False, cancel_futures=True)

    # --- checks ---------------------------------------------------------------------------
    def check_auth(self, authorization: bytes | str | None) -> None:
        """`Authorization: Bearer <key>`, compared in constant time on bytes: a header is bytes
        on the wire and may hold any of them (comparing str raises on non-ASCII)."""
        if not self.api_keys:
            return
        if isinstance(authorization, str):
            authorization = authorization.encode("utf-8", "surrogateescape")
        scheme, _, token = (authorization or b"").partition(b" ")
        token = token.strip()
        # every key is compared, so the time taken does not say which one came close
        matches = [hmac.compare_digest(token, k) for k in self._key_bytes]
        if scheme.lower() != b"bearer" or not any(matches):
            raise APIError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                           type="authentication_error", code="invalid_api_key")

    def check_model(self, model: str) -> str | None:
        """-> None for the base model, the adapter's name for a LoRA adapter; 404 else."""
        if model == self.info.id:
            return None
        if model in self.adapters:
            return model
        served = [self.info.id, *sorted(self.adapters)]
        raise APIError(404, f"the model {model!r} does not exist; this server serves "
                       + ", ".join(repr(m) for m in served[:20]), param="model",
                       code="model_not_found")

    def _routing(self, job: Job) -> dict:
        """What travels with each request to the replicas: the step choice's quality note,
        and for an adapter its directory (a replica that does not hold it reads it)."""
        note = dict(job.quality_note)
        adapter = job.requests[0].adapter if job.requests else None
        if adapter is not None:
            note["adapter_path"] = self.adapters[adapter]
        return note

    # --- LoRA adapters at run time (vLLM's /v1/load_lora_adapter, /v1/unload_lora_adapter) -
    def _check_dynamic(self, authorization) -> None:
        if not self.args.lora.dynamic_loading:
            raise APIError(404, "loading adapters at run time is off (lora.dynamic_loading)",
                           code="not_found")
        if not self.api_keys:  # never open to anyone: it makes the server read directories
            raise APIError(403, "loading adapters needs API keys configured (auth)",
                           type="permission_error", code="api_keys_required")
        self.check_auth(authorization)

    def adapter_dir(self, lora_path: str) -> str:
        """The directory lora_path names, if it is under lora.root (relative paths are
        taken under it); 400 otherwise, decided on the path alone (resolving symbolic links)
        before anything in it is read."""
        root = self.lora_root
        p = Path(lora_path)
        if "\x00" in lora_path:
            raise APIError(400, "lora_path holds a NUL byte", param="lora_path")
        target = (p if p.is_absolute() else root / p).resolve()
        if not target.is_relative_to(root):
            raise APIError(400, f"lora_path {lora_path!r} is outside the adapter root "
                           f"(lora.root)", param="lora_path", code="path_outside_root")
        return str(target)

    async def load_adapter(self, name: str, lora_path: str, authorization) -> dict:
        self._check_dynamic(authorization)
        path = self.adapter_dir(lora_path)
        if name == self.info.id:
            raise APIError(400, f"{name!r} is the base model's id", param="lora_name")
        if name in self.adapters:
            raise APIError(400, f"an adapter named {name!r} is already loaded; unload it "
                           "first", param="lora_name", code="adapter_exists")
        await self.backend.load_adapter(name, path)  # read and checked on one replica
        self.adapters[name] = path
        return {"object": "lora_adapter", "id": name, "parent": self.info.id, "loaded": True}

    async def unload_adapter(self, name: str, authorization) -> dict:
        self._check_dynamic(authorization)
        if self.adapters.pop(name, None) is None:
            raise APIError(404, f"no adapter named {name!r} is loaded", param="lora_name",
                           code="model_not_found")
        await self.backend.unload_adapter(name)
        return {"object": "lora_adapter", "id": name, "loaded": False}

    def admit(self, job: Job) -> None:
        """Refuse what cannot run: never (400, the limit named) or not now (429)."""
        limits, engine = self.limits, self.args.engine
        held = engine.max_num_seqs + (engine.max_queued if engine.max_queued is not None
                                      else math.inf)
        if len(job.requests) > held:
            raise APIError(400, f"this request has {len(job.requests)} choices (prompts x n); a "
                           f"model server holds at most {held} at once (engine.max_num_seqs "
                           f"{engine.max_num_seqs} + engine.max_queued {engine.max_queued})",
                           param="n", code="too_many_choices")
        if self.inflight >= limits.max_inflight:
            self._rejected(429)
            raise overloaded(429, f"too many requests in flight ({self.inflight}); retry later",
                             self.retry_after_s())
        load = self.load_cache.latest
        if limits.max_drain_s is not None and load.drain_s > limits.max_drain_s:
            self._rejected(429)
            raise overloaded(429, f"the cluster is overloaded ({load.drain_s:.1f}s of queued "
                             "work); retry later", min(load.drain_s - limits.max_drain_s + 1, 60))

    def retry_after_s(self) -> float:
        """When a refused request may fit: the cluster's measured drain time (the snapshot plus
        the work admitted since), at least 1 s and at most a minute; the configured
        limits.retry_after_s while nothing is measured."""
        drain = self.router.effective_drain_s()
        if math.isfinite(drain) and drain > 0:
            return min(max(drain, 1.0), 60.0)
        return float(self.limits.retry_after_s)

    def _rejected(self, status: int) -> None:
        if self.metrics is not None:
            self.metrics.rejected(status)

    # --- a request ---------------------------------------------------------------------------
    async def make_job(self, req: GenerationRequestBase, kind: str) -> Job:
        """The step choice here, on the event loop (the router's state lives there); text
        checks and tokenizing in the worker pool, so a long prompt stalls no other request."""
        adapter = self.check_model(req.model)
        if req.ignored_fields() and self.metrics is not None:
            self.metrics.ignored_fields(len(req.ignored_fields()))
        if kind == "chat":
            assert isinstance(req, ChatCompletionRequest)
            build = self.jobs.chat
        else:
            build = self.jobs.completion
        # tokenized first with the best rung's steps, so the controller sees the request's real
        # shape (prompt and answer lengths); then the setting it picks is applied
        provisional = StepChoice(steps=req.denoising_steps or self.router.ladder.steps[0],
                                 rung=None, reason="pinned")
        job = await asyncio.get_running_loop().run_in_executor(self.workers, build, req,
                                                               provisional)
        budget_s = req.latency_budget_ms / 1000.0 if req.latency_budget_ms else None
        if isinstance(self.router, SloRouter):
            choice = self.router.choose(req.denoising_steps, req.quality, record=False,
                                        shape=job.shape(self.info), budget_s=budget_s)
        else:
            choice = self.router.choose(req.denoising_steps, req.quality, record=False)
        try:
            job.apply_choice(choice)
        except ValueError as e:  # a rung's setting the request's own parameters refuse
            raise APIError(400, str(e)) from None
        for r in job.requests:  # every choice through the adapter the request named
            r.adapter = adapter
            r.latency_budget_s = budget_s  # the engines admit it first (priority slots)
        return job

    async def respond(self, req: GenerationRequestBase, kind: str, route: str = ""):
        """Run a request; JSON or SSE. `kind` is "chat" or "completion"."""
        try:
            return await self._respond(req, kind, route)
        except APIError as e:
            if e.status == 503 and "Retry-After" in e.headers:  # the servers' queues are full
                e.headers.update(retry_after(self.retry_after_s()))
            raise

    async def _respond(self, req: GenerationRequestBase, kind: str, route: str):
        job = await self.make_job(req, kind)
        job.route = route
        self.admit(job)
        self.router.record_choice(job.choice, job.quality)  # admitted: a 429 is not a choice
        self.inflight += 1
        if isinstance(self.router, SloRouter):
            ledger_key = self.router.admitted(job.token_steps(self.info), len(job.requests),
                                              job.shape(self.info))
        else:
            ledger_key = self.router.admitted(job.token_steps(self.info))
        released = False

        def release():
            nonlocal released
            if not released:
                released = True
                self.inflight -= 1
                self.router.done(ledger_key)

        try:
            if req.stream:
                streams, early = await self.start_stream(job)
                gen = self.stream(job, req.include_usage, streams, early, chat=kind == "chat")
                return SSEResponse(gen, streams, release, headers=self.headers(job))
            texts, finished = await self.collect(job)
        except BaseException:
            release()
            raise
        release()
        body = self._body(job, kind, texts, finished)
        return JSONResponse(body.model_dump(exclude_none=True), headers=self.headers(job))

    def _body(self, job: Job, kind: str, texts: list[str], finished: dict[int, Finished]):
        usage = self._usage(job, finished)
        if kind == "chat":
            return ChatCompletionResponse(id=job.id, model=_model_name(job, self.info.id), usage=usage, choices=[
                ChatChoice(index=i, message=ChatMessageOut(content=texts[i]),
                           finish_reason=self._finish_reason(finished[i]))
                for i in range(len(texts))])
        return CompletionResponse(id=job.id, model=_model_name(job, self.info.id), usage=usage, choices=[
            CompletionChoice(index=i, text=job.echo[i] + texts[i],
                             finish_reason=self._finish_reason(finished[i]))
            for i in range(len(texts))])

    # --- running a job ----------------------------------------------------------------------
    def _usage(self, job: Job, finished: dict[int, Finished]) -> Usage:
        completion = sum(f.completion_tokens for f in finished.values())
        c = job.choice
        return Usage(prompt_tokens=job.prompt_tokens, completion_tokens=completion,
                     total_tokens=job.prompt_tokens + completion,
                     denoising_steps=sum(f.steps for f in finished.values()),
                     denoising_steps_per_block=job.steps_per_block,
                     denoising_setting=_setting(job),
                     denoising_confidence_threshold=job.requests[0].params.confidence_threshold
                     if job.requests else None,
                     predicted_latency_ms=_ms(c.predicted_latency_s),
                     latency_target_ms=_ms(c.target_s))

    def headers(self, job: Job) -> dict[str, str]:
        # (no x-request-id of ours: Serve's proxy sets one; the body carries the completion id)
        out = {"x-denoising-steps": str(job.steps_per_block), "x-denoising-setting": _setting(job)}
        if (ms := _ms(job.choice.predicted_latency_s)) is not None:
            out["x-predicted-latency-ms"] = f"{ms:.0f}"
        return out

    def _observe_finished(self, job: Job, finished: dict[int, Finished]) -> None:
        """Tell the step controller what the request really took (its calibration)."""
        if not isinstance(self.router, SloRouter) or not finished:
            return
        used = max(f.steps for f in finished.values())
        self.router.finished(job.choice, job.scheduled_passes(), used,
                             time.perf_counter() - job.started)

    def _finish_reason(self, f: Finished) -> str:
        """The OpenAI finish reason; a cancelled or failed generation is a 503."""
        if f.finish_reason in ("stop", "length"):
            return f.finish_reason
        raise overloaded(503, f"generation {f.finish_reason}: {f.error or 'server draining'}",
                         self.limits.retry_after_s)

    async def collect(self, job: Job) -> tuple[list[str], dict[int, Finished]]:
        texts = [""] * len(job.requests)
        finished: dict[int, Finished] = {}
        streams = EventStreams(self.backend, job.requests, self._routing(job), job.healed)
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
        self._observe_finished(job, finished)
        if self.metrics is not None:
            self.metrics.finished(job, finished)
        return texts, finished

    async def start_stream(self, job: Job) -> tuple[EventStreams, list[tuple[int, Event]]]:
        """Open the streams and wait until every choice is admitted (or one is refused, which
        cancels the others), so a refusal is a status, never a 200 and then an error chunk.
        -> the streams and the events that arrived meanwhile."""
        streams = EventStreams(self.backend, job.requests, self._routing(job), job.healed)
        early: list[tuple[int, Event]] = []
        waiting = set(range(len(job.requests)))
        try:
            while waiting:
                i, event = await streams.__anext__()
                waiting.discard(i)  # an engine event also means the choice was admitted
                if not isinstance(event, Admitted):
                    early.append((i, event))
        except StopAsyncIteration:
            pass
        except BaseException:
            streams.close()
            raise
        return streams, early

    # --- streaming ----------------------------------------------------------------------------
    def _chat_chunk(self, job: Job, choices: list, usage: Usage | None = None) -> str:
        return sse(ChatCompletionChunk(id=job.id, model=_model_name(job, self.info.id), choices=choices,
                                       usage=usage))

    def _completion_chunk(self, job: Job, choices: list, usage: Usage | None = None) -> str:
        return sse(CompletionResponse(id=job.id, model=_model_name(job, self.info.id), choices=choices,
                                      usage=usage))

    @staticmethod
    def _choice(chat: bool, i: int, text: str = "", canvas: CanvasUpdate | None = None,
                finish_reason: str | None = None):
        diffusion = DiffusionState(canvas=canvas.text, step=canvas.step) if canvas else None
        if chat:
            return ChatChunkChoice(index=i, delta=ChatDelta(content=text or None),
                                   diffusion=diffusion, finish_reason=finish_reason)
        return CompletionChoice(index=i, text=text, diffusion=diffusion,
                                finish_reason=finish_reason)

    async def stream(self, job: Job, include_usage: bool, streams: EventStreams,
                     early: list[tuple[int, Event]], chat: bool) -> AsyncIterator[str]:
        """SSE chunks of a job: text as blocks are committed, canvases in diffusing mode, a
        finish reason per choice, usage last if asked for, then [DONE]. An error after the
        first chunk is an error event (the status was already sent)."""
        chunk = self._chat_chunk if chat else self._completion_chunk
        finished: dict[int, Finished] = {}
        if chat:  # chat streams open every choice with the assistant role
            for i in range(len(job.requests)):
                yield chunk(job, [ChatChunkChoice(index=i, delta=ChatDelta(role="assistant",
                                                                           content=""))], None)
        try:
            async for i, event in _chain(early, streams):
                if isinstance(event, TextDelta) and event.text:
                    job.saw_text()
                    yield chunk(job, [self._choice(chat, i, event.text)], None)
                elif isinstance(event, CanvasUpdate):
                    yield chunk(job, [self._choice(chat, i, canvas=event)], None)
                elif isinstance(event, Finished):
                    finished[i] = event
                    reason = self._finish_reason(event)
                    yield chunk(job, [self._choice(chat, i, finish_reason=reason)], None)
            if include_usage:
                yield chunk(job, [], self._usage(job, finished))
            self._observe_finished(job, finished)
            if self.metrics is not None:
                self.metrics.finished(job, finished)
        except APIError as e:
            yield sse(e.envelope())
        except Exception as e:
            log.exception("stream %s failed", job.id)
            yield sse(internal_error(f"internal error: {e}").envelope())
        yield SSE_DONE

    # --- model and health ---------------------------------------------------------------------
    def model_card(self, model_id: str | None = None) -> ModelCard:
        """The base model's card, or an adapter's (with its `parent`, as vLLM lists them)."""
        i = self.info
        card = ModelCard(id=i.id, created=i.created, max_model_len=i.max_seq_len,
                         block_length=i.block_length, attention=i.attention,
                         default_denoising_steps=i.default_steps,
                         classifier_free_guidance=i.classifier_free_guidance,
                         diffusion_process=i.process)
        if model_id is None or model_id == i.id:
            return card
        return card.model_copy(update={"id": model_id, "parent": i.id,
                                       "root": self.adapters[model_id]})

    def model_cards(self) -> list[ModelCard]:
        return [self.model_card()] + [self.model_card(n) for n in sorted(self.adapters)]

    def health(self) -> tuple[int, dict]:
        load = self.load_cache.latest
        body = {"status": "ok", "model": self.info.id, "load": load.to_dict(),
                "rung": self.router.rung, "steps": self.router.ladder.steps[self.router.rung],
                "inflight": self.inflight, "load_age_s": round(self.load_cache.age_s, 3)}
        if isinstance(self.router, SloRouter):  # the setting, target and predictions per rung
            body["slo"] = self.router.describe()
        # Unavailable: no model server reports load, or the board has been silent for 30 s
        # (a starved CPU can delay a refresh by seconds; that alone is not an outage).
        if load.replicas == 0 or self.load_cache.age_s > 30:
            body["status"] = "unavailable"
            return 503, body
        return 200, body


async def _chain(early: list[tuple[int, Event]], streams: EventStreams
                 ) -> AsyncIterator[tuple[int, Event]]:
    for item in early:
        yield item
    async for item in streams:
        yield item


def _ms(seconds: float | None) -> float | None:
    if seconds is None or not math.isfinite(seconds):
        return None
    return round(seconds * 1000.0, 1)


def _setting(job: Job) -> str:
    """The setting a job runs at, as StepChoice.setting spells it."""
    thr = job.requests[0].params.confidence_threshold if job.requests else None
    return str(job.steps_per_block) if thr is None else f"{job.steps_per_block}@{thr:g}"


def _model_name(job: Job, base: str) -> str:
    """The `model` an answer names: the adapter the request asked for, else the base model."""
    adapter = job.requests[0].adapter if job.requests else None
    return adapter or base
