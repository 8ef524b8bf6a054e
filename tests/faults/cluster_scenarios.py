"""Fault scenarios on a multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`).

    python -m tests.faults.cluster_scenarios results.json      # what tests/faults/ runs

Runs in its own process (test_faults.py starts it), so its Ray cluster never meets the shared
Ray instance of the test session. The cluster: a head node (the ingress, the HTTP proxy on
127.0.0.1) and two worker nodes with one logical GPU each and no CPUs, so each holds exactly
one ModelServer replica (num_gpus=1; the mock engine: replicas sleep instead of computing).

Scenarios, each writing what clients saw into the JSON (the tests assert on it):
- replica_kill: while clients stream and post requests, kill one ModelServer replica actor;
- node_kill: the same, removing a whole worker node; then add a node back (capacity returns);
- overload: a second app with small queues gets a burst far beyond them.
Every HTTP request has a client timeout; a request that hits it is recorded as a hang.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

import httpx

log = logging.getLogger("faults")

APP, PREFIX = "faults", "/faults"
OVERLOAD_APP, OVERLOAD_PREFIX = "overload", "/overload"
SERVER = "ModelServer"
CLIENT_TIMEOUT_S = 60.0  # a request still open after this counts as hung
RESTORE_WAIT_S = 180.0  # bound on waiting for Serve to bring the replica count back
MAX_TOKENS = 128  # 4 blocks x 16 steps x 20 ms: about 1.3 s per request on the mock


@dataclass
class Attempt:
    start: float
    end: float = 0.0
    stream: bool = False
    status: int = 0  # HTTP status (0: transport error or timeout)
    outcome: str = ""  # "ok" | "error" (clean error) | "dirty" (no envelope) | "hang"
    error: str = ""
    tokens: int = 0
    retry_after: str | None = None


@dataclass
class Request:
    first: Attempt
    retry: Attempt | None = None


@dataclass
class ScenarioResult:
    name: str
    fault_at: float = 0.0
    requests: list[dict] = field(default_factory=list)
    replicas_before: int = 0
    replicas_after_fault: list = field(default_factory=list)  # (t, running) samples
    restored_after_s: float | None = None
    notes: dict = field(default_factory=dict)


def mock_engine():
    from benchmarks.mock_engine import MockEngineFactory

    return MockEngineFactory("tiny-coder", step_delay_s=0.02, max_num_seqs=16)


def app_args(**server) -> dict:
    return {
        "ladder": {"steps": [16], "thresholds_s": []},
        "auth": {"api_keys_env": None},
        "limits": {"default_max_tokens": MAX_TOKENS, "retry_after_s": 1},
        "server": {
            "num_replicas": 2,
            "num_cpus": 0,
            "num_gpus": 1,
            "health_check_period_s": 1,
            "graceful_shutdown_timeout_s": 2,
            "drain_timeout_s": 1,
            **server,
        },
        # One CPU: only the head has CPUs, so the ingress stays off the nodes we kill.
        "ingress": {"num_cpus": 1},
    }


def attempt(client: httpx.Client, url: str, model: str, stream: bool) -> Attempt:
    a = Attempt(start=time.monotonic(), stream=stream)
    body = {"model": model, "prompt": "def fib(n):", "max_tokens": MAX_TOKENS, "stream": stream}
    try:
        if stream:
            with client.stream(
                "POST", f"{url}/v1/completions", json=body, timeout=CLIENT_TIMEOUT_S
            ) as r:
                a.status = r.status_code
                a.retry_after = r.headers.get("retry-after")
                if r.status_code != 200:
                    r.read()
                    _classify_error(a, r.text)
                else:
                    done = error = False
                    for line in r.iter_lines():
                        if not line.startswith("data: "):
                            continue
                        data = line.removeprefix("data: ")
                        if data == "[DONE]":
                            done = True
                            break
                        chunk = json.loads(data)
                        if "error" in chunk:
                            error = True
                            a.error = chunk["error"].get("message", "")[:200]
                        for choice in chunk.get("choices", []):
                            a.tokens += 1 if choice.get("text") else 0
                    a.outcome = "error" if error else ("ok" if done else "dirty")
        else:
            r = client.post(f"{url}/v1/completions", json=body, timeout=CLIENT_TIMEOUT_S)
            a.status = r.status_code
            a.retry_after = r.headers.get("retry-after")
            if r.status_code == 200:
                a.outcome = "ok"
                a.tokens = r.json()["usage"]["completion_tokens"]
            else:
                _classify_error(a, r.text)
    except httpx.TimeoutException as e:
        a.outcome, a.error = "hang", repr(e)
    except httpx.HTTPError as e:  # connection reset mid-stream etc.
        a.outcome, a.error = "dirty", repr(e)
    a.end = time.monotonic()
    return a


def _classify_error(a: Attempt, text: str) -> None:
    try:
        err = json.loads(text)["error"]
        a.outcome, a.error = "error", f"{err.get('type')}: {err.get('message', '')[:200]}"
    except (ValueError, KeyError, TypeError):
        a.outcome, a.error = "dirty", text[:200]


def run_clients(
    url: str, model: str, n_clients: int, duration_s: float, fault
) -> tuple[list[Request], float]:
    """n_clients loop requests (half streaming) for duration_s; `fault()` runs after 3 s.
    A failed request is retried once. Returns the requests and the fault time."""
    requests: list[Request] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client_loop(i: int) -> None:
        with httpx.Client() as client:
            n = 0
            while not stop.is_set():
                first = attempt(client, url, model, stream=(i + n) % 2 == 0)
                req = Request(first)
                if first.outcome != "ok":
                    req.retry = attempt(client, url, model, stream=first.stream)
                with lock:
                    requests.append(req)
                n += 1

    threads = [
        threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(n_clients)
    ]
    for t in threads:
        t.start()
    time.sleep(3.0)
    fault_at = time.monotonic()
    fault()
    time.sleep(max(0.0, duration_s - 3.0))
    stop.set()
    for t in threads:
        t.join(timeout=2 * CLIENT_TIMEOUT_S + 5)
    return requests, fault_at


def running(app: str) -> int:
    from ray import serve

    try:
        return int(
            serve.status().applications[app].deployments[SERVER].replica_states.get("RUNNING", 0)
        )
    except KeyError:
        return 0


def wait_running(app: str, n: int, since: float, samples: list) -> float | None:
    deadline = time.monotonic() + RESTORE_WAIT_S
    while time.monotonic() < deadline:
        k = running(app)
        samples.append((round(time.monotonic() - since, 1), k))
        if k == n:
            return time.monotonic() - since
        time.sleep(1.0)
    return None


def model_of(url: str) -> str:
    deadline = time.monotonic() + 120
    while True:
        try:
            return httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, ValueError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def replica_actor_names(app: str) -> list[str]:
    import ray

    names = ray.util.list_named_actors(all_namespaces=True)
    return sorted(
        a["name"] for a in names if a["name"].startswith(f"SERVE_REPLICA::{app}#{SERVER}#")
    )


def scenario_replica_kill(url: str, model: str) -> ScenarioResult:
    import ray

    res = ScenarioResult("replica_kill", replicas_before=running(APP))
    victim = replica_actor_names(APP)[0]
    res.notes["killed_actor"] = victim

    def fault() -> None:
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)

    # 32 clients: both replicas' batches (16 each) full when one dies
    requests, res.fault_at = run_clients(url, model, n_clients=32, duration_s=15.0, fault=fault)
    res.requests = [_rel(r, res.fault_at) for r in requests]
    res.restored_after_s = wait_running(APP, 2, res.fault_at, res.replicas_after_fault)
    return res


def scenario_node_kill(cluster, url: str, model: str, victim_node) -> ScenarioResult:
    res = ScenarioResult("node_kill", replicas_before=running(APP))

    def fault() -> None:
        cluster.remove_node(victim_node, allow_graceful=False)

    requests, res.fault_at = run_clients(url, model, n_clients=6, duration_s=20.0, fault=fault)
    res.requests = [_rel(r, res.fault_at) for r in requests]
    res.notes["running_after_kill"] = running(APP)
    # Capacity returns: a fresh worker node with one GPU.
    cluster.add_node(num_cpus=0, num_gpus=1)
    res.notes["node_added_at_s"] = round(time.monotonic() - res.fault_at, 1)
    res.restored_after_s = wait_running(APP, 2, res.fault_at, res.replicas_after_fault)
    # And it serves: a request after restoration.
    with httpx.Client() as client:
        after = attempt(client, url, model, stream=False)
    res.notes["request_after_restore"] = asdict(after)
    return res


def scenario_overload(url: str, model: str) -> ScenarioResult:
    """A burst of 48 concurrent requests at an app that admits far fewer: ingress cap 12 in
    flight (429 beyond), 2 ongoing + 2 queued per replica at the handle (503 beyond)."""
    res = ScenarioResult("overload", replicas_before=running(OVERLOAD_APP))
    attempts: list[Attempt] = []
    res.fault_at = time.monotonic()
    with (
        concurrent.futures.ThreadPoolExecutor(48) as pool,
        httpx.Client(limits=httpx.Limits(max_connections=64)) as client,
    ):
        futures = [pool.submit(attempt, client, url, model, i % 2 == 0) for i in range(48)]
        attempts = [f.result() for f in futures]
    res.requests = [_rel(Request(a), res.fault_at) for a in attempts]
    return res


def _rel(req: Request, t0: float) -> dict:
    """Times relative to the fault, for the JSON."""
    d = asdict(req)
    for key in ("first", "retry"):
        if d[key]:
            d[key]["start"] = round(d[key]["start"] - t0, 3)
            d[key]["end"] = round(d[key]["end"] - t0, 3)
    return d


def main(out_path: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import ray
    from ray import serve

    from deployments.app import build_application
    from tests.cluster_serve import serve_cluster

    results: dict = {}
    with serve_cluster({"num_cpus": 4, "num_gpus": 0}, [{"num_cpus": 0, "num_gpus": 1}] * 2,
                       "dllm-faults", out_path, results) as (cluster, workers, base):
        serve.run(build_application(app_args(), engine_factory=mock_engine()), name=APP, route_prefix=PREFIX)
        url = f"{base}{PREFIX}"
        model = model_of(url)
        results["setup"] = {"replicas": running(APP), "nodes": len(ray.nodes())}
        log.info("cluster up: %s", results["setup"])

        results["replica_kill"] = asdict(scenario_replica_kill(url, model))
        log.info("replica_kill done")
        # Kill a worker node: each holds one ModelServer replica.
        results["node_kill"] = asdict(scenario_node_kill(cluster, url, model, workers[0]))
        log.info("node_kill done")

        serve.delete(APP)  # frees the GPUs for the overload app's replicas
        serve.run(
            build_application(
                app_args(max_ongoing_requests=2, max_queued_requests=2)
                | {
                    "limits": {
                        "max_inflight": 12,
                        "retry_after_s": 1,
                        "default_max_tokens": MAX_TOKENS,
                    }
                },
                engine_factory=mock_engine(),
            ),
            name=OVERLOAD_APP,
            route_prefix=OVERLOAD_PREFIX,
        )
        ourl = f"{base}{OVERLOAD_PREFIX}"
        results["overload"] = asdict(scenario_overload(ourl, model_of(ourl)))
        log.info("overload done")


if __name__ == "__main__":
    main(sys.argv[1])
