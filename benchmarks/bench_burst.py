"""`dllm bench burst`: a quiet / 4x burst / quiet load against the app, two serving set-ups
side by side.

    dllm bench burst                                   # both variants, ~6 minutes
    dllm bench burst --quiet-s 10 --burst-s 20 --after-s 20      # shorter
    dllm bench burst --url http://127.0.0.1:8000 --variants adaptive   # an app already running

Variants (each deployed in turn on a local Ray instance, HTTP on 127.0.0.1):
- adaptive: the step ladder [16, 8, 4, 2] (the router trades steps for latency as the cluster
  loads) + autoscaling/policy.py (token backlog against capacity, plus quality debt);
- fixed: best-quality steps only (ladder [16]) + Serve's default request-count policy.
Both get the same replica bounds, delays and metric intervals, and the same open-loop arrival
schedule (seeded Poisson: offered load does not slow down when the server does).

Every second it records the offered load (requests sent), completions and refusals, running
model-server replicas, the steps per block the router chose (and its rung: the quality level),
p95 latency of the requests that finished in the last 5 s, and the cluster drain time; then
writes benchmarks/results/burst.json and draws burst.png (one column per variant).

By default the model servers run the mock engine (benchmarks/mock_engine.py): a step takes
`step_delay_s + token_cost_s * tokens in the batch` of sleep, so each replica behaves like a
compute-bound accelerator with its own capacity and adding replicas adds capacity, which this
2-core machine could not show with real CPU replicas. `--engine real` serves tiny-coder.
Time is compressed: replicas here start in seconds, H100 replicas in minutes (weight loading).
The run is bounded: each variant stops `--grace-s` after its schedule ends, unfinished
requests counted as such.
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


@dataclass
class Schedule:
    base_rps: float = 1.0  # quiet load: about half of one replica at best quality (mock)
    burst_factor: float = 4.0
    quiet_s: float = 20.0
    burst_s: float = 40.0
    after_s: float = 60.0  # long enough to see the replicas come back down
    seed: int = 0

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


@dataclass
class Second:
    t: int
    offered: int = 0  # requests sent in this second
    completed: int = 0
    rejected: int = 0  # 429/503
    failed: int = 0  # other errors, timeouts
    p95_latency_s: float | None = None  # over requests finished in the last LATENCY_WINDOW_S
    steps_chosen: float | None = None  # mean steps per block of requests finished this second
    rung: int | None = None  # the router's rung (0 = best quality) from /health
    router_steps: int | None = None  # steps per block the router would choose now
    drain_s: float | None = None
    replicas: int | None = None  # running model-server replicas


@dataclass
class Outcome:
    sent_at: float
    done_at: float = 0.0
    status: int = 0  # HTTP status, 0 for a transport error / timeout
    steps: int | None = None


@dataclass
class VariantResult:
    name: str
    description: str
    seconds: list[Second] = field(default_factory=list)
    app_args: dict | None = None
    summary: dict = field(default_factory=dict)


# --- variants ----------------------------------------------------------------------------------
# ~2000 token-steps/s per mock replica; a 64-token answer at 16 steps/block = 1024 of them.
MOCK_OPTIONS = {"step_delay_s": 0.005, "token_cost_s": 0.0005, "max_num_seqs": 32}


def engine_factory(engine: str):
    """The replicas' engine: the mock (MOCK_OPTIONS) or None for tiny-coder's real engine."""
    if engine != "mock":
        return None
    from benchmarks.mock_engine import MockEngineFactory

    return MockEngineFactory("tiny-coder", **MOCK_OPTIONS)


def variant_args(
    name: str, engine: str, max_replicas: int, upscale_delay_s: float, downscale_delay_s: float
) -> dict:
    """deployments.app args for a variant (the same engine, bounds and delays for both)."""
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
    if name == "adaptive":
        # serve_config.yaml's ladder: 1 replica at the quiet load (~50% busy) stays at rung 0.
        ladder = {"steps": [16, 8, 4, 2], "thresholds_s": [2.0, 4.0, 8.0], "up_hold_s": 3.0}
        autoscaling["policy"] = {
            "policy_function": "autoscaling.policy:TokenBacklogPolicy",
            "policy_kwargs": {"target_backlog_s": 1.0, "quality_debt_s": 5.0},
        }
    elif name == "fixed":
        ladder = {"steps": [16], "thresholds_s": []}
        autoscaling["target_ongoing_requests"] = 2  # Serve's default policy and default target
    else:
        raise ValueError(f"unknown variant {name!r}")
    return {
        "model": model,
        "ladder": ladder,
        "auth": {"api_keys_env": None},
        "engine": {"max_num_seqs": 32, "max_queued": 1024},
        "limits": {"max_inflight": 4096, "default_max_tokens": 64},
        "server": {"num_cpus": 1, "max_ongoing_requests": 1100, "autoscaling_config": autoscaling},
    }


DESCRIPTIONS = {
    "adaptive": "adaptive steps [16,8,4,2] + token-backlog/quality-debt autoscaling",
    "fixed": "fixed best-quality steps [16] + Serve's default autoscaling policy",
}


# --- the load ----------------------------------------------------------------------------------
async def send(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    max_tokens: int,
    i: int,
    outcomes: list[Outcome],
    timeout_s: float,
) -> None:
    out = Outcome(sent_at=time.monotonic())
    outcomes.append(out)
    body = {
        "model": model,
        "prompt": f"# task {i}\ndef f{i}(x):\n",
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    try:
        r = await client.post(f"{url}/v1/completions", json=body, timeout=timeout_s)
        out.status = r.status_code
        if r.status_code == 200:
            out.steps = r.json().get("usage", {}).get("denoising_steps_per_block")
    except (httpx.HTTPError, asyncio.CancelledError):
        out.status = 0
    finally:
        out.done_at = time.monotonic()


async def sample_health(client: httpx.AsyncClient, url: str) -> dict:
    try:
        r = await client.get(f"{url}/health", timeout=2.0)
        return r.json()
    except (httpx.HTTPError, ValueError):
        return {}


def running_replicas(app_name: str | None) -> int | None:
    if app_name is None:
        return None
    from ray import serve

    try:
        dep = serve.status().applications[app_name].deployments[SERVER]
        return int(dep.replica_states.get("RUNNING", 0))
    except Exception:  # noqa: BLE001 - a missed sample is a gap in the plot, not a failure
        return None


async def sample_seconds(
    client: httpx.AsyncClient, url: str, seconds: list[Second], start: float, app_name: str | None,
    load: asyncio.Task, schedule: Schedule, desc: str
) -> int:
    """At the end of each second: the router's rung and steps, the drain time and the running
    replicas; stops once the load is done and the schedule is over -> seconds sampled."""
    bar = harness.progress(total=len(seconds), desc=desc, unit="s")
    sampled = 0
    for sec in seconds:
        await asyncio.sleep(max(0.0, start + sec.t + 1 - time.monotonic()))
        health = await sample_health(client, url)
        sec.rung = health.get("rung")
        sec.router_steps = health.get("steps")
        sec.drain_s = (health.get("load") or {}).get("drain_s")
        sec.replicas = await asyncio.to_thread(running_replicas, app_name)
        if sec.replicas is None:
            sec.replicas = (health.get("load") or {}).get("replicas")
        bar.update(1)
        sampled = sec.t + 1
        if load.done() and sec.t >= schedule.total_s:
            break
    bar.close()
    return sampled


async def run_load(
    url: str, schedule: Schedule, app_name: str | None, max_tokens: int, grace_s: float, desc: str
) -> list[Second]:
    """The open-loop schedule against `url`, bounded at its end + grace_s, sampled per second."""
    outcomes: list[Outcome] = []
    max_s = schedule.total_s + grace_s
    seconds = [Second(t=i) for i in range(int(math.ceil(max_s)))]
    async with harness.loopback_client(url, 2048, timeout_s=max_s) as client:
        model = (await client.get("/v1/models", timeout=30)).json()["data"][0]["id"]
        start = time.monotonic()

        def call(i: int):
            return send(client, url, model, max_tokens, i, outcomes, max_s)

        load = asyncio.create_task(harness.open_loop(call, schedule.arrivals(), max_s=max_s))
        sampled = await sample_seconds(client, url, seconds, start, app_name, load, schedule,
                                       desc)
        load.cancel()
        await asyncio.gather(load, return_exceptions=True)
    bucket(outcomes, seconds, start)
    unfinished = sum(1 for o in outcomes if not o.done_at or o.status == 0)
    if unfinished:
        log.warning("%s: %d requests unfinished or failed at the end of the run", desc, unfinished)
    return seconds[:sampled]


def bucket(outcomes: list[Outcome], seconds: list[Second], start: float) -> None:
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
    for sec in seconds:
        lo, hi = start + sec.t + 1 - LATENCY_WINDOW_S, start + sec.t + 1
        lat = sorted(
            o.done_at - o.sent_at for o in outcomes if o.status == 200 and lo <= o.done_at < hi
        )
        if lat:
            sec.p95_latency_s = lat[min(len(lat) - 1, math.ceil(0.95 * len(lat)) - 1)]
        steps = [
            o.steps
            for o in outcomes
            if o.status == 200 and o.steps is not None and sec.t <= o.done_at - start < sec.t + 1
        ]
        if steps:
            sec.steps_chosen = sum(steps) / len(steps)


def summarize(seconds: list[Second], schedule: Schedule) -> dict:
    def phase(lo: float, hi: float) -> list[Second]:
        return [s for s in seconds if lo <= s.t < hi]

    b0, b1 = schedule.quiet_s, schedule.quiet_s + schedule.burst_s
    phases = {"quiet": phase(0, b0), "burst": phase(b0, b1), "after": phase(b1, math.inf)}
    out: dict = {}
    for name, secs in phases.items():
        lat = [s.p95_latency_s for s in secs if s.p95_latency_s is not None]
        steps = [s.steps_chosen for s in secs if s.steps_chosen is not None]
        out[name] = {
            "offered": sum(s.offered for s in secs),
            "completed": sum(s.completed for s in secs),
            "rejected": sum(s.rejected for s in secs),
            "failed": sum(s.failed for s in secs),
            "max_p95_latency_s": max(lat, default=None),
            "median_p95_latency_s": sorted(lat)[len(lat) // 2] if lat else None,
            "mean_steps_chosen": sum(steps) / len(steps) if steps else None,
            "max_replicas": max((s.replicas or 0 for s in secs), default=0),
        }
    up = next((s.t for s in phases["burst"] + phases["after"] if (s.replicas or 0) > 1), None)
    out["first_scale_up_s_after_burst_start"] = None if up is None else up - b0
    last = seconds[-1] if seconds else None
    out["replicas_at_end"] = last.replicas if last else None
    out["rung_at_end"] = last.rung if last else None
    return out


# --- deploy and run ----------------------------------------------------------------------------
def deployed_variants(args, schedule: Schedule) -> list[VariantResult]:
    """Each variant deployed in turn on one local Ray + Serve, loaded, then deleted."""
    from ray import serve

    from deployments.app import build_application

    results: list[VariantResult] = []
    with harness.serve_cluster(args.max_replicas + 2, "dllm-bench-burst") as base:
        for name in args.variants:
            app_args = variant_args(
                name, args.engine, args.max_replicas, args.upscale_delay_s, args.downscale_delay_s
            )
            app_name = f"burst-{name}"
            app = build_application(app_args, engine_factory=engine_factory(args.engine))
            url = harness.deploy_app(app, base, app_name, route_prefix=f"/{app_name}")
            time.sleep(args.settle_s)  # load stats and capacity measured before the load
            secs = asyncio.run(
                run_load(url, schedule, app_name, args.max_tokens, args.grace_s, name)
            )
            results.append(
                VariantResult(
                    name, DESCRIPTIONS[name], secs, app_args, summarize(secs, schedule)
                )
            )
            serve.delete(app_name)
    return results


def run_variants(args) -> dict:
    schedule = Schedule(
        args.base_rps, args.burst_factor, args.quiet_s, args.burst_s, args.after_s, args.seed
    )
    if args.url:
        url = harness.require_loopback(args.url)
        results = []
        for name in args.variants:
            secs = asyncio.run(run_load(url, schedule, None, args.max_tokens, args.grace_s, name))
            results.append(
                VariantResult(name, f"{name} (app at {url})", secs, summary=summarize(secs, schedule))
            )
    else:
        results = deployed_variants(args, schedule)
    return {
        "benchmark": "burst",
        "engine": "external" if args.url else args.engine,
        "schedule": asdict(schedule),
        "settings": {
            "max_tokens": args.max_tokens,
            "max_replicas": args.max_replicas,
            "upscale_delay_s": args.upscale_delay_s,
            "downscale_delay_s": args.downscale_delay_s,
            "grace_s": args.grace_s,
            "latency_window_s": LATENCY_WINDOW_S,
            "mock_engine": MOCK_OPTIONS if args.engine == "mock" and not args.url else None,
        },
        "variants": {
            r.name: {
                "description": r.description,
                "summary": r.summary,
                "app_args": r.app_args,
                "seconds": [asdict(s) for s in r.seconds],
            }
            for r in results
        },
    }


def plot(result: dict, path: Path) -> None:
    variants = result["variants"]
    sched = result["schedule"]
    fig, axes = harness.figure(
        3, len(variants), figsize=(6.5 * len(variants), 9), sharex=True, sharey="row", squeeze=False
    )
    lat_max = max(
        (s["p95_latency_s"] or 0 for v in variants.values() for s in v["seconds"]), default=1.0
    )
    for col, (name, v) in enumerate(variants.items()):
        secs = v["seconds"]
        t = [s["t"] for s in secs]
        ax = axes[0][col]
        ax.plot(t, [s["offered"] for s in secs], label="offered req/s", color="tab:gray")
        ax.plot(t, [s["completed"] for s in secs], label="completed req/s", color="tab:green")
        ax.plot(t, [s["rejected"] for s in secs], label="refused req/s", color="tab:red", lw=0.8)
        ax.set_title(f"{name}: {v['description']}", fontsize=9)
        ax.set_ylabel("requests/s")
        twin = ax.twinx()
        twin.step(
            t, [s["replicas"] or 0 for s in secs], where="post", color="tab:blue", label="replicas"
        )
        twin.set_ylim(0, result["settings"]["max_replicas"] + 1)
        twin.set_ylabel("model-server replicas", color="tab:blue")
        lines = ax.get_legend_handles_labels()
        lines2 = twin.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="upper right")
        ax = axes[1][col]
        ax.plot(t, [s["p95_latency_s"] for s in secs], color="tab:orange")
        ax.set_ylabel(f"p95 latency (s, last {LATENCY_WINDOW_S:.0f} s)")
        ax.set_ylim(0, lat_max * 1.1)
        ax = axes[2][col]
        ax.plot(
            t,
            [s["steps_chosen"] for s in secs],
            ".",
            ms=3,
            color="tab:purple",
            label="steps/block of answers",
        )
        ax.step(
            t,
            [s["router_steps"] for s in secs],
            where="post",
            color="tab:purple",
            lw=0.8,
            alpha=0.6,
            label="router's steps now",
        )
        ax.set_ylabel("denoising steps per block")
        ax.set_xlabel("time (s)")
        twin = ax.twinx()
        twin.step(
            t,
            [s["rung"] for s in secs],
            where="post",
            color="tab:brown",
            lw=0.8,
            label="rung (0 = best)",
        )
        twin.set_ylim(-0.5, 4)
        twin.set_ylabel("quality rung", color="tab:brown")
        lines, lines2 = ax.get_legend_handles_labels(), twin.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="upper right")
        for row in axes:
            row[col].axvspan(
                sched["quiet_s"], sched["quiet_s"] + sched["burst_s"], color="tab:red", alpha=0.07
            )
    fig.suptitle(
        f"Burst: {sched['base_rps']} req/s, x{sched['burst_factor']:.0f} for "
        f"{sched['burst_s']:.0f} s (shaded); engine: {result['engine']}",
        fontsize=11,
    )
    harness.save_figure(fig, path, dpi=110)


# (flag, type, default, help): the schedule, then the serving set-up both variants share
NUMERIC_FLAGS = [
    ("--base-rps", float, 1.0, "quiet load, requests/s"),
    ("--burst-factor", float, 4.0, "the burst's load over the quiet one"),
    ("--quiet-s", float, 20.0, "seconds of quiet load before the burst"),
    ("--burst-s", float, 40.0, "seconds of burst"),
    ("--after-s", float, 60.0, "seconds of quiet load after it"),
    ("--grace-s", float, 15.0, "wait this long after the schedule for stragglers, then stop"),
    ("--max-tokens", int, 64, "tokens per answer"),
    ("--max-replicas", int, 4, "autoscaling bound"),
    ("--upscale-delay-s", float, 2.0, None),
    ("--downscale-delay-s", float, 15.0, None),
    ("--settle-s", float, 3.0, "seconds between deploying and loading a variant"),
    ("--seed", int, 0, "of the arrival schedule"),
]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="dllm bench burst", description=__doc__.split("\n")[0])
    p.add_argument(
        "--variants", nargs="+", default=["adaptive", "fixed"], choices=["adaptive", "fixed"]
    )
    p.add_argument("--url", help="measure an app already running here (no deploy, no Ray)")
    p.add_argument("--engine", choices=["mock", "real"], default="mock")
    for flag, kind, default, help_ in NUMERIC_FLAGS:
        p.add_argument(flag, type=kind, default=default, help=help_)
    p.add_argument("--out", default=None, help="JSON path (default results/burst.json)")
    args = harness.parse_args(p, argv)
    logging.basicConfig(level=logging.WARNING)
    result = run_variants(args)
    out = harness.write_results("burst", result, args.out, indent=1)
    plot(result, out)
    for name, v in result["variants"].items():
        s = v["summary"]
        print(
            f"{name:9s} burst: p95 max {s['burst']['max_p95_latency_s']}s, mean steps "
            f"{s['burst']['mean_steps_chosen']}, replicas max {s['burst']['max_replicas']}, "
            f"refused {s['burst']['rejected']}; end: {s['replicas_at_end']} replicas, "
            f"rung {s['rung_at_end']}"
        )
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
