"""The model-server deployment: one replica = one model + one continuous-batching engine.

    server = ModelServer.options(ray_actor_options={"num_gpus": 1}).bind(server_config, board)
    # the ingress calls it through a DeploymentHandle (RayBackend below):
    async for event in handle.options(stream=True).generate.remote(request, routing): ...

A replica loads the model named in its ServerConfig (a preset such as "tiny-coder" or a
checkpoint directory, in the project's own or a published format; dtype and device from the
config, the GPU from `num_gpus` in the deployment options), starts the engine (engine.Engine, or
engine.mock.MockEngine for HTTP tests) and then:
- streams each request's events back to the caller; when the caller goes away (client
  disconnect -> Serve cancels this generator), the engine request is cancelled and its slot
  frees at the next step;
- pushes its load (ReplicaLoad) to the LoadBoard ~4 times a second for the step router, and
  publishes the same numbers through `record_routing_stats` (for deployments/routing.py),
  `record_autoscaling_stats` (for autoscaling/policy.py) and Serve metrics (dllm_engine_*);
- `check_health` fails when the engine loop has died, so Serve replaces the replica;
- with `tensor_parallel_size` N > 1 the replica is rank 0 of a tensor-parallel group: Serve gives
  it a placement group of N bundles (deployments/app.py), it starts one rank actor in each other
  bundle and drives all of them from its engine (deployments/tensor_parallel.py); a rank that
  dies breaks the group, new requests get 503 and the health check fails;
- on shutdown Serve first lets ongoing requests finish (graceful_shutdown_timeout_s), then
  `__del__` drains the engine for `drain_timeout_s` and leaves the load board.
Engine refusals travel as exceptions the ingress turns into statuses: ServerOverloaded (the
engine queue is full: 503 + Retry-After), ServerDraining (503), InvalidRequest (400).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from ray import serve

from autoscaling.load import ClusterLoad, PeakRate, ReplicaLoad
from deployments.openai_api import APIError, Backend, ModelInfo, overloaded
from engine.types import EngineBase, Event, Finished, GenerationRequest

log = logging.getLogger("ray.serve")


class ServerOverloaded(RuntimeError):
    """The replica's engine queue is full."""


class ServerDraining(RuntimeError):
    """The replica is shutting down."""


class InvalidRequest(ValueError):
    """The engine refused the request's parameters."""


@dataclass
class ServerConfig:
    model: str = "tiny-coder"  # preset name or checkpoint directory
    model_id: str | None = None  # the name clients use; default: the config's name
    dtype: str = "float32"
    device: str = "auto"  # "auto": cuda when the replica has a GPU, else cpu
    engine: str = "real"  # "real" | "mock"
    engine_options: dict = field(default_factory=dict)  # engine.EngineConfig fields
    mock_options: dict = field(default_factory=dict)  # engine.mock.MockEngineConfig fields
    torch_threads: int | None = None  # CPU replicas: intra-op threads (None: torch default)
    tensor_parallel_size: int = 1  # > 1: ranks in the replica's placement group (tensor_parallel.py)
    tensor_parallel_transport: str = "collective"  # how specs reach ranks: "collective" | "ray"
    tensor_parallel_timeout_s: float = 120.0  # a collective waiting longer fails (dead rank)
    drain_timeout_s: float = 30.0
    report_period_s: float = 0.25  # load pushes to the board (the router needs >= 1/s)
    quality_window_s: float = 30.0  # window of below_best_fraction (autoscaling)


# --- loading ---------------------------------------------------------------------------------
def _torch_dtype(name: str):
    import torch

    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {name!r}") from None


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(source: str, device: str = "auto", dtype: str = "float32"):
    """-> (net, tokenizer, cfg) through model.load_pretrained (every format, ours included)."""
    from model.loaders import load_pretrained

    return load_pretrained(source, device=_device(device), dtype=_torch_dtype(dtype))


def load_config_and_tokenizer(source: str):
    """-> (cfg, tokenizer) without weights (the mock engine): our own format only."""
    from model.config import ModelConfig
    from model.tokenizer import Tokenizer

    path = Path(source)
    if not path.is_dir() and source == "tiny-coder":
        from model.checkpoint import EMBEDDED_DIR

        path = EMBEDDED_DIR
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"the mock engine needs a directory with config.json and "
                                f"tokenizer.json, got {source!r}")
    return ModelConfig.load(path), Tokenizer.load(path)


def describe(cfg, model_id: str | None) -> ModelInfo:
    from model.families import family_defaults

    fam = family_defaults(cfg)
    block_length, steps = fam.block_length, fam.steps_per_block or cfg.block_length
    extra = dict(family=fam.family, remasking=fam.remasking, temperature=fam.temperature,
                 top_p=fam.top_p, suppress_token_ids=tuple(fam.suppress_token_ids),
                 defer_token_ids=tuple(fam.defer_token_ids))
    return ModelInfo(id=model_id or cfg.name, max_seq_len=cfg.max_seq_len,
                            block_length=block_length, attention=cfg.attention,
                            default_steps=steps, vocab_size=cfg.vocab_size, **extra)


async def build_engine_async(config: ServerConfig):
    """-> (engine, tokenizer, cfg, tensor-parallel group or None) inside a replica: with
    tensor_parallel_size > 1 the engine drives rank 0 of a group of rank actors."""
    if config.tensor_parallel_size <= 1 or config.engine == "mock":
        return (*build_engine(config), None)
    from deployments.tensor_parallel import TensorParallelGroup

    group = await TensorParallelGroup.start(config)
    # the engine sizes its KV pool from the rank's config (its share of the heads)
    engine, tokenizer, _ = build_engine(config, (group.leader, group.tokenizer, group.leader.cfg))
    return engine, tokenizer, group.cfg, group


def build_engine(config: ServerConfig, loaded: tuple | None = None
                 ) -> tuple[EngineBase, object, object]:
    """-> (engine, tokenizer, cfg) for a ServerConfig; `loaded`: (net, tokenizer, cfg) already
    built (a tensor-parallel leader), else the model is loaded here."""
    if config.engine == "mock":
        from engine.mock import MockEngine, MockEngineConfig

        cfg, tokenizer = load_config_and_tokenizer(config.model)
        return MockEngine(MockEngineConfig(**config.mock_options)), tokenizer, cfg
    if config.engine != "real":
        raise ValueError(f"engine must be 'real' or 'mock', got {config.engine!r}")
    if config.torch_threads:
        import torch

        torch.set_num_threads(config.torch_threads)
    from engine import Engine, EngineConfig

    net, tokenizer, cfg = loaded or load_model(config.model, config.device, config.dtype)
    return Engine(net, tokenizer, cfg, EngineConfig(**config.engine_options)), tokenizer, cfg


def engine_alive(engine: EngineBase) -> bool:
    if hasattr(engine, "alive"):
        return bool(engine.alive)
    task = getattr(engine, "_task", None)  # engine.Engine's scheduler task
    return task is None or not task.done()


# --- the deployment -----------------------------------------------------------------------------
class _ServerMetrics:
    def __init__(self):
        from ray.serve import metrics

        g = metrics.Gauge
        self.gauges = {
            "queued": g("dllm_engine_queued", description="Requests waiting for a slot."),
            "running": g("dllm_engine_running", description="Sequences in the step batch."),
            "token_backlog": g("dllm_engine_token_backlog",
                               description="Work left on the replica, in token-steps."),
            "capacity": g("dllm_engine_capacity_token_steps_per_s",
                          description="Measured processing rate, token-steps/s."),
            "step_latency_ms": g("dllm_engine_step_latency_ms",
                                 description="Recent mean wall time of one batched step."),
            "output_tokens_per_s": g("dllm_engine_output_tokens_per_s",
                                     description="Recent committed tokens per second."),
            "kv_pages_used": g("dllm_engine_kv_pages_used", description="KV pages in use."),
            "kv_pages_total": g("dllm_engine_kv_pages_total", description="KV pages in the pool."),
            "tp_ranks": g("dllm_tensor_parallel_ranks",
                          description="Ranks of the replica's tensor-parallel group (1 without "
                                      "TP; 0 once a rank failed)."),
        }
        self.finished = metrics.Counter("dllm_requests_finished_total",
                                        description="Engine requests by finish reason.",
                                        tag_keys=("finish_reason",))
        self.tokens = metrics.Counter("dllm_completion_tokens_total",
                                      description="Tokens generated.")
        self.steps = metrics.Counter("dllm_denoising_steps_total",
                                     description="Denoising forward passes spent on requests.")

    def set(self, stats) -> None:
        for name in ("queued", "running", "token_backlog", "step_latency_ms",
                     "output_tokens_per_s", "kv_pages_used", "kv_pages_total"):
            self.gauges[name].set(float(getattr(stats, name)))
        self.gauges["capacity"].set(float(stats.capacity_token_steps_per_s))

    def done(self, f: Finished) -> None:
        self.finished.inc(tags={"finish_reason": f.finish_reason})
        if f.completion_tokens:
            self.tokens.inc(f.completion_tokens)
        if f.steps:
            self.steps.inc(f.steps)


@serve.deployment(name="ModelServer", max_ongoing_requests=64, graceful_shutdown_timeout_s=30,
                  health_check_period_s=5, ray_actor_options={"num_cpus": 1})
class ModelServer:
    async def __init__(self, config: ServerConfig | dict, board=None):
        self.config = config if isinstance(config, ServerConfig) else ServerConfig(**config)
        self.engine, self.tokenizer, self.cfg, self.tp = await build_engine_async(self.config)
        self.description = describe(self.cfg, self.config.model_id)
        await self.engine.start()
        self.board = board
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (unit use)
            self.replica_id = f"local-{id(self)}"
        self.max_num_seqs = int(self.config.engine_options.get("max_num_seqs", 0)) or \
            int(self.config.mock_options.get("max_num_seqs", 0))
        self.metrics = _ServerMetrics()
        self._quality: collections.deque[tuple[float, bool]] = collections.deque()
        self._busy_mark = (time.monotonic(), self._iterations())
        self._busy = 0.0
        self._peak = PeakRate()
        self._draining = False
        self._report_task = asyncio.get_running_loop().create_task(self._report_loop())
        log.info("model server %s ready: %s (%s engine)", self.replica_id, self.description.id,
                 self.config.engine)

    # --- requests ---------------------------------------------------------------------------
    async def describe(self) -> tuple[ModelInfo, object]:
        return self.description, self.tokenizer

    async def generate(self, request: GenerationRequest, routing: dict | None = None
                       ) -> AsyncIterator[Event]:
        """Stream a request's events. routing: {"below_best": bool | None} from the router."""
        if routing and routing.get("below_best") is not None:
            self._quality.append((time.monotonic(), bool(routing["below_best"])))
            self._below_best_fraction()  # trims the window (Serve polls it only when autoscaling)
        if self._draining:
            raise ServerDraining("the model server is shutting down")
        if self.tp is not None and self.tp.leader.broken:  # Serve replaces us at the next check
            raise ServerDraining("a tensor-parallel rank of this replica failed")
        try:
            stream = self.engine.submit(request)
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        except RuntimeError as e:  # QueueFullError / EngineClosedError / the mock's
            name = type(e).__name__
            if name == "QueueFullError":
                raise ServerOverloaded(str(e)) from None
            raise ServerDraining(str(e)) from None
        finished = False
        try:
            async for event in stream:
                if isinstance(event, Finished):
                    finished = True
                    self.metrics.done(event)
                yield event
        finally:
            if not finished:  # the caller went away (disconnect) or we are being torn down
                await self.engine.cancel(request.request_id)
            await stream.aclose()

    # --- load and health --------------------------------------------------------------------
    def _iterations(self) -> int:
        extra = self.engine.stats().extra
        return int(extra.get("iterations", extra.get("steps_run", 0)))

    def replica_load(self) -> ReplicaLoad:
        stats = self.engine.stats()
        peak = self._peak.update(stats.capacity_token_steps_per_s)
        return ReplicaLoad.from_stats(self.replica_id, stats, self.max_num_seqs, peak)

    def _below_best_fraction(self) -> float:
        cutoff = time.monotonic() - self.config.quality_window_s
        while self._quality and self._quality[0][0] < cutoff:
            self._quality.popleft()
        return sum(b for _, b in self._quality) / len(self._quality) if self._quality else 0.0

    def _update_busy(self, stats) -> None:
        now, iters = time.monotonic(), self._iterations()
        t0, i0 = self._busy_mark
        if now - t0 >= 1.0:
            self._busy = min(1.0, (iters - i0) * stats.step_latency_ms / 1e3 / (now - t0))
            self._busy_mark = (now, iters)

    async def _report_loop(self) -> None:
        while True:
            try:
                stats = self.engine.stats()
                self.metrics.set(stats)
                self.metrics.gauges["tp_ranks"].set(float(self._tp_ranks()))
                self._update_busy(stats)
                if self.board is not None:
                    await asyncio.wait_for(self.board.report.remote(self.replica_load().to_dict()),
                                           timeout=2.0)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("load report failed: %s", e)
            await asyncio.sleep(self.config.report_period_s)

    async def stats(self) -> dict:
        return self.replica_load().to_dict()

    async def check_health(self) -> None:
        if not engine_alive(self.engine):
            raise RuntimeError("the engine loop has stopped")
        if self.tp is not None:  # a dead rank: Serve replaces the whole replica (and group)
            if self.tp.leader.broken:
                raise RuntimeError(f"tensor-parallel group broken: {self.tp.leader.broken}")
            await self.tp.check()

    def _tp_ranks(self) -> int:
        if self.tp is None:
            return 1
        return 0 if self.tp.leader.broken else len(self.tp.ranks)

    async def tp_layout(self) -> list[dict]:
        """Where each tensor-parallel rank runs (node, GPU ids, pid, heads); [] without TP."""
        return [] if self.tp is None else self.tp.layout()

    def record_routing_stats(self) -> dict:
        load = self.replica_load()
        return {"token_backlog": load.token_backlog, "capacity": load.effective_capacity,
                "queued": load.queued, "running": load.running, "reported_at": load.reported_at}

    def record_autoscaling_stats(self) -> dict[str, float]:
        load = self.replica_load()
        # capacity: the peak recent rate (autoscaling/load.py says why), not the current one
        return {"token_backlog": float(load.token_backlog),
                "capacity_token_steps_per_s": float(load.effective_capacity),
                "below_best_fraction": float(self._below_best_fraction()),
                "busy_fraction": float(self._busy)}

    async def __del__(self):
        self._draining = True
        self._report_task.cancel()
        if self.board is not None:
            try:
                await asyncio.wait_for(self.board.forget.remote(self.replica_id), timeout=2.0)
            except Exception:
                pass
        await self.engine.shutdown(drain_timeout_s=self.config.drain_timeout_s)
        if self.tp is not None:
            self.tp.shutdown()


# --- the ingress' view of the servers ----------------------------------------------------------
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
    """openai_api.Backend over DeploymentHandles to ModelServer and the LoadBoard."""

    def __init__(self, server_handle, board_handle, retry_after_s: float = 1.0,
                 replica_retries: int = 2, retry_backoff_s: float = 0.25):
        self.server = server_handle.options(stream=True)
        self.board = board_handle
        self.retry_after_s = retry_after_s
        self.replica_retries = replica_retries  # resends of a request whose replica died early
        self.retry_backoff_s = retry_backoff_s

    def generate(self, request: GenerationRequest, routing: dict | None = None
                 ) -> AsyncIterator[Event]:
        return self._stream(request, routing)

    async def _stream(self, request: GenerationRequest, routing: dict | None):
        """Events of one engine request. A replica that dies before its first event (killed,
        its node lost, a tensor-parallel rank gone) costs the client nothing: the request is
        sent again, to a live replica; one that dies mid-stream ends it with a 503 error."""
        from ray.exceptions import ActorUnavailableError, RayActorError

        for attempt in range(self.replica_retries + 1):
            started = False
            try:
                async for event in self._one_stream(request, routing):
                    started = True
                    yield event
                return
            except (RayActorError, ActorUnavailableError) as e:
                if started or attempt == self.replica_retries:
                    log.warning("request %s: model server lost (%s)", request.request_id, e)
                    raise overloaded(503, "the model server serving this request failed; retry",
                                     self.retry_after_s) from None
                log.info("request %s: model server lost before its first event, resending",
                         request.request_id)
                await asyncio.sleep(self.retry_backoff_s * (attempt + 1))  # let routing drop it

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
        except ServerOverloaded:
            raise overloaded(503, "the model server's queue is full; retry later",
                             self.retry_after_s) from None
        except ServerDraining as e:
            raise overloaded(503, f"{e or 'the model server is shutting down'}; retry",
                             self.retry_after_s) from None
        except InvalidRequest as e:
            raise APIError(400, str(e)) from None
        finally:
            # No-op once finished; on disconnect it cancels the replica's stream. cancel()
            # re-raises a request's routing error (BackPressureError), which would replace the
            # 503 APIError above with Serve's plain-text 503 without Retry-After.
            try:
                gen.cancel()
            except Exception:  # noqa: BLE001 - already reported above
                pass

    def cancel_stream(self, stream) -> None:
        asyncio.ensure_future(stream.aclose())

    async def load(self) -> ClusterLoad:
        return ClusterLoad.from_dict(await self.board.snapshot.remote())
