"""Faults on a multi-node cluster: a replica dies, a node dies, the queues overflow.

The scenarios run in a separate process (tests/faults/cluster_scenarios.py) on their own
`ray.cluster_utils.Cluster` (head + two worker nodes with a logical GPU each, one ModelServer
replica per node), so they never share Ray with the session's `ray_serve` fixture and can run
before or after it. The tests read what the clients saw:

- a replica actor killed under load, and a worker node removed under load: requests in flight
  end with a clean error (an OpenAI error envelope, or an error event in the stream) or
  succeed; a failed one succeeds when retried; none hangs (each has a client timeout); new
  requests succeed again within a bounded time; Serve restores the replica count once
  capacity is there (a node added back);
- a burst far beyond the queue limits: refusals are 429/503 with Retry-After, and every
  accepted request completes with its full output.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults.cluster_scenarios import MAX_TOKENS

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 1500  # the whole subprocess (three Ray nodes on a small machine)
# New requests must succeed again within this long after the fault. Serve notices a dead
# replica at once (actor death) and a dead node within its health checks (1 s here).
RECOVERY_BOUND_S = 15.0


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("faults") / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.faults.cluster_scenarios", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    data = json.loads(out.read_text()) if out.exists() else {}
    if proc.returncode != 0 or not data:
        pytest.fail(
            f"fault scenarios failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
            f"{proc.stderr[-5000:]}"
        )
    return data


def scenario(results: dict, name: str) -> dict:
    if name not in results:
        pytest.fail(f"scenario {name} did not run; got {sorted(results)}")
    return results[name]


def check_fault_scenario(res: dict) -> None:
    requests = res["requests"]
    firsts = [r["first"] for r in requests]
    in_flight = [a for a in firsts if a["start"] < 0 < a["end"]]
    assert in_flight, "no request was in flight when the fault hit"
    # None hangs, and every failure is clean.
    attempts = firsts + [r["retry"] for r in requests if r["retry"]]
    assert [a for a in attempts if a["outcome"] == "hang"] == []
    dirty = [a for a in attempts if a["outcome"] == "dirty"]
    assert dirty == [], f"errors without an OpenAI error envelope: {dirty[:3]}"
    # Failed requests succeed on retry.
    unrecovered = [
        r
        for r in requests
        if r["first"]["outcome"] != "ok" and (r["retry"] is None or r["retry"]["outcome"] != "ok")
    ]
    assert unrecovered == [], unrecovered[:3]
    # New requests succeed within a bounded time after the fault.
    late_failures = [a for a in firsts if a["start"] > RECOVERY_BOUND_S and a["outcome"] != "ok"]
    assert late_failures == []
    assert any(a["outcome"] == "ok" for a in firsts if a["start"] > 0)
    # Completed requests have their full output.
    for a in attempts:
        if a["outcome"] == "ok" and not a["stream"]:
            assert a["tokens"] == MAX_TOKENS
    # Serve brought the replica count back.
    assert res["replicas_before"] == 2
    assert res["restored_after_s"] is not None, res["replicas_after_fault"][-10:]


def test_setup_has_two_worker_replicas(results):
    assert results["setup"]["replicas"] == 2 and results["setup"]["nodes"] == 3


def test_replica_killed_under_load(results):
    res = scenario(results, "replica_kill")
    check_fault_scenario(res)
    # The killed replica's requests, streamed ones included, are resumed on the other: no client
    # sees the kill except as a 503 with Retry-After before its answer started.
    firsts = [r["first"] for r in res["requests"]]
    broken = [a for a in firsts if a["outcome"] != "ok"
              and not (a["status"] == 503 and a["retry_after"])]
    assert broken == [], broken[:3]
    print(f"replica kill, 32 clients: {len(firsts)} requests, "
          f"{sum(a['outcome'] == 'ok' for a in firsts)} ok, "
          f"{sum(a['status'] == 503 for a in firsts)} 503 + Retry-After, {len(broken)} broken")


def test_worker_node_killed_under_load_and_capacity_returns(results):
    res = scenario(results, "node_kill")
    check_fault_scenario(res)
    assert res["notes"]["running_after_kill"] <= 1  # the node's replica was really gone
    assert res["restored_after_s"] >= res["notes"]["node_added_at_s"]
    assert res["notes"]["request_after_restore"]["outcome"] == "ok"


def test_overload_refuses_with_retry_after_and_completes_the_accepted(results):
    res = scenario(results, "overload")
    attempts = [r["first"] for r in res["requests"]]
    assert [a for a in attempts if a["outcome"] in ("hang", "dirty")] == []
    refused = [a for a in attempts if a["status"] in (429, 503)]
    accepted = [a for a in attempts if a["status"] == 200]
    assert refused and accepted
    assert len(refused) + len(accepted) == len(attempts), [a["status"] for a in attempts]
    for a in refused:
        assert a["outcome"] == "error" and a["retry_after"] and float(a["retry_after"]) > 0
    for a in accepted:
        assert a["outcome"] == "ok", a
        if not a["stream"]:
            assert a["tokens"] == MAX_TOKENS
        else:
            assert a["tokens"] > 0
