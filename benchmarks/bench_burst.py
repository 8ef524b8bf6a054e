"""`dllm bench burst`: quiet / 4x overload / quiet against the app, serving set-ups side by side.

    dllm bench burst                                   # real tiny-coder, every variant
    dllm bench burst --quiet-s 10 --burst-s 20 --after-s 30 --variants adaptive fixed
    dllm bench burst --engine mock --burst-s 120       # long simulated schedules
    dllm bench burst --url http://127.0.0.1:8000 --variants adaptive   # an app already running

Variants (each deployed in turn on one local Ray instance, HTTP on 127.0.0.1; the same replica
bounds, delays and metric intervals, the same open-loop arrival schedule):
- adaptive: the latency-target controller (deployments/slo.py; ladder [16, 8, 4, 2] or
  `--ladder`, the default target: 2x the unloaded best-quality latency) +
  autoscaling/policy.py (token backlog against capacity, plus quality debt);
- ladder: today's drain-time threshold ladder (ladder.control "thresholds", serve_config's
  [2, 3, 4] s) + the same token-backlog autoscaler;
- fixed: best-quality steps only (ladder [16]) + Serve's default request-count policy;
- fixed-<steps> (e.g. fixed-4, fixed-2): one fixed setting + the token-backlog autoscaler: the
  fixed settings the adaptive one must beat on delivered quality at the same p95.

The load: first a probe on the first variant measures the unloaded p95 at best quality (one
request at a time, `quality: max`) and the rate best quality sustains (16 closed-loop clients
pinned to the best steps for `--probe-s`); then the quiet rate is `--quiet-load` (0.25) and the
burst `--overload` (4) times that sustainable rate, Poisson (offered load does not slow down when the
server does). Before its schedule the adaptive variant also serves 1, then 2 closed-loop
clients for `--lone-s` each (the share of their answers at best quality). `--budget-share` of
the requests (0.25) carry `latency_budget_ms` of
`--budget-over-unloaded` (0.5) x the unloaded p95: on an H100 an IDE's 300 ms inline completion
is about half a best-quality answer; on this CPU the same ratio.

Every second it records the offered load, completions, refusals, running and starting
model-server replicas, the router's setting, p95 latency of the requests finished in the last
5 s, and the delivered quality (the model's quality table at each answer's setting); then
writes benchmarks/results/burst.json (or burst_mock.json) and the PNG: one column per variant.
`summary.goals` holds the issue's ratios, each measured in this one run.

`--engine real` (default) serves tiny-coder from every replica: on this 2-core CPU added
replicas add little real capacity, which the result records rather than hides. `--engine mock`
serves benchmarks/mock_engine.py (a step sleeps `step_delay_s + token_cost_s * tokens`, so each
replica behaves like a compute-bound accelerator with its own capacity). The run is bounded:
each variant stops `--grace-s` after its schedule ends, unfinished requests counted as such.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from benchmarks import harness

log = logging.getLogger(__name__)

SERVER = "ModelServer"
LATENCY_WINDOW_S = 5.0
BEST_STEPS = 16
LADDER_STEPS = [16, 8, 4, 2]


@dataclass
class Schedule:
    base_rps: float = 1.0  # quiet load (set from the probe unless --base-rps is given)
    burst_factor: float = 16.0  # the burst's rate over the quiet one (4x / 0.25 by default)
    quiet_s: float = 15.0
    burst_s: float = 30.0
    after_s: float = 40.0  # long enough to see quality restored and replicas come down
    seed: int = 0
    budget_share: float = 0.25  # requests carrying latency_budget_ms
    budget_ms: float | None = None

    @property
    def total_s(self) -> float:
        return self.quiet_s + self.burst_s + self.after_s

    def rate(self, t: float) -> float:
        in_burst = self.quiet_s <= t < self.quiet_s + self.burst_s
        return self.base_rps * (self.burst_factor if in_burst else 1.0)

    def arrivals(self) -> list[float]:
        """Send times (s from start) of a Poisson process with the piecewise rate."""
        rng, t, out = random.Random(self.seed), 0.0, []
        while True:
            t += rng.expovariate(self.rate(t))
            if t >= self.total_s:
                return out
            out.append(t)

    def budgeted(self) -> list[bool]:
        """Which arrivals carry the budget (seeded, the same for every variant)."""
        rng = random.Random(self.seed + 1)
        return [self.budget_ms is not None and rng.random() < self.budget_share
                for _ in self.arrivals()]


@dataclass
class Second:
    t: int
    offered: int = 0  # requests sent in this second
    completed: int = 0
    rejected: int = 0  # 429/503
    failed: int = 0  # other errors, timeouts
    p95_latency_s: float | None = None  # unbudgeted requests finished in the last 5 s
    budget_p95_latency_s: float | None = None  # budgeted ones, same window
    steps_chosen: float | None = None  # mean steps per block of answers finished this second
    quality: float | None = None  # mean quality (table) of unbudgeted answers finished now
    rung: int | None = None  # the router's rung (0 = best quality) from /health
    router_steps: int | None = None  # steps per block the router would choose now
    drain_s: float | None = None
    replicas: int | None = None  # running model-server replicas
    starting: int | None = None  # model-server replicas starting
    slo: dict | None = None  # the step controller's state from /health (adaptive only)


@dataclass
class Outcome:
    sent_at: float
    budgeted: bool = False
    done_at: float = 0.0
    status: int = 0  # HTTP status, 0 for a transport error / timeout
    steps: int | None = None
    setting: str | None = None
    predicted_ms: float | None = None  # the router's prediction for it (usage)
    target_ms: float | None = None  # ... and the target it was held to


@dataclass
class VariantResult:
    name: str
    description: str
    seconds: list[Second] = field(default_factory=list)
    app_args: dict | None = None
    summary: dict = field(default_factory=dict)
    outcomes: list[dict] = field(default_factory=list)


# --- quality of a setting ------------------------------------------------------------------------
def quality_of(setting: str | None, rows: list[dict]) -> float | None:
    """The quality table's value at an answer's setting ("16" or "16@0.9"), as the step
    controller values rungs (deployments/slo.rung_qualities)."""
    if not setting:
        return None
    from deployments.quality_table import rung_qualities
    from deployments.step_router import Ladder

    steps, _, thr = setting.partition("@")
    lad = Ladder(steps=[int(steps)], confidence_thresholds=[float(thr)] if thr else None)
    return rung_qualities(lad, rows, "parse_rate", 32)[0]


def quality_rows() -> list[dict]:
    from deployments.quality_table import load_quality_table, quality_table_path

    return load_quality_table(quality_table_path("tiny-coder"))


# --- variants ----------------------------------------------------------------------------------
# ~2000 token-steps/s per mock replica; a 64-token answer at 16 steps/block = 1024 of them.
MOCK_OPTIONS = {"step_delay_s": 0.005, "token_cost_s": 0.0005, "max_num_seqs": 32}
VARIANTS = ["adaptive", "ladder", "fixed", "fixed-4", "fixed-2"]


def engine_factory(engine: str):
    """The replicas' engine: the mock (MOCK_OPTIONS) or None for tiny-coder's real engine."""
    if engine != "mock":
        return None
    from benchmarks.mock_engine import MockEngineFactory

    return MockEngineFactory("tiny-coder", **MOCK_OPTIONS)


def variant_args(
    name: str, engine: str, max_replicas: int, upscale_delay_s: float, downscale_delay_s: float,
    ladder_steps: list[int] | None = None,
) -> dict:
    """deployments.app args for a variant (the same engine, bounds and delays for all);
    ladder_steps: the adaptive variant's rungs (default serve_config.yaml's)."""
    model = {"source": "tiny-coder"}
    if engine != "mock":
        model.update(device="cpu", torch_threads=1)
    autoscaling = {
        "min_replicas": 1,
        "initial_replicas": 1,
        "max_replicas": max_replicas,
        "upscale_delay_s": upscale_delay_s,
        "downscale_delay_s": downscale_delay_s,
        "metrics_interval_s": 0.5,
        "look_back_period_s": 3.0,
    }
    backlog_policy = {
        "policy_function": "autoscaling.policy:TokenBacklogPolicy",
        "policy_kwargs": {"target_backlog_s": 1.0, "quality_debt_s": 5.0},
    }
    if name == "adaptive":
        ladder = {"steps": list(ladder_steps or LADDER_STEPS), "control": "slo"}
        autoscaling["policy"] = backlog_policy
    elif name == "ladder":
        # serve_config.yaml's threshold ladder as it was before the SLO controller
        ladder = {"steps": LADDER_STEPS, "thresholds_s": [2.0, 3.0, 4.0], "up_hold_s": 2.0,
                  "control": "thresholds"}
        autoscaling["policy"] = backlog_policy
    elif name == "fixed":
        ladder = {"steps": [BEST_STEPS], "thresholds_s": []}
        autoscaling["target_ongoing_requests"] = 2  # Serve's default policy and default target
    elif name.startswith("fixed-"):
        ladder = {"steps": [int(name.removeprefix("fixed-"))], "thresholds_s": []}
        autoscaling["policy"] = backlog_policy
    else:
        raise ValueError(f"unknown variant {name!r}")
    return {
        "model": model,
        "ladder": ladder,
        "auth": {"api_keys_env": None},
        "engine": {"max_num_seqs": 16 if engine != "mock" else 32, "max_queued": 1024},
        "limits": {"max_inflight": 4096, "default_max_tokens": 64},
        "server": {"num_cpus": 1, "max_ongoing_requests": 1100, "autoscaling_config": autoscaling},
    }


def describe(name: str, ladder_steps: list[int] | None = None) -> str:
    if name == "adaptive":
        steps = ",".join(str(x) for x in (ladder_steps or LADDER_STEPS))
        return f"SLO controller [{steps}] + token-backlog autoscaling"
    if name == "ladder":
        return "threshold ladder [16,8,4,2] @ [2,3,4] s + token-backlog autoscaling"
    if name == "fixed":
        return "fixed best (16 steps) + Serve's default autoscaling"
    return f"fixed {name.removeprefix('fixed-')} steps + token-backlog autoscaling"


# --- the load ----------------------------------------------------------------------------------
def request_body(model: str, i: int, max_tokens: int, budget_ms: float | None = None,
                 **extra) -> dict:
    body = {"model": model, "prompt": f"# task {i}\ndef f{i}(x):\n", "max_tokens": max_tokens,
            "temperature": 0, **extra}
    if budget_ms is not None:
        body["latency_budget_ms"] = budget_ms
    return body


async def send(client: httpx.AsyncClient, url: str, body: dict, out: Outcome,
               timeout_s: float) -> Outcome:
    try:
        r = await client.post(f"{url}/v1/completions", json=body, timeout=timeout_s)
        out.status = r.status_code
        if r.status_code == 200:
            usage = r.json().get("usage", {})
            out.steps = usage.get("denoising_steps_per_block")
            out.setting = usage.get("denoising_setting") or (
                str(out.steps) if out.steps is not None else None)
            out.predicted_ms = usage.get("predicted_latency_ms")
            out.target_ms = usage.get("latency_target_ms")
    except (httpx.HTTPError, asyncio.CancelledError):
        out.status = 0
    finally:
        out.done_at = time.monotonic()
    return out


async def sample_health(client: httpx.AsyncClient, url: str) -> dict:
    try:
        r = await client.get(f"{url}/health", timeout=2.0)
        return r.json()
    except (httpx.HTTPError, ValueError):
        return {}


def replica_counts(app_name: str | None) -> tuple[int | None, int | None]:
    """(running, starting) model-server replicas of the app."""
    if app_name is None:
        return None, None
    from ray import serve

    try:
        states = serve.status().applications[app_name].deployments[SERVER].replica_states
        return int(states.get("RUNNING", 0)), int(states.get("STARTING", 0))
    except Exception:  # noqa: BLE001 - a missed sample is a gap in the plot, not a failure
        return None, None


async def sample_seconds(
    client: httpx.AsyncClient, url: str, seconds: list[Second], start: float, app_name: str | None,
    load: asyncio.Task, schedule: Schedule, desc: str
) -> int:
    """At the end of each second: the router's rung and steps, the drain time and the
    replicas; stops once the load is done and the schedule is over -> seconds sampled."""
    bar = harness.progress(total=len(seconds), desc=desc, unit="s")
    sampled = 0
    for sec in seconds:
        await asyncio.sleep(max(0.0, start + sec.t + 1 - time.monotonic()))
        health = await sample_health(client, url)
        sec.rung = health.get("rung")
        sec.router_steps = health.get("steps")
        sec.drain_s = (health.get("load") or {}).get("drain_s")
        sec.slo = health.get("slo")
        sec.replicas, sec.starting = await asyncio.to_thread(replica_counts, app_name)
        if sec.replicas is None:
            sec.replicas = (health.get("load") or {}).get("replicas")
        bar.update(1)
        sampled = sec.t + 1
        if load.done() and sec.t >= schedule.total_s:
            break
    bar.close()
    return sampled


async def run_load(url: str, schedule: Schedule, app_name: str | None, max_tokens: int,
                   grace_s: float, desc: str) -> tuple[list[Second], list[Outcome]]:
    """The open-loop schedule against `url`, bounded at its end + grace_s, sampled per second."""
    outcomes: list[Outcome] = []
    max_s = schedule.total_s + grace_s
    seconds = [Second(t=i) for i in range(int(math.ceil(max_s)))]
    budgeted = schedule.budgeted()
    async with harness.loopback_client(url, 2048, timeout_s=max_s) as client:
        model = (await client.get("/v1/models", timeout=30)).json()["data"][0]["id"]
        start = time.monotonic()

        def call(i: int):
            out = Outcome(sent_at=time.monotonic(), budgeted=budgeted[i])
            outcomes.append(out)
            body = request_body(model, i, max_tokens, schedule.budget_ms if budgeted[i] else None)
            return send(client, url, body, out, max_s)

        load = asyncio.create_task(harness.open_loop(call, schedule.arrivals(), max_s=max_s))
        sampled = await sample_seconds(client, url, seconds, start, app_name, load, schedule,
                                       desc)
        load.cancel()
        await asyncio.gather(load, return_exceptions=True)
    bucket(outcomes, seconds, start, quality_rows())
    unfinished = sum(1 for o in outcomes if not o.done_at or o.status == 0)
    if unfinished:
        log.warning("%s: %d requests unfinished or failed at the end of the run", desc, unfinished)
    for o in outcomes:  # times from the schedule's start, for the JSON
        o.sent_at -= start
        o.done_at = o.done_at - start if o.done_at else 0.0
    return seconds[:sampled], outcomes


def _p95(xs: list[float]) -> float | None:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, math.ceil(0.95 * len(xs)) - 1)] if xs else None


def bucket(outcomes: list[Outcome], seconds: list[Second], start: float,
           rows: list[dict]) -> None:
    """Outcomes into the seconds they were sent / finished in; p95 over the latency window."""
    for out in outcomes:
        sent = int(out.sent_at - start)
        if 0 <= sent < len(seconds):
            seconds[sent].offered += 1
        done = int(out.done_at - start) if out.done_at else None
        if done is None or not 0 <= done < len(seconds):
            continue
        if out.status == 200:
            seconds[done].completed += 1
        elif out.status in (429, 503):
            seconds[done].rejected += 1
        else:
            seconds[done].failed += 1
    ok = [o for o in outcomes if o.status == 200]
    for sec in seconds:
        lo, hi = start + sec.t + 1 - LATENCY_WINDOW_S, start + sec.t + 1
        window = [o for o in ok if lo <= o.done_at < hi]
        sec.p95_latency_s = _p95([o.done_at - o.sent_at for o in window if not o.budgeted])
        sec.budget_p95_latency_s = _p95([o.done_at - o.sent_at for o in window if o.budgeted])
        now = [o for o in ok if sec.t <= o.done_at - start < sec.t + 1]
        steps = [o.steps for o in now if o.steps is not None]
        if steps:
            sec.steps_chosen = sum(steps) / len(steps)
        qs = [quality_of(o.setting, rows) for o in now if not o.budgeted]
        qs = [q for q in qs if q is not None]
        if qs:
            sec.quality = sum(qs) / len(qs)


def summarize(seconds: list[Second], outcomes: list[Outcome], schedule: Schedule,
              rows: list[dict], unloaded_p95_s: float | None) -> dict:
    """Per phase (by send time): p95 of unbudgeted and budgeted answers, delivered quality,
    refusals; and when best quality came back after the burst."""
    b0, b1 = schedule.quiet_s, schedule.quiet_s + schedule.burst_s
    best_q = quality_of(str(BEST_STEPS), rows)
    out: dict = {}
    for name, (lo, hi) in {"quiet": (0, b0), "burst": (b0, b1),
                           "after": (b1, math.inf)}.items():
        sent = [o for o in outcomes if lo <= o.sent_at < hi]
        ok = [o for o in sent if o.status == 200]
        plain = [o for o in ok if not o.budgeted]
        budg = [o for o in ok if o.budgeted]
        q = [quality_of(o.setting, rows) for o in plain]
        q = [x for x in q if x is not None]
        secs = [s for s in seconds if lo <= s.t < hi]
        p95 = harness.percentile([o.done_at - o.sent_at for o in plain], 0.95)
        out[name] = {
            "offered": len(sent),
            "completed": len(ok),
            "rejected": sum(1 for o in sent if o.status in (429, 503)),
            "unfinished_or_failed": sum(1 for o in sent if o.status not in (200, 429, 503)),
            "p95_latency_s": p95,
            "p95_over_unloaded": p95 / unloaded_p95_s if p95 and unloaded_p95_s else None,
            "budgeted": len(budg),
            "budgeted_p95_latency_s": harness.percentile([o.done_at - o.sent_at for o in budg],
                                                         0.95),
            "budgeted_met_share": (sum(1 for o in budg if schedule.budget_ms and
                                       (o.done_at - o.sent_at) * 1000 <= schedule.budget_ms)
                                   / len(budg)) if budg else None,
            "mean_quality": sum(q) / len(q) if q else None,
            "best_quality_share": (sum(1 for x in q if best_q is not None and x >= best_q - 1e-9)
                                   / len(q)) if q else None,
            "mean_steps_chosen": (sum(o.steps for o in plain if o.steps) /
                                  max(1, sum(1 for o in plain if o.steps))) if plain else None,
            "max_replicas": max((s.replicas or 0 for s in secs), default=0),
        }
    up = next((s.t for s in seconds if s.t >= b0 and (s.replicas or 0) > 1), None)
    out["first_scale_up_s_after_burst_start"] = None if up is None else up - b0
    # best quality back: the router's rung 0 from some second after the burst on, to the end
    after = [s for s in seconds if s.t >= b1 and s.rung is not None]
    back = None
    for i, s in enumerate(after):
        if all(x.rung == 0 for x in after[i:]):
            back = s.t - b1
            break
    out["best_quality_back_s_after_burst"] = back
    # the longest stretch any replica spent STARTING (the autoscaler's replica start time)
    longest = run = 0
    for s in seconds:
        run = run + 1 if (s.starting or 0) > 0 else 0
        longest = max(longest, run)
    out["replica_start_s"] = longest or None
    last = seconds[-1] if seconds else None
    out["replicas_at_end"] = last.replicas if last else None
    out["rung_at_end"] = last.rung if last else None
    return out


# --- the probe ---------------------------------------------------------------------------------
async def probe(url: str, max_tokens: int, samples: int, sat_clients: int, sat_s: float) -> dict:
    """Unloaded p95 at best quality (one request at a time) and the rate best quality sustains
    (`sat_clients` closed-loop clients pinned to the best steps for ~sat_s)."""
    async with harness.loopback_client(url, sat_clients + 4, timeout_s=600) as client:
        model = (await client.get("/v1/models", timeout=30)).json()["data"][0]["id"]
        lat = []
        for i in range(samples):
            out = await send(client, url, request_body(model, 10_000 + i, max_tokens,
                                                       quality="max"),
                             Outcome(sent_at=time.monotonic()), 600)
            if out.status == 200:
                lat.append(out.done_at - out.sent_at)
        done: list[float] = []
        t0 = time.monotonic()

        async def one(i: int, _w: int):
            o = await send(client, url, request_body(model, 20_000 + i, max_tokens,
                                                     denoising_steps=BEST_STEPS),
                           Outcome(sent_at=time.monotonic()), 600)
            if o.status == 200 and o.done_at - t0 <= sat_s:
                done.append(o.done_at)

        seconds, _ = await harness.closed_loop(one, sat_clients, 10_000, max_s=sat_s)
    # clients start together, so answers come in waves: rate up to the last one counted
    span = max(done) - t0 if done else 0.0
    return {"unloaded_p95_s": harness.percentile(lat, 0.95), "unloaded_samples_s": lat,
            "best_saturated_rps": len(done) / span if span > 0 else None,
            "saturation_s": seconds, "saturation_completed": len(done),
            "saturation_clients": sat_clients}


async def lone_clients(url: str, max_tokens: int, seconds: float, rows: list[dict],
                       app_name: str | None = None) -> dict:
    """1, then 2 closed-loop clients for `seconds` each, quality auto and no budget: the share
    of their answers at the best quality (no lone user may degrade themselves)."""
    best = quality_of(str(BEST_STEPS), rows)
    out: dict = {}
    async with harness.loopback_client(url, 8, timeout_s=600) as client:
        model = (await client.get("/v1/models", timeout=30)).json()["data"][0]["id"]
        for clients in (1, 2):
            got: list[Outcome] = []

            async def one(i: int, _w: int, clients=clients, got=got):
                got.append(await send(client, url, request_body(model, 30_000 + 100 * clients + i,
                                                                max_tokens),
                                      Outcome(sent_at=time.monotonic()), 600))

            await harness.closed_loop(one, clients, 10_000, max_s=seconds)
            ok = [o for o in got if o.status == 200]
            q = [quality_of(o.setting, rows) for o in ok]
            out[f"{clients}_clients"] = {
                "answers": len(ok),
                "best_quality_share": (sum(1 for x in q if x is not None and best is not None
                                           and x >= best - 1e-9) / len(q)) if q else None,
                "settings": sorted({o.setting for o in ok if o.setting}),
                "p95_latency_s": harness.percentile([o.done_at - o.sent_at for o in ok], 0.95),
                "replicas_after": await asyncio.to_thread(replica_counts, app_name),
                # per answer: sent (s from the first), latency, setting, predicted, target
                "answers_log": [(round(o.sent_at - ok[0].sent_at, 2),
                                 round(o.done_at - o.sent_at, 3), o.setting, o.predicted_ms,
                                 o.target_ms) for o in ok]}
    return out


# --- deploy and run ----------------------------------------------------------------------------
def schedule_from(args, measured: dict | None) -> Schedule:
    base = args.base_rps
    if base is None:
        sat = (measured or {}).get("best_saturated_rps") or 1.0
        base = args.quiet_load * sat
    factor = args.overload / args.quiet_load
    unloaded = (measured or {}).get("unloaded_p95_s")
    budget = args.budget_over_unloaded * unloaded * 1000 if unloaded and args.budget_share else None
    return Schedule(base, factor, args.quiet_s, args.burst_s, args.after_s, args.seed,
                    args.budget_share, budget)


def deployed_variants(args) -> tuple[list[VariantResult], dict, Schedule]:
    """Each variant deployed in turn on one local Ray + Serve, loaded, then deleted."""
    from ray import serve

    from deployments.app import build_application

    results: list[VariantResult] = []
    rows = quality_rows()
    with harness.serve_cluster(args.max_replicas + 2, "dllm-bench-burst") as base:
        # the probe on its own app: one replica at the best setting, no autoscaling, so no
        # variant starts with the replicas or the rate window the probe's load left behind
        probe_args = variant_args("fixed", args.engine, 1, 1.0, 1.0)
        probe_args["server"] = {**probe_args["server"], "num_replicas": 1,
                                "autoscaling_config": None}
        url = harness.deploy_app(build_application(probe_args, engine_factory(args.engine)),
                                 base, "burst-probe", route_prefix="/burst-probe")
        measured = asyncio.run(probe(url, args.max_tokens, args.probe_samples,
                                     args.probe_clients, args.probe_s))
        serve.delete("burst-probe")
        schedule = schedule_from(args, measured)
        log.warning("probe: %s; schedule %s", measured, schedule)
        for name in args.variants:
            app_args = variant_args(
                name, args.engine, args.max_replicas, args.upscale_delay_s, args.downscale_delay_s,
                args.ladder,
            )
            app_name = f"burst-{name}"
            app = build_application(app_args, engine_factory=engine_factory(args.engine))
            url = harness.deploy_app(app, base, app_name, route_prefix=f"/{app_name}")
            time.sleep(args.settle_s)  # load stats and capacity measured before the load
            lone = asyncio.run(lone_clients(url, args.max_tokens, args.lone_s, rows, app_name)) \
                if name == "adaptive" and args.lone_s > 0 else None
            if lone:
                time.sleep(args.settle_s)
            secs, outs = asyncio.run(
                run_load(url, schedule, app_name, args.max_tokens, args.grace_s, name))
            summary = summarize(secs, outs, schedule, rows, measured.get("unloaded_p95_s"))
            if lone:
                summary["lone_clients"] = lone
            results.append(VariantResult(name, describe(name, args.ladder), secs, app_args, summary,
                                         [asdict(o) for o in outs]))
            serve.delete(app_name)
    return results, measured, schedule


def goals(variants: dict, unloaded_p95_s: float | None, schedule: Schedule) -> dict:
    """The issue's "done when" figures from this one run (met or not, as measured)."""
    s = {name: v["summary"] for name, v in variants.items()}
    g: dict = {"unloaded_p95_s": unloaded_p95_s}
    for name, v in s.items():
        g[f"{name}_burst_p95_over_unloaded"] = v["burst"]["p95_over_unloaded"]
        g[f"{name}_burst_mean_quality"] = v["burst"]["mean_quality"]
    a = s.get("adaptive")
    if a:
        r = a["burst"]["p95_over_unloaded"]
        g["adaptive_burst_p95_within_2x"] = r is not None and r <= 2.0
        fixed_ok = [(v["burst"]["mean_quality"], n) for n, v in s.items()
                    if n.startswith("fixed") and v["burst"]["p95_over_unloaded"] is not None
                    and v["burst"]["p95_over_unloaded"] <= 2.0
                    and v["burst"]["mean_quality"] is not None]
        best_fixed = max(fixed_ok) if fixed_ok else None
        g["best_fixed_within_2x"] = best_fixed[1] if best_fixed else None
        g["adaptive_quality_over_best_fixed_within_2x"] = (
            a["burst"]["mean_quality"] / best_fixed[0]
            if best_fixed and a["burst"]["mean_quality"] and best_fixed[0] else None)
        g["adaptive_quiet_best_quality_share"] = a["quiet"]["best_quality_share"]
        for k, v in (a.get("lone_clients") or {}).items():
            g[f"adaptive_{k}_best_quality_share"] = v["best_quality_share"]
        g["adaptive_best_quality_back_s_after_burst"] = a["best_quality_back_s_after_burst"]
        g["adaptive_replica_start_s"] = a["replica_start_s"]
        back, start = a["best_quality_back_s_after_burst"], a["replica_start_s"] or 0
        g["adaptive_restored_within_start_plus_30s"] = back is not None and back <= start + 30
        g["budget_ms"] = schedule.budget_ms
        for phase in ("quiet", "burst", "after"):
            g[f"adaptive_{phase}_budgeted_p95_ms"] = (
                1000 * a[phase]["budgeted_p95_latency_s"]
                if a[phase]["budgeted_p95_latency_s"] is not None else None)
        bp = [a[p]["budgeted_p95_latency_s"] for p in ("quiet", "burst", "after")
              if a[p]["budgeted_p95_latency_s"] is not None]
        g["adaptive_budget_met_at_p95"] = bool(bp) and schedule.budget_ms is not None and \
            max(bp) * 1000 <= schedule.budget_ms
        # the case: a mixed load under which the unbudgeted answers keep best quality
        # (the phases where at least 95% of them did: not a 4x overload, but a moderate
        # --overload, e.g. 0.5, makes the "burst" phase one)
        mixed = [a[p]["budgeted_p95_latency_s"] for p in ("quiet", "burst", "after")
                 if a[p]["budgeted_p95_latency_s"] is not None
                 and (a[p]["best_quality_share"] or 0) >= 0.95]
        g["adaptive_budget_met_at_p95_unbudgeted_at_best"] = \
            bool(mixed) and schedule.budget_ms is not None and max(mixed) * 1000 <= schedule.budget_ms
    return g


def run_variants(args) -> dict:
    measured: dict = {}
    if args.url:
        url = harness.require_loopback(args.url)
        measured = asyncio.run(probe(url, args.max_tokens, args.probe_samples,
                                     args.probe_clients, args.probe_s))
        schedule = schedule_from(args, measured)
        rows = quality_rows()
        results = []
        for name in args.variants:
            secs, outs = asyncio.run(run_load(url, schedule, None, args.max_tokens, args.grace_s,
                                              name))
            results.append(VariantResult(name, f"{name} (app at {url})", secs,
                                         summary=summarize(secs, outs, schedule, rows,
                                                           measured.get("unloaded_p95_s")),
                                         outcomes=[asdict(o) for o in outs]))
    else:
        results, measured, schedule = deployed_variants(args)
    variants = {
        r.name: {"description": r.description, "summary": r.summary, "app_args": r.app_args,
                 "seconds": [asdict(s) for s in r.seconds], "outcomes": r.outcomes}
        for r in results
    }
    return {
        "benchmark": "burst",
        "engine": "external" if args.url else args.engine,
        "schedule": asdict(schedule),
        "probe": measured,
        "settings": {
            "max_tokens": args.max_tokens,
            "max_replicas": args.max_replicas,
            "upscale_delay_s": args.upscale_delay_s,
            "downscale_delay_s": args.downscale_delay_s,
            "grace_s": args.grace_s,
            "overload": args.overload,
            "quiet_load": args.quiet_load,
            "latency_window_s": LATENCY_WINDOW_S,
            "mock_engine": MOCK_OPTIONS if args.engine == "mock" and not args.url else None,
        },
        "goals": goals(variants, measured.get("unloaded_p95_s"), schedule),
        "variants": variants,
    }


def plot(result: dict, path: Path) -> None:
    variants = result["variants"]
    sched = result["schedule"]
    fig, axes = harness.figure(
        4, len(variants), figsize=(5.2 * len(variants), 11), sharex=True, squeeze=False
    )
    rps_max = max((max(s["offered"], s["completed"]) for v in variants.values()
                   for s in v["seconds"]), default=1)
    lat_max = max(
        (s["p95_latency_s"] or 0 for v in variants.values() for s in v["seconds"]), default=1.0
    )
    unloaded = (result.get("probe") or {}).get("unloaded_p95_s")
    qs = [s["quality"] for v in variants.values() for s in v["seconds"] if s["quality"]]
    for col, (name, v) in enumerate(variants.items()):
        secs = v["seconds"]
        t = [s["t"] for s in secs]
        ax = axes[0][col]
        ax.plot(t, [s["offered"] for s in secs], label="offered req/s", color="tab:gray")
        ax.plot(t, [s["completed"] for s in secs], label="completed req/s", color="tab:green")
        ax.plot(t, [s["rejected"] for s in secs], label="refused req/s", color="tab:red", lw=0.8)
        ax.set_title(f"{name}: {v['description']}", fontsize=8)
        ax.set_ylabel("requests/s")
        ax.set_ylim(0, rps_max * 1.1)
        twin = ax.twinx()
        twin.step(t, [s["replicas"] or 0 for s in secs], where="post", color="tab:blue",
                  label="replicas")
        twin.set_ylim(0, result["settings"]["max_replicas"] + 1)
        twin.set_ylabel("model-server replicas", color="tab:blue")
        lines, lines2 = ax.get_legend_handles_labels(), twin.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=6, loc="upper right")
        ax = axes[1][col]
        ax.plot(t, [s["p95_latency_s"] for s in secs], color="tab:orange", label="p95")
        ax.plot(t, [s["budget_p95_latency_s"] for s in secs], ".", ms=3, color="tab:pink",
                label="p95, budgeted requests")
        if unloaded:
            ax.axhline(2 * unloaded, color="k", ls=":", lw=0.8, label="2x unloaded p95")
        if sched.get("budget_ms"):
            ax.axhline(sched["budget_ms"] / 1000, color="tab:pink", ls=":", lw=0.8,
                       label="budget")
        # log scale: the fixed best setting's queue reaches a minute, the others stay near 1 s
        ax.set_yscale("log")
        ax.set_ylabel(f"latency (s, last {LATENCY_WINDOW_S:.0f} s, log)")
        ax.set_ylim(0.05, max(lat_max, 2 * (unloaded or 0)) * 1.5)
        ax.legend(fontsize=6, loc="upper right")
        ax = axes[2][col]
        ax.plot(t, [s["steps_chosen"] for s in secs], ".", ms=3, color="tab:purple",
                label="steps/block of answers")
        ax.step(t, [s["router_steps"] for s in secs], where="post", color="tab:purple", lw=0.8,
                alpha=0.6, label="router's steps now")
        ax.set_ylabel("denoising steps per block")
        ax.set_ylim(0, BEST_STEPS + 1)
        ax.legend(fontsize=6, loc="upper right")
        ax = axes[3][col]
        ax.plot(t, [s["quality"] for s in secs], ".-", ms=3, lw=0.6, color="tab:olive")
        ax.set_ylabel("delivered quality (parse rate)")
        if qs:
            ax.set_ylim(0, max(qs) * 1.2)
        ax.set_xlabel("time (s)")
        for row in axes:
            row[col].axvspan(sched["quiet_s"], sched["quiet_s"] + sched["burst_s"],
                             color="tab:red", alpha=0.07)
    fig.suptitle(
        f"Burst: {sched['base_rps']:.2f} req/s, x{sched['burst_factor']:.0f} for "
        f"{sched['burst_s']:.0f} s (shaded); engine: {result['engine']}", fontsize=11)
    harness.save_figure(fig, path, dpi=100)


# (flag, type, default, help): the schedule, then the serving set-up all variants share
NUMERIC_FLAGS = [
    ("--base-rps", float, None, "quiet load, requests/s (default: --quiet-load x the probe's "
                                "best-quality rate)"),
    ("--quiet-load", float, 0.25, "quiet load over the rate best quality sustains"),
    ("--lone-s", float, 10.0, "adaptive only, before its schedule: seconds of 1 and of 2 "
                              "closed-loop clients (0: skip)"),
    ("--overload", float, 4.0, "burst load over the rate best quality sustains"),
    ("--quiet-s", float, 15.0, "seconds of quiet load before the burst"),
    ("--burst-s", float, 30.0, "seconds of burst"),
    ("--after-s", float, 40.0, "seconds of quiet load after it"),
    ("--grace-s", float, 15.0, "wait this long after the schedule for stragglers, then stop"),
    ("--max-tokens", int, 64, "tokens per answer"),
    ("--max-replicas", int, None, "autoscaling bound (default: 2 real replicas, one per core "
                                  "of this CPU; 4 with the mock)"),
    ("--upscale-delay-s", float, 2.0, None),
    ("--downscale-delay-s", float, 15.0, None),
    ("--settle-s", float, 3.0, "seconds between deploying and loading a variant"),
    ("--seed", int, 0, "of the arrival schedule"),
    ("--budget-share", float, 0.25, "share of requests with latency_budget_ms (0: none)"),
    ("--budget-over-unloaded", float, 0.5, "their budget over the unloaded best-quality p95"),
    ("--probe-samples", int, 8, "unloaded requests of the probe"),
    ("--probe-clients", int, 16, "closed-loop clients of the saturation probe"),
    ("--probe-s", float, 30.0, "seconds of the saturation probe"),
]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="dllm bench burst", description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", default=VARIANTS,
                   help="adaptive, ladder, fixed, fixed-<steps>")
    p.add_argument("--url", help="measure an app already running here (no deploy, no Ray)")
    p.add_argument("--engine", choices=["mock", "real"], default="real")
    p.add_argument("--ladder", type=int, nargs="+", default=LADDER_STEPS,
                   help="the adaptive variant's steps per block, best first (default "
                        "serve_config.yaml's; a faster last rung gives the controller room "
                        "when even the fastest one is past capacity)")
    for flag, kind, default, help_ in NUMERIC_FLAGS:
        p.add_argument(flag, type=kind, default=default, help=help_)
    p.add_argument("--out", default=None,
                   help="JSON path (default results/burst.json; burst_mock.json with the mock)")
    args = harness.parse_args(p, argv)
    if args.max_replicas is None:
        args.max_replicas = 4 if args.engine == "mock" else 2
    for v in args.variants:
        variant_args(v, args.engine, 1, 1.0, 1.0, args.ladder)  # bad names fail before Ray
    logging.basicConfig(level=logging.WARNING)
    result = run_variants(args)
    name = "burst" if args.engine == "real" or args.url else "burst_mock"
    out = harness.write_results(name, result, args.out, indent=1)
    plot(result, out)
    for vname, v in result["variants"].items():
        b = v["summary"]["burst"]
        print(f"{vname:9s} burst: p95 {b['p95_latency_s']} s ({b['p95_over_unloaded']} x "
              f"unloaded), quality {b['mean_quality']}, steps {b['mean_steps_chosen']}, "
              f"replicas max {b['max_replicas']}, refused {b['rejected']}, unfinished "
              f"{b['unfinished_or_failed']}")
    for k, v in result["goals"].items():
        print(f"  {k}: {v}")
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
