"""deployments/metrics.py: one Ray Serve metric per definition of monitoring/metrics.py, with the
definition's name, description, tags and buckets, and the values a scrape would show. Ray's
metric classes are replaced by recording fakes (no cluster needed)."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pytest
import ray.serve.metrics

from autoscaling.load import ClusterLoad
from deployments.metrics import INF_DRAIN_S, IngressMetrics, RouterMetrics, ServerMetrics
from engine.types import EngineStats, Finished
from monitoring import metrics as M

LADDER = [16, 8, 4, 2]


class Recorder:
    def __init__(self):
        self.created: list[dict] = []
        self.values: list[tuple[str, str, float, dict | None]] = []  # (op, name, value, tags)

    def fake(self, kind: str):
        recorder = self

        class FakeMetric:
            def __init__(self, name, description="", boundaries=None, tag_keys=None):
                assert tag_keys is None or isinstance(tag_keys, tuple)  # Serve rejects lists
                self.name = name
                recorder.created.append({"kind": kind, "name": name, "description": description,
                                         "boundaries": boundaries, "tags": tuple(tag_keys or ())})

            def inc(self, value=1.0, tags=None):
                recorder.values.append(("inc", self.name, value, tags))

            def set(self, value, tags=None):
                recorder.values.append(("set", self.name, value, tags))

            def observe(self, value, tags=None):
                recorder.values.append(("observe", self.name, value, tags))

        return FakeMetric

    def of(self, metric: M.Metric) -> list[tuple[str, float, dict | None]]:
        return [(op, v, tags) for op, name, v, tags in self.values if name == metric.name]


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder()
    for cls, kind in (("Counter", "counter"), ("Gauge", "gauge"), ("Histogram", "histogram")):
        monkeypatch.setattr(ray.serve.metrics, cls, rec.fake(kind))
    return rec


def test_each_definition_becomes_one_ray_metric(recorder):
    IngressMetrics(), ServerMetrics(), RouterMetrics(LADDER)
    created = {c["name"]: c for c in recorder.created}
    assert len(created) == len(recorder.created), "a metric is created twice"
    assert sorted(created) == sorted(m.name for m in M.APP_METRICS)
    for m in M.APP_METRICS:
        c = created[m.name]
        assert (c["kind"], c["description"], c["tags"]) == (m.kind, m.description, m.tags), m.name
        if m is M.ROUTER_STEPS:
            assert c["boundaries"] == [1.0, 2.0, 4.0, 8.0, 16.0, 64.0]
        elif m.kind == "histogram":
            assert c["boundaries"] == list(m.boundaries), m.name
        else:
            assert c["boundaries"] is None, m.name


def test_each_class_creates_the_metrics_of_its_source(recorder):
    for source, make in (("ingress", IngressMetrics), ("server", ServerMetrics),
                         ("router", lambda: RouterMetrics(LADDER))):
        recorder.created.clear()
        make()
        assert sorted(c["name"] for c in recorder.created) == sorted(
            m.name for m in M.from_source(source)), source


def test_ingress_counts_refusals_and_times_requests(recorder):
    metrics = IngressMetrics()
    metrics.rejected(429)
    metrics.ignored_fields(2)
    assert recorder.of(M.REQUESTS_REJECTED) == [("inc", 1.0, {"status": "429"})]
    assert recorder.of(M.IGNORED_FIELDS) == [("inc", 2, None)]

    now = time.perf_counter()
    done = {i: Finished(f"r{i}", "stop", 5, 9, steps) for i, steps in enumerate((12, 40))}
    streamed = SimpleNamespace(route="/v1/chat/completions", started=now - 2.0,
                               first_token_at=now - 1.5)
    metrics.finished(streamed, done)
    assert recorder.of(M.REQUEST_STEPS) == [("observe", 12, None), ("observe", 40, None)]
    ((_, ttft, tags),) = recorder.of(M.TIME_TO_FIRST_TOKEN)
    assert ttft == pytest.approx(0.5) and tags == {"route": "/v1/chat/completions"}
    ((_, latency, tags),) = recorder.of(M.REQUEST_LATENCY)
    assert 2.0 <= latency < 60 and tags == {"route": "/v1/chat/completions"}

    # No token streamed (an empty answer): latency only.
    metrics.finished(SimpleNamespace(route="/v1/completions", started=now, first_token_at=None),
                     {0: done[0]})
    assert len(recorder.of(M.TIME_TO_FIRST_TOKEN)) == 1
    assert recorder.of(M.REQUEST_LATENCY)[-1][2] == {"route": "/v1/completions"}


def test_server_gauges_show_the_engine_stats(recorder):
    metrics = ServerMetrics()
    stats = EngineStats(queued=1, running=2, token_backlog=3.5, step_latency_ms=4.25,
                        output_tokens_per_s=5.5, capacity_token_steps_per_s=6.75,
                        kv_pages_used=7, kv_pages_total=8)
    metrics.set(stats)
    metrics.tp_ranks(2)
    shown = {name: v for op, name, v, _ in recorder.values if op == "set"}
    assert shown == {
        M.ENGINE_QUEUED.name: 1.0, M.ENGINE_RUNNING.name: 2.0, M.ENGINE_BACKLOG.name: 3.5,
        M.ENGINE_STEP_LATENCY.name: 4.25, M.ENGINE_OUTPUT_TPS.name: 5.5,
        M.ENGINE_CAPACITY.name: 6.75, M.ENGINE_KV_USED.name: 7.0, M.ENGINE_KV_TOTAL.name: 8.0,
        M.TP_RANKS.name: 2.0,
    }
    assert all(isinstance(v, float) for v in shown.values())
    metrics.gauges["tp_ranks"].set(0.0)  # the dict stays reachable by key
    assert recorder.of(M.TP_RANKS)[-1] == ("set", 0.0, None)


def test_server_counts_finished_requests_tokens_and_passes(recorder):
    metrics = ServerMetrics()
    metrics.done(Finished("a", "stop", 3, 9, 12))
    metrics.done(Finished("b", "cancelled", 3, 0, 0))  # nothing generated: no token/pass incs
    assert recorder.of(M.REQUESTS_FINISHED) == [("inc", 1.0, {"finish_reason": "stop"}),
                                                ("inc", 1.0, {"finish_reason": "cancelled"})]
    assert recorder.of(M.COMPLETION_TOKENS) == [("inc", 9, None)]
    assert recorder.of(M.DENOISING_STEPS) == [("inc", 12, None)]


def test_router_exports_load_and_choices(recorder):
    metrics = RouterMetrics(LADDER)
    metrics.observe_load(ClusterLoad(replicas=2, token_backlog=100.0, drain_s=math.inf), 3)
    metrics.observe_load(ClusterLoad(replicas=3, token_backlog=50.0, drain_s=0.25), 0)
    # No capacity yet: the drain time is exported as a large finite number, not +Inf.
    assert [v for _, v, _ in recorder.of(M.CLUSTER_DRAIN)] == [INF_DRAIN_S, 0.25]
    assert [v for _, v, _ in recorder.of(M.ROUTER_RUNG)] == [3, 0]
    assert [v for _, v, _ in recorder.of(M.CLUSTER_BACKLOG)] == [100.0, 50.0]
    assert [v for _, v, _ in recorder.of(M.CLUSTER_REPLICAS)] == [2, 3]

    metrics.observe_choice(SimpleNamespace(steps=8, rung=1, reason="load"), "auto")
    metrics.observe_choice(SimpleNamespace(steps=3, rung=None, reason="pinned"), "high")
    assert recorder.of(M.ROUTER_STEPS) == [
        ("observe", 8, {"quality": "auto", "pinned": "false"}),
        ("observe", 3, {"quality": "high", "pinned": "true"}),
    ]
