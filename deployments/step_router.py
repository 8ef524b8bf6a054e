"""The step router: picks each request's denoising steps from the load of the whole cluster.

    router = StepRouter(Ladder(steps=[16, 8, 4, 2], thresholds_s=[2.0, 4.0, 8.0]))
    router.observe(cluster_load)            # background, on every load snapshot (>= 1/s)
    choice = router.choose(pinned=None, quality="auto")   # per request: no I/O
    choice.steps                            # steps per block for this request

What a step count means. Steps are per block everywhere (SamplingParams.steps, the API's
`denoising_steps`): a block of `block_length` tokens (32 for tiny-coder) is denoised in `steps`
forward passes, committing block_length/steps tokens per pass. 32 steps on a 32-token block is
one token per pass (autoregressive-like quality); 8 steps commits 4 per pass; 2 steps 16 per pass.
- A long answer of L tokens costs ceil(L / block_length) * steps passes, so halving the steps
  halves its latency and the work it adds to the cluster.
- A short answer (fewer tokens than one block, e.g. a 10-token completion) costs
  min(steps, L) passes: rungs above L are all the same to it, so it gains less from the fast
  rungs and loses less quality at them.

The ladder runs from best quality to fastest. The rung follows the cluster's drain time
(`ClusterLoad.drain_s`, seconds of accepted work): rung i is the target when load >=
thresholds_s[i-1]. Hysteresis keeps it from flapping: the router drops to a faster rung at once
(bursts must be absorbed now), but climbs back only one rung at a time, and only after the load
has stayed below `(1 - hysteresis) * threshold` for `up_hold_s` seconds.

Bursts: the snapshot is up to ~0.5 s old (replica report + board pull), and 64 requests arriving
together would all be decided on the idle snapshot. So the router also keeps a ledger of the
work it admitted itself in the last `ledger_horizon_s` (by then the snapshot counts it) and adds
it to the snapshot's drain time when choosing: each request of a burst sees the ones before it.
A request that finishes leaves the ledger at once (its work no longer loads anyone), so a client
sending short requests one after another is not mistaken for a burst.

Per request: `denoising_steps` pins the steps (the router is bypassed; quality is then ignored);
`quality` bounds the rungs the router may use:
  auto      every rung (follow the load)
  max       rung 0 only (best quality whatever the load)
  balanced  rungs 0 .. middle (the load may cost quality, but never below the middle rung)
  fast      the last rung only (fastest whatever the load)
Metrics: `dllm_router_steps` (histogram of chosen steps, tagged by quality and pinned),
`dllm_router_rung` and `dllm_cluster_drain_seconds` / `dllm_cluster_token_backlog` (gauges).
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from autoscaling.load import ClusterLoad, LoadBoard, ReplicaLoad

log = logging.getLogger(__name__)

QUALITY_LEVELS = ("auto", "max", "balanced", "fast")


@dataclass
class Ladder:
    steps: list[int]  # steps per block, best quality first
    thresholds_s: list[float]  # drain seconds at which to move to rung 1, 2, ...
    hysteresis: float = 0.25  # climb back only below (1 - hysteresis) * threshold
    up_hold_s: float = 2.0  # ... held for this long, one rung at a time

    def __post_init__(self) -> None:
        if not self.steps or any(s < 1 for s in self.steps):
            raise ValueError(f"ladder steps must be positive integers, got {self.steps}")
        if any(a <= b for a, b in zip(self.steps, self.steps[1:], strict=False)):
            raise ValueError(f"ladder steps must decrease (best quality first), got {self.steps}")
        if len(self.thresholds_s) != len(self.steps) - 1:
            raise ValueError(f"a ladder of {len(self.steps)} rungs needs {len(self.steps) - 1} "
                             f"thresholds, got {len(self.thresholds_s)}")
        if any(a >= b for a, b in zip(self.thresholds_s, self.thresholds_s[1:], strict=False)):
            raise ValueError(f"ladder thresholds must increase, got {self.thresholds_s}")
        if not 0.0 <= self.hysteresis < 1.0:
            raise ValueError("hysteresis must be in [0, 1)")

    @property
    def last(self) -> int:
        return len(self.steps) - 1

    def window(self, quality: str) -> tuple[int, int]:
        """Rungs [lo, hi] a quality level allows (see the module docstring)."""
        if quality == "auto":
            return 0, self.last
        if quality == "max":
            return 0, 0
        if quality == "balanced":
            return 0, self.last // 2
        if quality == "fast":
            return self.last, self.last
        raise ValueError(f"quality must be one of {QUALITY_LEVELS}, got {quality!r}")

    def target_rung(self, drain_s: float) -> int:
        return sum(drain_s >= t for t in self.thresholds_s)


@dataclass
class StepChoice:
    steps: int  # steps per block for this request
    rung: int | None  # ladder rung used (None when pinned)
    reason: str  # "pinned" | "load" | "bounded"


class StepRouter:
    """Holds the current rung; `observe` moves it with hysteresis, `choose` reads it."""

    def __init__(self, ladder: Ladder, clock: Callable[[], float] = time.monotonic,
                 metrics: RouterMetrics | None = None, ledger_horizon_s: float = 1.0):
        self.ladder = ladder
        self.clock = clock
        self.metrics = metrics
        self.ledger_horizon_s = ledger_horizon_s
        self.rung = 0
        self.load = ClusterLoad()
        self._below_since: float | None = None  # when the load fell below the climb-back level
        self._ledger: collections.OrderedDict[int, tuple[float, float]] = \
            collections.OrderedDict()
        self._ledger_keys = itertools.count()

    # --- the burst ledger ---------------------------------------------------------------------
    def admitted(self, token_steps: float) -> int:
        """Record work this router just sent to the cluster (see the module docstring).
        Returns a key for `done(key)` when that work finishes early."""
        key = next(self._ledger_keys)
        self._ledger[key] = (self.clock(), float(token_steps))
        return key

    def done(self, key: int) -> None:
        """The work is finished (or cancelled): it no longer loads the cluster."""
        self._ledger.pop(key, None)

    def ledger_token_steps(self) -> float:
        cutoff = self.clock() - self.ledger_horizon_s
        while self._ledger:
            key, (t, _) = next(iter(self._ledger.items()))
            if t >= cutoff:
                break
            del self._ledger[key]
        return sum(w for _, w in self._ledger.values())

    def effective_drain_s(self) -> float:
        """The snapshot's drain time plus the work admitted since it was taken."""
        extra = self.ledger_token_steps()
        if extra and self.load.capacity > 0:
            return self.load.drain_s + extra / self.load.capacity
        return self.load.drain_s

    def observe(self, load: ClusterLoad) -> int:
        now = self.clock()
        self.load = load
        target = self.ladder.target_rung(load.drain_s)
        if target > self.rung:
            log.info("load %.2fs: steps %d -> %d", load.drain_s, self.ladder.steps[self.rung],
                     self.ladder.steps[target])
            self.rung = target
            self._below_since = None
        elif self.rung > 0 and load.drain_s < (1 - self.ladder.hysteresis) * \
                self.ladder.thresholds_s[self.rung - 1]:
            if self._below_since is None:
                self._below_since = now
            elif now - self._below_since >= self.ladder.up_hold_s:
                self.rung -= 1
                log.info("load %.2fs: steps back up to %d", load.drain_s,
                         self.ladder.steps[self.rung])
                self._below_since = now if self.rung > 0 else None
        else:
            self._below_since = None
        if self.metrics is not None:
            self.metrics.observe_load(load, self.rung)
        return self.rung

    def choose(self, pinned: int | None = None, quality: str = "auto",
               record: bool = True) -> StepChoice:
        """The steps for a request. record=False leaves the metric to `record_choice`, for a
        caller that may still refuse the request (429): refusals are not choices."""
        if pinned is not None:
            choice = StepChoice(steps=pinned, rung=None, reason="pinned")
        else:
            target = self.ladder.target_rung(self.effective_drain_s())
            if target > self.rung:  # a burst through this ingress: drop now, climb back as usual
                log.info("burst: steps %d -> %d", self.ladder.steps[self.rung],
                         self.ladder.steps[target])
                self.rung = target
                self._below_since = None
            lo, hi = self.ladder.window(quality)
            rung = min(max(self.rung, lo), hi)
            choice = StepChoice(steps=self.ladder.steps[rung], rung=rung,
                                reason="load" if rung == self.rung else "bounded")
        if record:
            self.record_choice(choice, quality)
        return choice

    def record_choice(self, choice: StepChoice, quality: str = "auto") -> None:
        if self.metrics is not None:
            self.metrics.observe_choice(choice, quality)


def estimate_token_steps(prompt_tokens: int, max_new_tokens: int, steps: int,
                         block_length: int, block_causal: bool = True,
                         full_cache: str = "none", suffix_tokens: int = 0) -> float:
    """Work of one request in token-steps, counted as the engine counts a new request's backlog
    (engine/sequence.py; an upper bound: every block takes all its steps, min(steps, its
    length)). Block-causal: each step runs the active block; the prompt and each finished block
    but the last are written to the KV cache once. Full attention: each step runs the prompt
    (prompt_tokens, a FIM suffix's `suffix_tokens` included) and the whole canvas; with a
    prefix/dual cache (SamplingParams.full_cache) only a block's first step does, the others
    run the span model.sampling.cached_query_span gives."""
    from model.sampling import cached_query_span

    total = prompt_tokens + max_new_tokens
    work = prompt_tokens if block_causal else 0
    blocks = math.ceil(max_new_tokens / block_length)
    for b in range(blocks):
        lo, hi = b * block_length, min(max_new_tokens, (b + 1) * block_length)
        n = min(steps, hi - lo)
        if block_causal:
            work += n * (hi - lo) + (hi - lo if b < blocks - 1 else 0)
        elif full_cache == "none":
            work += n * total
        else:
            q0, q1 = cached_query_span(full_cache, prompt_tokens - suffix_tokens, lo, hi, total,
                                       logit_shift=False)
            work += total + (n - 1) * (q1 - q0)
    return work


class RouterMetrics:
    """Serve metrics for the router (exported on each node's metrics port)."""

    def __init__(self, ladder: Ladder):
        from ray.serve import metrics  # only inside a Serve replica

        self.steps = metrics.Histogram(
            "dllm_router_steps", description="Denoising steps per block chosen for a request.",
            boundaries=sorted({float(s) for s in ladder.steps} | {1.0, 64.0}),
            tag_keys=("quality", "pinned"))
        self.rung = metrics.Gauge("dllm_router_rung",
                                  description="Current step-ladder rung (0 = best quality).")
        self.drain = metrics.Gauge("dllm_cluster_drain_seconds",
                                   description="Cluster backlog over capacity, in seconds.")
        self.backlog = metrics.Gauge("dllm_cluster_token_backlog",
                                     description="Token-steps of accepted work in the cluster.")
        self.replicas = metrics.Gauge("dllm_cluster_reporting_replicas",
                                      description="Model-server replicas in the load snapshot.")

    def observe_load(self, load: ClusterLoad, rung: int) -> None:
        self.rung.set(rung)
        self.drain.set(load.drain_s if load.drain_s != float("inf") else 1e9)
        self.backlog.set(load.token_backlog)
        self.replicas.set(load.replicas)

    def observe_choice(self, choice: StepChoice, quality: str) -> None:
        self.steps.observe(choice.steps, tags={"quality": quality,
                                               "pinned": str(choice.reason == "pinned").lower()})


# --- the load board as a Serve deployment ---------------------------------------------------
def make_load_board_deployment():
    """LoadBoard as a tiny Serve deployment: replicas push, ingresses pull (one remote call per
    refresh each way, never one per request)."""
    from ray import serve

    @serve.deployment(name="LoadBoard", num_replicas=1, max_ongoing_requests=1000,
                      ray_actor_options={"num_cpus": 0}, health_check_period_s=5,
                      logging_config={"enable_access_log": False})  # ~8 calls/s per replica
    class LoadBoardDeployment:
        def __init__(self, stale_after_s: float = 5.0, fallback_capacity: float = 1000.0):
            self.board = LoadBoard(stale_after_s, fallback_capacity)

        def report(self, load: dict) -> None:
            self.board.report(ReplicaLoad.from_dict(load))

        def forget(self, replica_id: str) -> None:
            self.board.forget(replica_id)

        def snapshot(self) -> dict:
            return self.board.snapshot().to_dict()

        def replicas(self) -> list[dict]:
            return [r.to_dict() for r in self.board.fresh()]

    return LoadBoardDeployment
