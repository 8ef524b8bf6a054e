"""The Grafana dashboard of dllm-serve, built as code with grafana-foundation-sdk.

    dllm dashboard --out dashboard.json                   # write the dashboard JSON
    GRAFANA_API_KEY=... dllm dashboard --upload --url http://grafana:3000 [--folder-uid UID]

    from monitoring.dashboard import build_dashboard, dashboard_json, query_metric_names
    query_metric_names(dashboard_json())   # every Prometheus series the panels query

The panels are one table (ROWS: a row title and its panels, each a title, unit, queries and
description); build_dashboard turns it into the SDK's builders. Rows: at a glance; traffic
(requests, rejections, output tokens); latency (time to first token, end to end at the API and
at Serve's proxy, time on a replica); quality (steps the router chooses, its rung, passes per
request); load and autoscaling (cluster drain time and backlog, healthy/target replicas,
queues); engine (per replica: batch size, backlog, capacity, step time, KV pages, TP ranks).
Every query names a metric of monitoring/metrics.py, i.e. one the app or Ray exports; the
Prometheus test checks those names against a real scrape.

Uploading needs the optional extra `grafana` (grafana-client, which pulls niquests and
urllib3-future: kept out of the serving environment, see docs/deploy.md). The API key comes
from the environment (GRAFANA_API_KEY, or GRAFANA_TOKEN), never from the command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh

from monitoring import metrics as M

log = logging.getLogger(__name__)

UID = "dllm-serve"
TITLE = "dllm-serve: diffusion LM serving"
SERVER = "ModelServer"  # the Serve name of the model-server deployment
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
APP = 'application=~"$application"'
SRV = f'{APP},deployment="{SERVER}"'
RATE = "$__rate_interval"


# --- queries ------------------------------------------------------------------------------------
def rate(metric: M.Metric, selector: str = APP, by: str = "", series: str = "") -> str:
    """Per-second rate summed over replicas (by: the labels to keep)."""
    group = f" by ({by}) " if by else ""
    return f"sum{group}(rate({series or metric.prom}{{{selector}}}[{RATE}]))"


def quantile(p: float, metric: M.Metric, selector: str = APP, by: str = "") -> str:
    group = f"le,{by}" if by else "le"
    return (f"histogram_quantile({p}, sum by ({group}) "
            f"(rate({metric.series('bucket')}{{{selector}}}[{RATE}])))")


def quantiles(metric: M.Metric, selector: str = APP, by: str = "", qs=(0.5, 0.95, 0.99)):
    """(query, legend) per quantile: p50, p95, ... (per `by` label when given)."""
    legend = f" {{{{{by}}}}}" if by else ""
    return [(quantile(p, metric, selector, by), f"p{round(p * 100)}{legend}") for p in qs]


def mean(metric: M.Metric, by: str) -> str:
    """A histogram's mean observation per `by` group: rate of the sum over rate of the count."""
    return (f"{rate(metric, by=by, series=metric.series('sum'))} / "
            f"{rate(metric, by=by, series=metric.series('count'))}")


def total(metric: M.Metric, selector: str = APP) -> str:
    """Summed over replicas (counts of replicas, queue lengths)."""
    return f"sum({metric.prom}{{{selector}}})"


def highest(metric: M.Metric, selector: str = APP) -> str:
    """The largest value any replica reports (for values every ingress replica holds a copy of,
    or Serve's per-deployment gauges)."""
    return f"max({metric.prom}{{{selector}}})"


def per_replica(metric: M.Metric) -> list[tuple[str, str]]:
    return [(f"{metric.prom}{{{SRV}}}", "{{replica}}")]


# --- the panels ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Panel:
    """One panel. Grafana lays panels out left to right on a 24-column grid in table order,
    wrapping to a new line when a row is full: `width` is the panel's position on it."""

    kind: str  # "stat" (one number, 4 x 4) | "timeseries" (8 high)
    title: str
    unit: str
    targets: list[tuple[str, str]]  # (PromQL, legend)
    description: str
    width: int = 8
    stack: bool = False  # stack the series (a breakdown of one total)


def single(title: str, unit: str, query: str, description: str) -> Panel:
    return Panel("stat", title, unit, [(query, "")], description, width=4)


def graph(title: str, unit: str, targets: list[tuple[str, str]], description: str,
          stack: bool = False) -> Panel:
    return Panel("timeseries", title, unit, targets, description, stack=stack)


# (row title, its panels), top to bottom.
ROWS: list[tuple[str, list[Panel]]] = [
    ("At a glance", [
        single("Requests/s", "reqps", rate(M.HTTP_REQUESTS),
               "HTTP requests through Serve's proxy."),
        single("Output tokens/s", "short", rate(M.COMPLETION_TOKENS),
             "Tokens generated over all replicas."),
        single("p95 latency", "s", quantile(0.95, M.REQUEST_LATENCY), "End to end at the API."),
        single("Model-server replicas", "short", total(M.REPLICA_HEALTHY, SRV),
             "Healthy ModelServer replicas."),
        single("Router rung", "short", highest(M.ROUTER_RUNG),
             "0 = best quality; higher = fewer steps."),
        single("Cluster drain time", "s", highest(M.CLUSTER_DRAIN),
             "Accepted work over capacity."),
    ]),
    ("Traffic", [
        graph("Requests by status", "reqps",
              [(rate(M.HTTP_REQUESTS, by="status_code"), "{{status_code}}")],
              "HTTP requests/s at Serve's proxy by status code.", stack=True),
        graph("Rejected for load", "reqps",
              [(rate(M.REQUESTS_REJECTED, by="status"), "{{status}}")],
              "429 (ingress limits) and 503 (queues full)/s."),
        graph("Finished and output tokens", "short",
              [(rate(M.REQUESTS_FINISHED, by="finish_reason"), "{{finish_reason}} req/s"),
               (rate(M.COMPLETION_TOKENS), "output tok/s")],
              "Engine requests/s by finish reason; output tokens/s."),
    ]),
    ("Latency", [
        graph("Time to first token", "s",
              quantiles(M.TIME_TO_FIRST_TOKEN, by="route", qs=(0.5, 0.95)),
              "From request to the first streamed token, by route."),
        graph("End-to-end latency", "s",
              quantiles(M.REQUEST_LATENCY)
              + [(f"{quantile(0.95, M.HTTP_LATENCY)} / 1000", "p95 at the proxy")],
              "At the API (until the last token), and at Serve's proxy for comparison."),
        graph("Time on a model-server replica", "ms", quantiles(M.PROCESSING_LATENCY, SRV),
              "Serve's processing latency of ModelServer calls."),
    ]),
    ("Quality: denoising steps", [
        graph("Steps chosen per block", "short",
              [(mean(M.ROUTER_STEPS, by="quality, pinned"), "{{quality}} pinned={{pinned}}")],
              "Mean steps per block the step router chose, by quality level (pinned requests "
              "apart)."),
        graph("Router rung", "short",
              [(f"max by (replica) ({M.ROUTER_RUNG.prom}{{{APP}}})", "{{replica}}")],
              "Step-ladder rung per ingress replica (0 = best)."),
        graph("Forward passes per request", "short",
              quantiles(M.REQUEST_STEPS, qs=(0.5, 0.95))
              + [(rate(M.DENOISING_STEPS), "passes/s (all)")],
              "Denoising passes a request cost."),
    ]),
    ("Load and autoscaling", [
        graph("Cluster load", "short",
              [(highest(M.CLUSTER_DRAIN), "drain s"),
               (f"{highest(M.CLUSTER_BACKLOG)} / 1000", "backlog (k token-steps)")],
              "Drain time (accepted work / capacity) and token backlog, as the step router sees "
              "them."),
        graph("Replicas", "short",
              [(total(M.REPLICA_HEALTHY, SRV), "healthy"),
               (highest(M.TARGET_REPLICAS, SRV), "target"),
               (highest(M.DESIRED_REPLICAS, SRV), "desired"),
               (highest(M.CLUSTER_REPLICAS), "reporting load")],
              "Healthy ModelServer replicas against the autoscaler's target and the policy's raw "
              "decision."),
        graph("Queues", "short",
              [(total(M.QUEUED_QUERIES, SRV), "in handles"),
               (total(M.ENGINE_QUEUED, SRV), "in engines"),
               (total(M.PROCESSING_QUERIES, SRV), "on replicas")],
              "Requests waiting in Serve handles and in the engines."),
    ]),
    ("Engine (per replica)", [
        graph("Batch size", "short", per_replica(M.ENGINE_RUNNING), "Sequences in the step batch."),
        graph("Token backlog", "short", per_replica(M.ENGINE_BACKLOG),
              "Work left on each replica (token-steps)."),
        graph("Capacity", "short", per_replica(M.ENGINE_CAPACITY),
              "Measured processing rate (token-steps/s)."),
        graph("Step latency", "ms", per_replica(M.ENGINE_STEP_LATENCY),
              "Mean wall time of one batched step."),
        graph("Output tokens/s", "short", per_replica(M.ENGINE_OUTPUT_TPS),
              "Committed tokens per second."),
        graph("KV cache use", "percentunit",
              [(f"{M.ENGINE_KV_USED.prom}{{{SRV}}} / "
                f"clamp_min({M.ENGINE_KV_TOTAL.prom}{{{SRV}}}, 1)", "{{replica}}")],
              "Fraction of the paged KV pool in use."),
        graph("Tensor-parallel ranks", "short", per_replica(M.TP_RANKS),
              "Ranks in each replica's group: 1 without TP, 0 while a replica with a failed rank "
              "waits to be replaced."),
    ]),
]


# --- building -----------------------------------------------------------------------------------
def build_panel(spec: Panel) -> stat.Panel | timeseries.Panel:
    if spec.kind == "stat":
        panel = stat.Panel().height(4)
    else:
        panel = (
            timeseries.Panel()
            .height(8)
            .line_width(1)
            .fill_opacity(10)
            .legend(
                common_builders.VizLegendOptions()
                .show_legend(True)
                .display_mode(common.LegendDisplayMode.LIST)
                .placement(common.LegendPlacement.BOTTOM)
            )
        )
        if spec.stack:
            panel = panel.stacking(
                common_builders.StackingConfig().mode(common.StackingMode.NORMAL))
    panel = (panel.title(spec.title).description(spec.description).datasource(DS)
             .unit(spec.unit).span(spec.width))
    for i, (expr, legend) in enumerate(spec.targets):
        target = prometheus.Dataquery().expr(expr).datasource(DS).ref_id(chr(ord("A") + i))
        panel = panel.with_target(target.legend_format(legend) if legend else target)
    return panel


def build_dashboard() -> dash.Dashboard:
    d = (
        dash.Dashboard(TITLE)
        .uid(UID)
        .tags(["dllm-serve", "ray-serve"])
        .refresh("10s")
        .time("now-30m", "now")
        .timezone("browser")
        .editable()
        .with_variable(dash.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
        .with_variable(
            dash.QueryVariable("application")
            .label("Application")
            .datasource(DS)
            .query(f"label_values({M.REPLICA_HEALTHY.prom}, application)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .include_all(True)
            .all_value(".*")
            .multi(False)
        )
    )
    for row, panels in ROWS:
        d = d.with_row(dash.Row(row))
        for spec in panels:
            d = d.with_panel(build_panel(spec))
    return d


def dashboard_json() -> dict:
    """The dashboard as the JSON model Grafana stores."""
    return json.loads(json.dumps(build_dashboard().build(), cls=JSONEncoder))


_SERIES = re.compile(r"\b(ray_[a-zA-Z0-9_]+)")


def query_metric_names(model: dict) -> set[str]:
    """Every Prometheus series name in the dashboard's queries (panels and variables)."""
    names: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "query") and isinstance(value, str):
                    names.update(_SERIES.findall(value))
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(model)
    return names


def metric_families(names: set[str]) -> set[str]:
    """Series names -> metric family names (histogram _bucket/_sum/_count folded)."""
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def upload(
    model: dict, url: str, folder_uid: str | None = None, api_key: str | None = None
) -> dict:
    """POST the dashboard to Grafana (overwriting the same uid) with grafana-client."""
    try:
        from grafana_client import GrafanaApi
    except ImportError:
        raise SystemExit(
            "uploading needs grafana-client: pip install 'dllm-serve[grafana]'"
        ) from None
    api_key = api_key or os.environ.get("GRAFANA_API_KEY") or os.environ.get("GRAFANA_TOKEN")
    if not api_key:
        raise SystemExit("set GRAFANA_API_KEY (a Grafana service-account token)")
    api = GrafanaApi.from_url(url, credential=api_key)
    payload = {"dashboard": model, "overwrite": True, "message": "dllm dashboard --upload"}
    if folder_uid:
        payload["folderUid"] = folder_uid
    return api.dashboard.update_dashboard(payload)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dllm dashboard", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the dashboard JSON here")
    parser.add_argument("--upload", action="store_true", help="upload to Grafana (--url)")
    parser.add_argument("--url", help="Grafana base URL, e.g. http://localhost:3000")
    parser.add_argument("--folder-uid", help="Grafana folder to put the dashboard in")
    args = parser.parse_args(argv)
    if not args.out and not args.upload:
        parser.error("give --out FILE and/or --upload --url URL")
    if args.upload and not args.url:
        parser.error("--upload needs --url")
    model = dashboard_json()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(model, indent=2) + "\n")
        print(f"wrote {args.out} ({len(model.get('panels', []))} panels)")
    if args.upload:
        result = upload(model, args.url, args.folder_uid)
        print(f"uploaded: {result.get('url', result)}")


if __name__ == "__main__":
    main(sys.argv[1:])
