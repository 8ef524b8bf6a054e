"""Step router (ladder, hysteresis, pins, quality bounds), the cluster load model, and the replica
ranking of the request router. Pure logic: no Ray cluster."""

from __future__ import annotations

import math

import pytest

from autoscaling.load import (
    ClusterLoad,
    LoadBoard,
    LoadSnapshotCache,
    PeakRate,
    ReplicaLoad,
    cluster_load,
)
from deployments.config import parse_args
from deployments.replica_router import rank_by_drain, replica_drain_s
from deployments.step_router import Ladder, StepRouter
from engine.types import EngineStats
from model.schedule import request_token_steps


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def load(drain_s: float) -> ClusterLoad:
    return ClusterLoad(replicas=1, drain_s=drain_s, at=1.0)


LADDER = Ladder(steps=[32, 16, 8, 4], thresholds_s=[1.0, 2.0, 4.0], hysteresis=0.25,
                up_hold_s=2.0)


def test_ladder_validation():
    with pytest.raises(ValueError, match="decrease"):
        Ladder(steps=[8, 16], thresholds_s=[1.0])
    with pytest.raises(ValueError, match="thresholds"):
        Ladder(steps=[16, 8], thresholds_s=[1.0, 2.0])
    with pytest.raises(ValueError, match="increase"):
        Ladder(steps=[16, 8, 4], thresholds_s=[2.0, 1.0])
    assert [LADDER.target_rung(x) for x in (0, 0.99, 1.0, 3.9, 4.0, math.inf)] == [0, 0, 1, 2,
                                                                                     3, 3]


def test_burst_drops_at_once_and_recovery_is_gradual():
    clock = Clock()
    r = StepRouter(LADDER, clock=clock)
    assert r.choose().steps == 32
    r.observe(load(5.0))  # a burst: straight to the fastest rung
    assert r.choose().steps == 4
    # still above (1 - 0.25) * 4.0 = 3.0: no climbing however long it lasts
    for _ in range(5):
        clock.t += 1
        r.observe(load(3.5))
    assert r.rung == 3
    # below 3.0: climb one rung only after up_hold_s
    clock.t += 1
    r.observe(load(0.1))
    assert r.rung == 3
    clock.t += 1.9
    r.observe(load(0.1))
    assert r.rung == 3
    clock.t += 0.2
    r.observe(load(0.1))
    assert r.rung == 2
    for expected in (1, 0):
        clock.t += 2.1
        r.observe(load(0.1))
        assert r.rung == expected
    assert r.choose().steps == 32


def test_no_flapping_around_a_threshold():
    clock = Clock()
    r = StepRouter(LADDER, clock=clock)
    rungs = []
    for i in range(40):  # load oscillating around the 1.0 s threshold every 0.5 s
        clock.t += 0.5
        r.observe(load(1.05 if i % 2 else 0.95))
        rungs.append(r.rung)
    assert rungs[0] == 0 and set(rungs[1:]) == {1}  # went down once, stayed there


def test_a_dip_resets_the_hold_timer():
    clock = Clock()
    r = StepRouter(LADDER, clock=clock)
    r.observe(load(1.5))
    for drain in (0.1, 0.1, 0.9, 0.1, 0.1):  # 0.9 is above 0.75: the calm streak restarts
        clock.t += 1.5
        r.observe(load(drain))
    assert r.rung == 1
    clock.t += 1.5
    r.observe(load(0.1))
    assert r.rung == 0


def test_a_burst_is_seen_before_the_next_snapshot():
    """64 requests at once on an idle snapshot: each sees the work admitted before it."""
    clock = Clock()
    r = StepRouter(LADDER, clock=clock, ledger_horizon_s=1.0)
    r.observe(ClusterLoad(replicas=1, drain_s=0.0, capacity=2000.0, at=1.0))
    chosen = []
    for _ in range(64):
        c = r.choose()
        chosen.append(c.steps)
        r.admitted(request_token_steps(10, 128, c.steps, 32))
    assert chosen[0] == 32 and chosen[-1] == 4
    assert chosen == sorted(chosen, reverse=True)  # quality only goes down within the burst
    # finished work leaves the ledger at once: one client's back-to-back requests are no burst
    r2 = StepRouter(LADDER, clock=clock)
    r2.observe(ClusterLoad(replicas=1, drain_s=0.0, capacity=2000.0, at=1.0))
    for _ in range(10):
        c = r2.choose()
        r2.done(r2.admitted(request_token_steps(10, 128, c.steps, 32)))
        assert c.steps == 32
    # the ledger is forgotten after the horizon (by then the snapshot holds that work)
    clock.t += 1.5
    assert r.ledger_token_steps() == 0
    assert r.effective_drain_s() == 0.0


def test_pins_and_quality_bounds():
    r = StepRouter(LADDER)
    r.observe(load(2.5))  # rung 2 -> 8 steps
    assert r.choose().steps == 8 and r.choose().reason == "load"
    assert r.choose(quality="max").steps == 32
    assert r.choose(quality="balanced").steps == 16  # last // 2 = rung 1
    assert r.choose(quality="fast").steps == 4
    assert r.choose(quality="fast").reason == "bounded"
    pinned = r.choose(pinned=24, quality="fast")
    assert (pinned.steps, pinned.rung, pinned.reason) == (24, None, "pinned")
    r.observe(load(0.0))
    with pytest.raises(ValueError):
        r.choose(quality="best")


def test_two_rung_ladder_quality_windows():
    lad = Ladder(steps=[8, 2], thresholds_s=[1.0])
    assert [lad.window(q) for q in ("auto", "max", "balanced", "fast")] == [
        (0, 1), (0, 0), (0, 0), (1, 1)]


# --- the load model ------------------------------------------------------------------------------
def test_cluster_load_sums_backlog_over_capacity():
    reports = [ReplicaLoad("a", running=2, token_backlog=3000, capacity=1000, reported_at=10),
               ReplicaLoad("b", running=1, token_backlog=1000, capacity=3000, reported_at=10),
               ReplicaLoad("c", queued=1, token_backlog=2000, capacity=0, reported_at=10)]
    c = cluster_load(reports, now=10)
    # c has not measured its capacity: it borrows the mean of a and b (2000)
    assert c.capacity == pytest.approx(6000)
    assert c.drain_s == pytest.approx(6000 / 6000)
    assert c.max_replica_drain_s == pytest.approx(3.0)
    assert (c.replicas, c.running, c.queued) == (3, 3, 1)
    assert cluster_load([], now=5).drain_s == 0.0
    only_unmeasured = cluster_load([ReplicaLoad("x", token_backlog=500, reported_at=1)],
                                   fallback_capacity=250)
    assert only_unmeasured.drain_s == pytest.approx(2.0)


def test_capacity_is_the_recent_peak_rate():
    peak = PeakRate(half_life_s=100.0)
    assert peak.update(300.0, now=0.0) == 300.0
    assert peak.update(1600.0, now=1.0) == 1600.0  # a full batch shows the real capacity
    assert peak.update(320.0, now=2.0) == pytest.approx(1600.0 * 0.5 ** 0.01)  # idle: kept
    assert peak.update(0.0, now=302.0) == pytest.approx(1600.0 * 0.5 ** 3.01)  # ... then fades
    # the cluster divides by the peak when a replica reports one
    idle_one_request = ReplicaLoad("a", running=1, token_backlog=2048, capacity=320,
                                   peak_capacity=1600, reported_at=1)
    assert cluster_load([idle_one_request], now=1).drain_s == pytest.approx(2048 / 1600)


def test_replica_load_from_engine_stats_round_trips():
    stats = EngineStats(queued=1, running=3, token_backlog=1234.0, step_latency_ms=12.0,
                        output_tokens_per_s=50.0, capacity_token_steps_per_s=900.0)
    r = ReplicaLoad.from_stats("r1", stats)
    assert ReplicaLoad.from_dict(r.to_dict()) == r
    assert (r.queued, r.running, r.token_backlog, r.capacity) == (1, 3, 1234.0, 900.0)


def test_board_drops_stale_replicas():
    board = LoadBoard(stale_after_s=5)
    board.report(ReplicaLoad("a", token_backlog=100, capacity=100, reported_at=100.0))
    board.report(ReplicaLoad("b", token_backlog=300, capacity=100, reported_at=103.0))
    assert board.snapshot(now=104.0).replicas == 2
    snap = board.snapshot(now=106.0)  # a is 6 s old
    assert snap.replicas == 1 and snap.drain_s == pytest.approx(3.0)
    board.forget("b")
    assert board.snapshot(now=106.0).replicas == 0


async def test_snapshot_cache_keeps_last_value_on_failure():
    calls = {"n": 0}
    seen = []

    async def fetch():
        calls["n"] += 1
        if calls["n"] == 2:
            raise ConnectionError("board restarting")
        return ClusterLoad(replicas=1, drain_s=float(calls["n"]), at=float(calls["n"]))

    cache = LoadSnapshotCache(fetch, period_s=0.01, on_update=lambda c: seen.append(c.drain_s))
    await cache.refresh()
    await cache.refresh()  # fails: the previous snapshot stays
    assert cache.latest.drain_s == 1.0 and cache.failures == 1
    await cache.refresh()
    assert cache.latest.drain_s == 3.0 and cache.failures == 0
    assert seen == [1.0, 3.0]
    with pytest.raises(ValueError):
        LoadSnapshotCache(fetch, period_s=2.0)


# --- the replica request router's ranking -----------------------------------------------------
def test_least_backlog_ranking():
    stats = {"a": {"token_backlog": 4000, "capacity": 1000},
             "b": {"token_backlog": 1000, "capacity": 1000},
             "c": {"token_backlog": 1002, "capacity": 1000},  # within 5 ms of b: same rank
             "d": {"token_backlog": 0, "capacity": 0}}  # fresh replica, no stats yet
    drains = [(replica_drain_s(s, 0, 1000, fallback_capacity=1000), name)
              for name, s in stats.items()]
    assert rank_by_drain(drains) == [["d"], ["b", "c"], ["a"]]
    # requests routed since the last report count against the replica
    assert replica_drain_s(stats["b"], 3, 1000, 1000) == pytest.approx(4.0)


def test_app_args_reject_typos_with_a_clear_path():
    with pytest.raises(ValueError, match=r"ladder\.thresholdz"):
        parse_args({"ladder": {"thresholdz": [1, 2, 3]}})
    with pytest.raises(ValueError, match=r"server\.num_gpu"):
        parse_args({"server": {"num_gpu": 1}})
    with pytest.raises(ValueError, match="decrease"):
        parse_args({"ladder": {"steps": [2, 4], "thresholds_s": [1.0]}})
    args = parse_args({"model": {"source": "tiny-coder", "dtype": "bfloat16"}})
    assert args.model.dtype == "bfloat16" and args.ladder.steps == [16, 8, 4, 2]


class ChoiceRecorder:
    def __init__(self):
        self.choices = []

    def observe_choice(self, choice, quality):
        self.choices.append((choice.steps, quality))

    def observe_load(self, load, rung):
        pass


@pytest.mark.parametrize("max_inflight, status, recorded", [(8, 200, 1), (0, 429, 0)])
async def test_steps_metric_counts_admitted_requests_only(local_api, max_inflight, status,
                                                          recorded):
    async with local_api(max_inflight=max(max_inflight, 1)) as api:
        api.service.limits.max_inflight = max_inflight  # 0: everything is refused
        rec = ChoiceRecorder()
        api.service.router.metrics = rec
        r = await api.client.post("/v1/completions", json={
            "model": "test-coder", "prompt": "x = ", "max_tokens": 4, "quality": "fast"})
        assert r.status_code == status
        assert len(rec.choices) == recorded
        if recorded:
            assert rec.choices[0][1] == "fast"
