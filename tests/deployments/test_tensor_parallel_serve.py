"""A tensor-parallel replica on a multi-node Ray cluster: it gets its bundles and serves.

tests/deployments/tp_cluster_scenario.py runs in its own process on its own
`ray.cluster_utils.Cluster` (a head node and a node with two logical GPUs) and records what
clients saw; the tests read it:
- the tp=2 replica's placement group: two {"GPU": 1, "CPU": 1} bundles, PACK, on the GPU node;
  rank 0 (the replica) and rank 1 (an actor) in separate processes with separate GPU ids, each
  holding half the attention heads;
- it answers completions (plain and streamed) with the text of a tp=1 replica of the same
  model at temperature 0, refuses a bad request with a 400 envelope and goes on serving;
- rank 1's process killed mid-stream: the stream ends with an error event, new requests get
  503 + Retry-After while Serve replaces the replica, then serving resumes on new processes;
- idle for longer than the (shortened) collective timeout, the same ranks still serve: the
  heartbeat kept the followers' broadcast loop alive;
- redeployed with the "ray" transport (a Ray actor call per step), the answers are the same.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 900
RECOVERY_BOUND_S = 60.0  # health checks every 1 s, then a new replica loads tiny-coder


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("tp") / "results.json"
    proc = subprocess.run([sys.executable, "-m", "tests.deployments.tp_cluster_scenario",
                           str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    data = json.loads(out.read_text()) if out.exists() else {}
    if proc.returncode != 0 or "answers" not in data:
        pytest.fail(f"TP scenario failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-5000:]}\nresults: {json.dumps(data)[:2000]}")
    return data


def test_tp2_replica_gets_two_packed_gpu_bundles_on_one_node(run):
    gpu_pgs = [pg for pg in run["placement_groups"] if any(b.get("GPU") for b in pg["bundles"])]
    assert len(gpu_pgs) == 1, run["placement_groups"]
    pg = gpu_pgs[0]
    assert pg["strategy"] == "PACK"
    assert pg["bundles"] == [{"CPU": 1.0, "GPU": 1.0}] * 2
    assert pg["bundles_to_node_id"] == [run["gpu_node_id"]] * 2


def test_each_rank_owns_a_gpu_and_half_the_heads(run):
    layout = run["layout"]
    assert [r["rank"] for r in layout] == [0, 1]
    assert len({r["pid"] for r in layout}) == 2
    gpus = [r["gpu_ids"] for r in layout]
    assert all(len(g) == 1 for g in gpus) and gpus[0] != gpus[1]
    assert {r["node_id"] for r in layout} == {run["gpu_node_id"]}
    # tiny-coder: 4 query heads, 2 KV heads -> 2 and 1 per rank
    assert [(r["n_heads"], r["n_kv_heads"]) for r in layout] == [(2, 1), (2, 1)]
    assert run["layout_tp1"] == []
    assert run["tp2_replicas"] == {"RUNNING": 1}


def test_tp2_answers_like_tp1(run):
    tp2, tp1 = run["answers"]["tp2"], run["answers"]["tp1"]
    assert len(tp2) == len(tp1) == 3
    for a, b in zip(tp2, tp1, strict=True):
        assert a["status"] == b["status"] == 200
        assert not a.get("error") and a.get("done", True)
        assert a["text"] == b["text"]
    assert any(a["text"].strip() for a in tp2)  # real completions, not empty strings
    assert tp2[0]["body"]["usage"]["denoising_steps_per_block"] == 8


def test_bad_request_is_a_400_and_serving_goes_on(run):
    bad = run["bad_request"]
    assert bad["status"] == 400
    assert bad["body"]["error"]["type"] == "invalid_request_error"
    assert run["after_bad"]["status"] == 200
    assert run["after_bad"]["text"] == run["answers"]["tp2"][0]["text"]


def test_rank_death_fails_cleanly_then_the_replica_is_replaced(run):
    kill = run["rank_kill"]
    inflight = kill["inflight"]
    # the stream that was running ended: with its whole answer or a clean error event
    assert inflight["status"] == 200 and inflight["done"]
    if inflight["error"]:
        assert inflight["error"]["type"] == "service_unavailable_error"
    for r in kill.get("errors_while_down", []):
        assert r["status"] == 503 and r["retry_after"], r
    assert kill["recovered_after_s"] is not None and kill["recovered_after_s"] < RECOVERY_BOUND_S
    assert kill["after"]["text"] == run["answers"]["tp2"][0]["text"]
    old = {r["pid"] for r in run["layout"]}
    new = {r["pid"] for r in kill["layout_after"]}
    assert len(new) == 2 and not old & new  # a fresh group: both ranks are new processes


def test_idle_longer_than_the_collective_timeout_keeps_serving(run):
    from tests.deployments.tp_cluster_scenario import COLLECTIVE_TIMEOUT_S, IDLE_S

    assert IDLE_S > 2 * COLLECTIVE_TIMEOUT_S
    before, after = run["idle_layouts"]
    assert [r["pid"] for r in before] == [r["pid"] for r in after]  # not replaced
    assert run["after_idle"]["status"] == 200
    assert run["after_idle"]["text"] == run["answers"]["tp2"][0]["text"]


def test_ray_transport_answers_the_same(run):
    ray_run = run["ray_transport"]
    assert len(ray_run["layout"]) == 2
    for got, want in zip(ray_run["answers"], run["answers"]["tp1"], strict=True):
        assert got["status"] == 200 and not got.get("error")
        assert got["text"] == want["text"]
