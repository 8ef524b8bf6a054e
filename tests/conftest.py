"""Shared fixtures. The one Ray instance of a pytest run lives here.

    def test_something(ray_serve):            # starts Ray + Serve once per session
        serve.run(app, name="mine", route_prefix="/mine")
        httpx.get(f"{ray_serve.http_url}/mine/...")
        serve.delete("mine")                  # leave the instance clean for the next test

`ray_serve` is session-scoped: the first test that asks for it pays the start-up (Ray takes
10-20 s on this 2-core machine), every later test reuses it, and it is shut down at the end of
the run. It starts Ray with a fixed small logical CPU count (RAY_TEST_NUM_CPUS, default 4: a
logical count, so replicas schedule without hogging the real cores), no dashboard, a fixed metrics
export port (for Prometheus tests), and Serve's HTTP proxy on 127.0.0.1 with a free port.

Tests must not call ray.init/ray.shutdown/serve.shutdown themselves; deploy applications under
their own name and route prefix, and delete them when done (or use a module-scoped fixture that
does). Tests that need a multi-node `ray.cluster_utils.Cluster` cannot share this instance: run
them in a separate pytest process (e.g. mark them and select with -m).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from benchmarks.harness import free_port  # noqa: F401 - the tests' free port, re-exported


@dataclass(frozen=True)
class RayServeInstance:
    address: str  # the Ray GCS address (ray.init(address=...) from a subprocess)
    http_host: str
    http_port: int
    metrics_port: int  # Ray's Prometheus metrics export port on this node

    @property
    def http_url(self) -> str:
        return f"http://{self.http_host}:{self.http_port}"


_START_FAILURE: list[BaseException] = []  # a failed start is not retried by every later test


def _start_ray(ray, metrics_port: int, attempts: int = 2):
    # Ray gives its raylet a hard-coded 30 s to register; on this shared 2-core machine under a
    # training job that is sometimes not enough, so one more try before giving up.
    for attempt in range(attempts):
        try:
            return ray.init(num_cpus=int(os.environ.get("RAY_TEST_NUM_CPUS", "4")),
                            include_dashboard=False, log_to_driver=False,
                            namespace="dllm-tests", _metrics_export_port=metrics_port,
                            # no idle workers started ahead of need: fewer processes on 2 cores
                            _system_config={"enable_worker_prestart": False,
                                            "prestart_worker_first_driver": False})
        except Exception:
            ray.shutdown()
            if attempt == attempts - 1:
                raise


@pytest.fixture(scope="session")
def ray_serve() -> RayServeInstance:
    ray = pytest.importorskip("ray")
    from ray import serve

    if _START_FAILURE:
        pytest.fail(f"Ray did not start earlier in this run: {_START_FAILURE[0]}")
    if ray.is_initialized():
        pytest.fail("Ray was already initialised: use the ray_serve fixture only")
    metrics_port = free_port()
    try:
        ctx = _start_ray(ray, metrics_port)
    except Exception as e:
        _START_FAILURE.append(e)
        raise
    http_port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    try:
        yield RayServeInstance(address=ctx.address_info["gcs_address"], http_host="127.0.0.1",
                               http_port=http_port, metrics_port=metrics_port)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
