"""A real Prometheus scrapes the running app's metrics port on loopback.

Deploys the app (mock engine, so the CPU goes to Ray, not to a model) on the shared Ray
instance, serves requests (plain, streaming, a burst that gets 429s), starts the Debian
`prometheus` binary with the project's scrape config (monitoring/prometheus.py) and then, through
Prometheus' HTTP API: finds every metric of monitoring/metrics.py the dashboard queries, checks
the counters agree with what the client received, and that the dashboard queries nothing that
was not scraped. Skips when the prometheus binary is not installed (.ci/run installs it).
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import subprocess
import time

import httpx
import pytest

from monitoring import metrics as M
from monitoring.dashboard import dashboard_json, metric_families, query_metric_names
from monitoring.prometheus import dump, local_config
from tests.conftest import free_port

PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        PROMETHEUS is None,
        reason="prometheus binary not installed "
        "(apt-get install -y --no-install-recommends prometheus)",
    ),
]

APP = "monitoring-test"
PREFIX = "/monitoring-test"
# Ray's metrics agent exports every ~10 s and Prometheus scrapes every second: give both a few
# rounds. A bounded wait, not a speed assertion: on timeout the test says what was missing.
SCRAPE_WAIT_S = 120


@pytest.fixture(scope="module")
def app(ray_serve):
    from ray import serve

    from benchmarks.mock_engine import MockEngineFactory
    from deployments.app import build_application

    mock = MockEngineFactory("tiny-coder", step_delay_s=0.01, max_num_seqs=8)
    args = {
        "limits": {"max_inflight": 2, "retry_after_s": 1},
        "auth": {"api_keys_env": None},
        "server": {
            "autoscaling_config": {
                "min_replicas": 1,
                "initial_replicas": 1,
                "max_replicas": 1,
                "policy": {"policy_function": "autoscaling.policy:TokenBacklogPolicy"},
            }
        },
    }
    serve.run(build_application(args, engine_factory=mock), name=APP, route_prefix=PREFIX)
    url = f"{ray_serve.http_url}{PREFIX}"
    try:
        yield url
    finally:
        serve.delete(APP)


@pytest.fixture(scope="module")
def prometheus(ray_serve, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("prometheus")
    config = workdir / "prometheus.yml"
    config.write_text(
        dump(local_config([f"127.0.0.1:{ray_serve.metrics_port}"], scrape_interval_s=1))
    )
    port = free_port()
    log = (workdir / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            if proc.poll() is not None:
                pytest.fail(
                    f"prometheus exited: {(workdir / 'prometheus.log').read_text()[-2000:]}"
                )
            try:
                if httpx.get(f"{base}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("prometheus did not become ready")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def model_id(url: str) -> str:
    return httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]


def promql(base: str, expr: str) -> float:
    r = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert r["status"] == "success", r
    result = r["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0


def scraped_names(base: str) -> set[str]:
    r = httpx.get(f"{base}/api/v1/label/__name__/values", timeout=10).json()
    return set(r["data"])


def test_prometheus_scrapes_the_apps_metrics_and_the_dashboard_names(app, prometheus):
    mid = model_id(app)
    # Requests a user would send: plain and streamed chat, a completion, an unknown field.
    tokens = 0
    for stream in (False, True):
        r = httpx.post(
            f"{app}/v1/chat/completions",
            json={
                "model": mid,
                "messages": [{"role": "user", "content": "def add(a, b):"}],
                "max_tokens": 32,
                "stream": stream,
                "stream_options": {"include_usage": True} if stream else None,
                "some_client_extra": 1,
            },
            timeout=60,
        )
        assert r.status_code == 200, r.text
        if stream:
            usage = [
                line
                for line in r.text.splitlines()
                if '"usage"' in line and '"completion_tokens"' in line
            ]
            tokens += json.loads(usage[-1].removeprefix("data: "))["usage"]["completion_tokens"]
        else:
            tokens += r.json()["usage"]["completion_tokens"]
    r = httpx.post(
        f"{app}/v1/completions", json={"model": mid, "prompt": "x = ", "max_tokens": 16}, timeout=60
    )
    assert r.status_code == 200
    tokens += r.json()["usage"]["completion_tokens"]
    # A burst beyond max_inflight=2: some are refused with 429 + Retry-After.
    statuses = []
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for _ in range(5):
            futures = [
                pool.submit(
                    httpx.post,
                    f"{app}/v1/completions",
                    json={"model": mid, "prompt": "def f():", "max_tokens": 128},
                    timeout=60,
                )
                for _ in range(8)
            ]
            for f in futures:
                resp = f.result()
                statuses.append(resp.status_code)
                if resp.status_code == 429:
                    assert "retry-after" in resp.headers
                else:
                    assert resp.status_code == 200
                    tokens += resp.json()["usage"]["completion_tokens"]
            if 429 in statuses:
                break
    assert 429 in statuses and 200 in statuses

    wanted = metric_families(query_metric_names(dashboard_json()))
    app_sel = f'{{application="{APP}"}}'
    healthy = f'{M.REPLICA_HEALTHY.prom}{{application="{APP}",deployment="ModelServer"}}'
    rejected_q = f'sum({M.REQUESTS_REJECTED.prom}{{application="{APP}",status="429"}})'
    deadline = time.monotonic() + SCRAPE_WAIT_S
    while True:
        names = scraped_names(prometheus)
        families = metric_families(names)
        missing = wanted - families
        counted = promql(prometheus, f"sum({M.COMPLETION_TOKENS.prom}{app_sel})")
        rejected = promql(prometheus, rejected_q)
        # Ray exports each metric once its first value is recorded, and each process on its own
        # cadence: wait for this app's counters, the refusals' as well as the tokens'.
        if not missing and counted >= tokens and rejected >= statuses.count(429) \
                and promql(prometheus, f"max({healthy})") > 0:
            break
        if time.monotonic() > deadline:
            pytest.fail(
                f"after {SCRAPE_WAIT_S}s Prometheus still lacks {sorted(missing)}; "
                f"completion tokens counted {counted} of {tokens}, refusals {rejected} of "
                f"{statuses.count(429)}"
            )
        time.sleep(2)

    # Every metric the app defines (that this traffic exercises) is in Prometheus.
    for m in M.APP_METRICS:
        assert m.prom in families, m.name
    # Counters agree with what the client saw (the app served exactly these tokens).
    assert counted == tokens
    assert promql(prometheus, rejected_q) == statuses.count(429)
    # The router picks steps for every request it sees, the 429s included (they are refused
    # after routing), so at least one observation per answered request.
    steps_chosen = promql(prometheus, f"sum({M.ROUTER_STEPS.series('count')}{app_sel})")
    assert steps_chosen >= 3 + statuses.count(200)
    series = httpx.get(
        f"{prometheus}/api/v1/query", params={"query": M.REPLICA_HEALTHY.prom}, timeout=10
    ).json()["data"]["result"]
    assert promql(prometheus, f"max({healthy})") == 1, [
        (
            {k: v for k, v in r["metric"].items() if k in ("application", "deployment", "replica")},
            r["value"][1],
        )
        for r in series
    ]
