"""A multi-node Ray cluster on this machine with Serve's HTTP proxy on loopback, for the scenario
scripts that run in their own process (tests/faults/cluster_scenarios.py,
tests/deployments/tp_cluster_scenario.py), so their cluster never meets the session's Ray.

    results = {}
    with serve_cluster({"num_cpus": 4}, [{"num_cpus": 0, "num_gpus": 1}] * 2, "dllm-faults",
                       out_path, results) as (cluster, nodes, base_url):
        serve.run(app, name="x", route_prefix="/x")
        results["..."] = ...

`results` is written to out_path as JSON whatever happens inside (the tests read what got that
far), then Serve, Ray and every node are shut down.
"""

from __future__ import annotations

import contextlib
import json

from tests.conftest import free_port


@contextlib.contextmanager
def serve_cluster(head: dict, nodes: list[dict], namespace: str, out_path: str, results: dict):
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    port = free_port()
    cluster = Cluster(initialize_head=True, head_node_args=head)
    added = [cluster.add_node(**node) for node in nodes]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace=namespace, log_to_driver=False)
    try:
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        yield cluster, added, f"http://127.0.0.1:{port}"
    finally:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1, default=str)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
