"""The step controller by latency target: the best-quality setting that still meets the SLO.

    router = SloRouter(Ladder(steps=[16, 8, 4, 2]), SloConfig(latency_p95_s=4.0),
                       qualities=[0.14, 0.06, 0.06, 0.02])
    router.observe(cluster_load)                      # every load snapshot (>= 1/s)
    shape = RequestShape(prompt_tokens=40, max_new_tokens=128, block_length=32)
    choice = router.choose(None, "auto", shape=shape, budget_s=None)   # per request: no I/O
    choice.steps, choice.confidence_threshold, choice.predicted_latency_s
    router.finished(choice, scheduled_passes, used_passes, latency_s)  # calibration
    make_router(args, info)                           # what the ingress builds from AppArgs

The deployment states a target (`slo: {latency_p95_s, ttft_p95_s}`, either or both; neither:
`default_slowdown` (2x) times the latency the same request would see at the best rung on an
idle replica). For every candidate setting (a ladder rung: steps per block, maybe a confidence
threshold) the controller predicts the latency of the next request from

- the replicas' own iteration-time model (engine/cost_model.py, fitted online: seconds =
  a + b rows + c tokens + d attended kilo-pairs; the load snapshot carries the replicas' mean),
- the request's shape (prompt, new tokens, block length: its passes and tokens per pass),
- the queue ahead: rows running and queued per replica in the snapshot, plus the requests this
  ingress admitted since (the ledger, as the threshold ladder counts them), and
- the sustained arrival rate (requests admitted over the last `rate_window_s`): with all of
  them at rung r each replica runs N = lambda S_r(N) rows in steady state (Little's law over a
  step-level batch, solved in closed form), unbounded once the rung's work outruns the
  replicas' capacity; unless the arrivals follow answers (closed-loop clients: IDEs, agents),
  then their population is the steady state, as they only slow down at a slower rung.

  S_r(N) = passes_r * (a + N (b + c tok_row + d kpairs_row)) + c * cache_tokens   (service)
  latency_r = wait for a slot + S_r(max(rows now + 1, N_ss)) , times the calibration ratio

It picks the best-quality rung whose prediction meets the target (quality per rung from the
model's measured quality table, `dllm eval`'s output shipped beside the weights; a monotone
default otherwise; rungs the table values alike are ordered by their steps). Smooth: it moves down (faster) as soon as the current rung's prediction
misses the target, but up (better) only once the better rung's prediction is below
(1 - hysteresis) x target continuously for `up_hold_s`, and then straight to the best rung that
allows (new replicas reporting raise the capacity: quality comes back with them).

Calibration, online: `finished` learns per rung the passes a request really takes over the
scheduled ones (EOS stops early; a threshold rung commits many tokens per pass), and measured
latency against the step model's as overhead + ratio x model (LatencyCalibration: HTTP,
tokenizing, hand-overs are what the step model leaves out), and the spread of latency over
that mean, whose 95th percentile turns a mean prediction into a p95 one.

Per request: `denoising_steps` pins (no prediction), `quality` bounds the rungs (Ladder.window),
`latency_budget_ms` replaces the target for that request alone: it gets the best rung whose
prediction, with everyone else at the cluster's rung, meets its budget; the engines admit it
ahead of their queues (EngineConfig.priority_slots), so that prediction has no queue wait.

A new rung kind (DiffusionGemma's steps cap / entropy bound) is one more field on the ladder,
carried by StepChoice into SamplingParams (deployments/jobs.Job.apply_choice); the prediction
only needs its passes (learnt by `finished`) and its quality.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from autoscaling.load import FALLBACK_CAPACITY, ClusterLoad
from deployments.quality_table import load_quality_table, quality_table_path, rung_qualities
from deployments.step_router import Ladder, StepChoice, StepRouter
from model.schedule import BlockSchedule

if TYPE_CHECKING:
    from deployments.config import AppArgs
    from engine.types import ModelInfo

log = logging.getLogger(__name__)


@dataclass
class SloConfig:
    """`slo:` in serve_config.yaml."""

    latency_p95_s: float | None = None  # whole answer; None: default_slowdown x unloaded best
    ttft_p95_s: float | None = None  # first text (first block); None: no TTFT target
    # No latency target given: this many times the latency the same request gets at the best
    # rung on an idle replica. 2x: the goal under a 4x overload, and a lone user or two
    # (N = 2 rows: (a + 2k) / (a + k) < 2) always stays at the best rung.
    default_slowdown: float = 2.0
    # Climb to a better rung only when its prediction is below (1 - hysteresis) x target ...
    hysteresis: float = 0.2
    # ... for this long without a break (snapshots come 4 times a second).
    up_hold_s: float = 2.0
    # The default target's "unloaded" latency is taken at quiet moments that this much more
    # quiet followed: the first second of a burst still looks quiet to the snapshot, and its
    # calibration (the first answers overtaken by the burst) put the target at 2.86 s for the
    # whole burst instead of 1.2 (a `dllm bench burst` run on the 2-core CPU)
    quiet_confirm_s: float = 5.0
    # Closed-loop clients (each sends its next request when its answer arrives: IDEs, agents,
    # benchmarks): an arrival within this long after an answer finished follows it. When at
    # least `closed_loop_share` of the arrivals do, beyond chance, the steady state is the
    # clients' own population, not an open-loop rate's: at a fast rung two such clients send
    # twice as often, which as an open-loop rate is past the best rung's capacity and held
    # them at 8 steps for good (`dllm bench burst`'s two lone clients, on the 2-core CPU)
    closed_loop_gap_s: float = 0.05
    closed_loop_share: float = 0.8
    # The sustained arrival rate is the requests admitted over this window ...
    rate_window_s: float = 5.0
    # ... or over its last fifth when that is higher and counts at least this many arrivals:
    # a burst shows within a second, a Poisson clump does not (3 arrivals in one second of a
    # 0.8 req/s load, about 2 seconds in 40, read as 3 req/s and took lone users off the best
    # rung after a burst, benchmarks/results/burst_warmup.json)
    burst_min_arrivals: int = 5
    # Predictions aim at the p95, the step model at the mean: p95 = this x the mean until 20
    # requests have been measured, then the measured 95th percentile of latency / predicted
    # mean (LatencyCalibration.p95_factor; queueing under load widens it).
    p95_over_mean: float = 1.25
    # The model's quality table (`dllm eval` output); None: quality.json beside the weights
    quality_table: str | None = None
    # Which column of the table is quality. parse_rate: the one that rises with steps on
    # tiny-coder (0 at 1-8 steps/block, 0.12 at 16, 0.32 at 32: quality_defer_eos.json); its FIM
    # similarity is flat from 2 steps on. Rungs the table ties are ordered by their steps.
    quality_metric: str = "parse_rate"

    def __post_init__(self) -> None:
        for name in ("latency_p95_s", "ttft_p95_s"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"slo.{name} must be > 0 seconds")
        if self.default_slowdown < 1.0:
            raise ValueError("slo.default_slowdown must be >= 1")
        if not 0.0 <= self.hysteresis < 1.0:
            raise ValueError("slo.hysteresis must be in [0, 1)")
        if self.closed_loop_gap_s < 0 or not 0.0 < self.closed_loop_share <= 1.0:
            raise ValueError("slo.closed_loop_gap_s must be >= 0 and slo.closed_loop_share "
                             "in (0, 1]")
        if self.quiet_confirm_s < 0:
            raise ValueError("slo.quiet_confirm_s must be >= 0")
        if self.up_hold_s < 0 or self.rate_window_s <= 0:
            raise ValueError("slo.up_hold_s must be >= 0 and slo.rate_window_s > 0")
        if self.burst_min_arrivals < 1:
            raise ValueError("slo.burst_min_arrivals must be >= 1")
        if self.p95_over_mean < 1.0:
            raise ValueError("slo.p95_over_mean must be >= 1")


# --- the prediction --------------------------------------------------------------------------
@dataclass(frozen=True)
class RequestShape:
    """What a request's cost depends on (per choice; `n` choices run as n rows)."""

    prompt_tokens: int = 0
    max_new_tokens: int = 128
    block_length: int = 32
    block_causal: bool = True
    n: int = 1

    def passes(self, steps: int) -> int:
        """Denoising forwards when every block takes all its steps (model/schedule.py)."""
        return BlockSchedule(self.max_new_tokens, min(self.block_length, self.max_new_tokens),
                             steps).total_steps

    def first_block_passes(self, steps: int) -> int:
        return min(steps, self.block_length, self.max_new_tokens)

    @property
    def tokens_per_pass(self) -> int:
        """Tokens one row's denoising forward runs: the active block (block-causal) or the
        whole row (full attention, no cache)."""
        if self.block_causal:
            return min(self.block_length, self.max_new_tokens)
        return self.prompt_tokens + self.max_new_tokens

    @property
    def kpairs_per_pass(self) -> float:
        """Thousands of (query, key) pairs per pass, averaged over the blocks."""
        if self.block_causal:
            bl = min(self.block_length, self.max_new_tokens)
            mean_ctx = self.prompt_tokens + max(0, self.max_new_tokens - bl) / 2 + bl
            return bl * mean_ctx / 1000.0
        n = self.prompt_tokens + self.max_new_tokens
        return n * n / 1000.0

    @property
    def cache_tokens(self) -> int:
        """Tokens written to the KV cache once (block-causal: the prompt and every block but
        the last)."""
        if not self.block_causal:
            return 0
        bl = min(self.block_length, self.max_new_tokens)
        return self.prompt_tokens + max(0, self.max_new_tokens - bl)


@dataclass(frozen=True)
class StepModel:
    """Iteration seconds = a + b rows + c tokens + d kpairs (engine/cost_model.StepCost)."""

    a: float
    b: float
    c: float
    d: float = 0.0

    @classmethod
    def from_load(cls, load: ClusterLoad, min_rows_spread: float = 0.5) -> StepModel:
        """The snapshot's fitted model. While it is not identified (no fit yet, or every step
        so far at one batch size) a prior instead: half of a one-row step is fixed cost, half
        per row (tiny-coder on the CPU measured a ~= k: 14 ms each), from the fit's own
        one-row step, else the replicas' mean step latency, else their capacity."""
        cost = load.step_cost or {}
        coef = cost.get("coef")
        fitted = bool(coef) and len(coef) == 4 and any(c > 0 for c in coef)
        if fitted and cost.get("rows_spread", min_rows_spread) >= min_rows_spread:
            return cls(*(max(0.0, float(c)) for c in coef))
        one_row = 0.0
        if fitted:
            one_row = cls(*(max(0.0, float(c)) for c in coef)).step_s(1, 32)
        if one_row <= 0 and load.step_latency_ms > 0:
            one_row = load.step_latency_ms / 1000.0
        if one_row <= 0:
            per_replica = load.capacity / load.replicas if load.replicas and load.capacity \
                else 0.0
            one_row = 32.0 / (per_replica or FALLBACK_CAPACITY)  # a 32-token row's step
        return cls(0.5 * one_row, 0.5 * one_row, 0.0, 0.0)

    def step_s(self, rows: float, tokens: float, kpairs: float = 0.0) -> float:
        return self.a + self.b * rows + self.c * tokens + self.d * kpairs

    def row_cost(self, shape: RequestShape) -> float:
        """Seconds one more row adds to an iteration."""
        return self.b + self.c * shape.tokens_per_pass + self.d * shape.kpairs_per_pass

    def service_s(self, shape: RequestShape, passes: float, rows: float) -> float:
        """A request's time in the batch when `rows` rows (itself included) run with it."""
        return passes * (self.a + rows * self.row_cost(shape)) + self.c * shape.cache_tokens


@dataclass
class Prediction:
    latency_s: float  # predict(): the step model's mean; predict_rung(): calibrated p95
    ttft_s: float
    rows: float  # rows per replica the request runs with
    wait_s: float  # waiting for a slot
    model_s: float = 0.0  # predict_rung(): the step model's mean (what calibration compares)
    passes: float = 0.0  # predict_rung(): the passes it assumed


def predict(model: StepModel, shape: RequestShape, passes: float, first_passes: float,
            rows_now: float, arrival_rps: float, others: RequestShape, others_passes: float,
            max_num_seqs: int, priority: bool = False,
            population: float | None = None) -> Prediction:
    """The latency of one request of `shape` taking `passes` passes on a replica that runs
    `rows_now` rows (running + queued + just admitted, per replica) and receives `arrival_rps`
    requests/s of `others` shape at `others_passes` passes each (the module docstring).
    priority: a request with a latency budget, which the engine admits ahead of the queue into
    a priority slot (EngineConfig.priority_slots): no wait, one row more than a full batch.
    population: the arrivals come from this many closed-loop clients per replica (each waits
    for its answer): the steady state is that many rows, whatever the rate."""
    m = max(1, max_num_seqs)
    k = model.row_cost(others)
    fixed = others_passes * model.a + model.c * others.cache_tokens  # S(N) = fixed + p k N
    # steady state: N = lambda S(N) -> N = lambda fixed / (1 - lambda p k)
    lam_pk = arrival_rps * others_passes * k
    wait_ss = 0.0
    if arrival_rps <= 0:
        n_ss = 0.0
    elif population is not None:
        n_ss = min(float(m), population)
    elif lam_pk >= 1.0:
        return Prediction(math.inf, math.inf, float(m), math.inf)
    else:
        n_ss = arrival_rps * fixed / (1.0 - lam_pk)
        if n_ss > m:  # slot-bound: m rows at a time, the rest queue
            s_full = fixed + others_passes * k * m
            rho = arrival_rps * s_full / m
            if rho >= 1.0:
                return Prediction(math.inf, math.inf, float(m), math.inf)
            n_ss = float(m)
            wait_ss = s_full / m * rho / (2.0 * (1.0 - rho))  # M/D/1-like over the m slots
    # now: the rows ahead of it; past the slots it waits for (rows - m) of them to finish
    ahead = max(0.0, rows_now)
    s_others_full = others.cache_tokens * model.c + others_passes * (model.a + m * k)
    wait_now = max(0.0, ahead + 1 - m) * s_others_full / m
    # the rows it runs with: those ahead of it now plus itself, or the steady state's rows
    # (which count it among the arrivals); counting it on top of the steady state degraded
    # two closed-loop clients, whose requests only ever see each other
    # a priority row waits for nothing and may be one row past a full batch
    rows = min(float(m + priority), max(ahead + 1.0, n_ss, 1.0))
    wait = 0.0 if priority else max(wait_now, wait_ss)
    step = model.a + rows * model.row_cost(shape)
    service = passes * step + model.c * shape.cache_tokens
    first = first_passes * step + model.c * shape.prompt_tokens
    return Prediction(wait + service, wait + first, rows, wait)


class LatencyCalibration:
    """measured latency ~ overhead_s + ratio x the step model's, fitted online (weighted least
    squares, older requests weighed down by time). What the step model leaves out is partly a fixed
    cost per request (HTTP, tokenizing, Ray hand-overs: ~0.1 s through Serve on the CPU, which
    a ratio alone would overcharge long answers and undercharge short ones for) and partly a
    factor (a co-tenant slowing every step). Weighted by recency (half-life `half_life_s`),
    clamped to [0, 2] s and [0.2, 5].

    The ratio is shrunk towards 1 (the step model's own scaling) as if `prior_weight` requests
    had been measured at +-`prior_spread` of the mean prediction on the identity. Without it,
    requests all at one setting (lone users: predictions 0.45 or 0.49 s as one or two rows run)
    fitted a ratio of 0.2 and a 0.4 s overhead: rows that overlap for part of an answer make
    the measured latency vary less than the rows at admission say, and every faster rung then
    looked almost as slow as the best one (0.74 vs 0.89 s predicted for 2 vs 16 steps)."""

    def __init__(self, half_life_s: float = 10.0, window_s: float = 15.0,
                 clock: Callable[[], float] = time.monotonic, prior_weight: float = 2.0,
                 prior_spread: float = 0.5):
        self.half_life_s = half_life_s
        self.window_s = window_s
        self.prior_weight = prior_weight
        self.prior_spread = prior_spread
        self.clock = clock
        self.overhead_s, self.ratio = 0.0, 1.0
        self._w = self._x = self._y = self._xx = self._xy = 0.0
        self._at: float | None = None
        # (time, measured / calibrated prediction) of the requests of the last `window_s`:
        # their 95th percentile is how far above the mean the p95 sits. A window, not a count:
        # the spread of a burst's queueing must not outlive the burst (it held a controller
        # below best quality for a minute after one, in benchmarks/results/burst.json)
        self._spread: collections.deque[tuple[float, float]] = collections.deque()

    def p95_factor(self, default: float, min_samples: int = 10) -> float:
        """The 95th percentile of measured / predicted mean; `default` until measured."""
        cutoff = self.clock() - self.window_s
        while self._spread and self._spread[0][0] < cutoff:
            self._spread.popleft()
        if len(self._spread) < min_samples:
            return default
        xs = sorted(x for _, x in self._spread)
        return max(1.0, min(4.0, xs[min(len(xs) - 1, math.ceil(0.95 * len(xs)) - 1)]))

    def __call__(self, model_s: float) -> float:
        if not math.isfinite(model_s):
            return model_s
        return self.overhead_s + self.ratio * model_s

    def add(self, model_s: float, measured_s: float) -> None:
        # forgetting by time, not by count: after a burst the next quiet requests outweigh
        # it within seconds (by count it held a 2x ratio for a minute of light load)
        now = self.clock()
        g = 1.0 if self._at is None else 0.5 ** (max(0.0, now - self._at) / self.half_life_s)
        self._at = now
        self._w = g * self._w + 1.0
        self._x = g * self._x + model_s
        self._y = g * self._y + measured_s
        self._xx = g * self._xx + model_s * model_s
        self._xy = g * self._xy + model_s * measured_s
        mx, my = self._x / self._w, self._y / self._w
        sxx = max(0.0, self._xx - self._w * mx * mx)
        sxy = self._xy - self._w * mx * my
        # one predicted latency so far (sxx = 0): a factor cannot be told from an offset, the
        # prior's 1 stands
        prior = self.prior_weight * (self.prior_spread * mx) ** 2
        ratio = (sxy + prior) / (sxx + prior) if sxx + prior > 0 else 1.0
        self.ratio = min(5.0, max(0.2, ratio))
        self.overhead_s = min(2.0, max(0.0, my - self.ratio * mx))
        self._spread.append((self.clock(), measured_s / max(self(model_s), 1e-6)))


# --- the controller --------------------------------------------------------------------------
class SloRouter(StepRouter):
    """The threshold ladder's interface (observe, choose, admitted/done, rung), driven by
    predicted latency against the target (the module docstring)."""

    def __init__(self, ladder: Ladder, slo: SloConfig | None = None,
                 qualities: list[float] | None = None, clock: Callable[[], float] = time.monotonic,
                 metrics=None, ledger_horizon_s: float = 1.0, ingress_replicas: int = 1,
                 wall: Callable[[], float] = time.time, report_lag_s: float = 0.25):
        super().__init__(ladder, clock=clock, metrics=metrics, ledger_horizon_s=ledger_horizon_s)
        # wall time: snapshots are stamped with it (they cross processes)
        self.wall = wall
        self.report_lag_s = report_lag_s
        self._admitted_at: dict[int, float] = {}
        # (finished at, admitted at, rows) of the last 10 s
        self._finished: collections.deque[tuple[float, float, int]] = collections.deque()
        self.slo = slo or SloConfig()
        n = len(ladder.steps)
        self.qualities = list(qualities) if qualities is not None else \
            [1.0 - i / n for i in range(n)]
        if len(self.qualities) != n:
            raise ValueError(f"{n} rungs need {n} qualities, got {len(self.qualities)}")
        self.thresholds = ladder.thresholds_of()
        self.ingress_replicas = max(1, ingress_replicas)
        self._admits: collections.deque[float] = collections.deque()  # admission times
        # answers' finish times and, per admission, whether it followed one (closed loop)
        self._answers: collections.deque[float] = collections.deque()
        self._follows: collections.deque[tuple[float, bool]] = collections.deque()
        self._population_at: tuple[float, float | None] | None = None  # (when, estimate)
        self._admitted_rows: dict[int, int] = {}  # ledger key -> rows (choices) it added
        self.mean_shape: RequestShape | None = None
        # learnt per rung: passes really taken / scheduled (EOS, thresholds); 0.5 as a prior
        # for threshold rungs (Fast-dLLM reports 2-3.5x fewer passes at 0.9 on LLaDA)
        self.pass_ratio = [1.0 if t is None else 0.5 for t in self.thresholds]
        # ... and the last 100 measured per rung: a request's own prediction takes their 95th
        # percentile (the p95 request is a long one), the others' load their mean
        self._pass_samples = [collections.deque(maxlen=100) for _ in self.thresholds]
        self.calibration = LatencyCalibration(clock=clock)  # measured vs the step model's
        # The step model and the calibration (overhead, ratio, p95 factor) of the last quiet
        # moment: what the default target's "unloaded" latency is computed with. Under a burst
        # the measured latency outgrows the step model (queueing) and the steps themselves slow
        # down (the ingress and a starting replica share the cores); computed with today's
        # model and calibration the default target grew 12x within a burst (0.55 s -> 6.8 s,
        # benchmarks/results/burst.json), which let the controller climb back to slow rungs
        self._quiet_reference: tuple[StepModel, float, float, float] | None = None
        # (time, candidate reference) of the quiet moments not yet confirmed by
        # slo.quiet_confirm_s more of quiet; cleared by any moment that is not quiet
        self._quiet_candidates: collections.deque[
            tuple[float, tuple[StepModel, float, float, float]]] = collections.deque()
        # the last confirmed ones (3 s of them): the reference is their median, so one moment
        # of a step model fitted on a handful of steps (a third of the real step time, seen
        # once in a `dllm bench burst` run) does not set the target for good
        self._quiet_confirmed: collections.deque[tuple[StepModel, float, float, float]] = \
            collections.deque(maxlen=12)
        self._better_since: float | None = None
        self.last_prediction: list[float] = [0.0] * n

    # --- bookkeeping ---------------------------------------------------------------------
    def admitted(self, token_steps: float, rows: int = 1, shape: RequestShape | None = None
                 ) -> int:
        key = super().admitted(token_steps)
        self._admitted_rows[key] = rows
        self._admitted_at[key] = self.wall()
        now = self.clock()
        self._admits.append(now)
        # did it follow an answer (a closed-loop client's next request)?
        gap = self.slo.closed_loop_gap_s
        self._follows.append((now, bool(self._answers) and self._answers[-1] >= now - gap))
        if shape is not None:
            self._learn_shape(shape)
        return key

    def done(self, key: int) -> None:
        super().done(key)
        self._answers.append(self.clock())
        rows = self._admitted_rows.pop(key, None)
        at = self._admitted_at.pop(key, None)
        if rows is not None and at is not None:
            now = self.wall()
            self._finished.append((now, at, rows))
            while self._finished and self._finished[0][0] < now - 10.0:
                self._finished.popleft()

    def _learn_shape(self, shape: RequestShape, a: float = 0.1) -> None:
        m = self.mean_shape
        if m is None:
            self.mean_shape = shape
            return
        self.mean_shape = RequestShape(
            prompt_tokens=round((1 - a) * m.prompt_tokens + a * shape.prompt_tokens),
            max_new_tokens=max(1, round((1 - a) * m.max_new_tokens + a * shape.max_new_tokens)),
            block_length=shape.block_length, block_causal=shape.block_causal, n=1)

    def arrival_rps(self) -> float:
        """Requests/s admitted, cluster-wide (every ingress replica is assumed to see its
        share): the rate over the rate window, or over its last fifth when that is higher and
        holds at least `burst_min_arrivals` of them. A burst shows in the short window at
        once; over the long one alone the first second of a 4x burst looked like 1.6x and was
        served at a slow rung (benchmarks/results/burst.json); a lull has to last the whole
        window."""
        window = self.slo.rate_window_s
        short = self._count(window / 5)
        rate = self._count(window) / window
        if short >= self.slo.burst_min_arrivals:
            rate = max(rate, short / (window / 5))
        return rate * self.ingress_replicas

    def _rate(self, window: float) -> float:
        """Requests/s admitted over the last `window` seconds (<= rate_window_s), cluster-wide."""
        return self._count(window) / window * self.ingress_replicas

    def _count(self, window: float) -> int:
        """Requests this ingress admitted over the last `window` seconds (<= rate_window_s)."""
        now = self.clock()
        while self._admits and self._admits[0] <= now - self.slo.rate_window_s:
            self._admits.popleft()
        n = 0
        for t in reversed(self._admits):
            if t <= now - window:
                break
            n += 1
        return n

    def closed_loop_population(self, min_arrivals: int = 10) -> float | None:
        """Cluster-wide rows of closed-loop clients, when the arrivals of the rate window are
        theirs: the share of arrivals that followed an answer within `closed_loop_gap_s`,
        over what chance gives at the answers' rate (1 - exp(-rate x gap)), at least
        `closed_loop_share`. Their population is then rate x mean latency (Little's law;
        they wait for nothing else). None: an open-loop load (or too few arrivals).
        Computed at most every 50 ms: every request's choice asks for it once per rung."""
        now, window = self.clock(), self.slo.rate_window_s
        if self._population_at is not None and now - self._population_at[0] < 0.05:
            return self._population_at[1]
        pop = self._closed_loop_population(now, window, min_arrivals)
        self._population_at = (now, pop)
        return pop

    def _closed_loop_population(self, now: float, window: float, min_arrivals: int
                                ) -> float | None:
        while self._answers and self._answers[0] <= now - window:
            self._answers.popleft()
        while self._follows and self._follows[0][0] <= now - window:
            self._follows.popleft()
        n = len(self._follows)
        if n < min_arrivals:
            return None
        followed = sum(1 for _, f in self._follows if f) / n
        chance = 1.0 - math.exp(-len(self._answers) / window * self.slo.closed_loop_gap_s)
        if chance >= 1.0 or (followed - chance) / (1.0 - chance) < self.slo.closed_loop_share:
            return None
        wall = self.wall()
        lat = [done - at for done, at, _ in self._finished if done > wall - window]
        if not lat:
            return None
        return n / window * (sum(lat) / len(lat)) * self.ingress_replicas

    def ledger_rows(self) -> int:
        """Rows this ingress admitted within the ledger horizon and not finished: the
        requests the snapshot does not count yet."""
        self.ledger_token_steps()  # trims the ledger to the horizon
        return sum(self._admitted_rows.get(k, 1) for k in self._ledger)

    def rows_ahead(self, load: ClusterLoad) -> float:
        """Rows in the cluster now: the snapshot's, plus the rows this ingress admitted after
        it was taken, minus those it saw that have finished since (the snapshot is up to
        `report_lag_s` older than its time stamp). Counting a request both in the snapshot and
        in the ledger, and a finished one in a stale snapshot, made two closed-loop clients
        look like four rows and degraded them (benchmarks/results/burst.json, 2 clients)."""
        self.ledger_token_steps()
        if not load.at:
            return load.running + load.queued + self.ledger_rows()
        seen = load.at - self.report_lag_s
        new = sum(self._admitted_rows.get(k, 1) for k in self._ledger
                  if self._admitted_at.get(k, seen + 1) > seen)
        gone = sum(r for t_done, t_adm, r in self._finished if t_adm <= seen < t_done)
        return max(0.0, load.running + load.queued - gone) + new

    def finished(self, choice: StepChoice, scheduled_passes: int, used_passes: int,
                 latency_s: float | None = None, a: float = 0.1) -> None:
        """A request at `choice` ended: learn its rung's passes and the latency calibration."""
        if choice.rung is None or scheduled_passes <= 0:
            return
        ratio = min(1.0, max(0.02, used_passes / scheduled_passes))
        r = choice.rung
        self.pass_ratio[r] = (1 - a) * self.pass_ratio[r] + a * ratio
        self._pass_samples[r].append(ratio)
        raw = choice.model_latency_s
        if raw and choice.predicted_passes:
            # compare like with like: the model at the passes the request really took (an
            # answer that stopped early is not the model being wrong about the step time)
            raw *= used_passes / choice.predicted_passes
        if latency_s is not None and raw and math.isfinite(raw) and raw > 0:
            self.calibration.add(raw, latency_s)

    # --- predictions ---------------------------------------------------------------------
    def _passes(self, shape: RequestShape, rung: int, tail: bool = False
                ) -> tuple[float, float]:
        """(passes, first-block passes) at `rung`: the measured mean share of the scheduled
        passes, or with `tail` its 95th percentile (the mean until 10 are measured)."""
        steps = self.ladder.steps[rung]
        ratio = self.pass_ratio[rung]
        samples = self._pass_samples[rung]
        if tail and len(samples) >= 10:
            xs = sorted(samples)
            ratio = xs[min(len(xs) - 1, math.ceil(0.95 * len(xs)) - 1)]
        return max(1.0, shape.passes(steps) * ratio), \
            max(1.0, shape.first_block_passes(steps) * (ratio if self.thresholds[rung] else 1.0))

    def predict_rung(self, shape: RequestShape, rung: int, cluster_rung: int | None = None,
                     load: ClusterLoad | None = None, priority: bool = False) -> Prediction:
        """Latency (p95-scaled, calibrated) of a request of `shape` at `rung` while the other
        requests run at `cluster_rung` (default: the same rung); priority: a budgeted request,
        admitted ahead of the queue (predict's `priority`)."""
        load = load or self.load
        model = StepModel.from_load(load)
        replicas = max(1, load.replicas)
        others = self.mean_shape or shape
        c = rung if cluster_rung is None else cluster_rung
        rows_now = self.rows_ahead(load) / replicas
        p, p1 = self._passes(shape, rung, tail=True)
        po, _ = self._passes(others, c)
        m = load.max_num_seqs or 16
        pop = self.closed_loop_population()
        pr = predict(model, shape, p, p1, rows_now + shape.n - 1, self.arrival_rps() / replicas,
                     others, po, m, priority,
                     population=None if pop is None else max(1.0, pop / replicas))
        cal = self.calibration
        k = cal.p95_factor(self.slo.p95_over_mean)
        return Prediction(k * cal(pr.latency_s), k * cal(pr.ttft_s), pr.rows, pr.wait_s,
                          pr.latency_s, p)

    def quiet(self, service_s: float, load: ClusterLoad | None = None) -> bool:
        """Lone users, no burst: nothing queued, at most two rows per replica now, and at most
        three in the steady state of the sustained arrival rate (the whole rate window's, x
        `service_s`, the step model's time of a request on an idle replica: a lull in a burst's
        snapshot is not quiet; two closed-loop clients, at most 2 x their model time over
        their real latency, always are)."""
        load = load or self.load
        per = max(1, load.replicas)
        return load.queued == 0 and self.rows_ahead(load) <= 2 * per \
            and self._rate(self.slo.rate_window_s) * service_s <= 3 * per

    def lone_users(self, shape: RequestShape) -> bool:
        """At most two users per replica and the default target: the best rung, whatever the
        predictions say. Two rows take less than twice one row's time, so the default target
        (2x one row) always allows them; but the predictions carry today's spread of latency
        over the mean and the target that of the last confirmed quiet moment (one client's:
        tight), which put two clients at 8 steps. Users: the closed-loop population when the
        arrivals follow answers, else the arrival rate (with the short window's bursts) x
        an idle answer's time; nothing queued and at most two rows per replica running."""
        if self.slo.latency_p95_s is not None or self.slo.ttft_p95_s is not None:
            return False
        load = self.load
        per = max(1, load.replicas)
        if load.queued > 0 or self.rows_ahead(load) > 2 * per:
            return False
        pop = self.closed_loop_population()
        if pop is not None:  # rate x mean latency: within half a user of the count
            return pop <= 2 * per + 0.5
        p, p1 = self._passes(shape, 0)
        m = load.max_num_seqs or 16
        service = predict(StepModel.from_load(load), shape, p, p1, 0, 0.0, shape, p, m).latency_s
        return self.arrival_rps() * service <= 2 * per

    def unloaded_s(self, shape: RequestShape) -> float:
        """The latency of `shape` at the best rung on an idle replica (calibrated, p95), under
        the step model and calibration of the last quiet moment that `quiet_confirm_s` more
        of quiet followed. While quiet that is (a few seconds late) the calibration the
        predictions use: one or two requests per replica then meet 2x (S(2) < 2 S(1) whatever
        the fit), which two calibrations (one of requests that ran alone) did not guarantee;
        under load it stays what an idle replica took before the load came."""
        p, p1 = self._passes(shape, 0, tail=True)
        m = self.load.max_num_seqs or 16

        def idle(model: StepModel) -> float:
            return predict(model, shape, p, p1, shape.n - 1, 0.0, shape, p, m).latency_s

        def latency(ref: tuple[StepModel, float, float, float]) -> float:
            model, overhead, ratio, k = ref
            s = idle(model)
            return k * (overhead + ratio * s) if math.isfinite(s) else s

        model = StepModel.from_load(self.load)
        cal = self.calibration
        now_ref = (model, cal.overhead_s, cal.ratio, cal.p95_factor(self.slo.p95_over_mean))
        now = self.clock()
        if self.quiet(idle(model)):
            if not self._quiet_candidates or self._quiet_candidates[-1][0] <= now - 0.25:
                self._quiet_candidates.append((now, now_ref))  # at most 4 a second
            while self._quiet_candidates and \
                    self._quiet_candidates[0][0] <= now - self.slo.quiet_confirm_s:
                self._quiet_confirmed.append(self._quiet_candidates.popleft()[1])
        else:
            self._quiet_candidates.clear()
        # nothing confirmed yet (the first seconds): the quiet moments so far, else now
        pool = list(self._quiet_confirmed) or [c for _, c in self._quiet_candidates] or \
            [self._quiet_reference or now_ref]
        values = sorted((latency(ref), i) for i, ref in enumerate(pool))
        value, i = values[(len(values) - 1) // 2]
        self._quiet_reference = pool[i]
        return value

    def target_s(self, shape: RequestShape) -> float:
        if self.slo.latency_p95_s is not None:
            return self.slo.latency_p95_s
        return self.slo.default_slowdown * self.unloaded_s(shape)

    def meets(self, pred: Prediction, target_s: float, margin: float = 0.0) -> bool:
        ok = pred.latency_s <= (1 - margin) * target_s
        if self.slo.ttft_p95_s is not None:
            ok = ok and pred.ttft_s <= (1 - margin) * self.slo.ttft_p95_s
        return ok

    def best_rung(self, preds: list[Prediction], target_s: float, margin: float = 0.0,
                  lo: int = 0, hi: int | None = None) -> int:
        """The best-quality rung in [lo, hi] whose prediction meets the target (ties: the
        earlier rung); none does: the fastest predicted one (every one past capacity: the
        last, the fewest passes)."""
        hi = self.ladder.last if hi is None else hi
        ok = [r for r in range(lo, hi + 1) if self.meets(preds[r], target_s, margin)]
        if ok:
            return max(ok, key=lambda r: (self.qualities[r], -r))
        return min(range(lo, hi + 1), key=lambda r: (
            preds[r].latency_s, -r if math.isinf(preds[r].latency_s) else -self.qualities[r]))

    # --- the cluster's setting -----------------------------------------------------------
    def _update(self, shape: RequestShape | None) -> None:
        """Move the cluster's rung: down at once, up after the hold (the module docstring)."""
        shape = shape or self.mean_shape
        if shape is None:  # nothing admitted yet: nothing to predict for
            return
        now = self.clock()
        target = self.target_s(shape)
        preds = [self.predict_rung(shape, r) for r in range(len(self.ladder.steps))]
        self.last_prediction = [p.latency_s for p in preds]
        if self.lone_users(shape):
            if self.rung != 0:
                log.info("slo: %s -> %s (lone users)", self._label(self.rung), self._label(0))
                self.rung = 0
            self._better_since = None
            return
        want = self.best_rung(preds, target)
        if self.qualities[want] < self.qualities[self.rung] or \
                not self.meets(preds[self.rung], target):
            if want != self.rung:
                log.info("slo: %s -> %s (predicted %.2fs > target %.2fs)",
                         self._label(self.rung), self._label(want), preds[self.rung].latency_s,
                         target)
                self.rung = want
            self._better_since = None
            return
        up = self.best_rung(preds, target, self.slo.hysteresis, 0, self.rung)
        # Better: higher quality, or as high with more passes (an earlier rung). A table that
        # values several rungs alike (tiny-coder's parse rate is 0 at 2, 4 and 8 steps) cannot
        # tell them apart; the steps the latency target allows are not given away on a tie.
        if (self.qualities[up], -up) > (self.qualities[self.rung], -self.rung):
            if self._better_since is None:
                self._better_since = now
            elif now - self._better_since >= self.slo.up_hold_s:
                log.info("slo: back up %s -> %s (predicted %.2fs, target %.2fs)",
                         self._label(self.rung), self._label(up), preds[up].latency_s, target)
                self.rung = up
                self._better_since = None
        else:
            self._better_since = None

    def _label(self, rung: int) -> str:
        t = self.thresholds[rung]
        return str(self.ladder.steps[rung]) + ("" if t is None else f"@{t:g}")

    def observe(self, load: ClusterLoad) -> int:
        self.load = load
        self._update(None)
        if self.metrics is not None:
            self.metrics.observe_load(load, self.rung)
        return self.rung

    def choose(self, pinned: int | None = None, quality: str = "auto", record: bool = True,
               shape: RequestShape | None = None, budget_s: float | None = None) -> StepChoice:
        if pinned is not None:
            choice = StepChoice(steps=pinned, rung=None, reason="pinned")
        else:
            shape = shape or self.mean_shape or RequestShape()
            self._update(shape)  # a burst through this ingress is seen before the snapshot
            lo, hi = self.ladder.window(quality)
            if budget_s is not None:
                preds = [self.predict_rung(shape, r, self.rung, priority=True)
                         for r in range(len(self.qualities))]
                target = budget_s
                rung = self.best_rung(preds, target, 0.0, lo, hi)
                reason = "budget"
            else:
                target = self.target_s(shape)
                rung = min(max(self.rung, lo), hi)
                preds = {rung: self.predict_rung(shape, rung, self.rung)}
                reason = "load" if rung == self.rung else "bounded"
            pred = preds[rung]
            choice = StepChoice(steps=self.ladder.steps[rung], rung=rung, reason=reason,
                                confidence_threshold=self.thresholds[rung],
                                predicted_latency_s=pred.latency_s,
                                predicted_ttft_s=pred.ttft_s, target_s=target,
                                quality=self.qualities[rung], model_latency_s=pred.model_s,
                                predicted_rows=pred.rows, predicted_passes=pred.passes)
        if record:
            self.record_choice(choice, quality)
        return choice

    def describe(self) -> dict:
        """For /health: the setting, the target, the predictions per rung."""
        shape = self.mean_shape
        return {"control": "slo", "setting": self._label(self.rung),
                "quality": self.qualities[self.rung],
                "target_s": round(self.target_s(shape), 3) if shape else None,
                "predicted_s": [round(x, 3) if math.isfinite(x) else None
                                for x in self.last_prediction],
                "arrival_rps": round(self.arrival_rps(), 3),
                "calibration": {"overhead_s": round(self.calibration.overhead_s, 4),
                                "ratio": round(self.calibration.ratio, 3),
                                "p95_factor": round(self.calibration.p95_factor(
                                    self.slo.p95_over_mean), 3)},
                "pass_ratio": [round(x, 3) for x in self.pass_ratio]}


# --- building it --------------------------------------------------------------------------------
@dataclass
class RouterSpec:
    """What make_router resolved (logged at start-up)."""

    control: str
    qualities: list[float] = field(default_factory=list)
    quality_table: str | None = None


def make_router(args: AppArgs, info: ModelInfo | None = None, metrics=None,
                clock: Callable[[], float] = time.monotonic) -> StepRouter:
    """The step router the ingress runs: the SLO controller (ladder.control "slo") with the
    model's quality table, or the drain-time threshold ladder ("thresholds")."""
    ladder = args.ladder
    if ladder.control == "thresholds":
        return StepRouter(ladder, clock=clock, metrics=metrics)
    slo = args.slo
    path = quality_table_path(args.model.source, slo.quality_table)
    rows = load_quality_table(path)
    qualities = rung_qualities(ladder, rows, slo.quality_metric,
                               info.block_length if info is not None else None)
    log.info("slo controller: ladder %s, quality %s (%s)", ladder.steps,
             [round(q, 3) for q in qualities],
             path if rows else "no quality table: monotone default")
    return SloRouter(ladder, slo, qualities, clock=clock, metrics=metrics,
                     ingress_replicas=args.ingress.num_replicas)


__all__ = ["LatencyCalibration", "Prediction", "RequestShape", "SloConfig", "SloRouter", "StepModel",
           "make_router", "predict"]
