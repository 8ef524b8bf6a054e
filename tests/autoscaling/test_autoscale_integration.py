"""The autoscaling policy on real Ray Serve: replicas rise under load and fall after it.

The app runs with the mock engine (each replica a sleep-based "accelerator" with its own
capacity, so replicas add capacity without using this machine's cores) and
autoscaling.policy:TokenBacklogPolicy with short delays. Clients keep a steady stream of long
completions going until the deployment has scaled up and the router has answered with fewer
steps, then stop; the test waits for the
replicas to come back down and the router back to best quality. Waits are bounded (they fail
with the replica history, they do not measure speed).
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

pytestmark = pytest.mark.slow

APP = "autoscale-test"
PREFIX = "/autoscale-test"
MAX_REPLICAS = 3
WAIT_S = 180  # bound on each wait (Ray on a loaded 2-core machine is slow, not wrong)


@pytest.fixture(scope="module")
def app(ray_serve):
    from ray import serve

    from benchmarks.mock_engine import MockEngineFactory
    from deployments.app import build_application

    # ~2000 token-steps/s per replica; a 128-token answer at 16 steps/block = 4 blocks x
    # 32 tokens x 16 steps = 2048 token-steps (1 s of one replica at best quality).
    mock = MockEngineFactory("tiny-coder", step_delay_s=0.005, token_cost_s=0.0005,
                             max_num_seqs=32)
    args = {
        "ladder": {"steps": [16, 8, 4, 2], "thresholds_s": [1.0, 2.0, 4.0], "up_hold_s": 1.0},
        "auth": {"api_keys_env": None},
        "server": {
            "num_cpus": 0.5,
            "autoscaling_config": {
                "min_replicas": 1,
                "initial_replicas": 1,
                "max_replicas": MAX_REPLICAS,
                "upscale_delay_s": 0.5,
                "downscale_delay_s": 3.0,
                "metrics_interval_s": 0.5,
                "look_back_period_s": 2.0,
                "policy": {
                    "policy_function": "autoscaling.policy:TokenBacklogPolicy",
                    "policy_kwargs": {"target_backlog_s": 1.0, "quality_debt_s": 2.0},
                },
            },
        },
    }
    serve.run(build_application(args, engine_factory=mock), name=APP, route_prefix=PREFIX)
    try:
        yield f"{ray_serve.http_url}{PREFIX}"
    finally:
        serve.delete(APP)


def running_replicas() -> int:
    from ray import serve

    dep = serve.status().applications[APP].deployments["ModelServer"]
    return int(dep.replica_states.get("RUNNING", 0))


async def wait_for(predicate, what: str, history: list) -> None:
    deadline = time.monotonic() + WAIT_S
    while True:
        n = await asyncio.to_thread(running_replicas)
        history.append((round(time.monotonic(), 1), n))
        if await predicate(n):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {WAIT_S}s; replicas over time: {history[-30:]}")
        await asyncio.sleep(1.0)


async def test_replicas_rise_under_load_and_fall_after(app):
    history: list = []
    statuses: list[int] = []
    steps_seen: list[int] = []
    async with httpx.AsyncClient(timeout=300) as client:
        model = (await client.get(f"{app}/v1/models")).json()["data"][0]["id"]
        assert await asyncio.to_thread(running_replicas) == 1
        stop = asyncio.Event()

        async def user(i: int) -> None:
            while not stop.is_set():
                r = await client.post(
                    f"{app}/v1/completions",
                    json={"model": model, "prompt": f"def f{i}(x):", "max_tokens": 128},
                )
                statuses.append(r.status_code)
                if r.status_code == 200:
                    steps_seen.append(r.json()["usage"]["denoising_steps_per_block"])

        users = [asyncio.create_task(user(i)) for i in range(16)]

        rungs: list[int] = []

        async def scaled_up_and_degraded(n: int) -> bool:
            rungs.append((await client.get(f"{app}/health")).json()["rung"])
            return n > 1 and any(s < 16 for s in steps_seen)

        try:
            await wait_for(scaled_up_and_degraded, "scale-up and fewer steps under load", history)
            peak = max(n for _, n in history)
        finally:
            stop.set()
            await asyncio.gather(*users)
        assert statuses and set(statuses) == {200}  # every request answered
        # The router traded steps for latency under the load (the rung, and the answers).
        assert max(rungs) > 0 and min(steps_seen) < 16

        async def back_to_min(n: int) -> bool:
            health = (await client.get(f"{app}/health")).json()
            return n == 1 and health["rung"] == 0

        await wait_for(back_to_min, "scale-down to 1 replica at best quality", history)
    assert 1 < peak <= MAX_REPLICAS
    # Quality is back: a new request gets the best steps.
    async with httpx.AsyncClient(timeout=60) as client:
        r = await client.post(
            f"{app}/v1/completions", json={"model": model, "prompt": "x = ", "max_tokens": 32}
        )
        assert r.status_code == 200 and r.json()["usage"]["denoising_steps_per_block"] == 16
