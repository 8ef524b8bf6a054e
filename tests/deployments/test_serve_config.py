"""serve_config.yaml / serve_config.gpu.yaml are valid Serve configs whose args build the app
(no Ray cluster needed: validation and `bind` only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import DeploymentSchema, ServeDeploySchema

from deployments.app import build_app, build_application, replica_options
from deployments.config import AppArgs, parse_args

REPO = Path(__file__).resolve().parents[2]


def load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


def bound_deployments(app) -> dict:
    """name -> (Deployment, its bound init args) for every deployment of a built app."""
    out: dict = {}

    def walk(d):
        out[d.name] = d
        for arg in d.init_args:
            inner = getattr(arg, "_bound_deployment", None)
            if inner is not None and inner.name not in out:
                walk(inner)

    walk(app._bound_deployment)
    return out


@pytest.mark.parametrize("name", ["serve_config.yaml", "serve_config.gpu.yaml",
                                  "serve_config.llada2-mini.yaml"])
def test_config_validates_and_builds(name):
    raw = load(name)
    schema = ServeDeploySchema.model_validate(raw)
    app = schema.applications[0]
    assert app.import_path == "deployments.app:build_app"
    args = parse_args(app.args)
    options = replica_options(args.server)
    router = options.pop("request_router_config")
    DeploymentSchema.model_validate({"name": "ModelServer", **options,
                                     "request_router_config": router.model_dump()})
    assert router.request_router_class == "deployments.replica_router:LeastBacklogRouter"
    # the builder makes the three deployments, each handed the same validated args
    # built as `serve run` builds it: Serve's own call of the import path's builder
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    deps = bound_deployments(call_user_app_builder_with_args_if_necessary(build_app, app.args))
    assert set(deps) == {"OpenAIIngress", "ModelServer", "LoadBoard"}
    server, ingress = deps["ModelServer"], deps["OpenAIIngress"]
    assert server.init_args[0] == args and ingress.init_args[2] == args
    assert server.max_ongoing_requests == args.server.max_ongoing_requests
    assert server.ray_actor_options["num_gpus"] == args.server.num_gpus
    assert ingress.num_replicas == args.ingress.num_replicas


def test_cpu_config_serves_tiny_coder_on_8000():
    raw = load("serve_config.yaml")
    assert raw["http_options"]["port"] == 8000
    args = parse_args(raw["applications"][0]["args"])
    assert args.model.source == "tiny-coder" and args.model.device == "cpu"
    assert args.server.num_gpus == 0


def test_gpu_config_one_h100_per_replica_with_autoscaling():
    args = parse_args(load("serve_config.gpu.yaml")["applications"][0]["args"])
    opts = replica_options(args.server)
    assert opts["ray_actor_options"]["num_gpus"] == 1
    assert opts["ray_actor_options"]["accelerator_type"] == "H100"
    auto = opts["autoscaling_config"]
    assert "num_replicas" not in opts
    assert auto["max_replicas"] > auto["min_replicas"] >= 1
    assert auto["policy"]["policy_function"] == "autoscaling.policy:TokenBacklogPolicy"
    from ray.serve.config import AutoscalingConfig

    AutoscalingConfig(**auto)  # Serve's own validation of the block
    assert args.model.dtype == "bfloat16" and args.model.device == "cuda"


def test_code_defaults_are_the_cpu_demo_settings():
    """A key left out of the YAML means what serve_config.yaml says it should mean: the code's
    ladder is the demo's (the old [1, 2, 4] default degraded lone users), the engine queue is
    bounded, and the engine gets exactly the dataclass the config names."""
    from engine.config import EngineConfig

    defaults = parse_args(None)
    assert isinstance(defaults, AppArgs)
    demo = parse_args(load("serve_config.yaml")["applications"][0]["args"])
    assert defaults.ladder == demo.ladder
    assert isinstance(defaults.engine, EngineConfig)
    assert defaults.engine.max_queued == parse_args({"engine": {"max_num_seqs": 4}}).engine.max_queued
    assert defaults.engine.max_queued is not None


def test_tensor_parallel_replica_reserves_one_packed_bundle_per_rank():
    from ray.serve._private.config import ReplicaConfig

    args = parse_args({"model": {"source": "tiny-coder", "tensor_parallel_size": 4},
                       "server": {"num_gpus": 1, "num_cpus": 2, "accelerator_type": "H100"}})
    opts = replica_options(args.server, args.model.tensor_parallel_size)
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
    deps = bound_deployments(build_application({"model": {"tensor_parallel_size": 2},
                                        "server": {"num_gpus": 1}}))
    assert deps["ModelServer"]._replica_config.placement_group_bundles == \
        [{"GPU": 1, "CPU": 1}] * 2


@pytest.mark.parametrize("bad, match", [
    ({"model": {"tensor_parallel_size": 2}, "server": {"num_gpus": 0.5}}, "per rank"),
    ({"model": {"engine": "mock"}}, "model.engine"),  # the mock is a test double, not a choice
])
def test_bad_args_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_args(bad)


def test_tensor_parallel_needs_the_models_own_engine():
    with pytest.raises(ValueError, match="engine_factory"):
        build_application({"model": {"tensor_parallel_size": 2}}, engine_factory=lambda: None)


def test_family_options_reach_the_model_description(api_tokenizer):
    """model.family_options switches a family's published sampler options on (LLaDA's
    logits_eos_inf: EOS never predicted), and an unknown option fails the replica's start."""
    from engine.types import ModelInfo

    from .conftest import tiny_model_config

    cfg = tiny_model_config(api_tokenizer, attention="full", extra={"family": "llada"})
    args = parse_args({"model": {"family_options": {"logits_eos_inf": True}}})
    plain = ModelInfo.from_config(cfg)
    on = ModelInfo.from_config(cfg, None, args.model.family_options)
    assert cfg.eos_id not in plain.suppress_token_ids
    assert cfg.eos_id in on.suppress_token_ids
    with pytest.raises(ValueError, match="no option"):
        ModelInfo.from_config(cfg, None, {"logits_eos_infinity": True})
