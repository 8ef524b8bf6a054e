"""Serve custom autoscaling policy: token backlog against measured capacity, plus quality debt.

Wire it on the model-server deployment (Ray 2.60 custom autoscaling API):

    autoscaling_config:
      min_replicas: 1
      max_replicas: 8
      upscale_delay_s: 5         # the policy does its own timing for quality debt
      downscale_delay_s: 120     # continuous "best quality and spare capacity" before removing one
      look_back_period_s: 10
      policy:
        policy_function: autoscaling.policy:TokenBacklogPolicy
        policy_kwargs: {target_backlog_s: 2.0, quality_debt_s: 15.0}

Serve instantiates the class once with `policy_kwargs` (a plain function would not get them) and
calls it every control-loop tick with an `AutoscalingContext`; `token_backlog_policy(ctx)` is the
same policy with default settings for those who want the plain `fn(ctx)` form. Either returns
`(replicas, state)`; Serve then applies min/max and the up/down delays around it.

What the replicas publish (`record_autoscaling_stats`, keys below; Serve averages each over
`look_back_period_s` per replica into `ctx.aggregated_metrics`):
- `token_backlog`: work left on the replica in token-steps (EngineStats.token_backlog);
- `capacity_token_steps_per_s`: the replica's measured processing rate in the same unit;
- `below_best_fraction`: fraction (0..1) of the requests the step router placed on this replica
  recently that it served below the best rung of the ladder (pinned steps and explicit quality
  bounds do not count: the user asked for them);
- `busy_fraction`: fraction (0..1) of the recent wall time the engine spent running denoising
  steps (a replica that keeps up with a steady stream has a small backlog but is still busy).

The decision, each tick:
1. need = total backlog / (capacity per replica * target_backlog_s): the replicas that would each
   hold `target_backlog_s` seconds of queued work. Without token stats (replicas just started, or
   an older server) it falls back to Serve's request count / target_ongoing_requests.
2. Quality debt: while the fleet has served below best quality (mean below_best_fraction over
   `degraded_threshold`) for longer than `quality_debt_s`, ask for one replica more than are
   running, even if the backlog looks fine: degraded requests are cheap, so the backlog hides the
   shortfall. Another one after each further `quality_debt_s` of degradation.
3. Scale up whenever need is above the current target. Scale down only at best quality and with
   spare capacity: the fewer replicas must hold at most `downscale_utilization` of the target
   backlog and be busy at most `downscale_utilization` of the time. Otherwise hold the current target (returning the running count would cancel
   replicas that are still starting).
4. Clamp to the capacity-adjusted min/max. Before any replica runs, return
   `ctx.target_num_replicas` so the initial replicas are not undercut.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

logger = logging.getLogger("ray.serve")

# Keys of the model-server replicas' record_autoscaling_stats() dict (the contract with
# deployments/replica.py; monitoring/metrics.py re-exports them for the dashboard's documentation).
STAT_TOKEN_BACKLOG = "token_backlog"
STAT_CAPACITY = "capacity_token_steps_per_s"
STAT_BELOW_BEST = "below_best_fraction"
STAT_BUSY = "busy_fraction"
AUTOSCALING_STAT_KEYS = (STAT_TOKEN_BACKLOG, STAT_CAPACITY, STAT_BELOW_BEST, STAT_BUSY)

# Keys of the policy state we own (Serve merges its own delay counters into the same dict).
_DEGRADED_SINCE = "dllm_degraded_since"
_LAST_DEBT_BUMP = "dllm_last_debt_bump"
_DEBT_FLOOR = "dllm_debt_floor"
_LAST_REASON = "dllm_last_reason"


@dataclass
class PolicyConfig:
    # Seconds of queued work each replica may hold before we want another one. 2 s: a 128-token
    # answer at 8 steps/32-token block is ~32 token-steps per sequence per block; a replica that
    # has 2 s of backlog makes a new request wait about that long before its first block.
    target_backlog_s: float = 2.0
    # Scale down only if the remaining replicas would run at most this fraction of the target:
    # 0.5 leaves room for the next burst and keeps up/down decisions apart (no flapping).
    downscale_utilization: float = 0.5
    # How long the router may serve below best quality before we add a replica regardless of
    # queues; also the spacing between further debt-driven additions.
    quality_debt_s: float = 15.0
    # Mean below_best_fraction above which the fleet counts as degraded. A few pinned-fast or
    # boundary requests should not count, a router stuck one rung down should.
    degraded_threshold: float = 0.2
    # Used when no replica has measured its capacity yet (0: fall back to request counts).
    default_capacity_token_steps_per_s: float = 0.0

    def __post_init__(self) -> None:
        if self.target_backlog_s <= 0:
            raise ValueError("target_backlog_s must be > 0")
        if not 0 < self.downscale_utilization <= 1:
            raise ValueError("downscale_utilization must be in (0, 1]")
        if self.quality_debt_s < 0:
            raise ValueError("quality_debt_s must be >= 0")
        if not 0 <= self.degraded_threshold < 1:
            raise ValueError("degraded_threshold must be in [0, 1)")
        if self.default_capacity_token_steps_per_s < 0:
            raise ValueError("default_capacity_token_steps_per_s must be >= 0")


@dataclass
class FleetLoad:
    """What the policy read off one context (also logged, and kept in the state for debugging)."""

    running: int
    backlog: float | None  # token-steps over all replicas; None without token stats
    capacity: float | None  # token-steps/s of one replica (median of the measured ones)
    below_best: float  # mean below_best_fraction over replicas (0 when unpublished)
    busy: float | None  # sum of busy_fraction over replicas (replicas' worth of busy time)
    requests: float  # Serve's ongoing + queued requests


def read_fleet_load(ctx: Any, cfg: PolicyConfig) -> FleetLoad:
    metrics = ctx.aggregated_metrics or {}
    backlogs = list((metrics.get(STAT_TOKEN_BACKLOG) or {}).values())
    capacities = [c for c in (metrics.get(STAT_CAPACITY) or {}).values() if c and c > 0]
    below = list((metrics.get(STAT_BELOW_BEST) or {}).values())
    busy = list((metrics.get(STAT_BUSY) or {}).values())
    if capacities:
        # Median: one replica that just started (tiny measured rate) must not halve the estimate.
        capacity = statistics.median(capacities)
    elif cfg.default_capacity_token_steps_per_s > 0:
        capacity = cfg.default_capacity_token_steps_per_s
    else:
        capacity = None
    return FleetLoad(
        running=ctx.current_num_replicas,
        backlog=float(sum(backlogs)) if backlogs else None,
        capacity=capacity,
        below_best=float(sum(below) / len(below)) if below else 0.0,
        busy=float(sum(busy)) if busy else None,
        requests=float(ctx.total_num_requests or 0.0),
    )


def replicas_for_load(load: FleetLoad, ctx: Any, cfg: PolicyConfig, utilization: float) -> int:
    """Replicas that carry the load at `utilization` of the target (1.0 up, lower to go down)."""
    if load.backlog is not None and load.capacity:
        # backlog [token-steps] / (capacity [token-steps/s/replica] * target [s]) = replicas
        need = load.backlog / (load.capacity * cfg.target_backlog_s * utilization)
    else:
        target = ctx.config.get_target_ongoing_requests() if ctx.config is not None else 2.0
        need = load.requests / (target * utilization)
    if utilization < 1.0 and load.busy is not None:
        # Going down: the remaining replicas must also absorb the work the fleet is doing now.
        need = max(need, load.busy / utilization)
    # A small epsilon keeps float noise (e.g. 2.0000001) from asking for a whole extra replica.
    return max(0, math.ceil(need - 1e-6))


class TokenBacklogPolicy:
    """Callable policy; Serve builds it once with `policy_kwargs`. Keeps no state of its own:
    everything it remembers lives in the returned policy state, so a sequence of contexts fully
    determines its decisions (which is how the unit tests drive it)."""

    def __init__(self, **kwargs: Any) -> None:
        self.cfg = PolicyConfig(**kwargs)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        return decide(ctx, self.cfg)


def decide(ctx: Any, cfg: PolicyConfig) -> tuple[int, dict[str, Any]]:
    state = dict(ctx.policy_state or {})
    # Before any replica runs the metrics are empty and "need" would be min_replicas or 0:
    # returning that would undercut initial_replicas (seen in 2.60).
    if ctx.current_num_replicas == 0:
        return ctx.target_num_replicas, state

    now = ctx.current_time if ctx.current_time is not None else time.time()
    lo, hi = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
    target = ctx.target_num_replicas
    load = read_fleet_load(ctx, cfg)

    # Quality debt: time continuously spent below best quality.
    degraded = load.below_best > cfg.degraded_threshold
    if degraded:
        since = state.get(_DEGRADED_SINCE)
        if since is None:
            since = state[_DEGRADED_SINCE] = now
        last_bump = state.get(_LAST_DEBT_BUMP)
        matured = now - since >= cfg.quality_debt_s
        spaced = last_bump is None or now - last_bump >= cfg.quality_debt_s
        if matured and spaced:
            # One more than are *running*: a bump still starting is not counted twice.
            floor = int(state.get(_DEBT_FLOOR) or 0)
            if load.running + 1 > floor:
                state[_DEBT_FLOOR] = load.running + 1
                state[_LAST_DEBT_BUMP] = now
    else:
        # Back at best quality: the debt is paid; downscaling below is left to the capacity rule.
        state.pop(_DEGRADED_SINCE, None)
        state.pop(_LAST_DEBT_BUMP, None)
        state.pop(_DEBT_FLOOR, None)

    need_up = replicas_for_load(load, ctx, cfg, 1.0)
    debt_floor = int(state.get(_DEBT_FLOOR) or 0)
    if max(need_up, debt_floor) > target:
        decision = max(need_up, debt_floor)
        reason = "debt" if debt_floor > need_up else "backlog"
    elif (
        not degraded
        and (need_down := replicas_for_load(load, ctx, cfg, cfg.downscale_utilization)) < target
    ):
        # At best quality with spare capacity; Serve's downscale_delay_s asks for this to hold
        # continuously, and any "hold" below resets its counter.
        decision = need_down
        reason = "spare"
    else:
        decision = target
        reason = "hold"

    decision = min(max(decision, lo), hi)
    if state.get(_LAST_REASON) != reason or decision != target:
        logger.info(
            "autoscaling: %s -> %d replicas (target %d, %s, debt_floor %d)",
            reason,
            decision,
            target,
            asdict(load),
            debt_floor,
        )
    state[_LAST_REASON] = reason
    return decision, state


_DEFAULT_CONFIG = PolicyConfig()


def token_backlog_policy(ctx: Any) -> tuple[int, dict[str, Any]]:
    """The plain `fn(ctx)` form with default settings."""
    return decide(ctx, _DEFAULT_CONFIG)
