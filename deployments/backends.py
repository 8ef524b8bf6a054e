"""Where the ingress sends engine requests: an engine in this process, or the model-server replicas.

    backend = LocalBackend(engine)                    # tests, in-process comparisons
    backend = RayBackend(server_handle, board_handle) # under Serve (deployments/ingress.py)
    async for event in backend.generate(request, routing): ...
    load = await backend.load()                       # ClusterLoad for the step router

Both surface refusals the same way: APIError(400) for parameters the engine cannot run,
503 + Retry-After when the engine queue is full or the replica is draining, raised before the
first event so the ingress can still answer with a status instead of a broken stream; and both
start every stream with one Admitted event once the engine has queued the request.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator

from autoscaling.load import ClusterLoad, ReplicaLoad, cluster_load
from deployments.errors import (
    DEFAULT_RETRY_AFTER_S,
    APIError,
    InvalidRequest,
    ServerDraining,
    ServerOverloaded,
    overloaded,
    refusal_status,
    replica_refusal,
)
from engine.types import Admitted, CanvasUpdate, EngineBase, Event, GenerationRequest, TextDelta

log = logging.getLogger("ray.serve")


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

    async def load_adapter(self, name: str, path: str) -> None:
        """Read a LoRA adapter on a model server (the others read it on first use: the
        request's routing carries its path). Refusals as APIError 400."""
        raise APIError(400, "this backend cannot load adapters")

    async def unload_adapter(self, name: str) -> None:  # noqa: B027 - optional
        """Forget an adapter where it is held (best effort: replicas not reached keep it
        until their LRU drops it; the ingress no longer routes its name)."""


class LocalBackend(Backend):
    """An engine in this process."""

    def __init__(self, engine: EngineBase, replica_id: str = "local",
                 retry_after_s: float = DEFAULT_RETRY_AFTER_S):
        self.engine = engine
        self.replica_id = replica_id
        self.retry_after_s = retry_after_s

    def generate(self, request: GenerationRequest, routing: dict | None = None
                 ) -> AsyncIterator[Event]:
        return self._stream(request)

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[Event]:
        try:
            stream = self.engine.submit(request)
        except (ValueError, RuntimeError) as e:  # bad parameters, queue full, shutting down
            raise refusal_status(replica_refusal(e), self.retry_after_s) from None
        try:
            yield Admitted(request.request_id)
            async for event in stream:
                yield event
        finally:
            await stream.aclose()

    async def load(self) -> ClusterLoad:
        return cluster_load([ReplicaLoad.from_stats(self.replica_id, self.engine.stats())])

    async def load_adapter(self, name: str, path: str) -> None:
        try:
            await self.engine.load_adapter_async(name, path)
        except (ValueError, OSError) as e:
            raise APIError(400, f"adapter {name!r}: {e}", param="lora_path") from None

    async def unload_adapter(self, name: str) -> None:
        self.engine.remove_adapter(name)


def _own_internal_request_id() -> None:
    """Give the handle call about to be made its own Serve internal request id.

    Serve 2.60 stamps every handle call made while serving an HTTP request with that request's
    internal_request_id, and its request router indexes pending requests by that id: the n engine
    requests of one `n > 1` call shadowed each other and were dispatched one per routing backoff
    (seen here: one every ~10 s). Runs inside the stream's own task, so the HTTP request's
    context is untouched; the user-facing request_id (logs) stays the same."""
    try:
        from ray.serve import context as serve_context

        current = serve_context._get_serve_request_context()
        serve_context._serve_request_context.set(
            dataclasses.replace(current, _internal_request_id=uuid.uuid4().hex))
    except Exception as e:  # private API: if it moves, fall back to Serve's behaviour
        log.debug("could not set a fresh internal request id: %s", e)


class RayBackend(Backend):
    """DeploymentHandles to the ModelServer replicas and the LoadBoard."""

    def __init__(self, server_handle, board_handle, retry_after_s: float = DEFAULT_RETRY_AFTER_S,
                 replica_retries: int = 2, retry_backoff_s: float = 0.25):
        self.server = server_handle.options(stream=True)
        self.unary = server_handle  # adapter loads: one call, one answer
        self.board = board_handle
        self.retry_after_s = retry_after_s
        self.replica_retries = replica_retries  # resends of a request whose replica died early
        self.retry_backoff_s = retry_backoff_s

    def generate(self, request: GenerationRequest, routing: dict | None = None
                 ) -> AsyncIterator[Event]:
        return self._stream(request, routing)

    async def _stream(self, request: GenerationRequest, routing: dict | None):
        """Events of one engine request. A replica that dies (killed, its node lost, a
        tensor-parallel rank gone) costs the client nothing: the request is sent again, to a
        live replica, and the text the client already has is skipped. That is exact because
        an answer is a function of the request (prompt, parameters, seed: the sampler's noise is
        keyed by seed, position and step), so the new replica's text starts with what was
        streamed; if it does not, or the replicas keep dying, the stream ends with a 503."""
        from ray.exceptions import ActorUnavailableError, RayActorError

        admitted = False  # one Admitted reaches the caller, however many replicas were tried
        sent = ""  # text delivered so far
        for attempt in range(self.replica_retries + 1):
            replay = sent  # what the new replica must produce again before anything new
            try:
                async for event in self._one_stream(request, routing):
                    if isinstance(event, Admitted):
                        if not admitted:
                            admitted = True
                            yield event
                        continue
                    if replay:
                        event, replay = self._catch_up(event, replay)
                        if event is None:
                            continue
                    if isinstance(event, TextDelta):
                        sent += event.text
                    yield event
                return
            except (RayActorError, ActorUnavailableError) as e:
                if attempt == self.replica_retries:
                    log.warning("request %s: model server lost (%s)", request.request_id, e)
                    raise overloaded(503, "the model server serving this request failed; retry",
                                     self.retry_after_s) from None
                log.info("request %s: model server lost after %d characters, resending",
                         request.request_id, len(sent))
                await asyncio.sleep(self.retry_backoff_s * (attempt + 1))  # let routing drop it

    def _catch_up(self, event: Event, replay: str) -> tuple[Event | None, str]:
        """A resent request's event while it re-generates text the client already has: None
        for what to skip, else the event with only the new part; and the replay left."""
        if isinstance(event, CanvasUpdate):
            return None, replay  # canvases of steps the client has seen the result of
        if isinstance(event, TextDelta):
            n = min(len(replay), len(event.text))
            if event.text[:n] == replay[:n]:
                rest = event.text[n:]
                return (dataclasses.replace(event, text=rest) if rest else None), replay[n:]
        raise overloaded(503, "the model server that took over this request answered "
                         "differently; retry", self.retry_after_s)

    async def _one_stream(self, request: GenerationRequest, routing: dict | None):
        from ray.serve.exceptions import BackPressureError

        _own_internal_request_id()
        gen = self.server.generate.remote(request, routing)
        try:
            async for event in gen:
                yield event
        except BackPressureError:
            raise overloaded(503, "the model servers' queues are full; retry later",
                             self.retry_after_s) from None
        except (ServerOverloaded, ServerDraining, InvalidRequest) as e:
            raise refusal_status(e, self.retry_after_s) from None
        finally:
            # No-op once finished; on disconnect it cancels the replica's stream. cancel()
            # re-raises a request's routing error (BackPressureError), which would replace the
            # 503 APIError above with Serve's plain-text 503 without Retry-After.
            try:
                gen.cancel()
            except Exception:  # noqa: BLE001 - already reported above
                pass

    async def load(self) -> ClusterLoad:
        return ClusterLoad.from_dict(await self.board.snapshot.remote())

    async def load_adapter(self, name: str, path: str) -> None:
        try:
            await self.unary.load_adapter.remote(name, path)
        except Exception as e:  # the replica's InvalidRequest arrives wrapped by Ray
            raise APIError(400, f"adapter {name!r}: {_cause(e)}", param="lora_path") from None

    async def unload_adapter(self, name: str) -> None:
        try:
            await self.unary.unload_adapter.remote(name)
        except Exception as e:  # noqa: BLE001 - best effort (see Backend.unload_adapter)
            log.warning("unloading adapter %s: %s", name, e)


def _cause(e: BaseException) -> str:
    """The innermost message of a Ray-wrapped replica exception."""
    while getattr(e, "cause", None) is not None or e.__cause__ is not None:
        e = getattr(e, "cause", None) or e.__cause__
    return str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
