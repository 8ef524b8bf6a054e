"""The Grafana dashboard of dllm-serve, built as code with grafana-foundation-sdk.

    dllm dashboard --out dashboard.json                   # write the dashboard JSON
    GRAFANA_API_KEY=... dllm dashboard --upload --url http://grafana:3000 [--folder-uid UID]

    from monitoring.dashboard import build_dashboard, dashboard_json, query_metric_names
    query_metric_names(dashboard_json())   # every Prometheus series the panels query

Rows: traffic (requests, rejections, output tokens), latency (time to first token, end to end
at the API and at Serve's proxy, time on a replica), quality (steps the router chooses, its rung, passes per request), load and
autoscaling (cluster drain time and backlog, healthy/target replicas, handle queues), engine
(per replica: batch size, queue, backlog, capacity, step time, KV pages). Every query names a
metric from monitoring/metrics.py, i.e. one the app or Ray exports; the Prometheus test checks
those names against a real scrape.

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
SERVER = "ModelServer"  # the model-server deployment's name (deployments/server.py)
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
APP = 'application=~"$application"'
SRV = f'{APP},deployment="{SERVER}"'
RATE = "$__rate_interval"


def q(expr: str, legend: str = "") -> prometheus.Dataquery:
    target = prometheus.Dataquery().expr(expr).datasource(DS)
    if legend:
        target = target.legend_format(legend)
    return target


def ts(
    title: str,
    description: str,
    targets: list[prometheus.Dataquery],
    unit: str = "short",
    width: int = 8,
    stack: bool = False,
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .unit(unit)
        .span(width)
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
    if stack:
        panel = panel.stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL))
    for i, target in enumerate(targets):
        panel = panel.with_target(target.ref_id(chr(ord("A") + i)))
    return panel


def single(title: str, description: str, expr: str, unit: str = "short") -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .unit(unit)
        .span(4)
        .height(4)
        .with_target(q(expr).ref_id("A"))
    )


def quantiles(metric: M.Metric, selector: str, by: str = "", qs=(0.5, 0.95, 0.99)):
    group = f"le{',' + by if by else ''}"
    return [
        q(
            f"histogram_quantile({p}, sum by ({group}) "
            f"(rate({metric.series('bucket')}{{{selector}}}[{RATE}])))",
            f"p{round(p * 100)}" + (f" {{{{{by}}}}}" if by else ""),
        )
        for p in qs
    ]


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

    # --- at a glance ------------------------------------------------------------------------
    d = d.with_row(dash.Row("At a glance"))
    d = d.with_panel(
        single(
            "Requests/s",
            "HTTP requests through Serve's proxy.",
            f"sum(rate({M.HTTP_REQUESTS.prom}{{{APP}}}[{RATE}]))",
            "reqps",
        )
    )
    d = d.with_panel(
        single(
            "Output tokens/s",
            "Tokens generated over all replicas.",
            f"sum(rate({M.COMPLETION_TOKENS.prom}{{{APP}}}[{RATE}]))",
        )
    )
    d = d.with_panel(
        single(
            "p95 latency",
            "End to end at the API.",
            f"histogram_quantile(0.95, sum by (le) (rate("
            f"{M.REQUEST_LATENCY.series('bucket')}{{{APP}}}[{RATE}])))",
            "s",
        )
    )
    d = d.with_panel(
        single(
            "Model-server replicas",
            "Healthy ModelServer replicas.",
            f"sum({M.REPLICA_HEALTHY.prom}{{{SRV}}})",
        )
    )
    d = d.with_panel(
        single(
            "Router rung",
            "0 = best quality; higher = fewer steps.",
            f"max({M.ROUTER_RUNG.prom}{{{APP}}})",
        )
    )
    d = d.with_panel(
        single(
            "Cluster drain time",
            "Accepted work over capacity.",
            f"max({M.CLUSTER_DRAIN.prom}{{{APP}}})",
            "s",
        )
    )

    # --- traffic ----------------------------------------------------------------------------
    d = d.with_row(dash.Row("Traffic"))
    d = d.with_panel(
        ts(
            "Requests by status",
            "HTTP requests/s at Serve's proxy by status code.",
            [
                q(
                    f"sum by (status_code) (rate({M.HTTP_REQUESTS.prom}{{{APP}}}[{RATE}]))",
                    "{{status_code}}",
                )
            ],
            "reqps",
            stack=True,
        )
    )
    d = d.with_panel(
        ts(
            "Rejected for load",
            "429 (ingress limits) and 503 (queues full)/s.",
            [
                q(
                    f"sum by (status) (rate({M.REQUESTS_REJECTED.prom}{{{APP}}}[{RATE}]))",
                    "{{status}}",
                )
            ],
            "reqps",
        )
    )
    d = d.with_panel(
        ts(
            "Finished and output tokens",
            "Engine requests/s by finish reason; output tokens/s.",
            [
                q(
                    f"sum by (finish_reason) (rate({M.REQUESTS_FINISHED.prom}{{{APP}}}[{RATE}]))",
                    "{{finish_reason}} req/s",
                ),
                q(f"sum(rate({M.COMPLETION_TOKENS.prom}{{{APP}}}[{RATE}]))", "output tok/s"),
            ],
        )
    )

    # --- latency ----------------------------------------------------------------------------
    d = d.with_row(dash.Row("Latency"))
    d = d.with_panel(
        ts(
            "Time to first token",
            "From request to the first streamed token, by route.",
            quantiles(M.TIME_TO_FIRST_TOKEN, APP, by="route", qs=(0.5, 0.95)),
            "s",
        )
    )
    d = d.with_panel(
        ts(
            "End-to-end latency",
            "At the API (until the last token), and at Serve's proxy for comparison.",
            quantiles(M.REQUEST_LATENCY, APP)
            + [
                q(
                    f"histogram_quantile(0.95, sum by (le) (rate("
                    f"{M.HTTP_LATENCY.series('bucket')}{{{APP}}}[{RATE}]))) / 1000",
                    "p95 at the proxy",
                )
            ],
            "s",
        )
    )
    d = d.with_panel(
        ts(
            "Time on a model-server replica",
            "Serve's processing latency of ModelServer calls.",
            quantiles(M.PROCESSING_LATENCY, SRV),
            "ms",
        )
    )

    # --- quality ----------------------------------------------------------------------------
    d = d.with_row(dash.Row("Quality: denoising steps"))
    d = d.with_panel(
        ts(
            "Steps chosen per block",
            "Mean steps per block the step router chose, by quality level (pinned requests apart).",
            [
                q(
                    f"sum by (quality, pinned) (rate({M.ROUTER_STEPS.series('sum')}{{{APP}}}[{RATE}])) / "
                    f"sum by (quality, pinned) (rate({M.ROUTER_STEPS.series('count')}{{{APP}}}[{RATE}]))",
                    "{{quality}} pinned={{pinned}}",
                )
            ],
        )
    )
    d = d.with_panel(
        ts(
            "Router rung",
            "Step-ladder rung per ingress replica (0 = best).",
            [q(f"max by (replica) ({M.ROUTER_RUNG.prom}{{{APP}}})", "{{replica}}")],
        )
    )
    d = d.with_panel(
        ts(
            "Forward passes per request",
            "Denoising passes a request cost.",
            quantiles(M.REQUEST_STEPS, APP, qs=(0.5, 0.95))
            + [q(f"sum(rate({M.DENOISING_STEPS.prom}{{{APP}}}[{RATE}]))", "passes/s (all)")],
        )
    )

    # --- load and autoscaling ---------------------------------------------------------------
    d = d.with_row(dash.Row("Load and autoscaling"))
    d = d.with_panel(
        ts(
            "Cluster load",
            "Drain time (accepted work / capacity) and token "
            "backlog, as the step router sees them.",
            [
                q(f"max({M.CLUSTER_DRAIN.prom}{{{APP}}})", "drain s"),
                q(f"max({M.CLUSTER_BACKLOG.prom}{{{APP}}}) / 1000", "backlog (k token-steps)"),
            ],
        )
    )
    d = d.with_panel(
        ts(
            "Replicas",
            "Healthy ModelServer replicas against the autoscaler's "
            "target and the policy's raw decision.",
            [
                q(f"sum({M.REPLICA_HEALTHY.prom}{{{SRV}}})", "healthy"),
                q(f"max({M.TARGET_REPLICAS.prom}{{{SRV}}})", "target"),
                q(f"max({M.DESIRED_REPLICAS.prom}{{{SRV}}})", "desired"),
                q(f"max({M.CLUSTER_REPLICAS.prom}{{{APP}}})", "reporting load"),
            ],
        )
    )
    d = d.with_panel(
        ts(
            "Queues",
            "Requests waiting in Serve handles and in the engines.",
            [
                q(f"sum({M.QUEUED_QUERIES.prom}{{{SRV}}})", "in handles"),
                q(f"sum({M.ENGINE_QUEUED.prom}{{{SRV}}})", "in engines"),
                q(f"sum({M.PROCESSING_QUERIES.prom}{{{SRV}}})", "on replicas"),
            ],
        )
    )

    # --- engine -----------------------------------------------------------------------------
    d = d.with_row(dash.Row("Engine (per replica)"))
    per = "{{replica}}"
    d = d.with_panel(
        ts(
            "Batch size",
            "Sequences in the step batch.",
            [q(f"{M.ENGINE_RUNNING.prom}{{{SRV}}}", per)],
        )
    )
    d = d.with_panel(
        ts(
            "Token backlog",
            "Work left on each replica (token-steps).",
            [q(f"{M.ENGINE_BACKLOG.prom}{{{SRV}}}", per)],
        )
    )
    d = d.with_panel(
        ts(
            "Capacity",
            "Measured processing rate (token-steps/s).",
            [q(f"{M.ENGINE_CAPACITY.prom}{{{SRV}}}", per)],
        )
    )
    d = d.with_panel(
        ts(
            "Step latency",
            "Mean wall time of one batched step.",
            [q(f"{M.ENGINE_STEP_LATENCY.prom}{{{SRV}}}", per)],
            "ms",
        )
    )
    d = d.with_panel(
        ts(
            "Output tokens/s",
            "Committed tokens per second.",
            [q(f"{M.ENGINE_OUTPUT_TPS.prom}{{{SRV}}}", per)],
        )
    )
    d = d.with_panel(
        ts(
            "KV cache use",
            "Fraction of the paged KV pool in use.",
            [
                q(
                    f"{M.ENGINE_KV_USED.prom}{{{SRV}}} / "
                    f"clamp_min({M.ENGINE_KV_TOTAL.prom}{{{SRV}}}, 1)",
                    per,
                )
            ],
            "percentunit",
        )
    )
    d = d.with_panel(
        ts(
            "Tensor-parallel ranks",
            "Ranks in each replica's group: 1 without TP, 0 while a replica with a failed rank "
            "waits to be replaced.",
            [q(f"{M.TP_RANKS.prom}{{{SRV}}}", per)],
        )
    )
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
