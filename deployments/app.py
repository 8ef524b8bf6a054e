"""The Serve application builder that serve_config.yaml imports.

    applications:
      - name: dllm
        route_prefix: /
        import_path: deployments.app:build_app
        args: {model: {source: tiny-coder}, ladder: {steps: [16, 8, 4, 2]}}

    app = build_app({"model": {"source": "tiny-coder"}})     # or AppArgs(...)
    serve.run(app)

Three deployments: OpenAIIngress (the HTTP API, openai_api.py) -> ModelServer replicas
(server.py, routed by LeastBacklogRouter in routing.py) and LoadBoard (router.py), which the
replicas report their load to and the ingress' step router reads.

`args` is validated by AppArgs: every level forbids unknown keys, so a typo in the YAML fails the
deploy with the path of the bad key instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

log = logging.getLogger(__name__)


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class MockArgs(_Args):
    """The mock engine (engine/mock.py), for HTTP tests and overhead measurements."""

    step_delay_s: float = Field(default=0.005, ge=0)
    token_cost_s: float = Field(default=0.0, ge=0)
    max_num_seqs: int = Field(default=64, ge=1)
    max_queued: int | None = Field(default=None, ge=0)
    eos_after: int | None = Field(default=None, ge=1)


class ModelArgs(_Args):
    source: str = "tiny-coder"  # a preset ("tiny-coder") or a checkpoint directory
    id: str | None = None  # the model name clients send; default: the config's name
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"  # "auto": cuda when the replica has a GPU, else cpu
    engine: Literal["real", "mock"] = "real"
    mock: MockArgs = MockArgs()
    torch_threads: int | None = Field(default=None, ge=1)  # CPU replicas
    # > 1: each replica reserves this many GPUs (server.num_gpus = 1 per rank) as one placement
    # group and runs one rank actor per extra GPU (deployments/tensor_parallel.py)
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    # how each forward reaches the other ranks: a broadcast on the TP group (one collective per
    # step, heartbeats while idle) or a Ray actor call per step (deployments/tensor_parallel.py)
    tensor_parallel_transport: Literal["collective", "ray"] = "collective"
    tensor_parallel_timeout_s: float = Field(default=120.0, gt=0)  # then a rank counts as dead
    # heal a text prompt's trailing whitespace token (model/healing.py; the ingress strips it)
    token_healing: bool = True


class EngineArgs(_Args):
    """Engine limits (engine.EngineConfig); `options` passes any other EngineConfig field."""

    max_num_seqs: int = Field(default=16, ge=1)
    max_queued: int | None = Field(default=256, ge=0)  # beyond: 503 + Retry-After
    kv_cache_bytes: int | None = Field(default=None, ge=1)
    kv_pages: int | None = Field(default=None, ge=1)
    # Full-attention models (LLaDA, Dream): Fast-dLLM's approximate KV cache for every request
    # that does not set its own `full_cache` (model/sampling.py). "none": it changes tokens.
    # Applied by the ingress to each request's SamplingParams, not an EngineConfig field.
    full_attention_cache: Literal["none", "prefix", "dual"] = "none"
    options: dict[str, Any] = {}

    def engine_options(self) -> dict:
        out = {k: v for k, v in self.model_dump(exclude={"options", "full_attention_cache"}).items()
               if v is not None}
        if "max_queued" not in out:
            out["max_queued"] = None
        out.update(self.options)
        try:
            from engine.config import EngineConfig
        except ImportError:
            return out
        known = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(out) - known)
        if unknown:
            raise ValueError(f"engine.options: unknown EngineConfig fields {unknown}; "
                             f"known: {sorted(known)}")
        return out


class LadderArgs(_Args):
    """The step ladder (deployments/router.py): steps per block, best quality first."""

    steps: list[int] = [16, 8, 4, 2]
    thresholds_s: list[float] = [1.0, 2.0, 4.0]  # cluster drain seconds for rungs 1, 2, ...
    hysteresis: float = Field(default=0.25, ge=0, lt=1)
    up_hold_s: float = Field(default=2.0, ge=0)
    refresh_s: float = Field(default=0.25, gt=0, le=1.0)  # load snapshot period (>= 1/s)

    @model_validator(mode="after")
    def _valid_ladder(self):
        from deployments.router import Ladder

        Ladder(self.steps, self.thresholds_s, self.hysteresis, self.up_hold_s)  # raises
        return self


class LimitsArgs(_Args):
    default_max_tokens: int = Field(default=256, ge=1)
    default_temperature: float | None = Field(default=None, ge=0, le=2)  # None: the family's
    max_inflight: int = Field(default=256, ge=1)  # per ingress replica; beyond: 429
    max_drain_s: float | None = Field(default=None, gt=0)  # cluster drain time; beyond: 429
    retry_after_s: int = Field(default=2, ge=1)


class AuthArgs(_Args):
    api_keys_env: str | None = "DLLM_API_KEYS"  # comma-separated keys in this env variable
    api_keys_file: str | None = None  # or one key per line in this file


class ServerArgs(_Args):
    """Deployment options of the ModelServer replicas."""

    num_replicas: int | None = Field(default=1, ge=1)
    autoscaling_config: dict[str, Any] | None = None  # replaces num_replicas when set
    num_gpus: float = Field(default=0, ge=0)
    num_cpus: float = Field(default=1, ge=0)
    accelerator_type: str | None = None  # e.g. "H100"
    max_ongoing_requests: int = Field(default=64, ge=1)  # streams per replica (engine queues)
    max_queued_requests: int = Field(default=-1, ge=-1)  # in the callers' routers; then 503
    graceful_shutdown_timeout_s: float = Field(default=30, ge=0)
    drain_timeout_s: float = Field(default=30, ge=0)  # engine drain in __del__
    health_check_period_s: float = Field(default=5, gt=0)
    request_router: Literal["least_backlog", "serve_default"] = "least_backlog"
    routing_stats_period_s: float = Field(default=1.0, gt=0)
    report_period_s: float = Field(default=0.25, gt=0, le=1.0)
    # window of the below-best-quality fraction the autoscaling policy reads (quality debt)
    quality_window_s: float = Field(default=30.0, gt=0)


class IngressArgs(_Args):
    num_replicas: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=0, ge=0)
    max_ongoing_requests: int = Field(default=1024, ge=1)


class AppArgs(_Args):
    model: ModelArgs = ModelArgs()
    engine: EngineArgs = EngineArgs()
    ladder: LadderArgs = LadderArgs()
    limits: LimitsArgs = LimitsArgs()
    auth: AuthArgs = AuthArgs()
    server: ServerArgs = ServerArgs()
    ingress: IngressArgs = IngressArgs()

    @model_validator(mode="after")
    def _tensor_parallel(self):
        if self.model.tensor_parallel_size > 1:
            if self.model.engine == "mock":
                raise ValueError("model.tensor_parallel_size > 1 needs the real engine")
            if self.server.num_gpus not in (0, 1):
                raise ValueError("with model.tensor_parallel_size > 1, server.num_gpus is per "
                                 f"rank and must be 1 (GPU ranks) or 0 (CPU ranks), got "
                                 f"{self.server.num_gpus}")
        return self


def parse_args(args: dict | AppArgs | None) -> AppArgs:
    if isinstance(args, AppArgs):
        return args
    try:
        return AppArgs.model_validate(args or {})
    except ValidationError as e:
        lines = [f"  {'.'.join(map(str, err['loc'])) or '(root)'}: {err['msg']}"
                 for err in e.errors()]
        raise ValueError("invalid dllm application args:\n" + "\n".join(lines)) from None


def tp_bundles(a: ServerArgs, tensor_parallel_size: int) -> list[dict[str, float]]:
    """One bundle per rank: a whole GPU (or CPUs for CPU ranks) each; the replica = rank 0 takes
    bundle 0. The accelerator type goes into every bundle, so all ranks land on that card."""
    bundle: dict[str, float] = {}
    if a.num_gpus:
        bundle["GPU"] = 1
    if a.num_cpus or not a.num_gpus:
        bundle["CPU"] = a.num_cpus or 1
    if a.accelerator_type:
        bundle[f"accelerator_type:{a.accelerator_type}"] = 0.001
    return [dict(bundle) for _ in range(tensor_parallel_size)]


def server_options(a: ServerArgs, tensor_parallel_size: int = 1) -> dict:
    from ray.serve.config import RequestRouterConfig

    actor: dict[str, Any] = {"num_cpus": a.num_cpus, "num_gpus": a.num_gpus}
    if tensor_parallel_size > 1:
        bundles = tp_bundles(a, tensor_parallel_size)
        actor = {"num_cpus": bundles[0].get("CPU", 0), "num_gpus": bundles[0].get("GPU", 0)}
        if a.accelerator_type:
            actor["resources"] = {f"accelerator_type:{a.accelerator_type}": 0.001}
    elif a.accelerator_type:
        actor["accelerator_type"] = a.accelerator_type
    opts: dict[str, Any] = dict(
        ray_actor_options=actor, max_ongoing_requests=a.max_ongoing_requests,
        max_queued_requests=a.max_queued_requests,
        graceful_shutdown_timeout_s=a.graceful_shutdown_timeout_s,
        health_check_period_s=a.health_check_period_s)
    if tensor_parallel_size > 1:
        opts["placement_group_bundles"] = bundles
        opts["placement_group_strategy"] = "PACK"  # ranks on one node: NVLink, not the network
    if a.autoscaling_config is not None:
        opts["autoscaling_config"] = a.autoscaling_config
    else:
        opts["num_replicas"] = a.num_replicas
    if a.request_router == "least_backlog":
        opts["request_router_config"] = RequestRouterConfig(
            request_router_class="deployments.routing:LeastBacklogRouter",
            request_routing_stats_period_s=a.routing_stats_period_s)
    return opts


def build_app(args: dict | AppArgs | None = None):
    """Builder for `serve run` / `serve deploy` (import_path deployments.app:build_app)."""
    from deployments.openai_api import IngressConfig, OpenAIIngress
    from deployments.router import make_load_board_deployment
    from deployments.server import ModelServer, ServerConfig

    a = parse_args(args)
    server_config = ServerConfig(
        model=a.model.source, model_id=a.model.id, dtype=a.model.dtype, device=a.model.device,
        engine=a.model.engine, engine_options=a.engine.engine_options(),
        mock_options=a.model.mock.model_dump(exclude_none=True),
        torch_threads=a.model.torch_threads, drain_timeout_s=a.server.drain_timeout_s,
        report_period_s=a.server.report_period_s, quality_window_s=a.server.quality_window_s,
        tensor_parallel_size=a.model.tensor_parallel_size,
        tensor_parallel_transport=a.model.tensor_parallel_transport,
        tensor_parallel_timeout_s=a.model.tensor_parallel_timeout_s)
    ingress_config = IngressConfig(
        ladder=dict(steps=a.ladder.steps, thresholds_s=a.ladder.thresholds_s,
                    hysteresis=a.ladder.hysteresis, up_hold_s=a.ladder.up_hold_s),
        settings=dict(default_max_tokens=a.limits.default_max_tokens,
                      default_temperature=a.limits.default_temperature,
                      max_inflight=a.limits.max_inflight,
                      max_drain_s=a.limits.max_drain_s or float("inf"),
                      retry_after_s=a.limits.retry_after_s, load_refresh_s=a.ladder.refresh_s,
                      token_healing=a.model.token_healing,
                      full_attention_cache=a.engine.full_attention_cache),
        api_keys_env=a.auth.api_keys_env, api_keys_file=a.auth.api_keys_file,
        retry_after_s=a.limits.retry_after_s)
    board = make_load_board_deployment().bind()
    server = ModelServer.options(**server_options(a.server, a.model.tensor_parallel_size)).bind(
        dataclasses.asdict(server_config), board)
    ingress = OpenAIIngress.options(
        num_replicas=a.ingress.num_replicas, max_ongoing_requests=a.ingress.max_ongoing_requests,
        ray_actor_options={"num_cpus": a.ingress.num_cpus})
    return ingress.bind(server, board, dataclasses.asdict(ingress_config))
