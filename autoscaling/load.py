"""Cluster load model: every model-server replica's backlog against its measured capacity.

    board = LoadBoard(stale_after_s=5)
    board.report(ReplicaLoad.from_stats("replica-1", engine.stats()))   # each replica, ~4x/s
    load = board.snapshot()                  # -> ClusterLoad
    load.drain_s                             # seconds the cluster needs to finish accepted work

    cache = LoadSnapshotCache(fetch=async_fn_returning_ClusterLoad, period_s=0.25)
    await cache.start(); cache.latest        # read per request: no remote call

The unit of load is *seconds of accepted work*: token backlog (token-steps still to run: every
denoising step processes the whole active block, so a 32-token block at 8 steps is 256
token-steps) divided by the replica's capacity (token-steps/s). Both sides scale with the
denoising steps, which is why it is the right signal for a step router: a burst raises the
backlog at once, choosing fewer steps shrinks it. The cluster figure sums backlog and capacity
over replicas (the request router spreads work by backlog, so it is close to each replica's own).

Capacity is the *peak* rate a replica has shown recently (PeakRate), not its current rate: an
engine running one sequence processes far fewer token-steps per second than with a full batch
(tiny-coder on 2 CPU cores: ~320/s at batch 1, ~1700/s at batch 16), so dividing by the current
rate would make a single long request on an idle replica look like several seconds of queue.
At the peak rate, drain_s reads "seconds to clear the backlog running flat out".

A replica that has not reported for `stale_after_s` is dropped (dead or removed). A replica that
has not measured its capacity yet borrows the mean of those that have, or `fallback_capacity`.

No Ray here: deployments/load_board.py wraps LoadBoard in a Serve deployment that feeds the cache;
the autoscaling policy can read the same numbers from `record_autoscaling_stats`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field

log = logging.getLogger(__name__)

# Token-steps per second assumed for a replica before any has measured its own: about what
# tiny-coder does on one CPU core at a small batch, so a fresh cluster's first drain estimates
# are the right order of magnitude; replaced by measurements after the first steps.
FALLBACK_CAPACITY = 1000.0


@dataclass
class ReplicaLoad:
    replica_id: str
    queued: int = 0
    running: int = 0
    token_backlog: float = 0.0  # token-steps left, queued and running requests together
    capacity: float = 0.0  # measured token-steps/s now (0: not measured yet)
    peak_capacity: float = 0.0  # the best rate shown recently (PeakRate); preferred when > 0
    step_latency_ms: float = 0.0
    output_tokens_per_s: float = 0.0
    reported_at: float = field(default_factory=time.time)  # wall clock: crosses processes
    # the engine's fitted iteration-time model (engine/cost_model.StepCost.to_dict()) and its
    # batch limit: what the step controller (deployments/slo.py) predicts latency from
    step_cost: dict = field(default_factory=dict)
    max_num_seqs: int = 0

    @classmethod
    def from_stats(cls, replica_id: str, stats, peak_capacity: float = 0.0) -> ReplicaLoad:
        """From an engine.types.EngineStats (duck-typed so this module needs no engine import)."""
        extra = getattr(stats, "extra", None) or {}
        return cls(replica_id=replica_id, queued=int(stats.queued), running=int(stats.running),
                   token_backlog=float(stats.token_backlog),
                   capacity=float(stats.capacity_token_steps_per_s),
                   peak_capacity=float(peak_capacity),
                   step_latency_ms=float(stats.step_latency_ms),
                   output_tokens_per_s=float(stats.output_tokens_per_s),
                   step_cost=dict(getattr(stats, "step_cost", None) or {}),
                   max_num_seqs=int(extra.get("max_num_seqs", 0) or 0))

    @property
    def effective_capacity(self) -> float:
        return self.peak_capacity if self.peak_capacity > 0 else self.capacity

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ReplicaLoad:
        return cls(**d)


@dataclass
class ClusterLoad:
    replicas: int = 0
    queued: int = 0
    running: int = 0
    token_backlog: float = 0.0
    capacity: float = 0.0  # token-steps/s over all replicas (unmeasured ones estimated)
    output_tokens_per_s: float = 0.0
    drain_s: float = 0.0  # token_backlog / capacity: seconds of accepted work
    max_replica_drain_s: float = 0.0  # the most loaded replica's own drain time
    at: float = 0.0  # wall time of the snapshot (0: never refreshed)
    # the replicas' iteration-time models averaged (engine/cost_model.StepCost.mean) and the
    # smallest batch limit among them (0: not reported); mean step latency over replicas
    step_cost: dict = field(default_factory=dict)
    max_num_seqs: int = 0
    step_latency_ms: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ClusterLoad:
        return cls(**d)


def cluster_load(reports: list[ReplicaLoad], now: float | None = None,
                 fallback_capacity: float = FALLBACK_CAPACITY) -> ClusterLoad:
    """Aggregate fresh replica reports into one ClusterLoad (see the module docstring)."""
    now = time.time() if now is None else now
    if not reports:
        return ClusterLoad(at=now)
    measured = [r.effective_capacity for r in reports if r.effective_capacity > 0]
    default_cap = sum(measured) / len(measured) if measured else fallback_capacity
    caps = [r.effective_capacity if r.effective_capacity > 0 else default_cap for r in reports]
    backlog = sum(r.token_backlog for r in reports)
    capacity = sum(caps)
    limits = [r.max_num_seqs for r in reports if r.max_num_seqs > 0]
    return ClusterLoad(
        replicas=len(reports),
        queued=sum(r.queued for r in reports),
        running=sum(r.running for r in reports),
        token_backlog=backlog,
        capacity=capacity,
        output_tokens_per_s=sum(r.output_tokens_per_s for r in reports),
        drain_s=backlog / capacity if capacity > 0 else (math.inf if backlog else 0.0),
        max_replica_drain_s=max(r.token_backlog / c for r, c in zip(reports, caps, strict=False)),
        at=now,
        step_cost=mean_step_cost([r.step_cost for r in reports]),
        max_num_seqs=min(limits) if limits else 0,
        step_latency_ms=sum(r.step_latency_ms for r in reports) / len(reports),
    )


def mean_step_cost(costs: list[dict]) -> dict:
    """The cluster's iteration-time model: the mean of the replicas' fitted coefficients
    (engine/cost_model.StepCost dicts; same hardware assumed); {} while none has a fit. Plain
    Python, so the autoscaling side needs no engine import."""
    fitted = [c for c in costs if c and c.get("samples", 0) >= 4 and any(
        x > 0 for x in c.get("coef", ()))]
    if not fitted:
        return {}
    n = len(fitted)
    coef = [sum(c["coef"][i] for c in fitted) / n for i in range(len(fitted[0]["coef"]))]
    return {"coef": coef, "samples": sum(c["samples"] for c in fitted),
            "rmse_s": sum(c.get("rmse_s", 0.0) for c in fitted) / n,
            "rows_spread": max(c.get("rows_spread", 0.0) for c in fitted)}


class LoadBoard:
    """Latest report of every replica; a snapshot aggregates the fresh ones."""

    def __init__(self, stale_after_s: float = 5.0, fallback_capacity: float = FALLBACK_CAPACITY):
        self.stale_after_s = stale_after_s
        self.fallback_capacity = fallback_capacity
        self._reports: dict[str, ReplicaLoad] = {}

    def report(self, load: ReplicaLoad) -> None:
        self._reports[load.replica_id] = load

    def forget(self, replica_id: str) -> None:
        self._reports.pop(replica_id, None)

    def fresh(self, now: float | None = None) -> list[ReplicaLoad]:
        now = time.time() if now is None else now
        for rid in [rid for rid, r in self._reports.items()
                    if now - r.reported_at > self.stale_after_s]:
            log.info("replica %s stopped reporting load; dropped", rid)
            del self._reports[rid]
        return list(self._reports.values())

    def snapshot(self, now: float | None = None) -> ClusterLoad:
        now = time.time() if now is None else now
        return cluster_load(self.fresh(now), now, self.fallback_capacity)


class LoadSnapshotCache:
    """Keeps the latest ClusterLoad, refreshed by a background task every `period_s`.

    Requests read `latest` (a plain attribute); the only remote calls are the periodic fetches.
    `on_update(load)` runs after each successful fetch (the step router's hysteresis clock)."""

    def __init__(self, fetch: Callable[[], Awaitable[ClusterLoad]], period_s: float = 0.25,
                 on_update: Callable[[ClusterLoad], None] | None = None):
        if period_s > 1.0:
            raise ValueError("the load snapshot must refresh at least once a second")
        self.fetch = fetch
        self.period_s = period_s
        self.on_update = on_update
        self.latest = ClusterLoad()
        self.failures = 0
        self._task: asyncio.Task | None = None

    async def refresh(self) -> ClusterLoad:
        try:
            self.latest = await self.fetch()
            self.failures = 0
        except Exception as e:  # keep the last snapshot; a board restart must not stop serving
            self.failures += 1
            if self.failures in (1, 10) or self.failures % 100 == 0:
                log.warning("load snapshot refresh failed (%d in a row): %s", self.failures, e)
            return self.latest
        if self.on_update is not None:
            self.on_update(self.latest)
        return self.latest

    async def _loop(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.period_s)

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    @property
    def age_s(self) -> float:
        return time.time() - self.latest.at if self.latest.at else math.inf


class PeakRate:
    """The highest rate seen recently: max(new, old decayed), halving every `half_life_s`.

    A replica's capacity (see the module docstring). The slow decay forgets a rate the replica
    can no longer reach (a co-tenant on the GPU, thermal limits) within minutes, while a quiet
    spell of a few seconds keeps the peak."""

    def __init__(self, half_life_s: float = 600.0):
        self.half_life_s = half_life_s
        self.value = 0.0
        self._at: float | None = None

    def update(self, rate: float, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        if self._at is not None:
            self.value *= 0.5 ** ((now - self._at) / self.half_life_s)
        self._at = now
        self.value = max(self.value, float(rate))
        return self.value
