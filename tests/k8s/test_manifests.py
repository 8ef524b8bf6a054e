"""The KubeRay manifests in k8s/ are what the operator will accept, and their Serve config runs.

- every RayService validates against the RayService CRD schema of KubeRay v1.7.0
  (../shared/schemas/kuberay-v1.7.0/), strictly: an unknown field is an error, as with
  `kubectl apply` (strict field validation) rather than silently pruned;
- the rules KubeRay's webhook/controller checks but the CRD cannot express (upgrade type, name
  length, replicas within min/max, one GPU per worker pod and none on the head, ...);
- each serveConfigV2 validates with ray.serve.schema.ServeDeploySchema, its import paths
  (application builders, autoscaling policy) resolve, and it carries the same application as
  the serve config file it mirrors;
- the Dockerfile builds on the Ray version the project pins and copies paths that exist.
"""

from __future__ import annotations

import copy
import importlib
import re
import sys
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

REPO = Path(__file__).resolve().parents[2]
# In CI the shared folder sits beside the repository root (../shared); in the engineers' shared
# checkout it is /work/shared, which is the same relative path from /work/main.
SCHEMAS = (REPO / ".." / "shared" / "schemas" / "kuberay-v1.7.0").resolve()
MANIFESTS = sorted((REPO / "k8s").glob("*.yaml"))
# Which serve config file each manifest's serveConfigV2 mirrors, and the only places (dotted
# paths into the application's args, or top-level keys) where it may differ: where the weights
# are is a property of the cluster; the CPU demo cluster also autoscales and has 4 cores a pod.
MIRRORS = {
    "rayservice-h100.yaml": ("serve_config.gpu.yaml", {"args.model.source", "args.model.id"}),
    "rayservice-cpu.yaml": (
        "serve_config.yaml",
        {
            "proxy_location",
            "http_options.host",
            "args.model.torch_threads",
            "args.server.autoscaling_config",
        },
    ),
}

UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}  # KubeRay v1.7.0
MAX_RAYSERVICE_NAME = 47  # MaxRayClusterNameLength (53) - 6
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

pytestmark = pytest.mark.skipif(
    not SCHEMAS.is_dir(), reason=f"KubeRay CRD schemas not found at {SCHEMAS}"
)


def _strict(node):
    """Copy of a CRD openAPIV3Schema made usable by jsonschema and strict about unknown keys."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    # int-or-string without an anyOf (the apiserver accepts both).
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out and "type" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    crd_file = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
    # libyaml when present: the CRD is 1 MB, which the pure-Python loader takes seconds over.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((SCHEMAS / crd_file[kind]).read_text(), Loader=loader)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _strict(version["schema"]["openAPIV3Schema"])  # builds a new tree
    # Top-level metadata is an ObjectMeta the CRD leaves open; check the parts we use.
    schema["properties"]["metadata"] = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string"},
            "namespace": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        },
        "additionalProperties": False,
    }
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "spec"})
    return jsonschema.Draft7Validator(schema)


def crd_errors(doc: dict) -> list[str]:
    errors = sorted(crd_validator(doc["kind"]).iter_errors(doc), key=lambda e: list(e.path))
    return [f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors]


def kuberay_rule_errors(doc: dict) -> list[str]:
    """Checks from KubeRay v1.7.0's ValidateRayServiceMetadata/Spec and ValidateRayClusterSpec,
    plus the GPU layout this project relies on."""
    errs = []
    meta, spec = doc["metadata"], doc["spec"]
    if len(meta["name"]) > MAX_RAYSERVICE_NAME or not DNS1035.match(meta["name"]):
        errs.append(f"name {meta['name']!r}: DNS-1035 label of at most {MAX_RAYSERVICE_NAME} chars")
    timeout = (meta.get("annotations") or {}).get("ray.io/initializing-timeout")
    if timeout is not None and not re.fullmatch(r"[1-9]\d*|(\d+(\.\d+)?(h|m|s))+", timeout):
        errs.append(f"ray.io/initializing-timeout {timeout!r}: Go duration or positive seconds")
    upgrade = (spec.get("upgradeStrategy") or {}).get("type")
    if upgrade is not None and upgrade not in UPGRADE_TYPES:
        errs.append(f"upgradeStrategy.type {upgrade!r} not in {sorted(UPGRADE_TYPES)}")
    if upgrade == "NewClusterWithIncrementalUpgrade":
        if not spec["rayClusterConfig"].get("enableInTreeAutoscaling"):
            errs.append("NewClusterWithIncrementalUpgrade needs the Ray autoscaler")
        if not (spec["upgradeStrategy"].get("clusterUpgradeOptions") or {}).get("gatewayClassName"):
            errs.append("NewClusterWithIncrementalUpgrade needs clusterUpgradeOptions")
    cluster = spec["rayClusterConfig"]
    autoscaling = bool(cluster.get("enableInTreeAutoscaling"))
    groups = [("head", cluster["headGroupSpec"])] + [
        (g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])
    ]
    for name, group in groups:
        params = group.get("rayStartParams") or {}
        if not group["template"]["spec"].get("containers"):
            errs.append(f"{name}: at least one container")
        if group.get("resources") and any(
            params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")
        ):
            errs.append(f"{name}: resources in both rayStartParams and resources")
        if "labels" in params:
            errs.append(f"{name}: rayStartParams['labels'] is not supported")
    for name, group in groups[1:]:
        lo, hi = group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling and (lo is None or hi is None):
            errs.append(f"{name}: minReplicas and maxReplicas without autoscaling")
        if lo is not None and hi is not None and lo > hi:
            errs.append(f"{name}: minReplicas {lo} > maxReplicas {hi}")
        replicas = group.get("replicas")
        if replicas is not None and lo is not None and hi is not None and not lo <= replicas <= hi:
            errs.append(f"{name}: replicas {replicas} outside [{lo}, {hi}]")
    return errs


def gpu_limit(container: dict) -> int:
    return int((container.get("resources", {}).get("limits") or {}).get("nvidia.com/gpu", 0))


def load_manifest(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def serve_config(doc: dict) -> dict:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def walk(node, key: str):
    """Every value stored under `key` anywhere in a nested config."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, key)


def import_paths(config: dict) -> list[str]:
    """Every `module:attr` the Serve controller or replicas will import from this config:
    application builders, autoscaling policies, request routers (in deployment overrides or
    inside the builder's args)."""
    keys = ("import_path", "policy_function", "request_router_class")
    return [v for key in keys for v in walk(config, key) if isinstance(v, str)]


def resolve(path: str):
    """Import `pkg.module:attr` (or `pkg.module.attr`) as Serve does."""
    module, attr = path.split(":", 1) if ":" in path else path.rsplit(".", 1)
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def serve_config_errors(config: dict) -> list[str]:
    """ServeDeploySchema plus what it lets through: it ignores unknown keys and takes
    autoscaling_config as a plain dict, so a typo there would only fail (or be dropped) at
    deploy time, inside the cluster."""
    errs = []
    try:
        ServeDeploySchema.model_validate(config)
    except ValueError as e:
        return [str(e)]

    def unknown(where: str, given: dict, model) -> None:
        extra = set(given) - set(model.model_fields)
        if extra:
            errs.append(f"{where}: unknown keys {sorted(extra)}")

    unknown("<root>", config, ServeDeploySchema)
    for app in config.get("applications", []):
        where = f"app {app.get('name')}"
        unknown(where, app, ServeApplicationSchema)
        for dep in app.get("deployments", []) or []:
            unknown(f"{where} deployment {dep.get('name')}", dep, DeploymentSchema)
        # Autoscaling configs, in deployment overrides or in the builder's args.
        for autoscaling in walk(app, "autoscaling_config"):
            if isinstance(autoscaling, dict):
                unknown(f"{where} autoscaling_config", autoscaling, AutoscalingConfig)
                try:
                    AutoscalingConfig.model_validate(autoscaling)
                except (ValueError, ImportError) as e:
                    errs.append(f"{where} autoscaling_config: {e}")
        # What `serve deploy` does first: import the builder and build the application
        # (args validation, deployment options, the policy's import), without running it.
        try:
            built = resolve(app["import_path"])(app.get("args") or {})
        except Exception as e:  # noqa: BLE001 - any failure here fails the deploy
            errs.append(f"{where}: building the application failed: {type(e).__name__}: {e}")
        else:
            if type(built).__name__ != "Application":
                errs.append(f"{where}: the builder returned {type(built).__name__}")
    return errs


# --- the manifests ------------------------------------------------------------------------------


def test_manifests_exist():
    names = {p.name for p in MANIFESTS}
    assert {"rayservice-h100.yaml", "rayservice-cpu.yaml"} <= names


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_the_crd_schema(path):
    docs = load_manifest(path)
    assert docs, f"{path.name} is empty"
    for doc in docs:
        assert doc.get("apiVersion") == "ray.io/v1", doc.get("apiVersion")
        assert doc.get("kind") in ("RayService", "RayCluster")
        assert crd_errors(doc) == []


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_passes_kuberay_rules(path):
    for doc in load_manifest(path):
        assert kuberay_rule_errors(doc) == []


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_serve_config_v2_validates_and_imports(path):
    for doc in load_manifest(path):
        config = serve_config(doc)
        assert serve_config_errors(config) == []
        for import_path in import_paths(config):
            assert resolve(import_path) is not None, import_path


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def flatten(node, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    if isinstance(node, dict) and node:
        out = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): node}


def differences(got: dict, want: dict, allowed: set[str]) -> list[str]:
    a, b = flatten(got), flatten(want)
    return sorted(
        k
        for k in set(a) | set(b)
        if a.get(k, "<absent>") != b.get(k, "<absent>")
        and not any(k == p or k.startswith(p + ".") for p in allowed)
    )


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_serve_config_v2_carries_the_same_application_as_its_file(path):
    if path.name not in MIRRORS:
        pytest.skip(f"{path.name} mirrors no serve config file")
    mirror, allowed = MIRRORS[path.name]
    expected = yaml.safe_load((REPO / mirror).read_text())
    for doc in load_manifest(path):
        got = serve_config(doc)
        assert [a["name"] for a in got["applications"]] == [
            a["name"] for a in expected["applications"]
        ]
        top = {k: v for k, v in got.items() if k != "applications"}
        want_top = {k: v for k, v in expected.items() if k != "applications"}
        assert differences(top, want_top, allowed) == [], f"differs from {mirror}"
        for app, want in zip(got["applications"], expected["applications"], strict=True):
            assert differences(app, want, allowed) == [], f"{app['name']} differs from {mirror}"


def test_mirror_check_sees_a_changed_setting():
    want = {"args": {"model": {"source": "a", "dtype": "bfloat16"}, "ladder": {"steps": [8, 4]}}}
    got = copy.deepcopy(want)
    got["args"]["model"]["source"] = "/models/a"
    assert differences(got, want, {"args.model.source"}) == []
    got["args"]["ladder"]["steps"] = [8, 2]
    assert differences(got, want, {"args.model.source"}) == ["args.ladder.steps"]


def test_h100_layout_head_without_gpus_and_one_gpu_per_worker_pod():
    (doc,) = load_manifest(REPO / "k8s" / "rayservice-h100.yaml")
    cluster = doc["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus") == "0"
    assert head["rayStartParams"].get("num-cpus") == "0"  # no replicas on the head
    assert all(gpu_limit(c) == 0 for c in head["template"]["spec"]["containers"])
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["rayStartParams"]["num-gpus"] == "1"
    (worker,) = workers["template"]["spec"]["containers"]
    assert gpu_limit(worker) == 1
    assert 1 <= workers["minReplicas"] <= workers["maxReplicas"]
    # Weights come from a mounted volume, read-only, at the path the serve config loads from.
    volumes = {v["name"]: v for v in workers["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m for m in worker["volumeMounts"]}
    weights = next(m for m in mounts.values() if "persistentVolumeClaim" in volumes[m["name"]])
    assert weights["readOnly"] is True
    args = serve_config(doc)["applications"][0]["args"]
    assert args["model"]["source"].startswith(weights["mountPath"].rstrip("/") + "/")
    # Readiness waits for the app's /health (503 until a model server has loaded and reports
    # its load), not only for the raylet; liveness stays KubeRay's (weight loading is slow).
    assert "/health" in " ".join(worker["readinessProbe"]["exec"]["command"])
    assert "livenessProbe" not in worker


def replica_demands(args: dict) -> list[dict[str, float]]:
    """The Ray resources of every replica the app asks for at its maximum size."""
    from deployments.app import parse_args

    a = parse_args(args)
    server = {"CPU": a.server.num_cpus, "GPU": a.server.num_gpus}
    if a.server.accelerator_type:
        server[f"accelerator_type:{a.server.accelerator_type}"] = 0.001  # what Serve asks for
    autoscaling = a.server.autoscaling_config or {}
    n_servers = autoscaling.get("max_replicas", a.server.num_replicas or 1)
    ingress = {"CPU": a.ingress.num_cpus}
    return [server] * n_servers + [ingress] * a.ingress.num_replicas


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_ray_autoscaler_can_place_every_replica_at_max_scale(path):
    """What KubeRay's autoscaler believes each group offers (Ray's own conversion of the
    RayCluster spec) must hold the app at its largest: max_replicas model servers plus the
    ingress replicas, first-fit onto at most maxReplicas pods of each worker group."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    for doc in load_manifest(path):
        cr = {
            "apiVersion": "ray.io/v1",
            "kind": "RayCluster",
            "metadata": {"name": doc["metadata"]["name"], "namespace": "default"},
            "spec": doc["spec"]["rayClusterConfig"],
        }
        node_types = _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]
        nodes = [dict(t["resources"]) for name, t in node_types.items() if name == "headgroup"]
        for name, t in node_types.items():
            if name != "headgroup":
                nodes += [dict(t["resources"]) for _ in range(t["max_workers"])]
        for app in serve_config(doc)["applications"]:
            for demand in replica_demands(app["args"]):
                node = next(
                    (n for n in nodes if all(n.get(k, 0) >= v for k, v in demand.items())), None
                )
                assert node is not None, f"no pod can host a replica needing {demand}"
                for k, v in demand.items():
                    node[k] = node.get(k, 0) - v


# --- the validator itself catches mistakes (so the passes above mean something) ----------------


def test_validator_rejects_typos_and_wrong_types():
    (doc,) = load_manifest(REPO / "k8s" / "rayservice-h100.yaml")
    typo = copy.deepcopy(doc)
    typo["spec"]["rayClusterConfig"]["workerGroupSpec"] = typo["spec"]["rayClusterConfig"].pop(
        "workerGroupSpecs"
    )
    assert any("workerGroupSpec" in e for e in crd_errors(typo))
    wrong_type = copy.deepcopy(doc)
    wrong_type["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = 1
    assert crd_errors(wrong_type)  # rayStartParams values are strings
    bad_mode = copy.deepcopy(doc)
    bad_mode["spec"]["rayClusterConfig"]["autoscalerOptions"]["upscalingMode"] = "Fast"
    assert crd_errors(bad_mode)
    bad_upgrade = copy.deepcopy(doc)
    bad_upgrade["spec"]["upgradeStrategy"]["type"] = "BlueGreen"
    assert kuberay_rule_errors(bad_upgrade)
    too_many = copy.deepcopy(doc)
    too_many["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = 99
    assert kuberay_rule_errors(too_many)


def test_serve_config_check_rejects_bad_settings():
    (doc,) = load_manifest(REPO / "k8s" / "rayservice-cpu.yaml")
    config = serve_config(doc)
    args = config["applications"][0]["args"]
    autoscaling = args["server"]["autoscaling_config"]
    autoscaling["max_replicas"] = 0  # not a valid replica bound
    assert serve_config_errors(config)
    autoscaling["max_replicas"] = 3
    autoscaling["upscale_delay"] = 5  # typo of upscale_delay_s: Serve itself would ignore it
    ServeDeploySchema.model_validate(config)
    assert any("upscale_delay" in e for e in serve_config_errors(config))
    del autoscaling["upscale_delay"]
    args["ladder"]["stepz"] = [8]  # the app's own args reject unknown keys
    assert any("stepz" in e for e in serve_config_errors(config))
    with pytest.raises((ImportError, AttributeError)):
        resolve("autoscaling.policy:NoSuchPolicy")


# --- the Dockerfile -----------------------------------------------------------------------------


def test_dockerfile_pins_the_projects_ray_and_copies_existing_paths():
    text = (REPO / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)", text, re.M).group(1)
    tag = base.split(":", 1)[1]
    assert tag.startswith(f"{ray.__version__}-py{sys.version_info.major}{sys.version_info.minor}")
    assert re.search(r"^FROM \$\{RAY_IMAGE\}", text, re.M)
    for line in re.findall(r"^COPY (?:--\S+ )*(.+)$", text, re.M):
        *sources, _dest = line.split()
        for src in sources:
            assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the repo"
    # Every top-level package the project ships is copied into the image.
    for package in ("model", "kernels", "engine", "deployments", "autoscaling", "monitoring"):
        assert f"{package}/" in text


def test_tp2_pods_hold_exactly_one_tensor_parallel_replica():
    """The 2-GPU worker pods fit one tp=2 replica's placement group: as many GPUs as ranks, the
    CPUs of every bundle, the accelerator resource every bundle asks for."""
    import json

    from deployments.app import parse_args, replica_options

    (doc,) = load_manifest(REPO / "k8s" / "rayservice-h100-tp2.yaml")
    (app,) = serve_config(doc)["applications"]
    args = parse_args(app["args"])
    tp = args.model.tensor_parallel_size
    assert tp == 2
    opts = replica_options(args.server, tp)
    bundles = opts["placement_group_bundles"]
    assert len(bundles) == tp and opts["placement_group_strategy"] == "PACK"
    (workers,) = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    params = workers["rayStartParams"]
    assert int(params["num-gpus"]) == tp == sum(b["GPU"] for b in bundles)
    (worker,) = workers["template"]["spec"]["containers"]
    assert gpu_limit(worker) == tp
    cpus = int(worker["resources"]["limits"]["cpu"])
    assert sum(b["CPU"] for b in bundles) <= cpus
    offered = json.loads(json.loads(params["resources"]))
    assert offered["accelerator_type:H100"] >= sum(b["accelerator_type:H100"] for b in bundles)
    # the heads of the model it serves split evenly (LLaDA-8B: 32 query, 32 KV heads)
    from model.config import ModelConfig

    llada = ModelConfig.from_name("llada-8b")
    assert llada.n_heads % tp == 0 and llada.n_kv_heads % tp == 0 and llada.mlp_hidden % tp == 0


def test_llada2_flash_pods_hold_one_8_gpu_expert_parallel_replica():
    """LLaDA2.0-flash over 8 GPUs: the 8-GPU worker pods fit one tp=8 replica's placement
    group, and the model splits that way: 256 experts whole per rank (32 each), 32 query heads,
    4 KV heads replicated (8 is a multiple of 4), the dense and shared-expert widths."""
    import json

    from deployments.app import parse_args, replica_options
    from model.loaders.tp import check_divisible, check_experts_divisible

    (doc,) = load_manifest(REPO / "k8s" / "rayservice-llada2-flash.yaml")
    (app,) = serve_config(doc)["applications"]
    args = parse_args(app["args"])
    tp = args.model.tensor_parallel_size
    assert tp == 8 and args.model.source.endswith("LLaDA2.0-flash")
    opts = replica_options(args.server, tp)
    bundles = opts["placement_group_bundles"]
    assert len(bundles) == tp and opts["placement_group_strategy"] == "PACK"
    (workers,) = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    params = workers["rayStartParams"]
    assert int(params["num-gpus"]) == tp == sum(b["GPU"] for b in bundles)
    (worker,) = workers["template"]["spec"]["containers"]
    assert gpu_limit(worker) == tp
    assert sum(b["CPU"] for b in bundles) <= int(worker["resources"]["limits"]["cpu"])
    offered = json.loads(json.loads(params["resources"]))
    assert offered["accelerator_type:H100"] >= sum(b["accelerator_type:H100"] for b in bundles)
    # LLaDA2.0-flash: 32 heads, 4 KV heads (replicated to 8), 256 experts of width 1024, one
    # shared expert, dense first layer of 14336 (model/loaders/tp.py)
    check_divisible(32, 8, 14336, tp)  # KV heads as loaded: 4 repeated twice
    check_experts_divisible(256, 1024, tp)
    assert tp % 4 == 0  # KV replication needs a multiple of the 4 KV heads
