"""What every benchmark shares, so that each bench module keeps only what it measures.

    p = argparse.ArgumentParser(prog="dllm bench sampler", description=...)
    args = harness.parse_args(p, argv)            # adds --note, records the command line
    path = harness.write_results("bench_sampler", {"rows": rows}, out=args.out)
    fig, ax = harness.figure(figsize=(7, 4.5)); ...; harness.save_figure(fig, path)

- results: benchmarks/results/<name>.json and .png, or $DLLM_RESULTS_DIR/<name>.* (smoke runs
  and tests point it at a temporary folder so they never overwrite the committed results);
- the machine record: one shape (`machine_record`), stamped into every JSON by `write_results`;
- figures: matplotlib on the Agg backend (no display), one helper that saves the PNG;
- progress bars (tqdm; a no-op bar where tqdm is missing, e.g. gpu_check on a bare GPU box);
- load generators: `closed_loop` (c clients, each sending its next request when the previous
  one finishes) and `open_loop` (requests at given arrival times, however slow the server is),
  both bounded in count and in time; HTTP clients only to loopback addresses;
- Serve start-up: Ray + Serve on 127.0.0.1 at a free port, an app deployed and waited for until
  its /health answers 200, everything shut down on exit;
- the real engine under a closed loop (`run_engine`), `generate` one request after another
  (`run_generate`), token agreement between two runs (`agreement`), and random weights made
  on the device in their dtype (`build_on_device`).

Nothing here imports Ray, httpx, matplotlib or the engine at module level: gpu_check.py runs on
a machine with torch and triton only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import ipaddress
import json
import os
import shlex
import socket
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

RESULTS = Path(__file__).resolve().parent / "results"
RESULTS_ENV = "DLLM_RESULTS_DIR"  # another folder for every result (smoke runs, tests)

# --- results paths and the machine record --------------------------------------------------------

_RUN: dict[str, str | None] = {"command": None, "note": None}


def results_dir() -> Path:
    return Path(os.environ.get(RESULTS_ENV) or RESULTS)


def result_path(name: str, suffix: str = ".json") -> Path:
    """benchmarks/results/<name><suffix> (or under $DLLM_RESULTS_DIR)."""
    return results_dir() / f"{name}{suffix}"


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None
               ) -> argparse.Namespace:
    """parser.parse_args(argv) with a --note flag added; the command line (the parser's prog and
    these arguments) and the note go into every machine record written afterwards."""
    if "--note" not in parser._option_string_actions:
        parser.add_argument("--note", default="",
                            help="what else ran on the machine, recorded with the results")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    _RUN.update(command=shlex.join([*parser.prog.split(), *argv]), note=args.note or None)
    return args


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _cpu_vector_isa() -> str | None:
    """The widest vector and matrix extensions the CPU reports ("amx_bf16 avx512_bf16", "avx2"):
    the same model name covers machines with and without AVX-512 here, and CPU figures move
    with it (the burst probe's unloaded p95: 0.83 s on an AVX2-only EPYC, 0.41-0.49 s with
    AVX-512)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                wanted = ["amx_bf16", "avx512_bf16", "avx512f", "avx2"]
                have = [f for f in wanted if f in flags]
                return " ".join(have[:2]) if have else None
    except OSError:
        pass
    return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_record(note: str | None = None, command: str | None = None) -> dict:
    """The one shape every result carries under "machine"."""
    gpu = threads = None
    try:
        import torch

        threads = torch.get_num_threads()
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:  # pragma: no cover - every benchmark has torch
        pass
    return {"cpu": _cpu_model(), "cpu_isa": _cpu_vector_isa(), "cores": os.cpu_count(),
            "torch": _version("torch"),
            "triton": _version("triton"), "torch_threads": threads, "gpu": gpu,
            # spinning or sleeping OpenMP workers change CPU figures (dllm_cli.py)
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "libgomp default"),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command or _RUN["command"] or shlex.join(sys.argv),
            "note": note if note is not None else _RUN["note"]}


def write_results(name: str, payload: dict, out: str | Path | None = None,
                  indent: int = 2) -> Path:
    """payload + {"machine": machine_record()} as JSON at `out` (default result_path(name))."""
    path = Path(out) if out else result_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {**payload, "machine": machine_record()}
    path.write_text(json.dumps(doc, indent=indent, default=str) + "\n")
    return path


# --- figures and progress ---------------------------------------------------------------------------

def figure(nrows: int = 1, ncols: int = 1, **kw):
    """plt.subplots on the Agg backend (benchmarks run headless) -> (fig, axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, **kw)


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Lay out, save as <path>.png (the JSON's stem) and close the figure."""
    import matplotlib.pyplot as plt

    png = Path(path).with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(png, dpi=dpi)
    plt.close(fig)
    return png


class _NoBar:
    """What the benchmarks use of a tqdm bar, doing nothing."""

    def __init__(self, items=None):
        self.items = items

    def __iter__(self):
        return iter(self.items or ())

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kw) -> None:
        pass

    def close(self) -> None:
        pass


def progress(items: Iterable | None = None, desc: str = "", total: int | None = None,
             disable: bool = False, **tqdm_options):
    """A tqdm bar over `items` (or a manual one of `total`), a silent one without tqdm."""
    if disable:
        return _NoBar(items)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - gpu_check on a machine with torch + triton only
        return _NoBar(items)
    return tqdm(items, desc=desc, total=total, **tqdm_options)


# --- load generators ------------------------------------------------------------------------------

def require_loopback(url: str) -> str:
    """The load generators only ever load this machine: refuse any other host."""
    host = urlsplit(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"benchmarks send load to loopback addresses only, not {url!r}")
    return url.rstrip("/")


def loopback_client(url: str, connections: int, timeout_s: float = 1200.0):
    """An httpx.AsyncClient on `url` (loopback only) with room for `connections` streams."""
    import httpx

    limits = httpx.Limits(max_connections=connections + 4,
                          max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=require_loopback(url), timeout=httpx.Timeout(timeout_s),
                             limits=limits)


async def _bounded(tasks: list[asyncio.Task], deadline: float) -> None:
    """Wait for `tasks` until `deadline` (loop time), cancel what is left, reap all."""
    if tasks:
        await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def closed_loop(call: Callable[[int, int], Awaitable[Any]], concurrency: int, total: int,
                      max_s: float = 3600.0) -> tuple[float, list]:
    """`concurrency` clients share requests 0..total-1: each awaits call(i, client) for the
    next i when its previous one finished. No request starts after max_s; one still running at
    max_s is cancelled. -> (wall seconds, the calls' results in completion order)."""
    todo = iter(range(total))
    results: list = []
    deadline = time.monotonic() + max_s

    async def client(w: int) -> None:
        for i in todo:
            if time.monotonic() >= deadline:
                return
            results.append(await call(i, w))

    t0 = time.monotonic()
    await _bounded([asyncio.create_task(client(w)) for w in range(concurrency)], deadline)
    return time.monotonic() - t0, results


async def open_loop(call: Callable[[int], Awaitable[Any]], arrivals: list[float],
                    max_s: float = 3600.0) -> tuple[float, list]:
    """call(i) at arrivals[i] seconds from now, each in its own task, whether or not earlier
    ones finished (offered load does not slow down with the server). Nothing is sent after
    max_s, and what still runs then is cancelled. -> (wall seconds, completed calls' results)."""
    t0 = time.monotonic()
    deadline = t0 + max_s
    tasks: list[asyncio.Task] = []
    for i, at in enumerate(arrivals):
        if at >= max_s:
            break
        await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
        tasks.append(asyncio.create_task(call(i)))
    await _bounded(tasks, deadline)
    results = [t.result() for t in tasks if not t.cancelled() and t.exception() is None]
    return time.monotonic() - t0, results


def percentile(xs: list[float], q: float) -> float | None:
    """Linear-interpolated quantile q in [0, 1]; None for no samples."""
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# --- Ray Serve on loopback -----------------------------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, timeout_s: float = 300.0) -> None:
    """Poll <url>/health until it answers 200 (model loaded, replicas up)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{require_loopback(url)}/health", timeout=10)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.5)
    raise TimeoutError(f"{url}/health not 200 within {timeout_s:.0f} s ({last})")


@contextlib.contextmanager
def serve_cluster(num_cpus: int, namespace: str) -> Iterator[str]:
    """A local Ray instance and Serve's HTTP proxy on 127.0.0.1 at a free port -> its base URL;
    Serve and Ray are shut down on exit."""
    import ray
    from ray import serve

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             namespace=namespace)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def deploy_app(app, base_url: str, name: str, route_prefix: str = "/",
               timeout_s: float = 300.0) -> str:
    """serve.run(app) under `route_prefix`, then wait until its /health is 200 -> its URL."""
    from ray import serve

    serve.run(app, name=name, route_prefix=route_prefix)
    url = base_url + route_prefix.rstrip("/")
    wait_healthy(url, timeout_s)
    return url


# --- the real engine and the reference sampler ---------------------------------------------------

def build_on_device(make: Callable[[], Any], device, dtype, seed: int = 0):
    """make() under torch.manual_seed(seed) with `device` and `dtype` as the defaults: random
    weights made where they run, in their dtype (16 GB for an 8B model in bf16, never a 32 GB
    fp32 copy first). With a fixed schedule (EOS ignored) the work does not depend on them."""
    import torch

    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return make()
    finally:
        torch.set_default_dtype(prev)


def agreement(a: dict[str, list[int]], b: dict[str, list[int]]) -> float:
    """Token agreement of two runs over the same requests (id -> token ids): positions equal
    over the longer of each pair of outputs; a request missing from `b` agrees nowhere."""
    same = total = 0
    for rid, ta in a.items():
        tb = b.get(rid, [])
        same += sum(x == y for x, y in zip(ta, tb, strict=False))
        total += max(len(ta), len(tb))
    return same / max(total, 1)


def _count_denoise(engine) -> list[tuple[int, int]]:
    """(rows, real tokens) of each denoising step the engine runs from now on: its stats count
    iterations and time, not the tokens each step processed."""
    steps: list[tuple[int, int]] = []
    denoise = engine.runner.denoise

    def counted(seqs):
        n, outcome, apply = denoise(seqs)
        steps.append((len(seqs), n))
        return n, outcome, apply

    engine.runner.denoise = counted
    return steps


async def _serve_requests(engine, reqs: list, concurrency: int, tag: str = ""
                          ) -> tuple[float, list[tuple[str, list[int], int, float]]]:
    """The engine's closed loop -> (seconds, [(request id, token ids, completion tokens,
    latency)])."""
    from engine.types import Finished

    async def one(i: int, _client: int):
        req = reqs[i]
        if tag:
            req = dataclasses.replace(req, request_id=req.request_id + tag)
        t0, ids, tokens = time.perf_counter(), [], 0
        async for ev in engine.submit(req):
            ids += getattr(ev, "token_ids", None) or []
            if isinstance(ev, Finished):
                assert ev.error is None, ev.error
                tokens = ev.completion_tokens
        return reqs[i].request_id, ids, tokens, time.perf_counter() - t0

    return await closed_loop(one, concurrency, len(reqs))


def _counters(stats, names: tuple[str, ...]) -> dict:
    """Running totals from EngineStats: `iterations` is a field, the timings are in extra."""
    return {k: stats.iterations if k == "iterations" else stats.extra[k] for k in names}


async def run_engine(net, tok, reqs: list, concurrency: int, max_num_seqs: int,
                     engine_options: dict | None = None, warm_pass: bool = False,
                     keep_tokens: bool = False, count_steps: bool = False) -> dict:
    """One fresh Engine(EngineConfig(max_num_seqs, **engine_options)) serving `reqs` with
    `concurrency` closed-loop clients -> a row of throughput, latency and engine counters.
    warm_pass: serve them once untimed first (graph captures, allocator growth); keep_tokens:
    row["tokens"] = {request id: token ids}; count_steps: the tokens the denoising steps ran."""
    from engine import Engine, EngineConfig

    engine = Engine(net, tok, net.cfg, EngineConfig(max_num_seqs=max_num_seqs,
                                                    **(engine_options or {})))
    await engine.start()
    counters = ("iterations", "busy_s", "cache_write_s", "worker_s")
    before = dict.fromkeys(counters, 0)
    static = engine.runner.static
    graphs_before = static.stats() if static is not None else None
    if warm_pass:
        await _serve_requests(engine, reqs, concurrency, tag="-warm")
        before = _counters(engine.stats(), counters)
        graphs_before = static.stats() if static is not None else None
    steps = _count_denoise(engine) if count_steps else None
    seconds, done = await _serve_requests(engine, reqs, concurrency)
    stats = engine.stats()
    await engine.shutdown()
    now = _counters(stats, counters)
    ex = {k: now[k] - before[k] for k in counters}
    it, tokens, latencies = ex["iterations"], sum(d[2] for d in done), [d[3] for d in done]
    row = {"concurrency": concurrency, "requests": len(reqs), "output_tokens": tokens,
           "seconds": seconds, "tokens_per_s": tokens / seconds,
           "mean_latency_s": statistics.mean(latencies),
           "p50_latency_s": statistics.median(latencies),
           "iterations": it, "mean_iteration_ms": 1000 * ex["busy_s"] / max(it, 1),
           "cache_write_share": ex["cache_write_s"] / max(ex["busy_s"], 1e-9),
           "capacity_token_steps_per_s": stats.capacity_token_steps_per_s,
           "worker_share": ex["worker_s"] / max(ex["busy_s"], 1e-9),
           "warm_pass": warm_pass}
    if static is not None:
        now = static.stats()
        # counters of the timed pass; "graphs" and "shapes" are totals
        row["cuda_graphs"] = {**now, **{k: now[k] - graphs_before[k]
                                        for k in ("captures", "replays", "uncaptured")}}
    if steps is not None:
        row["token_steps"] = sum(n for _, n in steps)
        row["tokens_per_row_step"] = row["token_steps"] / max(sum(r for r, _ in steps), 1)
    if keep_tokens:
        row["tokens"] = {rid: ids for rid, ids, _, _ in done}
    return row


def run_generate(net, reqs: list, keep_tokens: bool = False) -> dict:
    """model.sampling.generate over `reqs` one after another (no engine) -> a row."""
    from model.sampling import generate

    t0 = time.perf_counter()
    outputs = {r.request_id: generate(net, r.prompt_ids, r.params).tokens for r in reqs}
    seconds = time.perf_counter() - t0
    tokens = sum(len(t) for t in outputs.values())
    row = {"requests": len(reqs), "output_tokens": tokens, "seconds": seconds,
           "tokens_per_s": tokens / seconds}
    if keep_tokens:
        row["tokens"] = outputs
    return row
