"""The Serve application builder that serve_config.yaml imports.

    applications:
      - name: dllm
        route_prefix: /
        import_path: deployments.app:build_app
        args: {model: {source: tiny-coder}, ladder: {steps: [16, 8, 4, 2]}}

    app = build_app({"model": {"source": "tiny-coder"}})     # or AppArgs(...)
    serve.run(app)

Three deployments: OpenAIIngress (the HTTP API, deployments/ingress.py) -> ModelServer replicas
(deployments/replica.py, routed by LeastBacklogRouter in deployments/replica_router.py) and the
LoadBoard (deployments/load_board.py), which the replicas report their load to and the
ingress' step router reads. `args` is validated once (deployments/config.py) and the same
AppArgs object is bound into the ingress and the replicas.
"""

from __future__ import annotations

import logging
from typing import Any

from deployments.config import AppArgs, ServerArgs, parse_args

log = logging.getLogger(__name__)


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


def replica_options(a: ServerArgs, tensor_parallel_size: int = 1) -> dict:
    """ModelServer deployment options: resources (a placement group of one bundle per rank
    with tensor parallelism), queue limits, health checks, the request router."""
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
            request_router_class="deployments.replica_router:LeastBacklogRouter",
            request_routing_stats_period_s=a.routing_stats_period_s)
    return opts


def build_app(args: dict | AppArgs | None = None):
    """Builder for `serve run` / `serve deploy` (import_path deployments.app:build_app). Serve
    calls an application builder with exactly one argument, the config's `args`."""
    return build_application(args)


def build_application(args: dict | AppArgs | None = None, engine_factory=None):
    """The app of `args`. engine_factory: () -> (engine, tokenizer, ModelConfig), called in each
    replica instead of loading args.model (a model-free engine for load tests:
    benchmarks/mock_engine.py); it must be picklable."""
    from deployments.ingress import OpenAIIngress
    from deployments.load_board import LoadBoardDeployment
    from deployments.replica import ModelServer

    a = parse_args(args)
    if engine_factory is not None and a.model.tensor_parallel_size > 1:
        raise ValueError("model.tensor_parallel_size > 1 needs the model's own engine, "
                         "not an engine_factory")
    board = LoadBoardDeployment.bind()
    server = ModelServer.options(**replica_options(a.server, a.model.tensor_parallel_size)).bind(
        a, board, engine_factory)
    ingress = OpenAIIngress.options(
        num_replicas=a.ingress.num_replicas, max_ongoing_requests=a.ingress.max_ongoing_requests,
        ray_actor_options={"num_cpus": a.ingress.num_cpus})
    return ingress.bind(server, board, a)
