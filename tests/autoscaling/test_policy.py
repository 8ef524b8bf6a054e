"""The autoscaling policy driven by sequences of synthetic Serve contexts (no Ray cluster).

Contexts are real `ray.serve.config.AutoscalingContext` objects filled with per-replica values
the way Serve fills `aggregated_metrics` from the replicas' record_autoscaling_stats().
"""

from __future__ import annotations

import pytest
import ray.serve.autoscaling_policy as serve_policy_module
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from autoscaling.policy import (
    STAT_BELOW_BEST,
    STAT_BUSY,
    STAT_CAPACITY,
    STAT_TOKEN_BACKLOG,
    PolicyConfig,
    TokenBacklogPolicy,
    token_backlog_policy,
)

DEP = DeploymentID(name="ModelServer", app_name="dllm")
CAP = 100.0  # token-steps/s per replica


def make_ctx(
    running: int,
    target: int,
    *,
    backlog: float | None = 0.0,  # total token-steps, spread evenly over the running replicas
    below_best: float | None = 0.0,
    capacity: float | None = CAP,
    busy: float | None = None,  # per replica
    requests: float = 0.0,
    now: float = 0.0,
    state: dict | None = None,
    lo: int = 1,
    hi: int = 8,
    config: AutoscalingConfig | None = None,
) -> AutoscalingContext:
    replicas = [ReplicaID(unique_id=f"r{i}", deployment_id=DEP) for i in range(running)]
    metrics: dict = {}
    if backlog is not None and running:
        metrics[STAT_TOKEN_BACKLOG] = {r: backlog / running for r in replicas}
    if capacity is not None and running:
        metrics[STAT_CAPACITY] = {r: capacity for r in replicas}
    if below_best is not None and running:
        metrics[STAT_BELOW_BEST] = {r: below_best for r in replicas}
    if busy is not None and running:
        metrics[STAT_BUSY] = {r: busy for r in replicas}
    return AutoscalingContext(
        deployment_id=DEP,
        deployment_name=DEP.name,
        app_name=DEP.app_name,
        current_num_replicas=running,
        target_num_replicas=target,
        running_replicas=replicas,
        total_num_requests=requests,
        total_queued_requests=0.0,
        aggregated_metrics=metrics,
        raw_metrics={},
        capacity_adjusted_min_replicas=lo,
        capacity_adjusted_max_replicas=hi,
        policy_state=dict(state or {}),
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=now,
        config=config or AutoscalingConfig(min_replicas=lo, max_replicas=hi),
    )


def test_returns_initial_target_before_any_replica_runs():
    policy = TokenBacklogPolicy()
    ctx = make_ctx(0, 3, backlog=None, capacity=None, below_best=None, lo=1)
    assert policy(ctx)[0] == 3
    # The same through Serve's own wrapper (bounds and delays): initial replicas survive.
    wrapped = _apply_autoscaling_config(policy)
    assert wrapped(make_ctx(0, 3, backlog=None, capacity=None, below_best=None))[0] == 3


def test_backlog_against_capacity_sets_replicas():
    policy = TokenBacklogPolicy(target_backlog_s=2.0)
    # 2 replicas, 1000 token-steps queued, 100 token-steps/s each: 5 replicas hold 2 s each.
    assert policy(make_ctx(2, 2, backlog=1000.0))[0] == 5
    # Capped at max_replicas.
    assert policy(make_ctx(2, 2, backlog=1000.0, hi=4))[0] == 4
    # Twice the measured capacity halves the need.
    assert policy(make_ctx(2, 2, backlog=1000.0, capacity=2 * CAP))[0] == 3


def test_capacity_is_the_median_so_a_cold_replica_does_not_double_the_need():
    policy = TokenBacklogPolicy(target_backlog_s=2.0)
    ctx = make_ctx(3, 3, backlog=1200.0)
    ctx.aggregated_metrics[STAT_CAPACITY][ctx.running_replicas[0]] = 5.0  # just started
    assert policy(ctx)[0] == 6  # 1200 / (100 * 2), not 1200 / (mean 68 * 2) = 9


def test_holds_between_the_up_and_down_thresholds():
    policy = TokenBacklogPolicy(target_backlog_s=2.0, downscale_utilization=0.5)
    # 4 replicas; need at full target = 2, at half target = 4: neither up nor down.
    replicas, _ = policy(make_ctx(4, 4, backlog=400.0))
    assert replicas == 4


def test_scales_down_at_best_quality_with_spare_capacity_and_respects_min():
    policy = TokenBacklogPolicy(target_backlog_s=2.0, downscale_utilization=0.5)
    assert policy(make_ctx(4, 4, backlog=150.0))[0] == 2  # 150 / (100 * 2 * 0.5) -> 2
    assert policy(make_ctx(4, 4, backlog=0.0, lo=1))[0] == 1
    assert policy(make_ctx(4, 4, backlog=0.0, lo=3))[0] == 3


def test_busy_replicas_with_short_queues_are_not_spare_capacity():
    policy = TokenBacklogPolicy(target_backlog_s=2.0, downscale_utilization=0.5)
    # 5 replicas keeping up with a steady stream: queues short, each 80% busy -> 4 replicas'
    # worth of work, which 5 replicas at <= 50% busy cannot become fewer than 8: hold.
    assert policy(make_ctx(5, 5, backlog=50.0, busy=0.8))[0] == 5
    # The stream fades to 10% busy each: 0.5 replicas' worth -> down to 1.
    assert policy(make_ctx(5, 5, backlog=50.0, busy=0.1))[0] == 1


def test_never_scales_down_while_below_best_quality():
    policy = TokenBacklogPolicy(quality_debt_s=1000.0)
    replicas, _ = policy(make_ctx(4, 4, backlog=0.0, below_best=0.9))
    assert replicas == 4


def test_holding_keeps_replicas_that_are_still_starting():
    # Target 5 with 3 running: a quiet tick must not return 3 (that would cancel two starting
    # replicas); at moderate load it holds the target.
    policy = TokenBacklogPolicy(target_backlog_s=2.0)
    assert policy(make_ctx(3, 5, backlog=700.0))[0] == 5


def test_quality_debt_adds_replicas_while_queues_look_fine():
    policy = TokenBacklogPolicy(quality_debt_s=10.0, degraded_threshold=0.2)
    state: dict = {}
    decisions = []
    # The router serves 80% of requests below best quality; the backlog needs only 1 replica.
    for t in range(0, 10):
        replicas, state = policy(make_ctx(2, 2, backlog=50.0, below_best=0.8, now=t, state=state))
        decisions.append(replicas)
    assert decisions == [2] * 10  # debt not yet due
    replicas, state = policy(make_ctx(2, 2, backlog=50.0, below_best=0.8, now=10, state=state))
    assert replicas == 3
    # The new replica is starting (target 3, 2 running): no second bump for it, even later.
    for t in (11, 15, 25):
        replicas, state = policy(make_ctx(2, 3, backlog=50.0, below_best=0.8, now=t, state=state))
        assert replicas == 3
    # It runs, the router is still degraded: one more after the next quality_debt_s.
    replicas, state = policy(make_ctx(3, 3, backlog=50.0, below_best=0.8, now=26, state=state))
    assert replicas == 4  # 25 s since the last bump at t=10 > 10 s
    # Quality back to best: debt paid; with spare capacity it may now come down.
    replicas, state = policy(make_ctx(4, 4, backlog=50.0, below_best=0.0, now=27, state=state))
    assert replicas == 1


def test_a_short_dip_below_best_quality_is_not_debt():
    policy = TokenBacklogPolicy(quality_debt_s=10.0)
    state: dict = {}
    for t in range(0, 8):
        _, state = policy(make_ctx(2, 2, backlog=300.0, below_best=0.8, now=t, state=state))
    _, state = policy(make_ctx(2, 2, backlog=300.0, below_best=0.0, now=8, state=state))
    # Degraded again: the clock restarts, so nothing is due at t=12.
    for t in range(9, 13):
        replicas, state = policy(make_ctx(2, 2, backlog=300.0, below_best=0.8, now=t, state=state))
        assert replicas == 2


def test_few_degraded_requests_below_threshold_do_not_count():
    policy = TokenBacklogPolicy(quality_debt_s=0.0, degraded_threshold=0.2)
    assert policy(make_ctx(2, 2, backlog=300.0, below_best=0.1, now=100.0))[0] == 2


def test_falls_back_to_request_counts_without_token_stats():
    policy = TokenBacklogPolicy()
    cfg = AutoscalingConfig(min_replicas=1, max_replicas=8, target_ongoing_requests=4)
    ctx = make_ctx(2, 2, backlog=None, capacity=None, below_best=None, requests=20.0, config=cfg)
    assert policy(ctx)[0] == 5  # 20 requests / 4 per replica
    # A configured default capacity makes the backlog usable before any replica measured it.
    policy = TokenBacklogPolicy(default_capacity_token_steps_per_s=50.0, target_backlog_s=2.0)
    assert policy(make_ctx(2, 2, backlog=400.0, capacity=None, config=cfg))[0] == 4


def test_plain_function_form_and_bad_kwargs():
    assert token_backlog_policy(make_ctx(2, 2, backlog=1000.0))[0] == 5
    with pytest.raises(TypeError):
        TokenBacklogPolicy(target_backlog=2.0)  # typo in policy_kwargs is an error, not ignored
    with pytest.raises(ValueError):
        PolicyConfig(downscale_utilization=1.5)


def test_state_keeps_serves_own_keys():
    # Serve stores its delay counters in the same dict; the policy must hand them back.
    state = {"__decision_counter": 3, "other": "x"}
    _, new_state = TokenBacklogPolicy()(make_ctx(2, 2, backlog=400.0, state=state))
    assert new_state["__decision_counter"] == 3 and new_state["other"] == "x"


class ToyFleet:
    """A fleet in one-second ticks: replicas take `startup_s` to come up; each works off CAP
    token-steps/s; a router degrades (below best quality) while backlog per replica exceeds
    1 s of work and recovers below 0.5 s (hysteresis), halving each request's cost while degraded."""

    def __init__(self, startup_s: int = 5) -> None:
        self.running, self.pending, self.backlog, self.degraded = 1, [], 0.0, False
        self.busy = 0.0
        self.startup_s = startup_s

    def tick(self, t: int, arrivals: float, target: int) -> None:
        self.running += sum(1 for ready_at in self.pending if ready_at <= t)
        self.pending = [ready_at for ready_at in self.pending if ready_at > t]
        if target > self.running + len(self.pending):
            self.pending += [t + self.startup_s] * (target - self.running - len(self.pending))
        elif target < self.running:
            self.running, self.pending = target, []
        per_replica_s = self.backlog / (self.running * CAP)
        if per_replica_s > 1.0:
            self.degraded = True
        elif per_replica_s < 0.5:
            self.degraded = False
        cost = 0.5 if self.degraded else 1.0
        work = self.backlog + arrivals * cost
        self.busy = min(1.0, work / (self.running * CAP))  # per replica
        self.backlog = max(0.0, work - self.running * CAP)


def test_burst_sequence_rises_then_falls_and_quality_returns(monkeypatch):
    # Serve's own wrapper around the policy: bounds, scaling factors, up/down delays. Its delays
    # read the wall clock, so the simulated clock stands in for it.
    clock = [0.0]
    monkeypatch.setattr(serve_policy_module.time, "time", lambda: clock[0])
    policy = _apply_autoscaling_config(TokenBacklogPolicy(target_backlog_s=2.0, quality_debt_s=5.0))
    cfg = AutoscalingConfig(min_replicas=1, max_replicas=6, upscale_delay_s=1, downscale_delay_s=10)
    fleet = ToyFleet()
    target, state, history = 1, {}, []
    for t in range(0, 150):
        clock[0] = float(t)
        arrivals = 4 * CAP if 20 <= t < 70 else 0.5 * CAP  # quiet, 4x one replica, quiet
        fleet.tick(t, arrivals, target)
        ctx = make_ctx(
            fleet.running,
            target,
            backlog=fleet.backlog,
            below_best=1.0 if fleet.degraded else 0.0,
            busy=fleet.busy,
            now=float(t),
            state=state,
            hi=6,
            config=cfg,
        )
        target, state = policy(ctx)
        history.append((t, fleet.running, target, fleet.degraded))
    running = [r for _, r, _, _ in history]
    assert max(running) >= 4, history  # scaled up for the burst
    # and stayed up while it lasted (no scale-down in the middle of the burst)
    assert min(r for t, r, _, _ in history if 45 <= t < 70) >= 4
    assert max(tg for _, _, tg, _ in history) <= 6
    assert any(d for t, _, _, d in history if 20 <= t < 70)  # the router degraded in the burst
    assert not any(d for t, _, _, d in history[60:70])  # and was back at best before it ended
    assert running[-1] == 1 and not history[-1][3]  # one replica, best quality, after the load
