"""The app's Ray Serve metrics, built from the definitions in monitoring/metrics.py.

    metrics = IngressMetrics()                   # the OpenAI ingress
    metrics.rejected(429); metrics.finished(job, finished)
    metrics = ServerMetrics()                    # each model-server replica
    metrics.set(engine.stats()); metrics.done(finished); metrics.tp_ranks(2)
    metrics = RouterMetrics(ladder.steps)        # the step router, in the ingress
    metrics.observe_load(cluster_load, rung); metrics.observe_choice(choice, quality)

Names, descriptions, tags and buckets all come from monitoring.metrics (one definition each,
which the dashboard queries too); this module only records values. `ray.serve.metrics` is
imported in the constructors, so importing this module stays cheap; inside a Serve replica Serve
adds the application, deployment and replica tags.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from monitoring import metrics as M

if TYPE_CHECKING:
    from autoscaling.load import ClusterLoad
    from engine.types import EngineStats, Finished

# Work waiting with no capacity reported (no replica has measured a rate yet) is an infinite
# drain time; the gauge exports this many seconds instead, so the series stays a finite number
# that max() and alert thresholds can use.
INF_DRAIN_S = 1e9


def build(metric: M.Metric, boundaries: Iterable[float] | None = None):
    """The ray.serve.metrics Counter, Gauge or Histogram of a definition. boundaries: a
    histogram's buckets when the definition has none of its own (the router's steps)."""
    from ray.serve import metrics

    if metric.kind == "histogram":
        bounds = list(metric.boundaries or boundaries or ())
        if not bounds:
            raise ValueError(f"{metric.name}: a histogram needs boundaries")
        return metrics.Histogram(metric.name, description=metric.description,
                                 boundaries=bounds, tag_keys=metric.tags)
    kind = {"counter": metrics.Counter, "gauge": metrics.Gauge}[metric.kind]
    return kind(metric.name, description=metric.description, tag_keys=metric.tags)


class IngressMetrics:
    """The OpenAI API's metrics: refusals, ignored fields, passes, TTFT and latency per route."""

    def __init__(self):
        self._rejected = build(M.REQUESTS_REJECTED)
        self._ignored = build(M.IGNORED_FIELDS)
        self._steps = build(M.REQUEST_STEPS)
        self._ttft = build(M.TIME_TO_FIRST_TOKEN)
        self._latency = build(M.REQUEST_LATENCY)

    def rejected(self, status: int) -> None:
        self._rejected.inc(tags={"status": str(status)})

    def ignored_fields(self, n: int) -> None:
        self._ignored.inc(n)

    def finished(self, job, finished: dict[int, Finished]) -> None:
        """job: the API's Job (.route, .started and .first_token_at, perf_counter seconds)."""
        for f in finished.values():
            self._steps.observe(f.steps)
        tags = {"route": job.route}
        if job.first_token_at is not None:
            self._ttft.observe(job.first_token_at - job.started, tags=tags)
        self._latency.observe(time.perf_counter() - job.started, tags=tags)


class ServerMetrics:
    """A model-server replica's metrics: the engine's stats as gauges, finished work as counters,
    and the size of its tensor-parallel group. gauges: EngineStats field (and "tp_ranks") ->
    its Gauge."""

    def __init__(self):
        self.gauges = {field: build(metric) for field, metric in M.ENGINE_STATS.items()}
        self.gauges["tp_ranks"] = build(M.TP_RANKS)
        self.finished = build(M.REQUESTS_FINISHED)
        self.tokens = build(M.COMPLETION_TOKENS)
        self.steps = build(M.DENOISING_STEPS)

    def set(self, stats: EngineStats) -> None:
        for field in M.ENGINE_STATS:
            self.gauges[field].set(float(getattr(stats, field)))

    def tp_ranks(self, n: int) -> None:
        """Ranks in the replica's group: 1 without tensor parallelism, 0 once a rank failed."""
        self.gauges["tp_ranks"].set(float(n))

    def done(self, f: Finished) -> None:
        self.finished.inc(tags={"finish_reason": f.finish_reason})
        if f.completion_tokens:
            self.tokens.inc(f.completion_tokens)
        if f.steps:
            self.steps.inc(f.steps)


class RouterMetrics:
    """The step router's metrics: the steps it chose, its rung, and the cluster load it saw."""

    def __init__(self, ladder_steps: Iterable[int]):
        self.steps = build(M.ROUTER_STEPS, M.router_steps_boundaries(ladder_steps))
        self.rung = build(M.ROUTER_RUNG)
        self.drain = build(M.CLUSTER_DRAIN)
        self.backlog = build(M.CLUSTER_BACKLOG)
        self.replicas = build(M.CLUSTER_REPLICAS)

    def observe_load(self, load: ClusterLoad, rung: int) -> None:
        self.rung.set(rung)
        self.drain.set(load.drain_s if load.drain_s != float("inf") else INF_DRAIN_S)
        self.backlog.set(load.token_backlog)
        self.replicas.set(load.replicas)

    def observe_choice(self, choice, quality: str) -> None:
        """choice: the router's StepChoice (.steps, and .reason "pinned" for a pinned request)."""
        self.steps.observe(choice.steps, tags={"quality": quality,
                                               "pinned": str(choice.reason == "pinned").lower()})
