"""Every metric of dllm-serve, defined once: name, kind, description, tags and buckets.

    from monitoring import metrics as M
    M.ROUTER_STEPS.prom                      # -> "ray_dllm_router_steps" (what Prometheus stores)
    M.ROUTER_STEPS.series("bucket")          # -> "ray_dllm_router_steps_bucket"
    M.router_steps_boundaries([16, 8, 4, 2]) # -> (1.0, 2.0, 4.0, 8.0, 16.0, 64.0)

The app's own metrics (APP_METRICS) are created from these definitions by deployments/metrics.py
(IngressMetrics, ServerMetrics, RouterMetrics: the Ray Serve metric objects); the Grafana
dashboard (monitoring/dashboard.py) queries them by the same definitions, and so do the tests.
Ray Serve's own metrics (RAY_METRICS) are named here for the dashboard only. This module imports
no Ray, so the dashboard and the docs can read it anywhere.

How Ray exports them (checked on 2.60 with a scrape of the metrics port): every name gets the
prefix `ray_`; a counter gets `_total` appended unless its name already ends in `_total`; a
histogram becomes `_bucket`, `_sum` and `_count` series. Serve adds the tags `application`,
`deployment` and `replica`; Ray adds `NodeAddress`, `SessionName`, `WorkerId`, ...

The autoscaling stats keys (record_autoscaling_stats -> autoscaling/policy.py) are not metrics:
Serve keeps them in the controller. AUTOSCALING_STAT_KEYS re-exports them for documentation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from autoscaling.policy import AUTOSCALING_STAT_KEYS  # noqa: F401 - re-exported

RAY_PREFIX = "ray_"
KINDS = ("counter", "gauge", "histogram")


@dataclass(frozen=True)
class Metric:
    name: str  # as passed to ray.serve.metrics (or Ray's own name, without the ray_ prefix)
    kind: str  # "counter" | "gauge" | "histogram"
    description: str
    tags: tuple[str, ...] = ()
    source: str = ""  # who creates it: "router", "ingress", "server" or "ray"
    # Histogram bucket upper bounds; () for the router's steps, which derive theirs from the
    # ladder (router_steps_boundaries).
    boundaries: tuple[float, ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind {self.kind!r} is not one of {KINDS}")

    @property
    def prom(self) -> str:
        """The metric family name in Prometheus."""
        base = RAY_PREFIX + self.name
        if self.kind == "counter" and not base.endswith("_total"):
            base += "_total"
        return base

    def series(self, suffix: str = "") -> str:
        """A series name: histograms need "bucket", "sum" or "count"."""
        if self.kind == "histogram":
            if suffix not in ("bucket", "sum", "count"):
                raise ValueError(f"{self.name} is a histogram: pick bucket, sum or count")
            return f"{self.prom}_{suffix}"
        if suffix:
            raise ValueError(f"{self.name} is a {self.kind}: no series suffix")
        return self.prom


def prom_name(metric: Metric) -> str:
    return metric.prom


def router_steps_boundaries(ladder_steps: Iterable[int]) -> tuple[float, ...]:
    """Buckets of ROUTER_STEPS: one bound per ladder rung, so each rung's share is exact, plus 1
    and 64 to bracket pinned requests (`denoising_steps`) outside the ladder."""
    return tuple(sorted({float(s) for s in ladder_steps} | {1.0, 64.0}))


# Buckets of the API's latency histograms, 10 ms to 2 min in 1-2.5-5 steps.
SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)
# Buckets of forward passes per request, doubling from 4 (a short answer at a fast rung).
PASSES = (4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


def _counter(name, description, source, tags=()):
    return Metric(name, "counter", description, tuple(tags), source)


def _gauge(name, description, source, tags=()):
    return Metric(name, "gauge", description, tuple(tags), source)


def _histogram(name, description, source, tags=(), boundaries=()):
    return Metric(name, "histogram", description, tuple(tags), source, tuple(boundaries))


# --- the app's own (deployments/metrics.py) ---------------------------------------------------
# The descriptions are the HELP text Prometheus shows.
# The step router (RouterMetrics, in the ingress replicas).
ROUTER_STEPS = _histogram("dllm_router_steps", "Denoising steps per block chosen for a request.",
                          "router", ("quality", "pinned"))
ROUTER_RUNG = _gauge("dllm_router_rung", "Current step-ladder rung (0 = best quality).", "router")
CLUSTER_DRAIN = _gauge("dllm_cluster_drain_seconds", "Cluster backlog over capacity, in seconds.",
                       "router")
CLUSTER_BACKLOG = _gauge("dllm_cluster_token_backlog",
                         "Token-steps of accepted work in the cluster.", "router")
CLUSTER_REPLICAS = _gauge("dllm_cluster_reporting_replicas",
                          "Model-server replicas in the load snapshot.", "router")
# The OpenAI API (IngressMetrics).
REQUESTS_REJECTED = _counter("dllm_requests_rejected_total", "Requests refused for load (429/503).",
                             "ingress", ("status",))
IGNORED_FIELDS = _counter("dllm_ignored_request_fields_total",
                          "Unknown request fields accepted and ignored.", "ingress")
REQUEST_STEPS = _histogram("dllm_request_denoising_steps", "Forward passes spent per request.",
                           "ingress", boundaries=PASSES)
# Time to first token and end-to-end latency as the API sees them (Ray's proxy latency counts a
# stream until its end, not its first token).
TIME_TO_FIRST_TOKEN = _histogram("dllm_time_to_first_token_seconds",
                                 "Time from request to first streamed token.", "ingress",
                                 ("route",), SECONDS)
REQUEST_LATENCY = _histogram("dllm_request_latency_seconds",
                             "End-to-end request latency at the API.", "ingress", ("route",),
                             SECONDS)
# The model-server replicas (ServerMetrics). One gauge per engine.types.EngineStats field, named
# dllm_engine_<field>; the KV pool size is there so KV use can be shown as a fraction.
def _engine_stat(field: str, description: str) -> Metric:
    return Metric(f"dllm_engine_{field}", "gauge", description, (), "server")


ENGINE_QUEUED = _engine_stat("queued", "Requests waiting for a slot.")
ENGINE_RUNNING = _engine_stat("running", "Sequences in the step batch.")
ENGINE_BACKLOG = _engine_stat("token_backlog", "Work left on the replica, in token-steps.")
ENGINE_CAPACITY = _engine_stat("capacity_token_steps_per_s",
                               "Measured processing rate, token-steps/s.")
ENGINE_STEP_LATENCY = _engine_stat("step_latency_ms", "Recent mean wall time of one batched step.")
ENGINE_OUTPUT_TPS = _engine_stat("output_tokens_per_s", "Recent committed tokens per second.")
ENGINE_KV_USED = _engine_stat("kv_pages_used", "KV pages in use.")
ENGINE_KV_TOTAL = _engine_stat("kv_pages_total", "KV pages in the pool.")
# EngineStats field -> the gauge that shows it.
ENGINE_STATS: dict[str, Metric] = {
    m.name.removeprefix("dllm_engine_"): m
    for m in (ENGINE_QUEUED, ENGINE_RUNNING, ENGINE_BACKLOG, ENGINE_CAPACITY, ENGINE_STEP_LATENCY,
              ENGINE_OUTPUT_TPS, ENGINE_KV_USED, ENGINE_KV_TOTAL)
}
TP_RANKS = _gauge(
    "dllm_tensor_parallel_ranks",
    "Ranks of the replica's tensor-parallel group (1 without TP; 0 once a rank failed).",
    "server")
REQUESTS_FINISHED = _counter("dllm_requests_finished_total", "Engine requests by finish reason.",
                             "server", ("finish_reason",))
COMPLETION_TOKENS = _counter("dllm_completion_tokens_total", "Tokens generated.", "server")
DENOISING_STEPS = _counter("dllm_denoising_steps_total",
                           "Denoising forward passes spent on requests.", "server")

APP_METRICS: tuple[Metric, ...] = (
    ROUTER_STEPS, ROUTER_RUNG, CLUSTER_DRAIN, CLUSTER_BACKLOG, CLUSTER_REPLICAS,
    REQUESTS_REJECTED, IGNORED_FIELDS, REQUEST_STEPS, TIME_TO_FIRST_TOKEN, REQUEST_LATENCY,
    ENGINE_QUEUED, ENGINE_RUNNING, ENGINE_BACKLOG, ENGINE_CAPACITY, ENGINE_STEP_LATENCY,
    ENGINE_OUTPUT_TPS, ENGINE_KV_USED, ENGINE_KV_TOTAL, TP_RANKS,
    REQUESTS_FINISHED, COMPLETION_TOKENS, DENOISING_STEPS,
)

# --- Ray Serve's own (names read off the 2.60 wheel) --------------------------------------------
HTTP_REQUESTS = _counter("serve_num_http_requests", "HTTP requests through Serve's proxy.", "ray",
                         ("route", "method", "application", "status_code"))
HTTP_LATENCY = _histogram("serve_http_request_latency_ms",
                          "End-to-end latency at Serve's proxy (a stream until its end).", "ray",
                          ("route", "application", "status_code"))
PROCESSING_LATENCY = _histogram("serve_deployment_processing_latency_ms",
                                "Time a replica spent on a request.", "ray", ("deployment",))
QUEUED_QUERIES = _gauge("serve_deployment_queued_queries",
                        "Requests waiting in handles for a replica.", "ray", ("deployment",))
PROCESSING_QUERIES = _gauge("serve_replica_processing_queries", "Requests a replica is processing.",
                            "ray", ("deployment",))
REPLICA_HEALTHY = _gauge("serve_deployment_replica_healthy", "1 per healthy replica.", "ray",
                         ("deployment", "replica"))
TARGET_REPLICAS = _gauge("serve_autoscaling_target_replicas",
                         "Replicas the autoscaler is trying to reach.", "ray", ("deployment",))
DESIRED_REPLICAS = _gauge("serve_autoscaling_desired_replicas",
                          "The autoscaling policy's raw decision.", "ray", ("deployment",))

RAY_METRICS: tuple[Metric, ...] = (
    HTTP_REQUESTS, HTTP_LATENCY, PROCESSING_LATENCY, QUEUED_QUERIES, PROCESSING_QUERIES,
    REPLICA_HEALTHY, TARGET_REPLICAS, DESIRED_REPLICAS,
)

ALL_METRICS: tuple[Metric, ...] = APP_METRICS + RAY_METRICS


def by_name(name: str) -> Metric:
    """A definition by its Ray name or its Prometheus family name."""
    for m in ALL_METRICS:
        if name in (m.name, m.prom):
            return m
    raise KeyError(name)


def from_source(source: str) -> tuple[Metric, ...]:
    """The app metrics one deployment part creates ("router", "ingress" or "server")."""
    return tuple(m for m in APP_METRICS if m.source == source)
