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
