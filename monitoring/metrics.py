"""The names of every metric the dashboard and the tests rely on, in one place.

    from monitoring.metrics import APP_METRICS, RAY_METRICS, prom_name
    prom_name(ROUTER_STEPS)                  # -> "ray_dllm_router_steps" (what Prometheus stores)
    ROUTER_STEPS.series("bucket")            # -> "ray_dllm_router_steps_bucket"

The app's own metrics are created with `ray.serve.metrics` in deployments/ (router.py,
openai_api.py, server.py); this module only names them, with their kind and tags, so the
dashboard (monitoring/dashboard.py) and the Prometheus test (tests/monitoring/) agree with the
code. tests/monitoring/test_metric_names.py reads the deployments' source and fails when a
metric is created there that is not listed here, or listed here and no longer created.

How Ray exports them (checked on 2.60 with a scrape of the metrics port): every name gets the
prefix `ray_`; a counter gets `_total` appended unless its name already ends in `_total`; a
histogram becomes `_bucket`, `_sum` and `_count` series. Serve adds the tags `application`,
`deployment` and `replica`; Ray adds `NodeAddress`, `SessionName`, `WorkerId`, ...

The autoscaling stats keys (record_autoscaling_stats -> autoscaling/policy.py) are not metrics:
Serve keeps them in the controller. AUTOSCALING_STAT_KEYS re-exports them for documentation.
"""

from __future__ import annotations

from dataclasses import dataclass

from autoscaling.policy import AUTOSCALING_STAT_KEYS  # noqa: F401 - re-exported

RAY_PREFIX = "ray_"


@dataclass(frozen=True)
class Metric:
    name: str  # as passed to ray.serve.metrics (or Ray's own name, without the ray_ prefix)
    kind: str  # "counter" | "gauge" | "histogram"
    description: str
    tags: tuple[str, ...] = ()
    source: str = ""  # where it is created: "router", "ingress", "server" or "ray"

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


# --- the app's own (deployments/) -------------------------------------------------------------
# The step router (deployments/router.py, in the ingress replicas).
ROUTER_STEPS = Metric(
    "dllm_router_steps",
    "histogram",
    "Denoising steps per block chosen for a request.",
    ("quality", "pinned"),
    "router",
)
ROUTER_RUNG = Metric(
    "dllm_router_rung", "gauge", "Current step-ladder rung (0 = best quality).", (), "router"
)
CLUSTER_DRAIN = Metric(
    "dllm_cluster_drain_seconds",
    "gauge",
    "Cluster backlog over capacity, in seconds.",
    (),
    "router",
)
CLUSTER_BACKLOG = Metric(
    "dllm_cluster_token_backlog",
    "gauge",
    "Token-steps of accepted work in the cluster.",
    (),
    "router",
)
CLUSTER_REPLICAS = Metric(
    "dllm_cluster_reporting_replicas",
    "gauge",
    "Model-server replicas in the load snapshot.",
    (),
    "router",
)
# The OpenAI API (deployments/openai_api.py).
REQUESTS_REJECTED = Metric(
    "dllm_requests_rejected_total",
    "counter",
    "Requests refused for load (429/503).",
    ("status",),
    "ingress",
)
IGNORED_FIELDS = Metric(
    "dllm_ignored_request_fields_total",
    "counter",
    "Unknown request fields accepted and ignored.",
    (),
    "ingress",
)
REQUEST_STEPS = Metric(
    "dllm_request_denoising_steps", "histogram", "Forward passes spent per request.", (), "ingress"
)
# The model-server replicas (deployments/server.py).
ENGINE_QUEUED = Metric("dllm_engine_queued", "gauge", "Requests waiting for a slot.", (), "server")
ENGINE_RUNNING = Metric(
    "dllm_engine_running",
    "gauge",
    "Sequences in the step batch (the engine's batch size).",
    (),
    "server",
)
ENGINE_BACKLOG = Metric(
    "dllm_engine_token_backlog", "gauge", "Work left on the replica, in token-steps.", (), "server"
)
ENGINE_CAPACITY = Metric(
    "dllm_engine_capacity_token_steps_per_s",
    "gauge",
    "Measured processing rate, token-steps/s.",
    (),
    "server",
)
ENGINE_STEP_LATENCY = Metric(
    "dllm_engine_step_latency_ms",
    "gauge",
    "Recent mean wall time of one batched step.",
    (),
    "server",
)
ENGINE_OUTPUT_TPS = Metric(
    "dllm_engine_output_tokens_per_s", "gauge", "Recent committed tokens per second.", (), "server"
)
ENGINE_KV_USED = Metric("dllm_engine_kv_pages_used", "gauge", "KV pages in use.", (), "server")
REQUESTS_FINISHED = Metric(
    "dllm_requests_finished_total",
    "counter",
    "Engine requests by finish reason.",
    ("finish_reason",),
    "server",
)
COMPLETION_TOKENS = Metric(
    "dllm_completion_tokens_total", "counter", "Tokens generated (output tokens).", (), "server"
)
DENOISING_STEPS = Metric(
    "dllm_denoising_steps_total",
    "counter",
    "Denoising forward passes spent on requests.",
    (),
    "server",
)


# Time to first token and end-to-end latency as the API sees them (Ray's proxy latency below
# counts a stream until its end, not its first token), and the KV pool size so KV use can be
# shown as a fraction.
TIME_TO_FIRST_TOKEN = Metric(
    "dllm_time_to_first_token_seconds",
    "histogram",
    "Time from request to first streamed token.",
    ("route",),
    "ingress",
)
REQUEST_LATENCY = Metric(
    "dllm_request_latency_seconds",
    "histogram",
    "End-to-end request latency at the API.",
    ("route",),
    "ingress",
)
ENGINE_KV_TOTAL = Metric(
    "dllm_engine_kv_pages_total", "gauge", "KV pages in the pool.", (), "server"
)
TP_RANKS = Metric(
    "dllm_tensor_parallel_ranks", "gauge",
    "Ranks of the replica's tensor-parallel group (1 without TP; 0 once a rank failed).", (),
    "server",
)
APP_METRICS: tuple[Metric, ...] = (
    ROUTER_STEPS,
    ROUTER_RUNG,
    CLUSTER_DRAIN,
    CLUSTER_BACKLOG,
    CLUSTER_REPLICAS,
    REQUESTS_REJECTED,
    IGNORED_FIELDS,
    REQUEST_STEPS,
    ENGINE_QUEUED,
    ENGINE_RUNNING,
    ENGINE_BACKLOG,
    ENGINE_CAPACITY,
    ENGINE_STEP_LATENCY,
    ENGINE_OUTPUT_TPS,
    ENGINE_KV_USED,
    REQUESTS_FINISHED,
    COMPLETION_TOKENS,
    DENOISING_STEPS,
    TIME_TO_FIRST_TOKEN,
    REQUEST_LATENCY,
    ENGINE_KV_TOTAL,
    TP_RANKS,
)
# Named here before the deployments create them; empty now that all three are exported.
PROPOSED_METRICS: tuple[Metric, ...] = ()

# --- Ray Serve's own (names read off the 2.60 wheel; see the ray-2.60 notes) -------------------
HTTP_REQUESTS = Metric(
    "serve_num_http_requests",
    "counter",
    "HTTP requests through Serve's proxy.",
    ("route", "method", "application", "status_code"),
    "ray",
)
HTTP_LATENCY = Metric(
    "serve_http_request_latency_ms",
    "histogram",
    "End-to-end latency at Serve's proxy (a stream until its end).",
    ("route", "application", "status_code"),
    "ray",
)
PROCESSING_LATENCY = Metric(
    "serve_deployment_processing_latency_ms",
    "histogram",
    "Time a replica spent on a request.",
    ("deployment",),
    "ray",
)
QUEUED_QUERIES = Metric(
    "serve_deployment_queued_queries",
    "gauge",
    "Requests waiting in handles for a replica.",
    ("deployment",),
    "ray",
)
PROCESSING_QUERIES = Metric(
    "serve_replica_processing_queries",
    "gauge",
    "Requests a replica is processing.",
    ("deployment",),
    "ray",
)
REPLICA_HEALTHY = Metric(
    "serve_deployment_replica_healthy",
    "gauge",
    "1 per healthy replica.",
    ("deployment", "replica"),
    "ray",
)
TARGET_REPLICAS = Metric(
    "serve_autoscaling_target_replicas",
    "gauge",
    "Replicas the autoscaler is trying to reach.",
    ("deployment",),
    "ray",
)
DESIRED_REPLICAS = Metric(
    "serve_autoscaling_desired_replicas",
    "gauge",
    "The autoscaling policy's raw decision.",
    ("deployment",),
    "ray",
)

RAY_METRICS: tuple[Metric, ...] = (
    HTTP_REQUESTS,
    HTTP_LATENCY,
    PROCESSING_LATENCY,
    QUEUED_QUERIES,
    PROCESSING_QUERIES,
    REPLICA_HEALTHY,
    TARGET_REPLICAS,
    DESIRED_REPLICAS,
)

ALL_METRICS: tuple[Metric, ...] = APP_METRICS + RAY_METRICS


def by_name(name: str) -> Metric:
    for m in ALL_METRICS + PROPOSED_METRICS:
        if name in (m.name, m.prom):
            return m
    raise KeyError(name)
