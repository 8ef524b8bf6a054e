"""The metric definitions (monitoring/metrics.py) and the dashboard agree: every series a panel
queries is a defined metric under the name Prometheus stores it (the ray_ prefix, _total on
counters, _bucket/_sum/_count only on histograms)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from monitoring import metrics as M
from monitoring.dashboard import ROWS, dashboard_json, metric_families, query_metric_names


def stored_series(metric: M.Metric) -> set[str]:
    """The series names Prometheus holds for a metric once Ray exports it."""
    if metric.kind == "histogram":
        return {metric.series(s) for s in ("bucket", "sum", "count")}
    return {metric.prom}


def test_dashboard_queries_only_series_of_defined_metrics():
    queried = query_metric_names(dashboard_json())
    stored = set().union(*(stored_series(m) for m in M.ALL_METRICS))
    # A gauge queried as `_bucket`, or a counter without `_total`, would be an empty panel.
    assert queried and queried <= stored, sorted(queried - stored)
    # Every histogram_quantile reads a histogram's buckets.
    for _row, panels in ROWS:
        for panel in panels:
            for expr, _legend in panel.targets:
                if "histogram_quantile" in expr:
                    assert "_bucket{" in expr, panel.title


def test_dashboard_shows_what_an_operator_looks_for():
    families = metric_families(query_metric_names(dashboard_json()))
    # Requests, time to first token, latency, output tokens, steps, cluster load, backlog,
    # engine batch size, KV-cache use.
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
        M.TP_RANKS,
    ):
        assert m.prom in families, m.name


def test_prometheus_names_follow_rays_export_rules():
    assert M.ROUTER_STEPS.series("bucket") == "ray_dllm_router_steps_bucket"
    assert M.HTTP_REQUESTS.prom == "ray_serve_num_http_requests_total"
    assert M.REQUESTS_REJECTED.prom == "ray_dllm_requests_rejected_total"  # no double _total
    assert M.ENGINE_RUNNING.prom == "ray_dllm_engine_running"
    with pytest.raises(ValueError):
        M.ROUTER_STEPS.series()
    with pytest.raises(ValueError):
        M.ENGINE_RUNNING.series("bucket")
    assert M.by_name("ray_dllm_router_rung") is M.ROUTER_RUNG
    assert M.by_name("dllm_router_rung") is M.ROUTER_RUNG
    with pytest.raises(KeyError):
        M.by_name("ray_dllm_nothing")


def test_definitions_are_distinct_and_histograms_have_increasing_buckets():
    names = [m.prom for m in M.ALL_METRICS]
    assert len(names) == len(set(names))
    assert {m.source for m in M.APP_METRICS} == {"router", "ingress", "server"}
    assert {m.source for m in M.RAY_METRICS} == {"ray"}
    for m in M.APP_METRICS:
        assert m.name.startswith("dllm_") and m.description, m.name
        if m.kind != "histogram":
            assert m.boundaries == (), m.name
        elif m is not M.ROUTER_STEPS:  # its buckets come from the ladder
            assert list(m.boundaries) == sorted(set(m.boundaries)) and m.boundaries, m.name
    with pytest.raises(ValueError):
        M.Metric("dllm_x", "summary", "not a kind Ray exports")


def test_router_steps_buckets_count_each_ladder_rung_apart():
    # One bucket bound per rung: the share of requests served at each rung reads off the
    # buckets; 1 and 64 bracket pinned step counts.
    assert M.router_steps_boundaries([16, 8, 4, 2]) == (1.0, 2.0, 4.0, 8.0, 16.0, 64.0)
    assert M.router_steps_boundaries([32, 8, 8]) == (1.0, 8.0, 32.0, 64.0)


def test_rays_own_metric_names_exist_in_the_installed_ray():
    # Some are built from parts (f"serve_num_{protocol}_requests"), so look for the name
    # anywhere in Serve's source; the Prometheus test checks them against a real scrape.
    spec = importlib.util.find_spec("ray.serve")
    source = "\n".join(p.read_text(errors="ignore") for p in Path(spec.origin).parent.rglob("*.py"))
    for m in M.RAY_METRICS:
        assert m.name in source, m.name
