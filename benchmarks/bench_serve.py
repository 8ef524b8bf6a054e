"""`dllm bench serve`: the OpenAI API under load on loopback, adaptive step router against fixed
steps, side by side in one run -> benchmarks/results/serve.json + serve.png.

    dllm bench serve                          # deploy serve_config.yaml's app on a local Ray
    dllm bench serve --quick                  # short settings (64-token answers, fewer requests)
    dllm bench serve --engine mock            # benchmarks/mock_engine.py: HTTP + Ray cost alone
    dllm bench serve --url http://127.0.0.1:8000 --model-id tiny-coder   # a running server

For each mode (adaptive: the step router decides; best: every request pins the ladder's first
rung; fastest: its last) and each concurrency C in 1, 4, 16, 64, C closed-loop workers send
streaming chat requests back to back (`--rounds` each, at least `--min-requests` in all: a
bounded load), every answer exactly `--max-tokens` long (ignore_eos), greedy. Reported per
level: output tok/s, time to first token (first streamed text) p50/p95, latency p50/p95, the
steps per block the server chose (header x-denoising-steps), errors by status. Between levels
the run waits for an idle cluster at the best rung, so every level starts from the same state.

Overload (open loop): requests arrive as a Poisson process at `--overload-factor` (4) times the
best rung's saturated rate (requests/s measured at the highest concurrency of the `best` mode in
this run), `--overload-requests` in all, for each mode; p95 is compared with the unloaded p95.
Closed-loop clients cannot overload a server (they wait), which is why this phase exists.

Overhead: at concurrency 1, a 128-token answer at the best rung through HTTP + Ray against the
same request on an engine in this process (same model, same EngineConfig), alternating, medians
of `--overhead-repeats`. Goals (on this CPU): HTTP+Ray overhead < 15 % of the
end-to-end latency; under 4x overload (C=64 on 16 engine slots) the adaptive router keeps p95
within 2x of the unloaded p95 (best rung, C=1) while fixed best quality goes past 4x.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import yaml

from benchmarks import harness
from benchmarks.harness import percentile

log = logging.getLogger("dllm.bench.serve")

REPO = Path(__file__).resolve().parents[1]
APP_NAME = "dllm-bench"
PROMPTS = [
    "def fibonacci(n):", "Write a function that parses a CSV line.", "class LRUCache:",
    "import json\n\ndef load(path):", "Sort a list of dicts by a key.", "def is_prime(n):",
    "Read a file and count the words.", "async def fetch(url):",
]


@dataclass
class Sample:
    ok: bool
    status: int
    latency_s: float = 0.0
    ttft_s: float | None = None
    completion_tokens: int = 0
    steps_per_block: int | None = None
    steps: int = 0  # forward passes the request used (usage.denoising_steps)


@dataclass
class Level:
    mode: str
    concurrency: int
    requests: int
    wall_s: float
    ok: int
    errors: dict[str, int]
    output_tok_per_s: float
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    latency_p50_s: float | None
    latency_p95_s: float | None
    latency_mean_s: float | None
    steps_chosen: dict[str, int]  # steps per block -> requests
    mean_steps_per_block: float | None
    mean_forward_passes: float | None


# --- the load ---------------------------------------------------------------------------------
async def one_request(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int,
                      pin: int | None) -> Sample:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    if pin is not None:
        body["denoising_steps"] = pin
    t0 = time.perf_counter()
    sample = Sample(ok=False, status=0)
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            sample.status = r.status_code
            if r.status_code != 200:
                await r.aread()
                return sample
            sample.steps_per_block = int(r.headers.get("x-denoising-steps", 0)) or None
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return sample
                if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                    if sample.ttft_s is None:
                        sample.ttft_s = time.perf_counter() - t0
                if chunk.get("usage"):
                    sample.completion_tokens = chunk["usage"]["completion_tokens"]
                    sample.steps = chunk["usage"].get("denoising_steps", 0)
        sample.latency_s = time.perf_counter() - t0
        sample.ok = True
    except httpx.HTTPError as e:
        log.warning("request failed: %s", e)
    return sample


def summarize(samples: list[Sample], mode: str, concurrency: int, wall: float) -> Level:
    good = [s for s in samples if s.ok]
    lat = [s.latency_s for s in good]
    ttft = [s.ttft_s for s in good if s.ttft_s is not None]
    steps = Counter(str(s.steps_per_block) for s in good)
    return Level(
        mode=mode, concurrency=concurrency, requests=len(samples), wall_s=wall, ok=len(good),
        errors=dict(Counter(str(s.status) for s in samples if not s.ok)),
        output_tok_per_s=sum(s.completion_tokens for s in good) / wall,
        ttft_p50_s=percentile(ttft, 0.5), ttft_p95_s=percentile(ttft, 0.95),
        latency_p50_s=percentile(lat, 0.5), latency_p95_s=percentile(lat, 0.95),
        latency_mean_s=statistics.fmean(lat) if lat else None, steps_chosen=dict(steps),
        mean_steps_per_block=statistics.fmean(s.steps_per_block for s in good
                                              if s.steps_per_block) if good else None,
        mean_forward_passes=statistics.fmean(s.steps for s in good) if good else None)


async def run_level(url: str, model: str, mode: str, concurrency: int, total: int,
                    max_tokens: int, pin: int | None, bar) -> Level:
    """Closed loop: `concurrency` clients, `total` requests."""
    async with harness.loopback_client(url, concurrency) as client:
        async def call(i: int, w: int) -> Sample:
            prompt = PROMPTS[(w + i) % len(PROMPTS)] + f"  # {i}"
            sample = await one_request(client, model, prompt, max_tokens, pin)
            bar.update(1)
            return sample

        wall, samples = await harness.closed_loop(call, concurrency, total)
    return summarize(samples, mode, concurrency, wall)


async def run_open_loop(url: str, model: str, mode: str, rate: float, total: int,
                        max_tokens: int, pin: int | None, seed: int, bar) -> Level:
    """Poisson arrivals at `rate` requests/s, `total` requests, each on its own connection."""
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in range(total):
        arrivals.append(t)
        t += rng.expovariate(rate)
    async with harness.loopback_client(url, total) as client:
        async def call(i: int) -> Sample:
            prompt = PROMPTS[i % len(PROMPTS)] + f"  # {i}"
            sample = await one_request(client, model, prompt, max_tokens, pin)
            bar.update(1)
            return sample

        wall, samples = await harness.open_loop(call, arrivals)
    return summarize(samples, mode, -1, wall)


def wait_idle(url: str, best_rung_too: bool = True, max_s: float = 600.0) -> None:
    deadline = time.monotonic() + max_s
    while time.monotonic() < deadline:
        try:
            h = httpx.get(f"{url}/health", timeout=30).json()
            load = h.get("load", {})
            if h.get("inflight", 0) == 0 and load.get("running", 0) == 0 and \
                    load.get("queued", 0) == 0 and (h.get("rung", 0) == 0 or not best_rung_too):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    log.warning("the cluster did not go idle within %.0f s", max_s)


# --- the app under test --------------------------------------------------------------------------
def app_args(config: Path, ladder: list[int] | None, thresholds: list[float] | None) -> dict:
    """serve_config.yaml's app args with the limits lifted, so that the load, not a limit,
    decides the latencies (4096 queued / in flight: more than any level sends)."""
    apps = yaml.safe_load(config.read_text())["applications"]
    args = dict(apps[0].get("args") or {})
    args["auth"] = {"api_keys_env": None}
    args["limits"] = {**args.get("limits", {}), "max_inflight": 4096, "max_drain_s": None}
    args["engine"] = {**args.get("engine", {}), "max_queued": 4096}
    args["server"] = {**args.get("server", {}), "max_ongoing_requests": 4200}
    if ladder:
        args["ladder"] = {**args.get("ladder", {}), "steps": ladder}
    if thresholds:
        args["ladder"] = {**args.get("ladder", {}), "thresholds_s": thresholds}
    return args


def mock_factory(args: dict):
    """The model-free engine: a 2 ms step plus 50 us per token in the batch, as many slots as
    the real engine would have (so HTTP + Ray cost is what is left to measure)."""
    from benchmarks.mock_engine import MockEngineFactory

    return MockEngineFactory(args.get("model", {}).get("source", "tiny-coder"),
                             step_delay_s=0.002, token_cost_s=5e-5,
                             max_num_seqs=args.get("engine", {}).get("max_num_seqs", 16))


def local_engine(args: dict, factory=None):
    """The engine the server runs, built in this process -> (engine, tokenizer): the factory's,
    or the real Engine on args.model with args.engine's EngineConfig fields."""
    if factory is not None:
        engine, tok, _ = factory()
        return engine, tok
    import torch

    from engine import Engine, EngineConfig
    from model.loaders import load_pretrained, resolve_device, torch_dtype

    model = args.get("model", {})
    if model.get("torch_threads"):
        torch.set_num_threads(model["torch_threads"])
    net, tok, cfg = load_pretrained(model.get("source", "tiny-coder"),
                                    device=resolve_device(model.get("device", "cpu")),
                                    dtype=torch_dtype(model.get("dtype", "float32")),
                                    progress=False)
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    opts = {k: v for k, v in args.get("engine", {}).items() if k in fields}
    return Engine(net, tok, cfg, EngineConfig(**opts)), tok


# --- overhead: HTTP + Ray against the engine alone ----------------------------------------------
def _params(max_tokens: int, steps: int, block_length: int):
    from model.sampling import SamplingParams

    return SamplingParams(max_new_tokens=max_tokens, steps=steps, block_length=block_length,
                          stop_token_ids=[])


async def engine_alone_latency(engine, prompt_ids: list[int], params, i: int) -> float:
    """One request straight to an engine in this process."""
    from engine.types import GenerationRequest

    t0 = time.perf_counter()
    async for _ in engine.submit(GenerationRequest(f"alone-{i}", prompt_ids, params)):
        pass
    return time.perf_counter() - t0


async def handle_latency(app_name: str, prompt_ids: list[int], params, i: int) -> float:
    """The same request straight to the ModelServer through a DeploymentHandle (Ray, no HTTP)."""
    from ray import serve

    from engine.types import GenerationRequest

    h = serve.get_deployment_handle("ModelServer", app_name=app_name).options(stream=True)
    t0 = time.perf_counter()
    async for _ in h.generate.remote(GenerationRequest(f"handle-{i}", prompt_ids, params)):
        pass
    return time.perf_counter() - t0


def _medians(out: dict, http: list, handle: list, alone: list) -> dict:
    out["http_latency_s"] = statistics.median(http) if http else None
    out["http_samples_s"] = http
    if handle:
        out["ray_handle_latency_s"] = statistics.median(handle)
        out["ray_handle_samples_s"] = handle
    if alone:
        out["engine_alone_latency_s"] = statistics.median(alone)
        out["engine_alone_samples_s"] = alone
        if http:
            out["overhead_s"] = out["http_latency_s"] - out["engine_alone_latency_s"]
            out["overhead_share"] = out["overhead_s"] / out["http_latency_s"]
            if handle:
                # HTTP + ingress alone: what the API layer adds on top of a Ray call
                out["http_ingress_share"] = (out["http_latency_s"] - out["ray_handle_latency_s"]
                                             ) / out["http_latency_s"]
    return out


async def measure_overhead(url: str, model: str, args: dict | None, factory, max_tokens: int,
                           steps: int, block_length: int, repeats: int,
                           app_name: str | None = None) -> dict:
    """Alternating, medians: HTTP (streaming, as clients call it), the ModelServer through a
    Ray handle, and the same engine in this process (when the app was deployed here)."""
    prompt, params = PROMPTS[0], _params(max_tokens, steps, block_length)
    http, alone, handle = [], [], []
    engine = ids = None
    if args is not None:
        engine, tok = local_engine(args, factory)
        ids = tok.chat_prompt([{"role": "user", "content": prompt}])
        await engine.start()
    async with harness.loopback_client(url, 4) as client:
        for i in harness.progress(range(repeats), desc="overhead (HTTP vs handle vs engine alone)"):
            if engine is not None:
                alone.append(await engine_alone_latency(engine, ids, params, i))
            if app_name is not None and ids is not None:
                handle.append(await handle_latency(app_name, ids, params, i))
            s = await one_request(client, model, prompt, max_tokens, steps)
            if s.ok:
                http.append(s.latency_s)
    if engine is not None:
        await engine.shutdown()
    out = {"max_tokens": max_tokens, "steps_per_block": steps, "repeats": repeats}
    return _medians(out, http, handle, alone)


# --- report ------------------------------------------------------------------------------------
def goals(levels: list[Level], overhead: dict, overload: list[Level] | None = None) -> dict:
    by = {(lv.mode, lv.concurrency): lv for lv in levels}
    out: dict = {}
    base = by.get(("best", 1)) or by.get(("adaptive", 1))
    top = max((lv.concurrency for lv in levels), default=0)
    if base and base.latency_p95_s:
        out["unloaded_p95_s"] = base.latency_p95_s
        for mode in ("adaptive", "best", "fastest"):
            lv = by.get((mode, top))
            if lv and lv.latency_p95_s:
                out[f"{mode}_p95_at_c{top}_over_unloaded"] = lv.latency_p95_s / base.latency_p95_s
    for mode in ("adaptive", "best", "fastest"):
        a, b = by.get((mode, 1)), by.get((mode, 16))
        if a and b and a.output_tok_per_s:
            out[f"{mode}_throughput_c16_over_c1"] = b.output_tok_per_s / a.output_tok_per_s
    if "http_ingress_share" in overhead:
        out["http_ingress_share_c1"] = overhead["http_ingress_share"]
    if "overhead_share" in overhead:
        out["http_ray_overhead_share_c1"] = overhead["overhead_share"]
        out["overhead_under_15pct"] = overhead["overhead_share"] < 0.15
    if f"adaptive_p95_at_c{top}_over_unloaded" in out:
        out["adaptive_p95_within_2x"] = out[f"adaptive_p95_at_c{top}_over_unloaded"] <= 2.0
    if f"best_p95_at_c{top}_over_unloaded" in out:
        out["best_p95_past_4x"] = out[f"best_p95_at_c{top}_over_unloaded"] > 4.0
    for lv in overload or []:
        if base and base.latency_p95_s and lv.latency_p95_s:
            out[f"overload_{lv.mode}_p95_over_unloaded"] = lv.latency_p95_s / base.latency_p95_s
    if "overload_adaptive_p95_over_unloaded" in out:
        out["overload_adaptive_p95_within_2x"] = out["overload_adaptive_p95_over_unloaded"] <= 2.0
    if "overload_best_p95_over_unloaded" in out:
        out["overload_best_p95_past_4x"] = out["overload_best_p95_over_unloaded"] > 4.0
    return out


def _plot_overload(ax, ax_steps, overload: list[Level], unloaded_p95: float | None) -> None:
    if not overload:
        ax.axis("off")
        ax_steps.axis("off")
        return
    names = [lv.mode for lv in overload]
    ax.bar(names, [lv.latency_p95_s or 0 for lv in overload], color="tab:orange", label="p95")
    ax.bar(names, [lv.latency_p50_s or 0 for lv in overload], color="tab:blue", label="p50")
    if unloaded_p95:
        ax.axhline(unloaded_p95, color="k", ls="--", label="unloaded p95")
        ax.axhline(2 * unloaded_p95, color="g", ls=":", label="2x unloaded")
    ax.set_ylabel("latency (s)")
    ax.set_title("open-loop overload")
    ax.legend()
    ax_steps.bar(names, [lv.mean_steps_per_block or 0 for lv in overload])
    ax_steps.set_ylabel("steps per block (mean)")
    ax_steps.set_title("open-loop overload: steps chosen")


def plot(levels: list[Level], overload: list[Level], unloaded_p95: float | None, path: Path,
         title: str) -> None:
    fig, axes = harness.figure(2, 3, figsize=(16, 8))
    panels = [("output_tok_per_s", "output tokens/s"), ("latency_p95_s", "p95 latency (s)"),
              ("ttft_p50_s", "time to first token p50 (s)"),
              ("mean_steps_per_block", "steps per block chosen (mean)")]
    flat = list(axes.flat)
    for ax, (key, label) in zip(flat[:4], panels, strict=False):
        for mode in dict.fromkeys(lv.mode for lv in levels):
            pts = [(lv.concurrency, getattr(lv, key)) for lv in levels
                   if lv.mode == mode and getattr(lv, key) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=False), marker="o", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        if key in ("latency_p95_s", "ttft_p50_s"):
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend()
    _plot_overload(flat[4], flat[5], overload, unloaded_p95)
    fig.suptitle(title)
    harness.save_figure(fig, path, dpi=110)


# --- the run -------------------------------------------------------------------------------------
def closed_levels(url: str, model: str, a, modes: list[str], levels_c: list[int],
                  pins: dict) -> list[Level]:
    levels: list[Level] = []
    total_requests = sum(max(c * a.rounds, a.min_requests) for c in levels_c) * len(modes)
    bar = harness.progress(total=total_requests, desc="bench serve")
    for mode in modes:
        for c in levels_c:
            wait_idle(url)
            total = max(c * a.rounds, a.min_requests)
            bar.set_postfix(mode=mode, c=c)
            lv = asyncio.run(run_level(url, model, mode, c, total, a.max_tokens, pins[mode], bar))
            log.info("%s c=%d: %.1f tok/s, p50 %.2fs p95 %.2fs, ttft p50 %s, steps %s, errors %s",
                     mode, c, lv.output_tok_per_s, lv.latency_p50_s or -1, lv.latency_p95_s or -1,
                     lv.ttft_p50_s, lv.steps_chosen, lv.errors)
            levels.append(lv)
    bar.close()
    return levels


def overload_levels(url: str, model: str, a, modes: list[str], pins: dict, rate: float
                    ) -> list[Level]:
    """Open loop at `rate` (a factor x the best rung's saturated rate) for each mode."""
    overload: list[Level] = []
    if rate <= 0 or a.overload_requests <= 0:
        return overload
    bar = harness.progress(total=a.overload_requests * len(modes), desc=f"overload {rate:.2f} req/s")
    for mode in modes:
        wait_idle(url)
        lv = asyncio.run(run_open_loop(url, model, mode, rate, a.overload_requests,
                                       a.max_tokens, pins[mode], seed=0, bar=bar))
        log.info("overload %s: p50 %.2fs p95 %.2fs, steps %s, errors %s", mode,
                 lv.latency_p50_s or -1, lv.latency_p95_s or -1, lv.steps_chosen, lv.errors)
        overload.append(lv)
    bar.close()
    return overload


def bench(url: str, a, args: dict, deployed: bool, factory) -> dict:
    """Every phase against the app at `url` -> the result document."""
    levels_c = [int(x) for x in a.concurrency.split(",")]
    modes = a.modes.split(",")
    model = a.model_id or httpx.get(f"{url}/v1/models", timeout=60).json()["data"][0]["id"]
    card = httpx.get(f"{url}/v1/models/{model}", timeout=60).json()
    block_length = card.get("block_length") or 32
    ladder = args.get("ladder", {}).get("steps", [16, 8, 4, 2])
    pins = {"adaptive": None, "best": ladder[0], "fastest": ladder[-1]}
    # Warm-up: a burst teaches the replica its peak rate (the router's capacity), then idle.
    warm = harness.progress(total=16, desc="warm-up")
    asyncio.run(run_level(url, model, "warmup", 16, 16, 32, ladder[-1], warm))
    warm.close()
    levels = closed_levels(url, model, a, modes, levels_c, pins)
    best_rates = [lv.ok / lv.wall_s for lv in levels if lv.mode == "best" and lv.wall_s > 0]
    saturated = max(best_rates, default=0.0)
    rate = a.overload_factor * saturated
    overload = overload_levels(url, model, a, modes, pins, rate)
    wait_idle(url)
    overhead = asyncio.run(measure_overhead(
        url, model, args if deployed else None, factory, a.overhead_tokens, ladder[0],
        block_length, a.overhead_repeats, app_name=APP_NAME if deployed else None))
    return {
        "benchmark": "serve", "url": url, "model": model,
        "engine": a.engine if deployed else "external",
        "settings": {"concurrency": levels_c, "modes": modes, "max_tokens": a.max_tokens,
                     "rounds": a.rounds, "min_requests": a.min_requests, "ladder": ladder,
                     "thresholds_s": args.get("ladder", {}).get("thresholds_s"),
                     "pins": pins, "quick": a.quick},
        "levels": [asdict(lv) for lv in levels],
        "overload": {"factor": a.overload_factor, "best_saturated_req_per_s": saturated,
                     "rate_req_per_s": rate, "levels": [asdict(lv) for lv in overload]},
        "overhead": overhead,
        "goals": goals(levels, overhead, overload),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="dllm bench serve", description=__doc__.split("\n")[0])
    p.add_argument("--url", help="benchmark a running server (on this machine) instead")
    p.add_argument("--model-id", help="model name to send (default: the server's)")
    p.add_argument("--config", default=str(REPO / "serve_config.yaml"))
    p.add_argument("--engine", choices=("real", "mock"), default="real")
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--modes", default="adaptive,best,fastest")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2, help="requests per worker per level")
    p.add_argument("--min-requests", type=int, default=8, help="per level, at least")
    p.add_argument("--ladder", help="steps per block, best first, e.g. 16,8,4,2")
    p.add_argument("--thresholds", help="drain seconds per rung change, e.g. 2,4,8")
    p.add_argument("--overload-factor", type=float, default=4.0)
    p.add_argument("--overload-requests", type=int, default=48)
    p.add_argument("--overhead-repeats", type=int, default=5)
    p.add_argument("--overhead-tokens", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="64-token answers, 1 round, 4 minimum")
    p.add_argument("--out", default=None, help="path stem for .json/.png (default results/serve)")
    a = harness.parse_args(p, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if a.quick:
        a.max_tokens, a.rounds, a.min_requests = 64, 1, 4
        a.overhead_repeats = min(a.overhead_repeats, 3)
        a.overload_requests = min(a.overload_requests, 32)
    args = app_args(Path(a.config), [int(x) for x in a.ladder.split(",")] if a.ladder else None,
                    [float(x) for x in a.thresholds.split(",")] if a.thresholds else None)
    factory = mock_factory(args) if a.engine == "mock" else None
    with contextlib.ExitStack() as stack:
        if a.url:
            url = harness.require_loopback(a.url)
        else:
            from deployments.app import build_application

            base = stack.enter_context(harness.serve_cluster(4, "dllm-bench"))
            url = harness.deploy_app(build_application(args, engine_factory=factory), base, APP_NAME)
        result = bench(url, a, args, deployed=not a.url, factory=factory)
    stem = Path(a.out) if a.out else harness.result_path("serve", "")
    out = harness.write_results("serve", result, stem.with_suffix(".json"))
    plot([Level(**lv) for lv in result["levels"]],
         [Level(**lv) for lv in result["overload"]["levels"]],
         result["goals"].get("unloaded_p95_s"), out,
         f"dllm bench serve: {result['model']} ({result['engine']} engine), "
         f"{a.max_tokens}-token answers")
    log.info("wrote %s and %s", out, out.with_suffix(".png"))
    print(json.dumps(result["goals"], indent=2))


if __name__ == "__main__":
    main()
