"""The model-server replica: one model + one continuous-batching engine per Serve replica.

    server = ModelServer.options(**replica_options(args.server)).bind(args, board)
    # the ingress calls it through a DeploymentHandle (deployments/backends.RayBackend):
    async for event in handle.options(stream=True).generate.remote(request, routing): ...

A replica loads `args.model.source` (a preset such as "tiny-coder" or a checkpoint directory, in
the project's own or a published format; dtype and device from args.model, the GPU from
`server.num_gpus`), starts an engine.Engine with `args.engine` (or whatever `engine_factory`
builds: tests and benchmarks pass a model-free double) and then:
- streams each request's events back to the caller; when the caller goes away (client
  disconnect -> Serve cancels this generator), the engine request is cancelled and its slot
  frees at the next step;
- pushes its load (ReplicaLoad) to the LoadBoard ~4 times a second for the step router, and
  publishes the same numbers through `record_routing_stats` (for deployments/replica_router.py),
  `record_autoscaling_stats` (for autoscaling/policy.py) and Serve metrics (dllm_engine_*);
- `check_health` fails when the engine loop has died, so Serve replaces the replica;
- with `tensor_parallel_size` N > 1 the replica is rank 0 of a tensor-parallel group: Serve gives
  it a placement group of N bundles (deployments/app.py), it starts one rank actor in each other
  bundle and drives all of them from its engine (deployments/tensor_parallel.py); a rank that
  dies breaks the group, new requests get 503 and the health check fails;
- on shutdown Serve first lets ongoing requests finish (graceful_shutdown_timeout_s), then
  `__del__` drains the engine for `server.drain_timeout_s` and leaves the load board.
Engine refusals travel as the exceptions of deployments/errors.py, which the ingress turns into
statuses: ServerOverloaded (the engine queue is full: 503 + Retry-After), ServerDraining (503),
InvalidRequest (400). No HTTP framework is imported here.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable

from ray import serve

from autoscaling.load import PeakRate, ReplicaLoad
from deployments.config import AppArgs, parse_args
from deployments.errors import ServerDraining, replica_refusal
from deployments.metrics import ServerMetrics
from engine.types import Admitted, EngineBase, Event, Finished, GenerationRequest, ModelInfo

log = logging.getLogger("ray.serve")

# () -> (engine, tokenizer, ModelConfig): builds a replica's engine instead of loading the model
EngineFactory = Callable[[], tuple[EngineBase, object, object]]


def build_engine(args: AppArgs, loaded: tuple | None = None) -> tuple[EngineBase, object, object]:
    """-> (engine, tokenizer, cfg): the model of args.model under an Engine with args.engine.
    `loaded`: (net, tokenizer, cfg) already built (a tensor-parallel leader)."""
    import torch

    from engine import Engine
    from model.loaders import load_pretrained, resolve_device, torch_dtype

    if args.model.torch_threads:
        torch.set_num_threads(args.model.torch_threads)
    net, tokenizer, cfg = loaded or load_pretrained(
        args.model.source, device=resolve_device(args.model.device),
        dtype=torch_dtype(args.model.dtype), rope_scaling=args.model.rope_scaling,
        max_model_len=args.model.max_model_len)
    read = adapter_reader(args.model.source, cfg)
    if args.model.merge_lora:  # one adapter folded into the weights (model/lora.py)
        from model.lora import merge_adapter

        merge_adapter(net, read("merged", args.model.merge_lora))
    engine = Engine(net, tokenizer, cfg, args.engine)
    engine.adapter_reader = read
    for name, path in args.model.lora_modules.items():
        engine.load_adapter(name, path)
    return engine, tokenizer, cfg


def adapter_reader(source: str, cfg):
    """(name, directory) -> AdapterWeights: a PEFT adapter read against `source`'s format."""
    from model.loaders.lora import base_map, read_adapter
    from model.parallel import unshard_config

    map_tensor, full = base_map(source), unshard_config(cfg)

    def read(name: str, path: str):
        return read_adapter(path, map_tensor=map_tensor, cfg=full, name=name)

    return read


async def start_engine(args: AppArgs, engine_factory: EngineFactory | None = None):
    """-> (engine, tokenizer, cfg, tensor-parallel group or None) inside a replica: with
    tensor_parallel_size > 1 the engine drives rank 0 of a group of rank actors."""
    if engine_factory is not None:
        return (*engine_factory(), None)
    if args.model.tensor_parallel_size <= 1:
        return (*build_engine(args), None)
    from deployments.tensor_parallel import TensorParallelGroup

    group = await TensorParallelGroup.start(args.model)
    # the engine sizes its KV pool from the rank's config (its share of the heads)
    engine, tokenizer, _ = build_engine(args, (group.leader, group.tokenizer, group.leader.cfg))
    return engine, tokenizer, group.cfg, group


WARMUP_PROMPT_TOKENS = 16
WARMUP_TIMEOUT_S = 300.0  # a first Triton compile of every kernel on a GPU takes tens of seconds


async def warm_up(engine: EngineBase, cfg, n: int) -> None:
    """Serve `n` requests of one block side by side (a prompt of ordinary token ids, the
    model's own block length and steps), so that the first client's request does not pay for
    the first passes. A failure is logged, not raised: a cold replica still serves."""
    if n <= 0:
        return
    from model.sampling import SamplingParams

    block = getattr(cfg, "block_length", None) or 32
    params = SamplingParams(max_new_tokens=block, block_length=block,
                            steps=getattr(cfg, "default_steps_per_block", None) or 8,
                            stop_token_ids=[])
    # ordinary ids: never the mask (a prompt position the engine would read as noise), EOS, pad
    special = {getattr(cfg, k, None) for k in ("mask_id", "eos_id", "pad_id", "eot_id")}
    prompt = list(itertools.islice((i for i in range(16, cfg.vocab_size) if i not in special),
                                   WARMUP_PROMPT_TOKENS))

    async def one(i: int) -> str | None:
        async for ev in engine.submit(GenerationRequest(f"warmup-{i}", prompt, params)):
            if isinstance(ev, Finished):
                return ev.error
        return None

    t0 = time.monotonic()
    try:
        errors = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))),
                                        WARMUP_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 - warming is best effort
        log.warning("warm-up failed after %.1f s: %r", time.monotonic() - t0, e)
        return
    finally:
        engine.forget_measurements()  # cold passes are not the replica's speed
    if any(errors):
        log.warning("warm-up request failed: %s", next(e for e in errors if e))
    else:
        log.info("warmed up with %d requests in %.2f s", n, time.monotonic() - t0)


# Every option (resources, queue limits, health checks) comes from args.server through
# deployments.app.replica_options, so no default is written here.
@serve.deployment(name="ModelServer")
class ModelServer:
    async def __init__(self, args: AppArgs | dict, board=None,
                       engine_factory: EngineFactory | None = None):
        self.args = parse_args(args)
        self.engine, self.tokenizer, self.cfg, self.tp = await start_engine(self.args,
                                                                            engine_factory)
        self.info = ModelInfo.from_config(self.cfg, self.args.model.id,
                                          self.args.model.family_options)
        await self.engine.start()
        if engine_factory is None:  # a model-free double has nothing to warm
            await warm_up(self.engine, self.cfg, self.args.server.warmup_requests)
        self.board = board
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (unit use)
            self.replica_id = f"local-{id(self)}"
        self.metrics = ServerMetrics()
        self._quality: collections.deque[tuple[float, bool]] = collections.deque()
        self._busy_mark = (time.monotonic(), self.engine.stats().iterations)
        self._busy = 0.0
        self._peak = PeakRate()
        self._draining = False
        self._report_task = asyncio.get_running_loop().create_task(self._report_loop())
        log.info("model server %s ready: %s (%s)", self.replica_id, self.info.id,
                 type(self.engine).__name__)

    # --- requests ---------------------------------------------------------------------------
    async def model_info(self) -> tuple[ModelInfo, object]:
        """What the ingress needs once at start: the model's description and its tokenizer."""
        return self.info, self.tokenizer

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
        path = (routing or {}).get("adapter_path")
        if request.adapter is not None and path and \
                request.adapter not in self.engine.adapter_names():
            # loaded at run time on another replica: read it here on first use (multiplexing)
            try:
                await self.engine.load_adapter_async(request.adapter, path)
            except (ValueError, OSError) as e:
                raise replica_refusal(ValueError(f"adapter {request.adapter!r}: {e}")) from None
        try:
            stream = self.engine.submit(request)
        except (ValueError, RuntimeError) as e:
            raise replica_refusal(e) from None
        finished = False
        try:
            yield Admitted(request.request_id)
            async for event in stream:
                if isinstance(event, Finished):
                    finished = True
                    self.metrics.done(event)
                yield event
        finally:
            if not finished:  # the caller went away (disconnect) or we are being torn down
                await self.engine.cancel(request.request_id)
            await stream.aclose()

    # --- LoRA adapters ----------------------------------------------------------------------
    async def load_adapter(self, name: str, path: str) -> list[str]:
        """Read and hold the PEFT adapter in `path` as `name` (the ingress checked the path is
        under lora.root). -> the adapters this replica holds. Refusals as InvalidRequest."""
        try:
            await self.engine.load_adapter_async(name, path)
        except (ValueError, OSError) as e:
            raise replica_refusal(ValueError(str(e))) from None
        return self.engine.adapter_names()

    async def unload_adapter(self, name: str) -> bool:
        return self.engine.remove_adapter(name)

    # --- load and health --------------------------------------------------------------------
    def replica_load(self) -> ReplicaLoad:
        stats = self.engine.stats()
        peak = self._peak.update(stats.capacity_token_steps_per_s)
        return ReplicaLoad.from_stats(self.replica_id, stats, peak)

    def _below_best_fraction(self) -> float:
        cutoff = time.monotonic() - self.args.server.quality_window_s
        while self._quality and self._quality[0][0] < cutoff:
            self._quality.popleft()
        return sum(b for _, b in self._quality) / len(self._quality) if self._quality else 0.0

    def _update_busy(self, stats) -> None:
        now, iters = time.monotonic(), stats.iterations
        t0, i0 = self._busy_mark
        if now - t0 >= 1.0:
            self._busy = min(1.0, (iters - i0) * stats.step_latency_ms / 1e3 / (now - t0))
            self._busy_mark = (now, iters)

    async def _report_loop(self) -> None:
        while True:
            try:
                stats = self.engine.stats()
                self.metrics.set(stats)
                self.metrics.tp_ranks(self._tp_ranks())
                self._update_busy(stats)
                if self.board is not None:
                    await asyncio.wait_for(self.board.report.remote(self.replica_load().to_dict()),
                                           timeout=2.0)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("load report failed: %s", e)
            await asyncio.sleep(self.args.server.report_period_s)

    async def stats(self) -> dict:
        return self.replica_load().to_dict()

    async def check_health(self) -> None:
        if not self.engine.alive:
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
                "queued": load.queued, "running": load.running, "reported_at": load.reported_at,
                # for the router: requests for an adapter go where it is already held
                "adapters": self.engine.adapter_names(),
                "resident_adapters": self.engine.resident_adapters()}

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
        await self.engine.shutdown(drain_timeout_s=self.args.server.drain_timeout_s)
        if self.tp is not None:
            self.tp.shutdown()


