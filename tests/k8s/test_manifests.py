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
# Which serve config file each manifest's serveConfigV2 mirrors.
MIRRORS = {
    "rayservice-h100.yaml": "serve_config.gpu.yaml",
    "rayservice-cpu.yaml": "serve_config.yaml",
}
# Keys of an application's `args` a cluster may set differently from the file it mirrors:
# where the weights are (the mounted volume) is a property of the cluster, not of the app.
CLUSTER_ARGS = {"model", "model_path", "model_dir", "weights", "checkpoint"}

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
    crd = yaml.safe_load((SCHEMAS / crd_file[kind]).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
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
    jsonschema.Draft7Validator.check_schema(schema)
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


def import_paths(config: dict) -> list[str]:
    """Every `module:attr` the Serve controller or replicas will import from this config."""
    paths = []
    for app in config.get("applications", []):
        paths.append(app["import_path"])
        for dep in app.get("deployments", []) or []:
            policy = (dep.get("autoscaling_config") or {}).get("policy") or {}
            if isinstance(policy.get("policy_function"), str):
                paths.append(policy["policy_function"])
            router = (dep.get("request_router_config") or {}).get("request_router_class")
            if isinstance(router, str):
                paths.append(router)
    return paths


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
        unknown(f"app {app.get('name')}", app, ServeApplicationSchema)
        for dep in app.get("deployments", []) or []:
            where = f"app {app.get('name')} deployment {dep.get('name')}"
            unknown(where, dep, DeploymentSchema)
            autoscaling = dep.get("autoscaling_config")
            if isinstance(autoscaling, dict):
                unknown(f"{where} autoscaling_config", autoscaling, AutoscalingConfig)
                try:
                    AutoscalingConfig.model_validate(autoscaling)
                except (ValueError, ImportError) as e:
                    errs.append(f"{where} autoscaling_config: {e}")
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
def test_serve_config_v2_carries_the_same_application_as_its_file(path):
    mirror = REPO / MIRRORS.get(path.name, "")
    if not mirror.is_file():
        pytest.skip(f"{path.name} mirrors no serve config file in the repo")
    expected = yaml.safe_load(mirror.read_text())
    for doc in load_manifest(path):
        got = serve_config(doc)
        assert [a["name"] for a in got["applications"]] == [
            a["name"] for a in expected["applications"]
        ]
        for app, want in zip(got["applications"], expected["applications"], strict=True):
            for key in ("import_path", "route_prefix", "deployments"):
                assert app.get(key) == want.get(key), (
                    f"{app['name']}: {key} differs from {mirror.name}"
                )
            args = {k: v for k, v in (app.get("args") or {}).items() if k not in CLUSTER_ARGS}
            want_args = {k: v for k, v in (want.get("args") or {}).items() if k not in CLUSTER_ARGS}
            assert args == want_args, f"{app['name']}: args differ from {mirror.name}"


def test_h100_layout_head_without_gpus_and_one_gpu_per_worker_pod():
    (doc,) = load_manifest(REPO / "k8s" / "rayservice-h100.yaml")
    cluster = doc["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["upscalingMode"] in (
        "Default",
        "Aggressive",
        "Conservative",
    )
    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus") == "0"
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
    model = serve_config(doc)["applications"][0]["args"]["model"]
    assert model.startswith(weights["mountPath"].rstrip("/") + "/")
    # Readiness waits for the app's /health (which needs a loaded model), not only the raylet.
    assert "/health" in " ".join(worker["readinessProbe"]["exec"]["command"])
    # The Serve replica bound is within what the worker group can host (one replica per pod).
    dep = serve_config(doc)["applications"][0]["deployments"][0]["autoscaling_config"]
    assert dep["max_replicas"] <= workers["maxReplicas"]
    assert dep["min_replicas"] >= 1 and workers["minReplicas"] >= 1


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


def test_serve_schema_rejects_a_bad_serve_config():
    (doc,) = load_manifest(REPO / "k8s" / "rayservice-cpu.yaml")
    config = serve_config(doc)
    autoscaling = config["applications"][0]["deployments"][0]["autoscaling_config"]
    autoscaling["max_replicas"] = 0  # below min_replicas
    assert serve_config_errors(config)
    autoscaling["max_replicas"] = 3
    autoscaling["upscale_delay"] = 5  # typo of upscale_delay_s: ServeDeploySchema alone takes it
    ServeDeploySchema.model_validate(config)
    assert any("upscale_delay" in e for e in serve_config_errors(config))
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
