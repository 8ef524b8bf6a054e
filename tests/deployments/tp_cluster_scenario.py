"""A tensor-parallel replica on a multi-node Ray cluster on this machine.

    python -m tests.deployments.tp_cluster_scenario results.json   # what test_tensor_parallel runs

Runs in its own process, so its `ray.cluster_utils.Cluster` never meets the test session's Ray.
The cluster: a head node (ingress, load board, HTTP proxy on 127.0.0.1, a tp=1 app on CPU) and a
worker node with two logical GPUs. The `tp2` app serves tiny-coder with tensor_parallel_size 2:
its one replica must get a placement group of two {"GPU": 1} bundles on the GPU node, rank 0 (the
replica) in bundle 0 and rank 1 (an actor) in bundle 1, each with its own GPU id. The logical
GPUs are not CUDA devices, so the ranks compute on the CPU over gloo: the same code path as NCCL
on real GPUs except the backend. Both apps answer the same prompts at temperature 0; the JSON
records what the clients saw, the placement groups and each rank's layout.
"""

from __future__ import annotations

import json
import logging
import sys
import time

import httpx

log = logging.getLogger("tp-cluster")

PROMPTS = ["def fibonacci(n):", "import os\n\ndef list_files(path):", "class Stack:"]
MAX_TOKENS = 48
CLIENT_TIMEOUT_S = 120.0
RECOVERY_WAIT_S = 180.0  # bound on waiting for Serve to replace a replica whose rank died
COLLECTIVE_TIMEOUT_S = 8.0  # the tp app's; heartbeats keep idle followers inside it
IDLE_S = 20.0  # an idle spell past that timeout


def app_args(tp: int, transport: str = "collective") -> dict:
    server = {"num_replicas": 1, "num_cpus": 1, "num_gpus": 1 if tp > 1 else 0,
              "health_check_period_s": 1}
    model = {"source": "tiny-coder", "tensor_parallel_size": tp, "torch_threads": 1}
    if tp > 1:  # a short collective timeout: idle periods longer than it must survive
        model.update(tensor_parallel_transport=transport,
                     tensor_parallel_timeout_s=COLLECTIVE_TIMEOUT_S)
    return {
        "model": model,
        "engine": {"max_num_seqs": 4},
        "ladder": {"steps": [8], "thresholds_s": []},
        "auth": {"api_keys_env": None},
        "limits": {"default_max_tokens": MAX_TOKENS},
        "server": server,
        "ingress": {"num_cpus": 0},
    }


def complete(url: str, prompt: str, stream: bool, **extra) -> dict:
    body = {"model": "tiny-coder", "prompt": prompt, "max_tokens": MAX_TOKENS,
            "temperature": 0, "denoising_steps": 8, "stream": stream, **extra}
    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as c:
        if not stream:
            r = c.post(f"{url}/v1/completions", json=body)
            data = r.json()
            text = data["choices"][0]["text"] if r.status_code == 200 else None
            return {"status": r.status_code, "text": text, "body": data}
        text, done, error = [], False, None
        with c.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                return {"status": r.status_code, "body": r.json(), "done": False,
                        "retry_after": r.headers.get("retry-after")}
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line.removeprefix("data: "))
                    if "error" in chunk:
                        error = chunk["error"]
                    elif chunk.get("choices"):
                        text.append(chunk["choices"][0].get("text") or "")
            return {"status": r.status_code, "text": "".join(text), "done": done, "error": error}


def kill_rank(base: str, server, pid: int) -> dict:
    """SIGKILL rank 1's process while a request streams: the request ends (an error or its
    answer), Serve replaces the replica (a fresh placement group and ranks), serving resumes."""
    import concurrent.futures
    import os
    import signal

    out: dict = {}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # long enough to be mid-stream at the kill: 512 tokens, EOS ignored
        inflight = pool.submit(complete_or_error, f"{base}/tp2", PROMPTS[1], max_tokens=512,
                               ignore_eos=True)
        time.sleep(1.0)
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        out["inflight"] = inflight.result()
    while time.monotonic() - t0 < RECOVERY_WAIT_S:
        r = complete_or_error(f"{base}/tp2", PROMPTS[0])
        if r["status"] == 200 and not r.get("error") and r.get("done"):
            out["recovered_after_s"] = round(time.monotonic() - t0, 1)
            out["after"] = r
            break
        out.setdefault("errors_while_down", []).append(
            {"status": r["status"], "error": r.get("error") or r.get("body"),
             "retry_after": r.get("retry_after")})
        time.sleep(1.0)
    out["layout_after"] = server.tp_layout.remote().result(timeout_s=60)
    return out


def complete_or_error(url: str, prompt: str, **extra) -> dict:
    try:
        return complete(url, prompt, stream=True, **extra)
    except (httpx.HTTPError, ValueError) as e:
        return {"status": 0, "error": f"{type(e).__name__}: {e}"}


def main(out_path: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import ray
    from ray import serve

    from deployments.app import build_app
    from tests.cluster_serve import serve_cluster

    results: dict = {}
    with serve_cluster({"num_cpus": 3, "num_gpus": 0}, [{"num_cpus": 2, "num_gpus": 2}],
                       "dllm-tp", out_path, results) as (_, (gpu_node,), base):
        results["gpu_node_id"] = gpu_node.node_id
        t0 = time.monotonic()
        serve.run(build_app(app_args(2)), name="tp2", route_prefix="/tp2")
        results["tp2_ready_s"] = round(time.monotonic() - t0, 1)
        serve.run(build_app(app_args(1)), name="tp1", route_prefix="/tp1")
        server = serve.get_deployment_handle("ModelServer", app_name="tp2")
        results["layout"] = server.tp_layout.remote().result(timeout_s=60)
        results["layout_tp1"] = serve.get_deployment_handle(
            "ModelServer", app_name="tp1").tp_layout.remote().result(timeout_s=60)
        results["placement_groups"] = [
            {"strategy": pg["strategy"], "state": pg["state"],
             "bundles": list(pg["bundles"].values()),
             "bundles_to_node_id": list(pg["bundles_to_node_id"].values())}
            for pg in ray.util.placement_group_table().values() if pg["state"] == "CREATED"]
        results["answers"] = {
            app: [complete(f"{base}/{app}", p, stream=i == 1) for i, p in enumerate(PROMPTS)]
            for app in ("tp2", "tp1")}
        # a bad request to the TP app: a clean 400, and the app still serves afterwards
        with httpx.Client(timeout=CLIENT_TIMEOUT_S) as c:
            bad = c.post(f"{base}/tp2/v1/completions",
                         json={"model": "tiny-coder", "prompt": "x", "max_tokens": -3})
        results["bad_request"] = {"status": bad.status_code, "body": bad.json()}
        results["after_bad"] = complete(f"{base}/tp2", PROMPTS[0], stream=False)
        status = serve.status().applications["tp2"].deployments["ModelServer"]
        results["tp2_replicas"] = status.replica_states
        results["rank_kill"] = kill_rank(base, server, results["layout"][1]["pid"])
        # idle past the collective timeout: the heartbeats keep the same group serving
        before = server.tp_layout.remote().result(timeout_s=60)
        time.sleep(IDLE_S)
        results["after_idle"] = complete(f"{base}/tp2", PROMPTS[0], stream=False)
        results["idle_layouts"] = [before, server.tp_layout.remote().result(timeout_s=60)]
        # the other transport: every spec as a Ray actor call
        serve.run(build_app(app_args(2, transport="ray")), name="tp2", route_prefix="/tp2")
        results["ray_transport"] = {
            "layout": server.tp_layout.remote().result(timeout_s=60),
            "answers": [complete(f"{base}/tp2", p, stream=i == 1)
                        for i, p in enumerate(PROMPTS)]}


if __name__ == "__main__":
    main(sys.argv[1])
