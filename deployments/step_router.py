"""The step router: picks each request's denoising steps from the load of the whole cluster.

    router = StepRouter(Ladder(steps=[16, 8, 4, 2], thresholds_s=[2.0, 3.0, 4.0]))
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
Metrics (deployments/metrics.py RouterMetrics): the chosen steps (tagged by quality and
pinned), the rung, the cluster's drain time and token backlog.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, get_args

from autoscaling.load import ClusterLoad

if TYPE_CHECKING:
    from deployments.metrics import RouterMetrics

log = logging.getLogger(__name__)

QualityLevel = Literal["auto", "max", "balanced", "fast"]
QUALITY_LEVELS: tuple[str, ...] = get_args(QualityLevel)


@dataclass
class Ladder:
    """The settings the router moves between; `ladder:` in serve_config.yaml.

    A rung is steps per block, optionally with a confidence threshold (commit every prediction
    above it, at least one per step; the steps then cap the passes: model/sampling.py), best
    quality first. `control` says what moves the cluster between rungs: "slo" (the
    latency-target controller of deployments/slo.py, the default) or "thresholds" (this
    module's drain-time thresholds, kept as the baseline `dllm bench burst` compares with)."""

    # Steps per block, best quality first: on a 32-token block 16 steps commit 2 tokens per
    # forward pass, 2 steps commit 16.
    steps: list[int] = field(default_factory=lambda: [16, 8, 4, 2])
    # Cluster drain seconds at which to move to rung 1, 2, ... (control "thresholds" only;
    # None: 2, 3, 4, ... s). Rung 1 sits above the drain time of ONE typical answer at the best
    # rung (128 tokens at 16 steps: ~1.2 s for tiny-coder on the 2-core CPU), else a lone user
    # degrades itself: [1, 2, 4] did, in benchmarks/results/serve.json; [3, 4, 5] held 4 steps
    # too long under overload.
    thresholds_s: list[float] | None = None
    hysteresis: float = 0.25  # climb back only below (1 - hysteresis) * threshold
    up_hold_s: float = 2.0  # ... held for this long, one rung at a time
    # How often the ingress refreshes its load snapshot; the ladder needs one at least every
    # second to follow a burst.
    refresh_s: float = 0.25
    # Per rung: a confidence threshold (Fast-dLLM's parallel decoding; the DiLaServe paper
    # reports thresholds as the best load control) or None for the fixed schedule; None for the
    # whole list: no threshold rungs. A rung may repeat the steps of the one before it with a
    # lower threshold (steps then cap the passes).
    confidence_thresholds: list[float | None] | None = None
    # Per rung: its quality, overriding the model's quality table (deployments/slo.py)
    quality: list[float] | None = None
    control: Literal["slo", "thresholds"] = "slo"

    def __post_init__(self) -> None:
        if not self.steps or any(s < 1 for s in self.steps):
            raise ValueError(f"ladder steps must be positive integers, got {self.steps}")
        if self.confidence_thresholds is not None and len(self.confidence_thresholds) != \
                len(self.steps):
            raise ValueError(f"confidence_thresholds needs one entry per rung ({len(self.steps)}),"
                             f" got {len(self.confidence_thresholds)}")
        thr = self.thresholds_of()
        if any(t is not None and not 0.0 < t <= 1.0 for t in thr):
            raise ValueError(f"confidence thresholds must be in (0, 1], got {thr}")
        # cheaper down the ladder: fewer steps, or as many with a lower threshold (None: none)
        rungs = list(zip(self.steps, thr, strict=True))
        for (s0, t0), (s1, t1) in zip(rungs, rungs[1:], strict=False):
            if s1 > s0 or (s1 == s0 and not (t1 is not None and (t0 is None or t1 < t0))):
                raise ValueError(f"ladder steps must decrease (best quality first; equal steps "
                                 f"only with a lower confidence threshold), got {self.steps}"
                                 + (f" / {thr}" if self.confidence_thresholds else ""))
        if self.thresholds_s is None:
            self.thresholds_s = [2.0 + i for i in range(len(self.steps) - 1)]
        if len(self.thresholds_s) != len(self.steps) - 1:
            raise ValueError(f"a ladder of {len(self.steps)} rungs needs {len(self.steps) - 1} "
                             f"thresholds, got {len(self.thresholds_s)}")
        if any(a >= b for a, b in zip(self.thresholds_s, self.thresholds_s[1:], strict=False)):
            raise ValueError(f"ladder thresholds must increase, got {self.thresholds_s}")
        if self.quality is not None and len(self.quality) != len(self.steps):
            raise ValueError(f"ladder quality needs one value per rung ({len(self.steps)}), got "
                             f"{len(self.quality)}")
        if not 0.0 <= self.hysteresis < 1.0:
            raise ValueError("hysteresis must be in [0, 1)")
        if self.up_hold_s < 0:
            raise ValueError("up_hold_s must be >= 0")
        if not 0.0 < self.refresh_s <= 1.0:
            raise ValueError("refresh_s must be in (0, 1] seconds")

    def thresholds_of(self) -> list[float | None]:
        """The confidence threshold of every rung (None: the fixed schedule)."""
        return list(self.confidence_thresholds) if self.confidence_thresholds is not None \
            else [None] * len(self.steps)

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
    reason: str  # "pinned" | "load" | "bounded" | "budget" (deployments/slo.py)
    confidence_threshold: float | None = None  # the rung's threshold (None: fixed schedule)
    # deployments/slo.py: the latency predicted for this request at this setting, the target it
    # was held to, and the rung's quality (None from the threshold ladder)
    predicted_latency_s: float | None = None
    predicted_ttft_s: float | None = None
    target_s: float | None = None
    quality: float | None = None
    model_latency_s: float | None = None  # the step model's own mean, before calibration
    predicted_rows: float | None = None  # rows per replica it was predicted to run with
    predicted_passes: float | None = None  # denoising passes the prediction assumed

    @property
    def setting(self) -> str:
        """The setting as one word: "16" (steps per block) or "16@0.9" (with a threshold)."""
        if self.confidence_threshold is None:
            return str(self.steps)
        return f"{self.steps}@{self.confidence_threshold:g}"


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
                                reason="load" if rung == self.rung else "bounded",
                                confidence_threshold=self.ladder.thresholds_of()[rung])
        if record:
            self.record_choice(choice, quality)
        return choice

    def record_choice(self, choice: StepChoice, quality: str = "auto") -> None:
        if self.metrics is not None:
            self.metrics.observe_choice(choice, quality)
