"""monitoring/metrics.py names exactly the metrics the deployments create, and the dashboard
queries only names from it (no Ray needed: the deployments' source is read with ast)."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

from monitoring import metrics as M

REPO = Path(__file__).resolve().parents[2]
KINDS = {"Counter": "counter", "Gauge": "gauge", "Histogram": "histogram"}


def created_metrics(folder: Path) -> dict[str, tuple[str, str]]:
    """name -> (kind, file) for every ray.serve.metrics Counter/Gauge/Histogram created with a
    literal name in the folder's modules (also through a local alias such as `g = metrics.Gauge`)."""
    found: dict[str, tuple[str, str]] = {}
    for path in sorted(folder.glob("*.py")):
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Attribute)
                and node.value.attr in KINDS
            ):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        aliases[target.id] = node.value.attr
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            first = node.args[0]
            if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                continue
            func = node.func
            kind = (
                func.attr
                if isinstance(func, ast.Attribute)
                else aliases.get(func.id)
                if isinstance(func, ast.Name)
                else None
            )
            if kind in KINDS:
                found[first.value] = (KINDS[kind], path.name)
    return found


def test_every_metric_the_deployments_create_is_named_here_and_vice_versa():
    created = created_metrics(REPO / "deployments")
    named = {m.name: m for m in M.APP_METRICS}
    assert sorted(set(created) - set(named)) == [], "add these to monitoring/metrics.py"
    assert sorted(set(named) - set(created)) == [], "no longer created in deployments/"
    for name, (kind, _file) in created.items():
        assert named[name].kind == kind, name


def test_proposed_metrics_are_not_created_yet_or_move_to_app_metrics():
    created = created_metrics(REPO / "deployments")
    for m in M.PROPOSED_METRICS:
        assert m.name not in created, f"{m.name} is exported now: move it to APP_METRICS"


def test_rays_own_metric_names_exist_in_the_installed_ray():
    # Some are built from parts (f"serve_num_{protocol}_requests"), so look for the name
    # anywhere in Serve's source; the Prometheus test checks them against a real scrape.
    spec = importlib.util.find_spec("ray.serve")
    source = "\n".join(p.read_text(errors="ignore") for p in Path(spec.origin).parent.rglob("*.py"))
    for m in M.RAY_METRICS:
        assert m.name in source, m.name


def test_prometheus_names_follow_rays_export_rules():
    assert M.ROUTER_STEPS.series("bucket") == "ray_dllm_router_steps_bucket"
    assert M.HTTP_REQUESTS.prom == "ray_serve_num_http_requests_total"
    assert M.REQUESTS_REJECTED.prom == "ray_dllm_requests_rejected_total"  # no double _total
    assert M.ENGINE_RUNNING.prom == "ray_dllm_engine_running"
    with pytest.raises(ValueError):
        M.ROUTER_STEPS.series()
    assert M.by_name("ray_dllm_router_rung") is M.ROUTER_RUNG


def test_dashboard_queries_only_known_metrics():
    from monitoring.dashboard import dashboard_json, metric_families, query_metric_names

    families = metric_families(query_metric_names(dashboard_json()))
    known = {m.prom for m in M.ALL_METRICS}
    assert families and families <= known, sorted(families - known)
    # The list: requests, time to first token, latency, output tokens, steps, cluster
    # load, backlog, engine batch size, KV-cache use are all on it.
    for m in (
        M.HTTP_REQUESTS,
        M.TIME_TO_FIRST_TOKEN,
        M.REQUEST_LATENCY,
        M.COMPLETION_TOKENS,
        M.ROUTER_STEPS,
        M.CLUSTER_DRAIN,
        M.ENGINE_BACKLOG,
        M.ENGINE_RUNNING,
        M.ENGINE_KV_USED,
        M.ENGINE_KV_TOTAL,
    ):
        assert m.prom in families, m.name
