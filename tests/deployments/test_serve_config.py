"""serve_config.yaml / serve_config.gpu.yaml are valid Serve configs whose args build the app
(no Ray cluster needed: validation and `bind` only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import DeploymentSchema, ServeDeploySchema

from deployments.app import AppArgs, build_app, parse_args, server_options

REPO = Path(__file__).resolve().parents[2]


def load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


@pytest.mark.parametrize("name", ["serve_config.yaml", "serve_config.gpu.yaml"])
def test_config_validates_and_builds(name):
    raw = load(name)
    schema = ServeDeploySchema.model_validate(raw)
    app = schema.applications[0]
    assert app.import_path == "deployments.app:build_app"
    args = parse_args(app.args)
    options = server_options(args.server)
    router = options.pop("request_router_config")
    DeploymentSchema.model_validate({"name": "ModelServer", **options,
                                     "request_router_config": router.model_dump()})
    assert router.request_router_class == "deployments.routing:LeastBacklogRouter"
    assert build_app(app.args) is not None  # the builder accepts its own config


def test_cpu_config_serves_tiny_coder_on_8000():
    raw = load("serve_config.yaml")
    assert raw["http_options"]["port"] == 8000
    args = parse_args(raw["applications"][0]["args"])
    assert args.model.source == "tiny-coder" and args.model.engine == "real"
    assert args.server.num_gpus == 0


def test_gpu_config_one_h100_per_replica_with_autoscaling():
    args = parse_args(load("serve_config.gpu.yaml")["applications"][0]["args"])
    opts = server_options(args.server)
    assert opts["ray_actor_options"]["num_gpus"] == 1
    assert opts["ray_actor_options"]["accelerator_type"] == "H100"
    auto = opts["autoscaling_config"]
    assert "num_replicas" not in opts
    assert auto["max_replicas"] > auto["min_replicas"] >= 1
    assert auto["policy"]["policy_function"] == "autoscaling.policy:TokenBacklogPolicy"
    from ray.serve.config import AutoscalingConfig

    AutoscalingConfig(**auto)  # Serve's own validation of the block
    assert args.model.dtype == "bfloat16" and args.model.device == "cuda"


def test_defaults_are_a_valid_app():
    assert isinstance(parse_args(None), AppArgs)


def test_tensor_parallel_replica_reserves_one_packed_bundle_per_rank():
    from ray.serve._private.config import ReplicaConfig

    args = parse_args({"model": {"source": "tiny-coder", "tensor_parallel_size": 4},
                       "server": {"num_gpus": 1, "num_cpus": 2, "accelerator_type": "H100"}})
    opts = server_options(args.server, args.model.tensor_parallel_size)
    bundle = {"GPU": 1, "CPU": 2, "accelerator_type:H100": 0.001}
    assert opts["placement_group_bundles"] == [bundle] * 4
    assert opts["placement_group_strategy"] == "PACK"
    # the replica is rank 0: exactly bundle 0's resources (Serve places it there)
    assert opts["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1,
                                         "resources": {"accelerator_type:H100": 0.001}}
    # Serve's own check that the replica fits its first bundle
    ReplicaConfig.create(object, ray_actor_options=opts["ray_actor_options"],
                         placement_group_bundles=opts["placement_group_bundles"],
                         placement_group_strategy="PACK")
    assert build_app({"model": {"tensor_parallel_size": 2}, "server": {"num_gpus": 1}})


@pytest.mark.parametrize("bad, match", [
    ({"model": {"tensor_parallel_size": 2}, "server": {"num_gpus": 0.5}}, "per rank"),
    ({"model": {"tensor_parallel_size": 2, "engine": "mock"}}, "real engine"),
])
def test_tensor_parallel_args_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_args(bad)
